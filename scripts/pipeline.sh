#!/usr/bin/env bash
# Set everything up and run the default pipeline end to end (digits, CPU-sized models) through
# Prefect and DVC, tracked in MLflow. Extra arguments go to `python -m flows pipeline`
# (e.g. `-S student.distillation=soft` to run a variant as a DVC experiment in a temporary copy).
# The pipeline ends with "Where to look": the results, DVC's commands, and the address that opens
# MLflow's UI on the experiment's runs (#/experiments/<id>/runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
python -m flows pipeline "$@"
