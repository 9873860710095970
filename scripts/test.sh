#!/usr/bin/env bash
# Set everything up and run the tests (what CI runs). Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not slow"` for the fast suite only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
export DISTILL_PROGRESS=0
echo "==> ruff check"
python -m ruff check .
exec python -m pytest -ra "$@"
