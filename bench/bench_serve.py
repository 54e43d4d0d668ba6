"""``ilora serve`` under load: an async HTTP client against the real server process, on loopback only.

Measured side by side in one run, each phase with a bounded number of requests:

1. throughput and p50 / p95 / p99 latency at concurrency 1, 4, 16 and 64 (the server's defaults: max_batch 16,
   max_wait_ms 5), after 200 warm-up requests at concurrency 16;
2. the batching gain: throughput at concurrency 16 with max_batch 16 against a second server with max_batch 1
   (goal >= 1.5x on a CPU);
3. latency at concurrency 1 against an in-process ``Recommender.recommend`` call for the same users (goal <= 1.3x);
4. failed requests over every request of the first server (goal 0 over >= 2,000), and its resident memory at
   the end against after the first 200 requests (goal: within 5 %);
5. overload: a third server with max_queue 4 and max_batch 1, kept full by 8 clients, while a probe client sends
   one request at a time: how fast a 503 comes back (goal <= 100 ms).

Users are the run's dataset's validation histories, in order, cycled. Every request asks for top_k 10.

Usage:
    python bench/bench_serve.py --run RUN_DIR              # a trained run
    python bench/bench_serve.py --dataset lastfm           # prepares, encodes and trains a 2-step run if missing
    python bench/bench_serve.py --tiny                     # a tiny synthetic run: checks the benchmark end to end
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
from common import ROOT, ensure_dataset, write_result

CONCURRENCY = (1, 4, 16, 64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="a trained run directory or name")
    ap.add_argument("--dataset", default="lastfm", help="without --run: train a 2-step run on this dataset")
    ap.add_argument("--tiny", action="store_true", help="a tiny synthetic dataset, encoder, backbone and run")
    ap.add_argument("--requests", default="100,300,800,1000", help="requests at concurrency 1,4,16,64")
    ap.add_argument("--warmup", type=int, default=200, help="requests before the measured phases (concurrency 16)")
    ap.add_argument("--gain-requests", type=int, default=200, help="requests of the max_batch 1 server")
    ap.add_argument("--inprocess-users", type=int, default=30, help="users timed in-process and at concurrency 1")
    ap.add_argument("--probes", type=int, default=100, help="requests sent one at a time into the full queue")
    args = ap.parse_args()
    from ilora_cli.console import quiet_libraries

    quiet_libraries()
    requests = [int(x) for x in args.requests.split(",")]
    if len(requests) != len(CONCURRENCY):
        ap.error(f"--requests needs {len(CONCURRENCY)} counts")
    label = "tiny" if args.tiny else Path(args.run).name if args.run else args.dataset
    if not args.tiny:
        measure(args, requests, label, args.run or trained_run(args.dataset))
        return
    with tempfile.TemporaryDirectory(prefix="ilora-bench-serve-") as home:
        os.environ["ILORA_HOME"] = home
        measure(args, requests, label, tiny_run())


def measure(args: argparse.Namespace, requests: list[int], label: str, run: str) -> None:
    """Every phase against ``run``; prints the table and writes bench/results/serve-<label>.json."""
    histories = validation_histories(run)
    doc = {"run": str(run), "label": label, "threads": torch_threads(), "histories": len(histories)}
    print(f"run {run}: {len(histories)} validation histories, cycled", flush=True)

    n_in = min(args.inprocess_users, requests[0])
    inprocess = inprocess_latencies(run, histories[:n_in])
    doc["inprocess"] = {"users": n_in, "p50_ms": ms(statistics.median(inprocess)), "all_s": inprocess}

    with Server(run) as s:
        warm = asyncio.run(load(s, histories, args.warmup, 16))
        rss_warm = s.rss_mib()
        phases = {}
        for c, n in zip(CONCURRENCY, requests):
            phases[c] = asyncio.run(load(s, histories, n, c))
            print(row(f"c={c}", phases[c]), flush=True)
        rss_end = s.rss_mib()
        code = s.stop()
    doc["warmup"] = summary(warm)
    doc["concurrency"] = {str(c): summary(p) for c, p in phases.items()}
    total = args.warmup + sum(requests)
    failed = sum(p["failed"] for p in [warm, *phases.values()])
    doc["reliability"] = {
        "requests": total,
        "failed": failed,
        "rss_mib_after_warmup": rss_warm,
        "rss_mib_at_end": rss_end,
        "rss_growth": rss_end / rss_warm - 1,
        "exit_code_after_sigterm": code,
    }

    with Server(run, "max_batch=1") as s:
        single = asyncio.run(load(s, histories, args.gain_requests, 16))
        print(row("c=16, max_batch 1", single), flush=True)
        s.stop()
    doc["max_batch_1"] = summary(single)

    with Server(run, "max_batch=1", "max_queue=4", "max_users=4") as s:
        overloaded = asyncio.run(overload(s, histories, args.probes, 8))
        s.stop()
    doc["overload"] = overloaded

    c1 = phases[1]["latencies"][:n_in]
    doc["ratios"] = {
        "batching_gain_c16": phases[16]["throughput"] / single["throughput"],
        "goal_batching_gain": ">= 1.5 (CPU), >= 8 (GPU)",
        "latency_c1_over_inprocess": statistics.median(c1) / statistics.median(inprocess),
        "goal_latency_ratio": "<= 1.3",
        "goal_failed": "0 of >= 2000",
        "goal_rss_growth": "<= 0.05",
        "goal_503_ms": "<= 100",
    }
    report(doc, phases, single, n_in, c1)
    write_result(f"serve-{label}", doc)


# -- the run and its users ---------------------------------------------------------------------------------------


def tiny_run() -> str:
    """A synthetic dataset, a small SASRec, the tests' tiny Llama and a 2-step K = 4 run, in $ILORA_HOME."""
    from ilora_cli.data.prepare import PrepareConfig, prepare
    from ilora_cli.data.prepared import PreparedDataset
    from ilora_cli.encoders.train import EncodeConfig, encode
    from ilora_cli.training.loop import TrainConfig, train

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_llama, word_tokenizer

    home = Path(os.environ["ILORA_HOME"])
    prepare(PrepareConfig(dataset="syn", synthetic_users=200, synthetic_items=60, draws=1))
    encode(EncodeConfig(dataset="syn", hidden_size=16, epochs=3, quiet=True))
    tok = word_tokenizer(PreparedDataset.open("syn").titles)
    tiny_llama(len(tok), seed=0).save_pretrained(home / "tiny-backbone")
    tok.save_pretrained(home / "tiny-backbone")
    out = train(TrainConfig(dataset="syn", backbone=str(home / "tiny-backbone"), name="tiny", max_steps=2, quiet=True))
    return out["run_dir"]


