"""One side of ``bench_throughput.py``: the ``ilora_cli`` found on PYTHONPATH (one revision of the code), driven
one command per line on stdin, one JSON answer per line on stdout. Everything the library prints goes to stderr.

Commands (JSON objects with an ``op``):

- ``setup``: build a real ``Trainer`` for ``kind`` (``title`` or ``item``) from ``config`` (TrainConfig fields).
- ``steps``: ``n`` optimisation steps of ``kind``; their seconds and losses.
- ``eval_setup``: the first ``rows`` validation rows (candidate draw 0) for score-mode evaluation with the title
  run's model, as ``ilora eval`` scores them (``evaluation.llm.score_candidates``, batches of ``batch_size``).
- ``eval``: score those rows once; the seconds and the scores.
- ``profile``: ``torch.profiler`` over ``n`` steps of ``kind`` (or one evaluation): the ``top`` operators by
  their own CPU time, per step.
- ``memory``: the peak resident memory of this process so far (VmHWM), in MiB.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

STATE: dict = {}


def setup(cmd: dict) -> dict:
    from ilora_cli.training.loop import TrainConfig, Trainer

    t0 = time.perf_counter()
    trainer = Trainer(TrainConfig(**cmd["config"]))
    trainer.model.train()
    STATE[cmd["kind"]] = trainer
    return {"seconds": time.perf_counter() - t0}


def steps(cmd: dict) -> dict:
    trainer = STATE[cmd["kind"]]
    seconds, losses = [], []
    for _ in range(cmd["n"]):
        t0 = time.perf_counter()
        loss, _ = trainer.step()
        seconds.append(time.perf_counter() - t0)
        losses.append(loss)
    return {"seconds": seconds, "losses": losses}


def eval_setup(cmd: dict) -> dict:
    from ilora_cli.training.run import LoadedRun

    trainer = STATE["title"]
    config, model, dataset = trainer.config, trainer.unwrapped, trainer.dataset
    split = dataset.split("val")
    rows = min(cmd["rows"], len(split))
    info = {
        "experts": {"head": config.head},
        "dataset": {"pad_id": dataset.pad_id, "max_history": dataset.max_history},
        "normalize": config.normalize,
        "fusion": None,
    }
    run = LoadedRun(model, trainer.builder.tokenizer, trainer.builder, info, dataset.titles)
    STATE["eval"] = (run, split.histories()[:rows], split.candidates[:rows, 0], cmd["batch_size"])
    return {"rows": rows}


def evaluate(cmd: dict) -> dict:
    from ilora_cli.evaluation.llm import score_candidates

    run, histories, candidates, batch_size = STATE["eval"]
    run.model.eval()
    try:
        t0 = time.perf_counter()
        scores, _ = score_candidates(run, histories, candidates, batch_size, run.normalize)
        seconds = time.perf_counter() - t0
    finally:
        run.model.train()
    return {"seconds": seconds, "rows": len(histories), "scores": scores.tolist()}


def profile(cmd: dict) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    kind, n = cmd["kind"], cmd["n"]
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        evaluate({}) if kind == "eval" else steps({"kind": kind, "n": n})
        seconds = time.perf_counter() - t0
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    top = [
        {
            "op": e.key,
            "self_seconds_per_step": e.self_cpu_time_total / 1e6 / n,
            "share": e.self_cpu_time_total / total,
            "calls_per_step": e.count / n,
        }
        for e in events[: cmd["top"]]
    ]
    return {"seconds_per_step": seconds / n, "top": top}


def memory(cmd: dict) -> dict:
    with open("/proc/self/status", encoding="utf-8") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    return {"peak_rss_mib": kib / 1024}


OPS = {"setup": setup, "steps": steps, "eval_setup": eval_setup, "eval": evaluate, "profile": profile, "memory": memory}


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # the library's prints and progress go to stderr; stdout carries the answers only
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            result = OPS[cmd["op"]](cmd)
        except Exception as exc:  # a revision without the feature: reported, the others go on
            result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        answers.write(json.dumps(result) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
