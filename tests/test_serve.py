"""ilora serve: the real server in a subprocess on a free local port, over a tiny run, with real HTTP requests.

Answers equal the CLI's and do not change with batching; every bad-input class is one sentence and leaves the
other requests of its batch alone; the API key; back-pressure; the per-request timeout; SIGTERM drains a
request in flight and exits 0. The batcher's own rules are tested without a model at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from ilora_cli.errors import UserError  # noqa: E402

from conftest import run_cli  # noqa: E402

RUN = "serve-k4"
KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def home(tiny_world):
    """The tiny world with a K = 4 run trained for two steps."""
    from ilora_cli.training.loop import TrainConfig, train

    old = os.environ.get("ILORA_HOME")
    os.environ["ILORA_HOME"] = str(tiny_world)
    try:
        if not (tiny_world / "runs" / RUN / "manifest.json").is_file():
            train(
                TrainConfig(
                    dataset="cyc",
                    backbone=str(tiny_world / "tiny-backbone"),
                    name=RUN,
                    experts=4,
                    max_steps=2,
                    batch_size=4,
                    candidates=6,
                    quiet=True,
                )
            )
    finally:
        if old is None:
            os.environ.pop("ILORA_HOME", None)
        else:
            os.environ["ILORA_HOME"] = old
    return tiny_world


class Server:
    """``ilora serve --json port=0 ...`` as a subprocess: its address, its process and its stderr."""

    def __init__(self, home: Path, *settings: str, env: dict[str, str] | None = None, run: str = RUN):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ilora_cli.cli", "serve", "--run", run, "--json", "port=0", *settings],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "ILORA_HOME": str(home), "TOKENIZERS_PARALLELISM": "false", **(env or {})},
        )
        self._stderr: list[str] = []
        threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True).start()
        line = self.proc.stdout.readline()  # the address, once it listens (empty if it exited)
        if not line:
            self.proc.wait(timeout=60)
            self.address = None
            return
        self.address = json.loads(line)
        self.url = self.address["url"]

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.stderr
            if httpx.get(self.url + "/readyz").status_code == 200:
                return
            time.sleep(0.05)
        raise AssertionError(f"not ready after {timeout} s: {self.stderr}")

    def metric(self, name: str, headers: dict[str, str] | None = None) -> float:
        text = httpx.get(self.url + "/metrics", headers=headers).text
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        assert found, name
        return float(found.group(1))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(home):
    """A server that batches up to 8 users for up to 0.2 s, needs the API key and logs every request."""
    settings = ("max_batch=8", "max_wait_ms=200", "max_history_items=50", "access_log=true")
    s = Server(home, *settings, env={"ILORA_API_KEY": KEY})
    s.wait_ready()
    yield s
    assert s.stop() == 0, s.stderr
    assert "Traceback" not in s.stderr, s.stderr
    assert '"GET /readyz HTTP/1.1" 200' in s.stderr
    assert s.proc.stdout.read() == ""  # stdout holds the address alone; logs go to stderr


async def _post_all(url: str, bodies: list, path: str = "/v1/recommend") -> list:
    """All bodies at once, each on its own connection (so that they can meet in one batch)."""
    headers = {**AUTH, "Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=60, headers=headers, limits=httpx.Limits(max_connections=64)) as client:
        return await asyncio.gather(
            *(client.post(url + path, content=b if isinstance(b, (bytes, str)) else json.dumps(b)) for b in bodies)
        )


def _same(answer: dict, expected: dict) -> None:
    """Equal recommendations (ids in order, scores to float precision), gate, history and notes."""
    assert [r["item_id"] for r in answer["recommendations"]] == [r["item_id"] for r in expected["recommendations"]]
    for got, want in zip(answer["recommendations"], expected["recommendations"]):
        for k in ("score", "llm_score", "encoder_score"):
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5)
    assert answer["gate"] == pytest.approx(expected["gate"], rel=1e-4, abs=1e-6)
    assert {k: answer[k] for k in ("history", "ranking", "fusion", "candidates", "notes")} == {
        k: expected[k] for k in ("history", "ranking", "fusion", "candidates", "notes")
    }


HISTORIES = [
    [0, 1, 2],
    ["Item D3", 4],
    [7],
    [9, 10, 11, 12, 13],
    ["item m12", {"item_id": 20}],
    [25, 26, 27, 28],
    [5, 6],
]
HISTORIES.append(list(range(12)))  # longer than the run reads: a note, and the most recent 10


def test_answers_equal_the_cli_and_do_not_change_when_batched(server, home, tmp_path):
    users = tmp_path / "users.jsonl"
    users.write_text("".join(json.dumps(h) + "\n" for h in HISTORIES))
    r = run_cli("recommend", "--run", RUN, "--user-history", str(users), "--top-k", "5", home=home)
    assert r.returncode == 0, r.stderr
    cli = [json.loads(line) for line in r.stdout.splitlines()]

    # all users at once, twice over, with bad requests among them: batched together, each with their own gate
    before = server.metric("ilora_batch_size_count", AUTH)
    bad = [{"history": ["No Such Item"]}, b'{"history": [1, 2', {"history": [3], "top_k": "many"}, {"history": []}]
    bodies = [{"history": h, "top_k": 5} for h in HISTORIES] * 2 + bad
    responses = asyncio.run(_post_all(server.url, bodies))
    good, errors = responses[: 2 * len(HISTORIES)], responses[2 * len(HISTORIES) :]
    for i, resp in enumerate(good):
        assert resp.status_code == 200, resp.text
        _same(resp.json(), cli[i % len(HISTORIES)])
    assert [e.status_code for e in errors] == [422] * 4
    batches = server.metric("ilora_batch_size_count", AUTH) - before
    assert batches < len(good)  # some users shared a forward
    assert server.metric('ilora_batch_size_bucket{le="1.0"}', AUTH) < server.metric("ilora_batch_size_count", AUTH)

    # one at a time: the same answers as in a batch
    for h, expected in zip(HISTORIES[:3], cli):
        resp = httpx.post(server.url + "/v1/recommend", json={"history": h, "top_k": 5}, headers=AUTH)
        _same(resp.json(), expected)
    assert cli[-1]["notes"] and len(cli[-1]["history"]) == 10

    # given candidates, per user, in one batch and alone
    given = [
        {"history": [0, 1], "candidates": [5, "Item G6", 7], "top_k": 2},
        {"history": [3], "candidates": [8, 2, 9]},
    ]
    together = asyncio.run(_post_all(server.url, given))
    for body, resp in zip(given, together):
        alone = httpx.post(server.url + "/v1/recommend", json=body, headers=AUTH).json()
        _same(resp.json(), alone)
        assert alone["candidates"] == "given" and len(alone["recommendations"]) == body.get("top_k", 3)
    assert {r["item_id"] for r in together[1].json()["recommendations"]} == {8, 2, 9}

    # the batch endpoint: answers in order, a bad user answered in place
    resp = httpx.post(
        server.url + "/v1/recommend/batch",
        json={
            "users": [{"history": HISTORIES[0], "top_k": 5}, {"history": [999]}, {"history": HISTORIES[1], "top_k": 5}]
        },
        headers=AUTH,
    )
    results = resp.json()["results"]
    assert resp.status_code == 200 and len(results) == 3
    _same(results[0], cli[0])
    _same(results[2], cli[1])
    assert results[1] == {"error": "users[1]: Unknown item id 999: ids run from 0 to 29."}


@pytest.mark.parametrize(
    "body,status,sentence",
    [
        ({"history": ["Itme B1"]}, 422, "Unknown title 'Itme B1'; closest: 'Item B1'"),
        ({"history": [30]}, 422, "Unknown item id 30: ids run from 0 to 29."),
        ({"history": [-1]}, 422, "Unknown item id -1"),
        ({"history": []}, 422, "The history is empty: give at least one item."),
        ({"history": "Item B1"}, 422, "history: input should be a valid list; got 'Item B1'."),
        ({"history": [True]}, 422, "The history entry true is neither an item id nor a title."),
        ({"history": [{"name": "x"}]}, 422, 'The history entry {"name": "x"} has neither an item_id nor a title.'),
        ({"history": [1], "top_k": "3"}, 422, "top_k: input should be a valid integer; got '3'."),
        ({"history": [1], "top_k": 0}, 422, "top_k must be between 1 and 100; got 0."),
        ({"history": [1], "top_k": 101}, 422, "top_k must be between 1 and 100; got 101."),
        ({"history": [1], "topk": 3}, 422, "Unknown field topk in the request; the fields are history, top_k"),
        ({"top_k": 3}, 422, "The request lacks the field history."),
        ({"users": [{"history": [1]}]}, 422, "Unknown field users in the request; the fields are history, top_k"),
        ({"history": list(range(51))}, 422, "The history has 51 items; this server accepts at most 50."),
        ({"history": [1], "candidates": [2, 2]}, 422, "candidates lists 'Item C2' (id 2) twice."),
        ({"history": [1], "candidates": []}, 422, "candidates lists no items"),
        ({"history": [1], "candidates": [None]}, 422, "The candidate null is neither an item id nor a title."),
        ({"history": [1], "dataset": "ml-100k"}, 422, "refers to the dataset 'ml-100k', but the run was trained on"),
        ({"history": ["x" * 1001]}, 422, "A title of 1,001 characters is longer than any this server looks up (1000)."),
        ({"history": [1], "candidates": [{"title": "y" * 5000}]}, 422, "A title of 5,000 characters is longer"),
        (b"[" * 100000 + b"]" * 100000, 422, "The request body is nested more than 32 levels deep."),
        (b'{"history": [1,', 422, "The request body is not valid JSON"),
        (b"", 422, "The request needs a JSON body"),
        (b"[1, 2]", 422, "The request body must be a JSON object"),
        (json.dumps({"history": ["x" * 1100000]}).encode(), 413, "The request body is larger than 1048576 bytes."),
    ],
)
def test_bad_input_is_one_sentence(server, body, status, sentence):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.post(
        server.url + "/v1/recommend", content=content, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert resp.status_code == status, resp.text
    assert set(resp.json()) == {"error"} and sentence in resp.json()["error"]
    assert "\n" not in resp.json()["error"] and "Traceback" not in resp.text


def test_batch_endpoint_limits_and_wrong_paths(server):
    post = lambda body: httpx.post(server.url + "/v1/recommend/batch", json=body, headers=AUTH)  # noqa: E731
    assert post({"users": []}).json() == {"error": "users lists nobody; give at least one user."}
    resp = post({"users": [{"history": [1]}] * 65})
    assert resp.status_code == 422 and "at most 64 per request" in resp.json()["error"]
    resp = post({"users": [{"history": [1], "top_k": "x"}]})  # a malformed user is answered in their place
    assert resp.status_code == 200 and resp.json()["results"][0]["error"].startswith("users[0].top_k: input should")
    resp = post({"user": []})
    assert (
        resp.status_code == 422 and resp.json()["error"] == "Unknown field user in the request; the fields are users."
    )
    resp = httpx.get(server.url + "/v1/nothing", headers=AUTH)
    assert resp.status_code == 404 and resp.json()["error"].startswith("There is no /v1/nothing here")
    assert httpx.get(server.url + "/v1/recommend", headers=AUTH).status_code == 405


def test_api_key_run_metrics_and_openapi(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        resp = httpx.post(server.url + "/v1/recommend", json={"history": [1]}, headers=headers)
        assert resp.status_code == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
        assert "Authorization: Bearer KEY" in resp.json()["error"]
        assert httpx.get(server.url + "/metrics", headers=headers).status_code == 401
        assert httpx.get(server.url + "/v1/run", headers=headers).status_code == 401
    # probes and the API description need no key; an unauthenticated request learns nothing about its body
    assert httpx.get(server.url + "/healthz").json() == {"status": "alive"}
    assert httpx.get(server.url + "/readyz").json() == {"status": "ready"}
    assert httpx.post(server.url + "/v1/recommend", content=b"{", headers={}).status_code == 401

    info = httpx.get(server.url + "/v1/run", headers=AUTH).json()
    assert info["run"] == RUN and info["experts"] == 4 and info["gate"] == "user" and info["ready"] is True
    assert set(info["fusion"]) == {"llm", "encoder"} and info["dataset"]["name"] == "cyc"
    assert info["training"]["steps"] == 2 and info["serving"]["max_batch"] == 8

    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    for name in (
        "ilora_requests_total",
        "ilora_request_errors_total",
        "ilora_request_seconds_bucket",
        "ilora_batch_size",
    ):
        assert name in text
    assert re.search(r'^ilora_requests_total\{code="401",endpoint="/v1/recommend"\} [1-9]', text, re.M)
    assert re.search(r"^ilora_queue_length 0\.0$", text, re.M)

    spec = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/recommend", "/v1/recommend/batch", "/v1/run", "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    assert "bearer" in json.dumps(spec["components"]["securitySchemes"]).lower()
    assert httpx.get(server.url + "/docs").status_code == 200


def test_back_pressure_and_sigterm_drains_a_request_in_flight(home):
    """A batch waits 2 s for company and 2 users may wait: a third gets 503 at once; SIGTERM while a request
    waits lets it finish, refuses new connections and exits 0."""
    s = Server(home, "max_wait_ms=2000", "max_queue=2", "max_users=2", "request_timeout_s=30")
    try:
        s.wait_ready()

        async def scenario():
            async with httpx.AsyncClient(timeout=30) as client:
                waiting = [
                    asyncio.create_task(client.post(s.url + "/v1/recommend", json={"history": [i]})) for i in (1, 2)
                ]
                while s.metric("ilora_queue_length") < 2:
                    await asyncio.sleep(0.02)
                start = time.perf_counter()
                refused = await client.post(s.url + "/v1/recommend", json={"history": [3]})
                refused_after = time.perf_counter() - start
                batch = await client.post(s.url + "/v1/recommend/batch", json={"users": [{"history": [4]}]})
                return refused, refused_after, batch, await asyncio.gather(*waiting)

        refused, refused_after, batch, answered = asyncio.run(scenario())
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"].startswith("The server is busy (2 users waiting); retry in")
        assert batch.status_code == 503
        assert refused_after < 1.0  # answered while the others still waited for their batch
        assert [a.status_code for a in answered] == [200, 200]
        assert [a.json()["history"][0]["item_id"] for a in answered] == [1, 2]

        # SIGTERM while a request waits in the batcher: it is answered, then the process exits 0
        async def drain():
            async with httpx.AsyncClient(timeout=30) as client:
                pending = asyncio.create_task(client.post(s.url + "/v1/recommend", json={"history": [5]}))
                while s.metric("ilora_queue_length") < 1:
                    await asyncio.sleep(0.02)
                s.proc.send_signal(signal.SIGTERM)
                while True:  # until the server stops accepting connections
                    try:
                        await client.get(s.url + "/healthz")
                    except httpx.ConnectError:
                        break
                    await asyncio.sleep(0.02)
                assert not pending.done()  # it was still waiting for its batch when the server stopped listening
                return await pending

        resp = asyncio.run(drain())
        assert resp.status_code == 200 and resp.json()["history"] == [{"item_id": 5, "title": "Item F5"}]
        assert s.proc.wait(timeout=60) == 0
        assert "Stopped." in s.stderr and "Traceback" not in s.stderr
    finally:
        s.stop()


@pytest.mark.slow
def test_the_item_head_is_served_alike(home, monkeypatch):
    """A run with the item head ranks the whole catalogue: batched answers equal those of the Python API (one
    user at a time), and per-user candidates work as with the title head."""
    from ilora_cli import recommend
    from ilora_cli.training.loop import TrainConfig, train

    monkeypatch.setenv("ILORA_HOME", str(home))
    backbone = str(home / "tiny-backbone")
    if not (home / "runs" / "serve-item" / "manifest.json").is_file():
        train(TrainConfig(dataset="cyc", backbone=backbone, name="serve-item", head="item", max_steps=2, quiet=True))
    expected = [recommend("serve-item", [h], top_k=7)[0] for h in HISTORIES]
    s = Server(home, "max_batch=8", "max_wait_ms=200", run="serve-item")
    try:
        s.wait_ready()
        answers = asyncio.run(_post_all(s.url, [{"history": h, "top_k": 7} for h in HISTORIES]))
        for resp, want in zip(answers, expected):
            assert resp.status_code == 200, resp.text
            assert resp.json()["candidates"] == "whole catalogue"
            _same(resp.json(), want)
        given = [{"history": [1, 2], "candidates": [3, 4, 5]}, {"history": [8], "candidates": [0, 29, 15]}]
        together = asyncio.run(_post_all(s.url, given))
        for body, resp in zip(given, together):
            alone = httpx.post(s.url + "/v1/recommend", json=body).json()
            _same(resp.json(), alone)
            assert {r["item_id"] for r in alone["recommendations"]} == set(body["candidates"])
        assert s.metric('ilora_batch_size_bucket{le="1.0"}') < s.metric("ilora_batch_size_count")
    finally:
        code = s.stop()
    assert code == 0, s.stderr


def test_the_title_head_is_served_alike(home, monkeypatch):
    """A run with the title head ranks the encoder's top-N of the catalogue by the LLM's title scores: batched
    answers equal those of the Python API (one user at a time), and per-user candidates work as with the item
    head. (The module's run has the default head, the item head.)"""
    from ilora_cli import recommend
    from ilora_cli.training.loop import TrainConfig, train

    monkeypatch.setenv("ILORA_HOME", str(home))
    if not (home / "runs" / "serve-title" / "manifest.json").is_file():
        settings = dict(experts=2, max_steps=2, batch_size=4, candidates=6, quiet=True)
        train(
            TrainConfig(
                dataset="cyc", backbone=str(home / "tiny-backbone"), name="serve-title", head="title", **settings
            )
        )
    expected = [recommend("serve-title", [h], top_k=5)[0] for h in HISTORIES]
    s = Server(home, "max_batch=8", "max_wait_ms=200", run="serve-title")
    try:
        s.wait_ready()
        assert httpx.get(s.url + "/v1/run").json()["head"] == "title"
        answers = asyncio.run(_post_all(s.url, [{"history": h, "top_k": 5} for h in HISTORIES]))
        for resp, want in zip(answers, expected):
            assert resp.status_code == 200, resp.text
            assert resp.json()["candidates"] == "encoder top-20"
            _same(resp.json(), want)
        given = [{"history": [1, 2], "candidates": [3, 4, 5]}, {"history": [8], "candidates": [0, 29, 15]}]
        together = asyncio.run(_post_all(s.url, given))
        for body, resp in zip(given, together):
            alone = httpx.post(s.url + "/v1/recommend", json=body).json()
            _same(resp.json(), alone)
            assert alone["candidates"] == "given"
            assert {r["item_id"] for r in alone["recommendations"]} == set(body["candidates"])
        assert s.metric('ilora_batch_size_bucket{le="1.0"}') < s.metric("ilora_batch_size_count")
    finally:
        code = s.stop()
    assert code == 0, s.stderr
    assert "Traceback" not in s.stderr


def test_loading_then_timeout(home):
    """503 while loading (the server listens at once); 504 past request_timeout_s, and the request leaves the
    queue; a second server on the same port is one sentence and exit code 2."""
    s = Server(home, "max_wait_ms=3000", "request_timeout_s=0.3")
    try:
        early = httpx.get(s.url + "/readyz")
        assert early.status_code == 503 and early.json() == {"status": "loading"}  # loading takes seconds
        resp = httpx.post(s.url + "/v1/recommend", json={"history": [1]})
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "2"
        assert "still loading" in resp.json()["error"]
        assert httpx.get(s.url + "/healthz").status_code == 200
        s.wait_ready()
        start = time.perf_counter()
        resp = httpx.post(s.url + "/v1/recommend", json={"history": [1]})
        assert resp.status_code == 504
        assert resp.json()["error"] == "The request was not answered within 0.3 s; retry later."
        assert time.perf_counter() - start < 2.5
        assert s.metric("ilora_queue_length") == 0  # the request that gave up left the queue

        taken = s.address["port"]
        r = run_cli("serve", "--run", RUN, "--port", str(taken), home=home, timeout=120)
        assert r.returncode == 2 and f"Cannot listen on 127.0.0.1:{taken}: address already in use." in r.stderr
    finally:
        code = s.stop()
    assert code == 0, s.stderr


def test_startup_errors(home, tmp_path, monkeypatch):
    """A missing run, bad settings, a run that fails to load and a missing extra: one sentence, exit code 2."""
    from ilora_cli.config import resolve
    from ilora_cli.serving.config import ServeConfig
    from ilora_cli.serving.server import serve

    monkeypatch.setenv("ILORA_HOME", str(home))
    import ilora_cli

    with pytest.raises(UserError, match="no-such-run is not a finished iLoRA run"):
        ilora_cli.serve(run="no-such-run")  # the Python API, as on the command line
    with pytest.raises(UserError, match=re.escape("max_users (300) must not exceed max_queue (256).")):
        resolve(ServeConfig, None, {"run": RUN}, ["max_users=300"])
    with pytest.raises(UserError, match=re.escape("Cannot listen on 203.0.113.1:8000: cannot assign requested")):
        serve(ServeConfig(run=RUN, host="203.0.113.1"))  # an address of no interface here (TEST-NET-3)

    # the run is checked when it loads, after the server listens: the server then stops with exit code 2
    damaged = tmp_path / "damaged"
    shutil.copytree(home / "runs" / RUN, damaged)
    (damaged / "gate.safetensors").write_bytes(b"not a tensor file")
    d = Server(home, run=str(damaged))
    assert d.proc.wait(timeout=120) == 2
    assert "error:" in d.stderr and "gate.safetensors" in d.stderr and "Traceback" not in d.stderr

    code = "import sys; sys.modules['fastapi'] = None; sys.argv = ['ilora', 'serve', '--run', 'x']; "
    code += "from ilora_cli.cli import main; main()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        "error: ilora serve needs the serve extra (fastapi is not installed): pip install 'ilora[serve]'."
    )