def trained_run(dataset: str) -> str:
    from ilora_cli.home import run_dir
    from ilora_cli.training.loop import TrainConfig, train

    path = run_dir(f"bench-serve-{dataset}")
    if not (path / "manifest.json").is_file():
        if not ensure_dataset(dataset):
            sys.exit(f"dataset {dataset} is not available; pass --run or --tiny")
        train(TrainConfig(dataset=dataset, output=path, max_steps=2, overwrite=True, quiet=True))
    return str(path)


def validation_histories(run: str) -> list[list[int]]:
    from ilora_cli.data.prepared import PreparedDataset
    from ilora_cli.evaluation.evaluate import resolve_run
    from ilora_cli.training.run import read_info

    info = read_info(resolve_run(run))
    return [[int(i) for i in h] for h in PreparedDataset.open(info["dataset"]["name"]).split("val").histories()]


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def inprocess_latencies(run: str, histories: list[list[int]]) -> list[float]:
    """Seconds of ``Recommender.recommend`` per user, after loading and one warm-up call (the server's view)."""
    from ilora_cli.evaluation.recommend import RecommendConfig, Recommender

    rec = Recommender(RecommendConfig(run=run, user_history=Path("-"), top_k=10))
    rec.recommend(histories[0])
    out = []
    for h in histories:
        t = time.perf_counter()
        rec.recommend(h)
        out.append(time.perf_counter() - t)
    del rec
    gc.collect()
    return out


