#!/usr/bin/env bash
# What `make demo` runs, end to end on the built-in synthetic dataset and the default backbone
# (SmolLM2-135M-Instruct), with a CPU-sized budget. Everything goes under $ILORA_HOME
# (make demo uses ./.ilora-demo). About a minute on an idle 2-core CPU once .venv exists.
set -euo pipefail
ILORA=${ILORA:-ilora}
here=$(cd "$(dirname "$0")" && pwd)
home=${ILORA_HOME:-$HOME/.ilora}

echo "== 1/5 prepare: the built-in synthetic dataset (heterogeneous users) =="
"$ILORA" prepare --dataset synthetic --format synthetic --overwrite

echo "== 2/5 encode: SASRec, evaluated on the frozen candidate draws =="
"$ILORA" encode --config "$here/encode_synthetic.yaml" --overwrite

echo "== 3/5 train: iLoRA (4 experts, user gate) on a small CPU budget =="
"$ILORA" train --config "$here/train_synthetic_cpu.yaml" --overwrite

echo "== 4/5 eval: the run and the encoder alone, on the same candidates =="
"$ILORA" eval --run synthetic-demo --encoder --max-samples 24 draws=1 --plot "$home/runs/synthetic-demo/plots/eval.png"

echo "== 5/5 recommend: one user's history (titles or ids) =="
"$ILORA" recommend --run synthetic-demo --user-history "$here/history_synthetic.json" --top-k 5

cat <<'NOTE'
How to read step 4: at the demo's budget (10 steps of 8, under a minute of training) the language model alone
ranks far below the encoder (HR@1 0.13 against 0.54 on the 24 val users of step 4 with two threads, 0.17 against
0.58 with one; after 40 steps, 0.18 against 0.57 on all 60),
so the default ranking, which fuses the two with learned weights, stays at the encoder's level and its LLM weight
stays small. On LastFM the default run (the item head, 321 steps, about 7 minutes on one CPU thread) brings the
language model alone to the encoder's level: README, CPU defaults.
NOTE
echo "Done. Artifacts are in $home; the run's card is $home/runs/synthetic-demo/README.md and its pictures are"
ls "$home/runs/synthetic-demo/plots/"*.png
