"""One pipeline at a time in a workspace, and variants that leave it as it is.

**The workspace lock.** ``python -m flows pipeline``, ``python -m flows seeds`` and the Prefect deployments' flow
runs hold an exclusive lock on ``.dvc/tmp/distill-workspace.lock`` from before they read or touch ``params.yaml``
or start DVC until they end. A second one stops at once with :class:`WorkspaceBusy`, naming the holder (its pid,
command and start time), and changes nothing. DVC's own repository lock does not cover this: ``dvc exp run``
stashes the workspace, rewrites ``params.yaml`` for its ``-S`` values and touches ``dvc.lock`` before it takes
that lock and refuses, so the first pipeline then records the second's params and fails at its end (issue 17).
The lock is ``fcntl.flock`` on an open file: the kernel releases it however the holder ends, SIGKILL included,
so there is never a stale lock to remove. The file itself stays, holding the last holder's description.

A sweep's variants (:mod:`flows.sweep`) run side by side as ``dvc exp run --temp``, each in its own temporary
copy, so they never touch ``params.yaml``: they take the lock *shared* (``shared=True``, ``LOCK_SH``). Any number
of shared holders run together; a pipeline in the workspace (exclusive) is refused while one runs, and a shared
one while a workspace pipeline runs.

**Formatting-preserving edits of params.yaml.** :func:`apply_to_params_file` writes ``key=value`` overrides into
``params.yaml`` by replacing only each value's text on its own line: comments, ``null``, inline lists and the
comment column stay as they are (DVC's own rewrite, ``dvc exp run -S`` in the workspace, loses them).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from distill.config import ParamsError, apply_overrides, load_raw

__all__ = ["LOCK_FILE", "WorkspaceBusy", "workspace_lock", "held", "command_line", "apply_to_params_file", "set_values",
           "top_level"]

LOCK_FILE = Path(".dvc") / "tmp" / "distill-workspace.lock"

# The workspaces this process holds: a flow run that the CLI started in this process (pipeline_flow inside
# `python -m flows pipeline`, each seed's pipeline_flow inside seeds_flow) is already covered.
_HELD: dict[Path, tuple[Any, int, bool]] = {}  # root -> (open lock file, depth, shared)


class WorkspaceBusy(RuntimeError):
    """Another pipeline command holds this workspace."""


def held(root: str | Path) -> bool:
    """True if this process holds the workspace lock of ``root``."""
    return Path(root).resolve() in _HELD


def _holder(handle: Any) -> str:
    """The holder's description, as it wrote it (a holder that is just writing it may leave it empty)."""
    for _ in range(20):
        handle.seek(0)
        text = handle.read()
        try:
            info = json.loads(text)
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
            return f"pid {info['pid']}, `{info['command']}`, since {since}"
        except (ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "a process that has not said what it is"


@contextmanager
def workspace_lock(root: str | Path, command: str, *, shared: bool = False) -> Iterator[None]:
    """Hold the workspace lock of the DVC project ``root`` (re-entrant within this process).

    Args:
        root: the project (a DVC repository).
        command: what holds it, for the message a second command prints (e.g. ``python -m flows pipeline``).
        shared: for runs that leave the workspace as it is (a sweep's ``dvc exp run --temp`` variants): any number
            of shared holders at once, none while an exclusive one runs.

    Raises:
        WorkspaceBusy: another process holds it (or this one holds it shared and asks for it exclusive); nothing
            was read or changed.
        ParamsError: ``root`` is not a DVC repository.
    """
    import fcntl

    root = Path(root).resolve()
    if root in _HELD:
        handle, depth, held_shared = _HELD[root]
        if held_shared and not shared:
            raise WorkspaceBusy(f"this process runs a sweep's temporary experiments in {root}; a pipeline in the "
                                "workspace cannot run inside it. Nothing was changed.")
        _HELD[root] = (handle, depth + 1, held_shared)
        try:
            yield
        finally:
            _HELD[root] = (handle, _HELD[root][1] - 1, held_shared)
        return
    if not (root / ".dvc").is_dir():
        raise ParamsError(f"{root} is not a DVC repository (no .dvc/): run the pipeline from the project's root")
    path = root / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # not truncated before the lock is ours: it holds the holder's description
    try:
        fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(handle)
        handle.close()
        raise WorkspaceBusy(
            f"another pipeline is running in {root}: {holder}. Nothing was changed. Wait for it to end, or stop "
            "it (Ctrl-C in its terminal, or kill its pid), then run this again.") from None
    try:
        _describe(handle, command + (" (with a sweep's temporary experiments)" if shared else ""), shared)
        _HELD[root] = (handle, 1, shared)
        yield
    finally:
        _HELD.pop(root, None)
        handle.close()  # closing the file releases the lock


def _describe(handle: Any, command: str, shared: bool) -> None:
    """Write the holder's description; a shared holder keeps that of another shared holder that is alive."""
    if shared:
        handle.seek(0)
        try:
            info = json.loads(handle.read())
            os.kill(int(info["pid"]), 0)
            if info.get("shared"):
                return
        except (ValueError, KeyError, TypeError, OSError):
            pass
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "command": command, "since": time.time(), "shared": shared}))
    handle.flush()