# -- the server process ------------------------------------------------------------------------------------------


class Server:
    """``ilora serve --json port=0`` in a subprocess, ready to answer."""

    def __init__(self, run: str, *settings: str):
        self.log = tempfile.NamedTemporaryFile("w+", prefix="ilora-serve-", suffix=".log")
        cmd = [sys.executable, "-m", "ilora_cli.cli", "serve", "--run", str(run), "--json", "port=0", *settings]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        if not line:
            self.fail("exited before listening")
        self.url = json.loads(line)["url"]

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.fail("exited while loading")
            if get(self.url + "/readyz")[0] == 200:
                return self
            time.sleep(0.2)
        self.fail("not ready after 600 s")

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log.close()

    def fail(self, what: str):
        self.log.seek(0)
        sys.exit(f"the server {what}:\n{self.log.read()[-4000:]}")

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024

    def metrics(self) -> dict[str, float]:
        text = get(self.url + "/metrics")[1]
        return {k: float(v) for k, v in re.findall(r"^(ilora_batch_size_(?:sum|count)) (\S+)$", text, re.M)}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class Connection:
    """One keep-alive HTTP/1.1 connection: a request, then its answer (the server always sends Content-Length).

    A plain asyncio client rather than httpx: with the tiny run at 64 connections, httpx's own CPU time, not the
    server's, set the pace on the 2-core machine (74 against 382 requests/s, same server)."""

    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port, self.netloc = parts.hostname, parts.port, parts.netloc
        self.reader = self.writer = None

    async def post(self, path: str, doc) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps(doc).encode()
        head = f"POST {path} HTTP/1.1\r\nHost: {self.netloc}\r\nContent-Type: application/json\r\n"
        self.writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        try:
            lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
            data = await self.reader.readexactly(int(headers["content-length"]))
        except (asyncio.IncompleteReadError, ConnectionError):
            self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            self.close()
        return int(lines[0].split()[1]), headers, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# -- load --------------------------------------------------------------------------------------------------------


async def load(server: Server, histories: list[list[int]], n: int, concurrency: int) -> dict:
    """``n`` requests from ``concurrency`` clients that each send their next request when answered. A request
    fails unless it is answered 200 with ``top_k`` recommendations."""
    before = server.metrics()
    records: list[tuple[int, float, int | str]] = []
    issued = 0

    async def client_loop():
        nonlocal issued
        conn = Connection(server.url)
        while issued < n:
            i, issued = issued, issued + 1
            body = {"history": histories[i % len(histories)], "top_k": 10}
            t = time.perf_counter()
            try:
                code, _, data = await conn.post("/v1/recommend", body)
                if code == 200 and not json.loads(data).get("recommendations"):
                    code = "empty answer"
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                code = type(exc).__name__
            records.append((i, time.perf_counter() - t, code))
        conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    after = server.metrics()
    records.sort()
    ok = [s for _, s, code in records if code == 200]
    batches = after["ilora_batch_size_count"] - before["ilora_batch_size_count"]
    return {
        "requests": n,
        "concurrency": concurrency,
        "failed": n - len(ok),
        "codes": dict(Counter(str(code) for _, _, code in records)),
        "seconds": wall,
        "throughput": len(ok) / wall,
        "latencies": [s for _, s, _ in records],
        "mean_batch": (after["ilora_batch_size_sum"] - before["ilora_batch_size_sum"]) / max(batches, 1),
    }


