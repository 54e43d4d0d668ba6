#!/usr/bin/env bash
# The demo `make demo` runs: prepare the built-in synthetic dataset, train and evaluate the encoder.
# Everything is written under $ILORA_HOME (make demo uses ./.ilora-demo).
set -euo pipefail
ILORA=${ILORA:-ilora}
here=$(cd "$(dirname "$0")" && pwd)

echo "== 1/2 prepare: the built-in synthetic dataset (heterogeneous users) =="
"$ILORA" prepare --dataset synthetic --format synthetic --overwrite

echo "== 2/2 encode: SASRec on it, evaluated on the frozen candidate draws =="
"$ILORA" encode --config "$here/encode_synthetic.yaml" --overwrite

echo "Done. Artifacts are in ${ILORA_HOME:-~/.ilora}."