# -- the batcher alone ------------------------------------------------------------------------------------------


def _batcher(log, **kwargs):
    from ilora_cli.serving.batching import Batcher

    def score(jobs):
        log.append([j.payload for j in jobs])
        return [f"answer {j.payload}" for j in jobs]

    return Batcher(score, **{"max_batch": 3, "max_wait_s": 0.05, "max_queue": 5, **kwargs})


def test_batcher_groups_by_key_up_to_max_batch_and_keeps_order():
    from ilora_cli.serving.batching import Job

    log = []

    async def main():
        b = _batcher(log)
        b.start()
        jobs = [Job(i, key="a" if i % 3 else "b") for i in range(5)]
        answers = await asyncio.gather(*b.submit(jobs))
        await b.stop()
        return answers

    assert asyncio.run(main()) == [f"answer {i}" for i in range(5)]
    # the first 3 to arrive form a batch, split by key (groups in order of their first job); then the other 2
    assert log == [[0], [1, 2], [3], [4]]


def test_batcher_refuses_what_does_not_fit_at_once_and_forgets_abandoned_jobs():
    from ilora_cli.serving.batching import Job, QueueFull

    log = []

    async def main():
        b = _batcher(log, max_wait_s=10.0)  # nothing is scored before the test says so
        b.start()
        first = b.submit([Job(1, "k"), Job(2, "k")])
        with pytest.raises(QueueFull) as refused:
            b.submit([Job(3, "k")] * 4)  # all or nothing: 2 + 4 > 5
        assert refused.value.retry_after >= 1 and b.waiting == 2
        gone = [Job(4, "k")]
        b.submit(gone)
        b.abandon(gone)
        assert b.waiting == 2 and gone[0].future.cancelled()
        b.submit([Job(5, "k")])  # a third user fills the batch: scored at once
        answers = await asyncio.gather(*first)
        await b.stop()
        return answers

    assert asyncio.run(main()) == ["answer 1", "answer 2"]
    assert log == [[1, 2, 5]]


def test_batcher_delivers_a_failed_batch_to_its_own_jobs_only():
    from ilora_cli.serving.batching import Batcher, Job

    def score(jobs):
        if any(j.payload == "bad" for j in jobs):
            raise UserError("bad batch")
        return [j.payload for j in jobs]

    async def main():
        b = Batcher(score, max_batch=4, max_wait_s=0.05, max_queue=8)
        b.start()
        futures = b.submit([Job("bad", "x"), Job("good", "y")])
        results = await asyncio.gather(*futures, return_exceptions=True)
        await b.stop()
        return results

    bad, good = asyncio.run(main())
    assert isinstance(bad, UserError) and good == "good"
