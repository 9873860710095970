"""Which stages DVC reruns when one library file changes: the rerun matrix, straight from ``dvc.yaml``.

A stage's deps list the library files it imports (``tests/test_dvc_deps.py`` keeps them equal to its import
closure), so an edit of ``distill/<file>.py`` reruns exactly the stages that list it. Their outputs may then
rerun the stages that read them, but only when those outputs change (DVC compares hashes: a retraining that gives
byte-identical files reruns nothing after it). ``tests/test_rerun_matrix.py`` pins what must never rerun.

Usage::

    python scripts/rerun_matrix.py                          # the workspace's dvc.yaml, as a Markdown table
    git show <commit>:dvc.yaml > /tmp/old.yaml && python scripts/rerun_matrix.py /tmp/old.yaml
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.config import dvc_stages  # noqa: E402  (the one reader of dvc.yaml)

LIBRARY = "distill/"


def _paths(entries: list) -> list[str]:
    """The paths of a ``deps`` or ``outs`` list (an entry is a path, or ``{path: options}``)."""
    return [str(next(iter(e))) if isinstance(e, dict) else str(e) for e in entries or []]


def rerun_matrix(dvc_yaml: str | Path) -> dict[str, tuple[list[str], list[str]]]:
    """For each library file some stage lists as a dep: the stages that list it (in ``dvc.yaml``'s order), and the
    stages after those that read their outputs (they rerun only when those outputs change)."""
    stages = dvc_stages(dvc_yaml)
    deps = {name: set(_paths(spec.get("deps"))) for name, spec in stages.items()}
    outs = {name: {*_paths(spec.get("outs")), *_paths(spec.get("metrics")), *_paths(spec.get("plots"))}
            for name, spec in stages.items()}
    readers = {name: [other for other in stages if outs[name] & deps[other]] for name in stages}
    files = sorted({d for ds in deps.values() for d in ds if d.startswith(LIBRARY)})
    matrix = {}
    for file in files:
        direct = [name for name in stages if file in deps[name]]
        after: list[str] = []
        todo = list(direct)
        while todo:
            for reader in readers[todo.pop(0)]:
                if reader not in direct and reader not in after:
                    after.append(reader)
                    todo.append(reader)
        matrix[file] = (direct, [name for name in stages if name in after])
    return matrix


def markdown(matrix: dict[str, tuple[list[str], list[str]]]) -> str:
    """The matrix as a Markdown table."""
    lines = ["| edited file | stages rerun | then, only if their outputs change |", "|---|---|---|"]
    for file, (direct, after) in matrix.items():
        lines.append(f"| `{file}` | {', '.join(direct)} | {', '.join(after) or '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dvc_yaml", nargs="?", default=str(ROOT / "dvc.yaml"), help="the stage graph (default: "
                        "the project's dvc.yaml)")
    args = parser.parse_args(argv)
    print(markdown(rerun_matrix(args.dvc_yaml)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
