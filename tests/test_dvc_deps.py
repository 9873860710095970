"""dvc.yaml lists, for every stage, each library file the stage really imports (STYLE anti-pattern 7).

Each stage function runs in its own process on a tiny configuration; the ``distill`` modules in
``sys.modules`` afterwards are what the stage's outputs can depend on, so each must be a dep of that stage,
or editing it would not rerun the stage. Exempt: package ``__init__`` files (re-exports only) and
``tracking.py``, which records runs in MLflow and never changes a stage's outputs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
EXEMPT = {"distill/tracking.py"}
PROBE = """
import json, sys
from distill import stages as S
from distill.config import load_params
getattr(S, "run_" + sys.argv[1])(load_params("params.yaml"), S.Paths("."))
files = {m.__file__ for n, m in list(sys.modules.items()) if n.split(".")[0] == "distill" and getattr(m, "__file__", None)}
print("LOADED " + json.dumps(sorted(files)))
"""


@pytest.mark.slow
def test_every_imported_library_file_is_a_dep_of_its_stage(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for model in ("teacher", "student"):
        params[model]["train"].update(epochs=1, warmup_epochs=0)
    params["soft_labels"]["views"] = 1
    params["evaluate"].update(throughput_iters=1, register_model=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "DISTILL_PROGRESS": "0", "PYTHONPATH": str(ROOT)}
    deps = {name: set(stage.get("deps", [])) for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()}
    assert set(deps) == {"check_params", *STAGES}
    assert deps["check_params"] == {"params.yaml", "distill/config.py"}  # it imports nothing else
    missing = {}
    for stage in STAGES:  # in pipeline order: each stage reads what the previous ones wrote
        res = subprocess.run([sys.executable, "-c", PROBE, stage], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600, check=False)
        assert res.returncode == 0, res.stderr[-3000:]
        loaded = json.loads(res.stdout.split("LOADED ", 1)[1])
        files = {str(Path(f).resolve().relative_to(ROOT)) for f in loaded}
        needed = {f for f in files if not f.endswith("__init__.py")} - EXEMPT
        if needed - deps[stage]:
            missing[stage] = sorted(needed - deps[stage])
    assert not missing, f"stages import library files that dvc.yaml does not list as their deps: {missing}"
