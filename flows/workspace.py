"""One pipeline at a time in a workspace.

**The workspace lock.** ``python -m flows pipeline``, ``python -m flows seeds`` and the Prefect deployments' flow
runs hold an exclusive lock on ``.dvc/tmp/distill-workspace.lock`` from before they read or touch ``params.yaml``
or start DVC until they end. A second one stops at once with :class:`WorkspaceBusy`, naming the holder (its pid,
command and start time), and changes nothing. DVC's own repository lock does not cover this: ``dvc exp run``
stashes the workspace, rewrites ``params.yaml`` for its ``-S`` values and touches ``dvc.lock`` before it takes
that lock and refuses, so the first pipeline then records the second's params and fails at its end (issue 17).
The lock is ``fcntl.flock`` on an open file: the kernel releases it however the holder ends, SIGKILL included,
so there is never a stale lock to remove. The file itself stays, holding the last holder's description.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from distill.config import ParamsError

__all__ = ["LOCK_FILE", "WorkspaceBusy", "workspace_lock", "held", "command_line"]

LOCK_FILE = Path(".dvc") / "tmp" / "distill-workspace.lock"

# The workspaces this process holds: a flow run that the CLI started in this process (pipeline_flow inside
# `python -m flows pipeline`, each seed's pipeline_flow inside seeds_flow) is already covered.
_HELD: dict[Path, tuple[Any, int]] = {}


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
def workspace_lock(root: str | Path, command: str) -> Iterator[None]:
    """Hold the workspace lock of the DVC project ``root`` (re-entrant within this process).

    Args:
        root: the project (a DVC repository).
        command: what holds it, for the message a second command prints (e.g. ``python -m flows pipeline``).

    Raises:
        WorkspaceBusy: another process holds it; nothing was read or changed.
        ParamsError: ``root`` is not a DVC repository.
    """
    import fcntl

    root = Path(root).resolve()
    if root in _HELD:
        handle, depth = _HELD[root]
        _HELD[root] = (handle, depth + 1)
        try:
            yield
        finally:
            _HELD[root] = (handle, _HELD[root][1] - 1)
        return
    if not (root / ".dvc").is_dir():
        raise ParamsError(f"{root} is not a DVC repository (no .dvc/): run the pipeline from the project's root")
    path = root / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # not truncated before the lock is ours: it holds the holder's description
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(handle)
        handle.close()
        raise WorkspaceBusy(
            f"another pipeline is running in {root}: {holder}. Nothing was changed. Wait for it to end, or stop "
            "it (Ctrl-C in its terminal, or kill its pid), then run this again.") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "command": command, "since": time.time()}))
        handle.flush()
        _HELD[root] = (handle, 1)
        yield
    finally:
        _HELD.pop(root, None)
        handle.close()  # closing the file releases the lock


def command_line() -> str:
    """This process's command line as a user typed it (``python -m flows pipeline ...``)."""
    args = sys.argv[1:]
    main = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if main is not None and main.name == "__main__.py" and main.parent.name == "flows":
        return " ".join(["python -m flows", *args])
    return " ".join(sys.argv)
