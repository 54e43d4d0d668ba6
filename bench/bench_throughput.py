"""Training and evaluation throughput, this checkout against earlier revisions of the code, side by side in one run.

    python bench/bench_throughput.py [--before issue=672337d~1 base=bc25bca] [--repeats 3] [--profile]
    python bench/bench_throughput.py --default-backbone 2 --before base=bc25bca     # the 135M default backbone

Each revision runs in a worker process of its own (``throughput_worker.py`` with that revision's ``src`` on
PYTHONPATH; earlier revisions are read with ``git archive``), and the workers take turns: every measurement
is made on every revision in turn, in alternating order, so that the load of a shared machine falls on all of
them alike. Measured, on LastFM (the llara-format data in ../shared, prepared into $ILORA_HOME when missing):

- title scoring: training samples/s of ``ilora train`` steps (batch 64, ``fusion=none``, otherwise defaults);
- the item head: the same with ``head=item``;
- score-mode evaluation: validation rows/s through ``evaluation.llm.score_candidates`` (batch 8, as ``ilora
  eval``), with the title run's model;

all on a tiny backbone built here: a 2-layer Llama of hidden size 64 with random weights and the default
backbone's tokenizer (49,152 tokens), so that the vocabulary-wide work weighs as it does on a real model while
the transformer costs little. The encoder is a one-epoch SASRec (``lastfm-sasrec-bench``; its quality does not
matter for speed). The first turn is a warm-up; within a turn the first step is left out, so that a batch built
ahead while another revision ran is not counted. With ``--default-backbone N`` the same is done for the
default backbone (SmolLM2-135M, fp32, batch 8, defaults): N turns of one counted step each.

It also checks that the revisions compute the same thing: the scores of the untrained models on the evaluation
rows, and the losses of every training step (same seed, same batches), as the largest differences.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, ensure_dataset, write_result

ENCODER = "lastfm-sasrec-bench"
DEFAULT_BEFORE = ["issue=672337d~1", "base=bc25bca"]  # the code the issue measured; the code this work started from


def tiny_backbone(directory: Path) -> Path:
    """A 2-layer Llama of hidden 64 with random weights (seed 0) and the default backbone's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ilora_cli.llm.backbone import default_backbone_dir

    tokenizer = AutoTokenizer.from_pretrained(default_backbone_dir())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def bench_encoder() -> None:
    """A one-epoch SASRec fitted on every row (holdout none), so that every revision trains on the same rows."""
    from ilora_cli.encoders.train import EncodeConfig, encode
    from ilora_cli.home import encoder_dir

    if not (encoder_dir(ENCODER) / "encoder.json").is_file():
        encode(EncodeConfig(dataset="lastfm", name=ENCODER, epochs=1, holdout="none", quiet=True))


def source_of(rev: str, scratch: Path) -> Path:
    """The ``src`` folder of a git revision (``.`` for this checkout)."""
    if rev == ".":
        return ROOT / "src"
    target = scratch / rev.replace("/", "_").replace("~", "-").replace("^", "-")
    target.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev, "src"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target / "src"


