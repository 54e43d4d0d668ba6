#!/usr/bin/env bash
# LastFM on one data-centre GPU, prepared to run unattended in under 10 minutes (docs/BENCHMARKS.md, GPU):
#   A. the default backbone (SmolLM2-135M-Instruct) in bf16 on the full LastFM train split for one epoch,
#      K = 1 and K = 4 side by side (two processes on the one GPU), then each evaluated on val (all draws);
#   B. then, with the time left: the lever sweep (bench/bench_levers.py --suite levers) and the synthetic
#      mechanism runs (--suite mechanism) at CPU scale (batch 8, fp32), several worker processes.
# Phase A runs alone: on an H200 shared with nine phase-B workers its steps took 6.6 s instead of 1.2 s
# (docs/BENCHMARKS.md, GPU).
#
#   bench/gpu_lastfm.sh                               # the real run; $ILORA_HOME holds the prepared `lastfm`
#                                                     # dataset and its `lastfm-sasrec` encoder
#   bench/gpu_lastfm.sh --tiny DATASET BACKBONE_DIR   # the same steps on a tiny budget (the tests, on CPU)
#
# Results go to $OUT (default bench/results/gpu): gpu-lastfm.json (the summary), levers.json,
# mechanism.json and logs.tar.gz (every job's output). BUDGET (seconds, default 540) bounds the
# whole script: phase A's training is stopped at BUDGET - 60 s, and phase B starts no new run after
# BUDGET - 100 s.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
PY=${PYTHON:-python3}
ILORA=("$PY" -m ilora_cli.cli)
OUT=${OUT:-bench/results/gpu}
WORK=$(mktemp -d)
mkdir -p "$OUT"
BUDGET=${BUDGET:-540}
SECONDS=0

if [[ ${1:-} == "--tiny" ]]; then
  DATASET=$2
  BACKBONE=(--backbone "$3")
  FULL=(--max-steps 2 --batch-size 4 candidates=6)
  EVAL_EXTRA=(max_samples=4 draws=1)
  SWEEP=(--dataset "$DATASET" --rows 8 --batch-size 4 --seeds 1 --workers 1 --set "backbone=$3" candidates=6)
  LEVERS=(--configs today)
  MECH=(--dataset "$DATASET" --rows 8 --batch-size 4 --seeds 1 --workers 1 --set "backbone=$3" candidates=6)
  DEVICE=auto
else
  DATASET=lastfm
  BACKBONE=()
  # the settings the CPU runs use, at the paper's effective batch of 128 (374 steps), validated every 47 steps
  FULL=(--epochs 1 --batch-size 64 grad_accum=2 templates=compact distill_weight=1 validate_every=47)
  EVAL_EXTRA=(batch_size=64)
  SWEEP=(--rows 1024 --seeds 1 2 3 --workers 6)
  LEVERS=()
  MECH=(--rows 512 --seeds 1 2 3 --workers 3)
  DEVICE=cuda
  # dequantize the default backbone once, before several processes want it
  bb=$("$PY" -c "from ilora_cli.llm.backbone import default_backbone_dir as d; print(d())" | tail -1)
  echo "backbone: $bb"
  # Other transformers versions read the GGUF file's tokenizer differently (5.17 takes <|im_start|> for the
  # end token): TOKENIZER_FROM names a folder with the tokenizer files that CPU runs use, to copy over.
  if [[ -n ${TOKENIZER_FROM:-} ]]; then cp "$TOKENIZER_FROM"/* "$bb"/; fi
  "$PY" -c "from transformers import AutoTokenizer as T; t=T.from_pretrained('$bb'); print('end token', t.eos_token)"
fi
"$PY" - <<'EOF' | tee "$WORK/machine.txt"
import torch
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU", "| torch", torch.__version__)
EOF

echo "== A: one epoch of $DATASET, K = 1 and K = 4 in bf16 ($(date +%T)) =="
full() {
  local k=$1 name="gpu-$DATASET-k$1"
  local t0=$SECONDS
  timeout $((BUDGET - 60)) "${ILORA[@]}" train --dataset "$DATASET" --name "$name" --experts "$k" "${FULL[@]}" \
    "${BACKBONE[@]}" --overwrite --json quiet=true checkpoint_every=100000 "device=$DEVICE" \
    >"$WORK/train-k$k.json" 2>"$WORK/train-k$k.log" || { echo "train K=$k failed"; tail -5 "$WORK/train-k$k.log"; return 0; }
  echo "train K=$k: $((SECONDS - t0)) s"
  "${ILORA[@]}" eval --run "$name" --json quiet=true "device=$DEVICE" "${EVAL_EXTRA[@]}" \
    >"$WORK/eval-k$k.json" 2>"$WORK/eval-k$k.log" || { echo "eval K=$k failed"; tail -5 "$WORK/eval-k$k.log"; }
  echo "train + eval K=$k: $((SECONDS - t0)) s"
}
full 1 &
full 4 &
wait
PHASE_A=$SECONDS
echo "phase A done at $PHASE_A s"

echo "== B: lever sweep and mechanism at CPU scale, fp32 ($(date +%T)) =="
deadline=$((BUDGET - 100 - SECONDS))
if ((deadline > 0)); then
  "$PY" bench/bench_levers.py --suite levers "${SWEEP[@]}" "${LEVERS[@]}" --device "$DEVICE" --dtype float32 \
    --deadline "$deadline" --out "$WORK/levers.json" >"$WORK/levers.log" 2>&1 &
  "$PY" bench/bench_levers.py --suite mechanism "${MECH[@]}" --device "$DEVICE" --dtype float32 \
    --deadline "$deadline" --out "$WORK/mechanism.json" >"$WORK/mechanism.log" 2>&1 &
  wait
  tail -n 20 "$WORK/levers.log" "$WORK/mechanism.log"
else
  echo "no time left for phase B"
fi

WORK=$WORK PHASE_A=$PHASE_A TOTAL=$SECONDS "$PY" - <<'EOF' >"$OUT/gpu-lastfm.json"
import json, os
from pathlib import Path
work = Path(os.environ["WORK"])
def read(name):
    p = work / name
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
doc = {"machine": (work / "machine.txt").read_text().strip(), "phase_a_seconds": int(os.environ["PHASE_A"]),
       "total_seconds": int(os.environ["TOTAL"]), "runs": {}}
for k in (1, 4):
    train, ev = read(f"train-k{k}.json"), read(f"eval-k{k}.json")
    run = {"train": train}
    if ev:
        r = next(v for name, v in ev["results"].items() if name != "encoder")
        run["metrics"] = {"default": r["metrics"], "ranking": r.get("ranking"), "fusion": r.get("fusion"),
                          "llm": (r.get("llm") or r)["metrics"], "encoder": ev["results"]["encoder"]["metrics"]}
        run["eval_seconds"] = r["seconds"]
    doc["runs"][f"k{k}"] = run
print(json.dumps(doc, indent=1))
EOF
for f in levers.json mechanism.json; do [[ -f $WORK/$f ]] && cp "$WORK/$f" "$OUT/$f"; done
tar -czf "$OUT/logs.tar.gz" -C "$WORK" .
echo "done in $SECONDS s; results in $OUT"