def command_line() -> str:
    """This process's command line as a user typed it (``python -m flows pipeline ...``)."""
    args = sys.argv[1:]
    main = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if main is not None and main.name == "__main__.py" and main.parent.name == "flows":
        return " ".join(["python -m flows", *args])
    return " ".join(sys.argv)


# ------------------------------------------------------------------------- editing params.yaml in place
_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.-]*):(?P<gap> *)(?P<rest>.*)$")


def top_level(text: str) -> Iterator[tuple[int, str]]:
    """The characters of a YAML value outside its quotes and brackets, with their index."""
    depth, quote = 0, ""
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif depth == 0:
            yield i, ch


def _split_comment(rest: str) -> tuple[str, str]:
    """``value   # comment`` -> (``value``, ``   # comment``): a ``#`` after whitespace, outside quotes and brackets."""
    for i, ch in top_level(rest):
        if ch == "#" and (i == 0 or rest[i - 1] in " \t"):
            value = rest[:i].rstrip()
            return value, rest[len(value):]
    return rest.rstrip(), ""


def _flow_text(value: Any) -> str:
    """A value as one line of YAML: ``null``, ``0.5``, ``soft``, ``[0.2, 1.0]``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, sort_keys=False).strip()
    return text[:-4].rstrip() if text.endswith("\n...") else text


def set_values(text: str, changes: dict[str, Any]) -> str:
    """``text`` (a YAML file of block mappings) with the dotted keys in ``changes`` set, nothing else changed.

    Each value is replaced on its own line; its comment keeps its column where the new value leaves room.

    Raises:
        ParamsError: a key is not on a line of its own with a one-line value (a block list or mapping).
    """
    lines = text.splitlines(keepends=True)
    stack: list[tuple[int, str]] = []
    found: set[str] = set()
    for i, line in enumerate(lines):
        match = _KEY_LINE.match(line.rstrip("\r\n"))
        if match is None:
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [match["key"]])
        stack.append((indent, match["key"]))
        if dotted not in changes:
            continue
        value, comment = _split_comment(match["rest"])
        if not value:
            raise ParamsError(f"cannot set {dotted} in place: its value spans several lines in params.yaml; "
                              "edit the file by hand")
        new = _flow_text(changes[dotted])
        if comment:  # keep the comment's column when the new value leaves room for it
            pad = len(comment) - len(comment.lstrip())
            comment = " " * max(1, pad + len(value) - len(new)) + comment.lstrip()
        ending = line[len(line.rstrip("\r\n")):]
        lines[i] = f"{match['indent']}{match['key']}:{match['gap'] or ' '}{new}{comment}{ending}"
        found.add(dotted)
    missing = sorted(set(changes) - found)
    if missing:
        raise ParamsError(f"cannot set {', '.join(missing)} in place: not a key on a line of its own in params.yaml")
    return "".join(lines)


def apply_to_params_file(path: str | Path, overrides: list[str]) -> bool:
    """Write ``key=value`` overrides into ``path`` in place, keeping its formatting; True if the file changed.

    The result is checked: read back, it must equal the file's values with the overrides applied.

    Raises:
        ParamsError: an override that cannot be written in place (the file is left as it was).
    """
    from distill.io import atomic_write_text

    path = Path(path)
    before = path.read_text()
    expected = apply_overrides(load_raw(path), overrides)
    changes = {}
    for item in overrides:
        key, _, value = item.partition("=")
        changes[key] = yaml.safe_load(value)
    after = set_values(before, changes)
    if yaml.safe_load(after) != expected:
        raise ParamsError(f"cannot write {' '.join(overrides)} into {path} in place; edit the file by hand")
    if after == before:
        return False
    atomic_write_text(path, after)
    return True
