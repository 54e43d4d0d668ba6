#!/usr/bin/env bash
# The reference implementations' training budget on one data-centre GPU, in one call of under 10 minutes
# (docs/BENCHMARKS.md, "The reference's budget on a GPU"):
#   0. profile: a few steps of each head on the default backbone in bf16 (bench/profile_step.py): samples/s,
#      where a step's time goes on the device and on the host, model FLOP utilisation, score-mode eval rows/s;
#   1. title scoring and the item head, K = 4, each for 5 epochs of the full LastFM train split (47,872 rows:
#      1,870 optimisation steps of 128, the budget of the reference implementations, whose SASRec was fitted on
#      the same rows: holdout none, with the encoder lastfm-sasrec-full fitted on every row), validated every
#      187 steps on the 122 val rows (all 5 candidate draws); the two runs side by side on the one GPU;
#   2. the learning curves (LLM alone, fused, encoder; HR@1 and MRR against samples seen): curves.json, curves.png.
#
#   bench/gpu_reference_budget.sh                               # the real run; $ILORA_HOME holds the prepared
#                                                               # `lastfm` dataset (the encoder is fitted if missing)
#   bench/gpu_reference_budget.sh --tiny DATASET BACKBONE_DIR   # the same steps on a tiny budget (the tests, on CPU)
#
# Budget guard: BUDGET (seconds, default 570) bounds the whole script. The profile is stopped after
# PROFILE_LIMIT seconds (default 100). Training is interrupted (SIGINT, killed 20 s later if still alive) when
# BUDGET - 45 s have passed (TRAIN_LIMIT: seconds from the start of phase 1 instead); what was validated by then
# is kept and plotted, and the runs are marked as stopped by the budget. STEPS overrides the steps per run.
# Results go to $OUT (default bench/results/gpu-reference): profile-step.json, curves.json, curves.png,
# summary.json and logs.tar.gz (every job's output and the runs' logs).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
PY=${PYTHON:-python3}
ILORA=("$PY" -m ilora_cli.cli)
OUT=${OUT:-bench/results/gpu-reference}
WORK=$(mktemp -d)
mkdir -p "$OUT"
BUDGET=${BUDGET:-570}
SECONDS=0

if [[ ${1:-} == "--tiny" ]]; then
  DATASET=$2
  BACKBONE=(--backbone "$3")
  PROFILE=(--dataset "$DATASET" --backbone "$3" --batch-size 4 --candidates 6 --warmup 1 --steps 2 --eval-rows 4
    --eval-batch 4 --eval-repeats 1)
  FULL=(--max-steps "${STEPS:-3}" --batch-size 4 candidates=6 validate_every=1 validate_rows=4 validate_draws=1)
  ENCODER=()
  DEVICE=auto
else
  DATASET=lastfm
  BACKBONE=()
  PROFILE=(--dataset lastfm --encoder lastfm-sasrec-full --device cuda --batch-size 128)
  FULL=(--batch-size 128 validate_every=187)
  if [[ -n ${STEPS:-} ]]; then FULL+=(--max-steps "$STEPS"); else FULL+=(--epochs 5); fi
  ENCODER=(--encoder lastfm-sasrec-full)
  DEVICE=cuda
  # dequantize the default backbone once, before several processes want it
  bb=$("$PY" -c "from ilora_cli.llm.backbone import default_backbone_dir as d; print(d())" | tail -1)
  echo "backbone: $bb"
  # Other transformers versions read the GGUF file's tokenizer differently (5.17 takes <|im_start|> for the
  # end token): TOKENIZER_FROM names a folder with the tokenizer files that CPU runs use, to copy over.
  if [[ -n ${TOKENIZER_FROM:-} ]]; then cp "$TOKENIZER_FROM"/* "$bb"/; fi
  "$PY" -c "from transformers import AutoTokenizer as T; t=T.from_pretrained('$bb'); print('end token', t.eos_token)"
  if [[ ! -f ${ILORA_HOME:-$HOME/.ilora}/encoders/lastfm-sasrec-full/encoder.json ]]; then
    echo "== fitting the encoder lastfm-sasrec-full on every train row ($(date +%T)) =="
    "${ILORA[@]}" encode --dataset lastfm --name lastfm-sasrec-full holdout=none device=cuda quiet=true \
      >"$WORK/encode.log" 2>&1 || { echo "encode failed"; tail -5 "$WORK/encode.log"; }
  fi
fi
"$PY" - <<'EOF' | tee "$WORK/machine.txt"
import torch
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU", "| torch", torch.__version__)
EOF

echo "== 0: profile of a step of each head ($(date +%T)) =="
timeout -s INT -k 10 "${PROFILE_LIMIT:-100}" "$PY" bench/profile_step.py "${PROFILE[@]}" --output "$WORK/profile-runs" \
  --out "$OUT/profile-step.json" >"$WORK/profile.log" 2>&1 || echo "profile stopped or failed (rc $?)"
tail -n 3 "$WORK/profile.log"

echo "== 1: title and item head, K = 4, side by side ($(date +%T)) =="
START=$SECONDS
LIMIT=${TRAIN_LIMIT:-$((BUDGET - 45 - START))}
((LIMIT < 10)) && LIMIT=10
STOPPED=()
train() {
  local head=$1
  timeout -s INT -k 20 "$LIMIT" "${ILORA[@]}" train --dataset "$DATASET" --output "$WORK/run-$head" --experts 4 \
    --head "$head" "${FULL[@]}" "${ENCODER[@]}" "${BACKBONE[@]}" holdout=none --overwrite --json quiet=true \
    checkpoint_every=100000 "device=$DEVICE" >"$WORK/train-$head.json" 2>"$WORK/train-$head.log"
  local rc=$?
  echo "$rc" >"$WORK/rc-$head"
  echo "train $head: rc $rc after $((SECONDS - START)) s"
}
train title &
train item &
wait
for head in title item; do
  rc=$(cat "$WORK/rc-$head")
  if ((rc == 124 || rc == 137)); then
    STOPPED+=("$head")
  elif ((rc != 0)); then
    echo "train $head failed:"
    tail -n 5 "$WORK/train-$head.log"
  fi
done
echo "phase 1 done at $SECONDS s; stopped by the budget: ${STOPPED[*]:-none}"

echo "== 2: learning curves ($(date +%T)) =="
"$PY" bench/gpu_curves.py "title=$WORK/run-title" "item=$WORK/run-item" --json "$OUT/curves.json" \
  --png "$OUT/curves.png" --budget-stopped "${STOPPED[@]}" \
  --title "$DATASET: title scoring and the item head, K = 4 ($(head -c 60 "$WORK/machine.txt"))"

WORK=$WORK TOTAL=$SECONDS STOPPED="${STOPPED[*]:-}" "$PY" - <<'EOF' >"$OUT/summary.json"
import json, os
from pathlib import Path
work = Path(os.environ["WORK"])
def read(name):
    try:
        return json.loads((work / name).read_text())
    except (OSError, ValueError):
        return None
doc = {"machine": (work / "machine.txt").read_text().strip(), "total_seconds": int(os.environ["TOTAL"]),
       "stopped_by_budget": os.environ["STOPPED"].split(), "train": {h: read(f"train-{h}.json") for h in ("title", "item")}}
print(json.dumps(doc, indent=1))
EOF
tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude='*.safetensors' --exclude='*.pt' .
rm -rf "$WORK"
echo "done in $SECONDS s; results in $OUT"
