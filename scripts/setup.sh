#!/usr/bin/env bash
# Create .venv and install the project with its test extras. Idempotent: reinstalls only when
# pyproject.toml or this script changed.
#
# torch/torchvision: the versions this project is tested with are installed first
# (DISTILL_TORCH_SPEC, default "torch==2.14.1 torchvision==0.29.1"; on the development machines
# pip finds them on local disk). If they cannot be installed (another platform or Python), the
# open ranges in pyproject.toml let pip pick what fits. Plain pip on purpose: uv and poetry ignore
# the local wheels and download several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${DISTILL_TORCH_SPEC-torch==2.14.1 torchvision==0.29.1}"
if [ ! -x .venv/bin/python ]; then
  echo "==> creating virtual environment .venv"
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
pip_quiet() {
  # pip prints one harmless warning per package for local index folders it cannot use: hide those.
  .venv/bin/python -m pip install --disable-pip-version-check -q "$@" 2>&1 | { grep -v "^WARNING: Location '" || true; }
  return "${PIPESTATUS[0]}"
}
if [ ! -f "$stamp" ]; then
  if [ -n "$TORCH_SPEC" ]; then
    echo "==> installing $TORCH_SPEC"
    # shellcheck disable=SC2086 # the spec is a list of requirements
    pip_quiet $TORCH_SPEC || echo "==> $TORCH_SPEC is not installable here; pip will choose torch from pyproject.toml's ranges"
  fi
  echo "==> installing the project and its dependencies into .venv (a few minutes the first time)"
  pip_quiet -e ".[dev]"
  .venv/bin/python -c "import torch, torchvision, prefect, mlflow, dvc, accelerate, distill" \
    || { echo "error: the installed environment does not import; delete .venv and rerun" >&2; exit 1; }
  rm -f .venv/.installed-*
  touch "$stamp"
fi
.venv/bin/python scripts/plots_template.py  # .dvc/offline_plots.html: `dvc plots show` with no network
