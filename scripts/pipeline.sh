#!/usr/bin/env bash
# Set everything up and run the default pipeline end to end (digits, CPU-sized models) through
# Prefect and DVC, tracked in MLflow. Extra arguments go to `python -m flows pipeline`
# (e.g. `-S student.distillation=soft` to run a DVC experiment instead).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
python -m flows pipeline "$@"
cat <<'MSG'

Where to look:
  results table       reports/results.md   (figures in reports/figures/)
  DVC                 dvc metrics show ; dvc plots show ; dvc exp show
  MLflow UI           mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db   then open http://127.0.0.1:5000
MSG