async def overload(server: Server, histories: list[list[int]], probes: int, background: int) -> dict:
    """``background`` clients keep a queue of 4 full while one probe client sends ``probes`` requests, one at a
    time: how fast each 503 comes back. A background client sends its next request as soon as it is answered, or
    50 ms after a 503 (so that the refusals themselves do not flood the server)."""
    stop, codes = asyncio.Event(), Counter()
    refused, probe_codes = [], Counter()

    async def post(conn: Connection, i: int):
        t = time.perf_counter()
        code, headers, _ = await conn.post("/v1/recommend", {"history": histories[i % len(histories)], "top_k": 10})
        if code == 503:
            assert int(headers["retry-after"]) >= 1
        return code, time.perf_counter() - t

    async def crowd(k: int):
        conn, i = Connection(server.url), k
        while not stop.is_set():
            code, _ = await post(conn, i)
            codes[code] += 1
            i += background
            if code == 503:
                await asyncio.sleep(0.05)
        conn.close()

    crowds = [asyncio.create_task(crowd(k)) for k in range(background)]
    await asyncio.sleep(1.0)  # the queue fills
    probe = Connection(server.url)
    for i in range(probes):
        code, seconds = await post(probe, i)
        probe_codes[code] += 1
        if code == 503:
            refused.append(seconds)
    probe.close()
    stop.set()
    await asyncio.gather(*crowds)
    return {
        "max_queue": 4,
        "max_batch": 1,
        "background_clients": background,
        "background_codes": {str(k): v for k, v in codes.items()},
        "probes": probes,
        "probe_codes": {str(k): v for k, v in probe_codes.items()},
        "refused_p50_ms": ms(float(np.percentile(refused, 50))) if refused else None,
        "refused_p99_ms": ms(float(np.percentile(refused, 99))) if refused else None,
        "refused_max_ms": ms(max(refused)) if refused else None,
    }


# -- report ------------------------------------------------------------------------------------------------------


def ms(seconds: float) -> float:
    return round(1000 * seconds, 1)


def summary(phase: dict) -> dict:
    lat = np.array(phase["latencies"])
    out = {k: v for k, v in phase.items() if k != "latencies"}
    for p in (50, 95, 99):
        out[f"p{p}_ms"] = ms(float(np.percentile(lat, p)))
    return out


def row(name: str, phase: dict) -> str:
    s = summary(phase)
    return (
        f"{name:<18} {s['requests']:>6} {s['failed']:>6} {s['throughput']:>10.2f} {s['p50_ms']:>9.1f} "
        f"{s['p95_ms']:>9.1f} {s['p99_ms']:>9.1f} {s['mean_batch']:>10.1f}"
    )


def report(doc: dict, phases: dict, single: dict, n_in: int, c1: list[float]) -> None:
    r, rel, ov = doc["ratios"], doc["reliability"], doc["overload"]
    print()
    print(f"run {doc['run']}, {doc['threads']} torch threads in each process, loopback HTTP")
    print(
        f"{'':<18} {'reqs':>6} {'failed':>6} {'req/s':>10} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'mean batch':>10}"
    )
    for c, phase in phases.items():
        print(row(f"concurrency {c}", phase))
    print(row("c=16, max_batch 1", single))
    print()
    print(
        f"batching gain      c=16: max_batch 16 {phases[16]['throughput']:.2f} req/s / max_batch 1 "
        f"{single['throughput']:.2f} req/s = {r['batching_gain_c16']:.2f}x (goal >= 1.5x on a CPU)"
    )
    print(
        f"latency, c=1       server median {ms(statistics.median(c1))} ms / in-process "
        f"{doc['inprocess']['p50_ms']} ms over the same {n_in} users = {r['latency_c1_over_inprocess']:.2f}x "
        "(goal <= 1.3x)"
    )
    print(
        f"reliability        {rel['failed']} failed of {rel['requests']} (goal 0 of >= 2,000); RSS "
        f"{rel['rss_mib_after_warmup']:.0f} MiB after the warm-up, {rel['rss_mib_at_end']:.0f} MiB at the end "
        f"({100 * rel['rss_growth']:+.1f} %, goal within 5 %); exit code after SIGTERM {rel['exit_code_after_sigterm']}"
    )
    print(
        f"overload           max_queue 4 kept full by {ov['background_clients']} clients; {ov['probes']} probes "
        f"{ov['probe_codes']}: a 503 in p50 {ov['refused_p50_ms']} ms, p99 {ov['refused_p99_ms']} ms, max "
        f"{ov['refused_max_ms']} ms (goal <= 100 ms)"
    )


if __name__ == "__main__":
    main()
