#!/usr/bin/env bash
# The main job (run after scripts/setup.sh): train the FLT IS2RE model on the embedded EMT-IS2RE
# data set (recipes/emt_is2re_flt.yaml, CPU, about 3 minutes from a fresh clone, set-up included),
# evaluate it on the four validation splits and print energy MAE / MSE / EwT beside the trivial baselines (training
# logs one line per evaluation; the table is printed once, by `flt-mol evaluate`).
#
#   bash scripts/demo.sh                   # fresh run into runs/emt_is2re_flt
#   OUT=runs/x bash scripts/demo.sh run.steps=500     # extra arguments are config overrides
#
# A finished run (metrics.json present) is not retrained; an interrupted one is resumed.
# EMT is not DFT: the numbers say how well the model learns this synthetic set, nothing more.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/emt_is2re_flt}
# One thread: on a shared 2-core machine two threads per process contend and run ~10x slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
FLT=.venv/bin/flt-mol

if [ -f "$OUT/metrics.json" ] && [ -f "$OUT/checkpoint.pt" ]; then
  echo "== $OUT already holds a finished run; delete it to retrain"
elif [ -f "$OUT/checkpoint.pt" ]; then
  echo "== resuming the interrupted run in $OUT"
  "$FLT" train recipes/emt_is2re_flt.yaml --out "$OUT" --resume "$@"
else
  echo "== training recipes/emt_is2re_flt.yaml into $OUT"
  "$FLT" train recipes/emt_is2re_flt.yaml --out "$OUT" "$@"
fi

echo "== evaluating $OUT/checkpoint.pt on the EMT-IS2RE validation splits (energies in eV)"
"$FLT" evaluate "$OUT/checkpoint.pt" --out "$OUT/eval.json" --plot "$OUT/parity.png"
echo "== learning curve: $OUT/learning_curve.png   parity plot: $OUT/parity.png"