class Worker:
    """A worker process for one revision; ``ask`` sends a command and waits for its answer."""

    def __init__(self, label: str, src: Path, threads: int, log: Path):
        env = dict(os.environ, PYTHONPATH=str(src), BENCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        env["TOKENIZERS_PARALLELISM"] = "false"
        self.label, self.log = label, open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "throughput_worker.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )

    def ask(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.label} worker died; see {self.log.name}")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


def train_config(kind: str, backbone: str | None, batch: int, threads: int, out: Path) -> dict:
    return {
        "dataset": "lastfm",
        "backbone": backbone,
        "encoder": ENCODER,
        "output": str(out),
        "overwrite": True,
        "quiet": True,
        "batch_size": batch,
        "fusion": "none",
        "head": kind,
        "checkpoint_every": 10**6,
        "max_steps": 10**4,
        "threads": threads,
    }


def turns(workers: list[Worker], kind: str, steps_per_turn: int, repeats: int) -> dict[str, dict]:
    """``repeats`` counted turns (after one warm-up turn) of every worker in alternating order."""
    seconds = {w.label: [] for w in workers}
    losses = {w.label: [] for w in workers}
    for r in range(repeats + 1):
        for w in workers if r % 2 == 0 else workers[::-1]:
            out = w.ask("eval") if kind == "eval" else w.ask("steps", kind=kind, n=steps_per_turn)
            if "error" in out:
                seconds[w.label] = out["error"]
                continue
            if isinstance(seconds[w.label], str):
                continue
            if kind != "eval":
                losses[w.label] += out["losses"]
            if r == 0:
                continue
            seconds[w.label] += [out["seconds"]] if kind == "eval" else out["seconds"][1:]
            print(f"{kind:<6} {w.label:<8} turn {r}: {out['seconds'] if kind == 'eval' else out['seconds'][1:]}")
    return {w.label: {"seconds": seconds[w.label], "losses": losses[w.label]} for w in workers}


def largest_difference(series: dict[str, list], base: str) -> dict[str, float | None]:
    """max |x − x_base| over aligned entries of each label's series against ``base``'s."""
    out = {}
    for label, xs in series.items():
        ref = series[base]
        n = min(len(xs), len(ref))
        out[label] = max((abs(a - b) for a, b in zip(_flat(xs)[:n], _flat(ref)[:n])), default=None)
    return out


def _flat(xs):
    return [v for x in xs for v in (_flat(x) if isinstance(x, list) else [x])]


def rate(result: dict, per: int) -> float | None:
    s = result["seconds"]
    return None if isinstance(s, str) or not s else per / statistics.median(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", nargs="*", default=DEFAULT_BEFORE, help="LABEL=REVISION pairs, oldest first")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--eval-rows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="also the top operators of each revision")
    ap.add_argument("--default-backbone", type=int, default=0, metavar="N", help="N turns on the 135M default")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not ensure_dataset("lastfm"):
        print("the LastFM data is not available; skipping")
        return
    bench_encoder()
    revisions = [tuple(x.split("=", 1)) for x in args.before] + [("after", ".")]
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        scratch = Path(tmp)
        workers = [
            Worker(label, source_of(rev, scratch), args.threads, scratch / f"{label}.log") for label, rev in revisions
        ]
        try:
            if args.default_backbone:
                doc = default_backbone(workers, args, scratch)
            else:
                doc = tiny(workers, args, scratch)
        finally:
            for w in workers:
                w.close()
    doc = {"revisions": dict(revisions), "threads": args.threads, **doc}
    write_result(args.out or ("throughput-default" if args.default_backbone else "throughput-tiny"), doc)


def tiny(workers: list[Worker], args, scratch: Path) -> dict:
    backbone = str(tiny_backbone(scratch / "tiny-backbone"))
    labels = [w.label for w in workers]
    for w in workers:
        for kind in ("title", "item"):
            cfg = train_config(kind, backbone, args.batch_size, args.threads, scratch / f"run-{w.label}-{kind}")
            answer = w.ask("setup", kind=kind, config=cfg)
            if "error" in answer:
                raise RuntimeError(f"{w.label}: {answer['error']}")
        w.ask("eval_setup", rows=args.eval_rows, batch_size=8)
    untrained = {w.label: w.ask("eval")["scores"] for w in workers}  # before any step: the same weights everywhere
    results = {
        "title": turns(workers, "title", 3, args.repeats),
        "item": turns(workers, "item", 11, args.repeats),
        "eval": turns(workers, "eval", 1, args.repeats),
    }
    rates = {
        "title_samples_per_second": {k: rate(v, args.batch_size) for k, v in results["title"].items()},
        "item_samples_per_second": {k: rate(v, args.batch_size) for k, v in results["item"].items()},
        "eval_rows_per_second": {k: rate(v, args.eval_rows) for k, v in results["eval"].items()},
    }
    doc = {
        "backbone": "tiny: 2-layer Llama, hidden 64, random weights, the default backbone's tokenizer (49,152 tokens)",
        "batch_size": args.batch_size,
        "eval_rows": args.eval_rows,
        **rates,
        "ratio_after_over": {
            name: {k: (r["after"] / v if v and r["after"] else None) for k, v in r.items() if k != "after"}
            for name, r in rates.items()
        },
        "max_abs_difference_vs_after": {
            "untrained_eval_scores": largest_difference(untrained, "after"),
            "title_losses": largest_difference({k: v["losses"] for k, v in results["title"].items()}, "after"),
            "item_losses": largest_difference({k: v["losses"] for k, v in results["item"].items()}, "after"),
        },
        "seconds": {name: {k: v["seconds"] for k, v in r.items()} for name, r in results.items()},
        "losses": {name: {k: v["losses"] for k, v in r.items()} for name, r in results.items() if name != "eval"},
        "peak_rss_mib": {w.label: w.ask("memory")["peak_rss_mib"] for w in workers},
    }
    print()
    print(f"{'':<28}" + "".join(f"{label:>12}" for label in labels) + "   after / each")
    for name, r in rates.items():
        cells = "".join(f"{r[label]:12.2f}" if r[label] else f"{'n/a':>12}" for label in labels)
        ratios = "  ".join(f"{k} {v:.2f}x" for k, v in doc["ratio_after_over"][name].items() if v)
        print(f"{name:<28}{cells}   {ratios}")
    print("largest differences from 'after':", json.dumps(doc["max_abs_difference_vs_after"]))
    if args.profile:
        doc["profile"] = {}
        for kind, n in (("title", 2), ("item", 10), ("eval", 1)):
            doc["profile"][kind] = {w.label: w.ask("profile", kind=kind, n=n, top=12) for w in workers}
            for label, p in doc["profile"][kind].items():
                print(f"\nprofile {kind} {label}: {p.get('seconds_per_step', 0):.3f} s per step")
                for e in p.get("top", []):
                    print(f"  {e['op']:<58} {e['self_seconds_per_step']:8.4f} s  {e['share']:6.1%}")
    return doc


def default_backbone(workers: list[Worker], args, scratch: Path) -> dict:
    """The default configuration on the default backbone (batch 8): N counted steps per revision, alternated."""
    for w in workers:
        cfg = train_config("title", None, 8, args.threads, scratch / f"run-{w.label}")
        cfg.pop("fusion")  # every default, the learned fusion included
        answer = w.ask("setup", kind="title", config=cfg)
        if "error" in answer:
            raise RuntimeError(f"{w.label}: {answer['error']}")
    result = turns(workers, "title", 2, args.default_backbone)
    median = {k: statistics.median(v["seconds"]) for k, v in result.items()}
    doc = {
        "backbone": "SmolLM2-135M-Instruct (default), fp32, batch 8, the default configuration",
        "step_seconds": {k: v["seconds"] for k, v in result.items()},
        "median_step_seconds": median,
        "ratio_after_over": {k: v / median["after"] for k, v in median.items() if k != "after"},
        "losses": {k: v["losses"] for k, v in result.items()},
        "max_abs_difference_vs_after": {
            "first_step_loss": {k: abs(v["losses"][0] - result["after"]["losses"][0]) for k, v in result.items()},
            "losses": largest_difference({k: v["losses"] for k, v in result.items()}, "after"),
        },
        "peak_rss_mib": {w.label: w.ask("memory")["peak_rss_mib"] for w in workers},
    }
    print()
    for label, m in median.items():
        print(f"{label:<8} median {m:6.2f} s/step   step-time ratio {label} / after: {m / median['after']:.2f}")
    print("largest differences from 'after':", json.dumps(doc["max_abs_difference_vs_after"]))
    return doc


if __name__ == "__main__":
    main()
