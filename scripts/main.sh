#!/usr/bin/env bash
# The main job on the embedded default data: POA-pretrain the demo elastic ViT (recipes/demo.py),
# then sweep every subnet of its teacher (k-NN top-1, parameters, FLOPs, latency), print the
# table and write the plot. Run scripts/setup.sh first. 7.7-8.6 minutes on 2 CPU cores with the
# PyTorch backend (the default here; KERAS_BACKEND=jax or tensorflow work too, and first compile
# one train step per width of the grid).
#
#   OUTPUT=runs/demo (default)  OUTPUT/teacher: the elastic teacher preset
#                               OUTPUT/sweep: sweep.csv, sweep.json, sweep.png
# A rerun resumes the pretraining from its last checkpoint (a finished run is not retrained).
set -euo pipefail
cd "$(dirname "$0")/.."
export KERAS_BACKEND=${KERAS_BACKEND:-torch}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-3}
OUTPUT=${OUTPUT:-runs/demo}
POA=${POA:-.venv/bin/poa-keras}
"$POA" pretrain --recipe=demo --output="$OUTPUT" "$@"
# The k-NN bank and queries: shapes images like the recipe's (same size and palette), labelled.
"$POA" sweep --preset="$OUTPUT/teacher" --num_train=6400 --num_val=2000 --output="$OUTPUT/sweep"
echo "plot: $OUTPUT/sweep/sweep.png   table: $OUTPUT/sweep/sweep.csv"
