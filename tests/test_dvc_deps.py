"""dvc.yaml lists, for every stage, each library file the stage really imports (STYLE anti-pattern 7).

Each stage runs in its own process on a tiny configuration, as ``python -m flows stage <name> --no-prefect``
runs it; the ``distill`` modules in ``sys.modules`` afterwards are what its outputs can depend on, so each must
be a dep of the stage, or editing it would not rerun the stage. Exempt: package ``__init__`` files (docstrings
and re-exports only) and ``tracking.py``, which records runs in MLflow and never changes a stage's outputs.
Every stage has its imports at the top of its own module (distill/stages/<name>.py), so what it imports is
what it runs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from distill.config import merge
from distill.stages.runner import pipeline_stages

from helpers import TINY

ROOT = Path(__file__).resolve().parents[1]
EXEMPT = {"distill/tracking.py"}
PROBE = """
import json, sys
from pathlib import Path
if sys.argv[1] == "check_params":  # its command: python -m distill.preflight params.yaml --stamp ...
    from distill.preflight import main
    assert main(["params.yaml"]) == 0
else:
    from distill.config import Paths, load_params
    from distill.stages.runner import run_stage
    run_stage(sys.argv[1], load_params("params.yaml"), Paths("."), dvc_yaml=Path(sys.argv[2]))
files = {m.__file__ for n, m in list(sys.modules.items())
         if n.split(".")[0] == "distill" and getattr(m, "__file__", None)}
print("LOADED " + json.dumps(sorted(files)))
"""


@pytest.mark.slow
def test_every_imported_library_file_is_a_dep_of_its_stage(tmp_path):
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data" / "raw").mkdir(parents=True)
    env = {**os.environ, "DISTILL_PROGRESS": "0", "PYTHONPATH": str(ROOT)}
    deps = {name: set(stage.get("deps", []))
            for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()}
    stages = pipeline_stages(ROOT / "dvc.yaml")
    assert set(deps) == {"check_params", *stages}
    assert deps["check_params"] >= {"params.yaml", "${data.root}", "models/pretrained/teacher",
                                    "models/pretrained/student"}  # what it checks besides the params
    missing, extra = {}, {}
    for stage in ["check_params", *stages]:  # in pipeline order: each stage reads what the previous ones wrote
        res = subprocess.run([sys.executable, "-c", PROBE, stage, str(ROOT / "dvc.yaml")], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600, check=False)
        assert res.returncode == 0, res.stderr[-3000:]
        loaded = json.loads(res.stdout.split("LOADED ", 1)[1])
        files = {str(Path(f).resolve().relative_to(ROOT)) for f in loaded}
        needed = {f for f in files if not f.endswith("__init__.py")} - EXEMPT
        listed = {d for d in deps[stage] if d.startswith("distill/")}
        if needed - listed:
            missing[stage] = sorted(needed - listed)
        if listed - needed:
            extra[stage] = sorted(listed - needed)
    assert not missing, f"stages import library files that dvc.yaml does not list as their deps: {missing}"
    assert not extra, f"dvc.yaml lists library files that the stages do not import (needless reruns): {extra}"


def test_no_import_cycles_and_the_layers_read_top_down():
    """flows -> stages -> engine, store, evaluation -> models, data, losses: no module imports a higher layer."""
    import ast

    layer = {"flows": 0, "distill.stages": 1,
             "distill.engine": 2, "distill.evaluation": 2, "distill.registry": 2, "distill.serving": 2,
             "distill.report": 2, "distill.export": 2, "distill.plots": 2, "distill.tracking": 2,
             "distill.preflight": 2, "distill.runtime": 2, "distill.inference": 3,
             "distill.store": 3, "distill.views": 4, "distill.checkpoint": 7,
             "distill.models": 6, "distill.teachers": 6, "distill.prepare": 6,
             "distill.weights": 7, "distill.data": 7, "distill.augment": 7, "distill.losses": 7, "distill.stats": 7,
             "distill.io": 8, "distill.config": 8}

    def level(module: str) -> int:
        best = max((k for k in layer if module == k or module.startswith(k + ".")), key=len, default=None)
        return layer[best] if best is not None else 99

    import networkx as nx

    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for p in [*ROOT.glob("distill/**/*.py"), *ROOT.glob("flows/*.py")]}
    graph = nx.DiGraph()
    wrong = []
    for path in [*ROOT.glob("distill/**/*.py"), *ROOT.glob("flows/*.py")]:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                if target in ("distill", "flows"):
                    continue
                if target.split(".")[0] in ("distill", "flows") and level(target) < level(module):
                    wrong.append(f"{module} imports {target}")
                if target in modules and target != module:
                    graph.add_edge(module, target)
    assert not wrong, "\n".join(sorted(wrong))
    assert nx.is_directed_acyclic_graph(graph), f"import cycles: {list(nx.simple_cycles(graph))[:5]}"
