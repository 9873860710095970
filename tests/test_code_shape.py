"""The house rules of issue 18 that a reader can check by counting: no function in ``distill/`` or ``flows/`` has
more than 60 lines of code (its docstring aside) or more than 8 parameters (``self`` and ``cls`` aside), unless a
comment right above its ``def`` (or its decorators) says why."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60
MAX_PARAMS = 8


def _parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    names = [*a.posonlyargs, *a.args, *a.kwonlyargs]
    count = len(names) + (a.vararg is not None) + (a.kwarg is not None)
    return count - (1 if names and names[0].arg in ("self", "cls") else 0)


def _code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the end of the function."""
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str) and len(body) > 1:
        body = body[1:]
    return fn.end_lineno - body[0].lineno + 1


def _explained(fn: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> bool:
    first = min([fn.lineno, *(d.lineno for d in fn.decorator_list)])
    return first >= 2 and lines[first - 2].strip().startswith("#")


def oversized(source: str) -> list[tuple[str, int, int, int]]:
    """``(name, line, code lines, parameters)`` of each function over the limits without a comment saying why."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            size, params = _code_lines(node), _parameters(node)
            if (size > MAX_LINES or params > MAX_PARAMS) and not _explained(node, lines):
                found.append((node.name, node.lineno, size, params))
    return found


def test_no_function_is_too_long_or_takes_too_many_parameters_without_saying_why() -> None:
    files = sorted([*ROOT.glob("distill/**/*.py"), *ROOT.glob("flows/**/*.py")])
    assert len(files) > 30
    bad = [f"{p.relative_to(ROOT)}:{line} {name}: {size} lines, {params} parameters"
           for p in files for name, line, size, params in oversized(p.read_text())]
    assert not bad, "over 60 lines or 8 parameters, with no comment above saying why:\n" + "\n".join(bad)


def test_the_counts_catch_what_they_should() -> None:
    many = "def f(a, b, c, d, e, f, g, h, i):\n    return a\n"
    long = "def g(self):\n    '''doc'''\n" + "".join(f"    x{i} = {i}\n" for i in range(61))
    fine = "class C:\n    def h(self, a, b, c, d, e, f, g, h):\n        '''Eight and self.'''\n        return a\n"
    assert [n for n, *_ in oversized(many)] == ["f"]
    assert [(n, size) for n, _, size, _ in oversized(long)] == [("g", 61)]
    assert oversized(fine) == []
    assert oversized("# nine: each is a separate decision\n" + many) == []
