"""File helpers every layer shares: atomic writes, atomic folder swaps, hashing, and the progress switch.

Atomic writes: a file is written to a temporary sibling, flushed and ``fsync``-ed, renamed over its target
with ``os.replace``, and the folder is ``fsync``-ed so the rename itself is durable. A reader therefore sees
the old content or the new one, never half of either, after a killed process *and* after a power cut.

Sets of files (a training stage's checkpoint, metrics and curves, in three folders): :func:`replace_together`
writes every file to its temporary sibling first, and renames them only once all are written. A writer that
fails (a full disk, typically at the largest file) leaves every old file as it was, not the old checkpoint
beside a new curve. The renames themselves cannot be one atomic step across folders; a crash between them is
the only moment a mix can exist, and the training stages repair it on rerun (their resume state is kept until
DVC has recorded the outputs, :mod:`distill.stages.runner`).

Folder swaps (prepared data, the soft-label store): the new folder is written complete under a staging
name, every file in it is ``fsync``-ed, then two renames put it in place: ``out -> .<out>.old``,
``staging -> out``, and ``.old`` is deleted. A crash between the two renames leaves only ``.<out>.old``,
which :func:`recover_dir` (called by readers and by the next writer) renames back. A reader sees the
previous complete folder or the new complete one.

Staging folders: a writer builds the new folder under ``.<name>.tmp-<token>`` beside ``<name>``
(:func:`staging_dir`); :func:`make_staging_dir` first finishes an interrupted swap and clears what killed
writers left behind (``.<name>.old``, ``.<name>.tmp-*``), so one writer at a time is assumed. Every folder the
library writes (prepared data, the soft-label store, the servable model, a training's resume state) is written
through :func:`staged_dir`, the one staging-and-swap: the block writes the folder, the swap happens when it
succeeds, and a failure removes the staging folder and leaves the old one as it was.

Progress: one switch for every progress bar of the library, ``DISTILL_PROGRESS=0`` (tests, CI logs).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_replace",
    "discard_dir",
    "json_text",
    "replace_together",
    "staged_dir",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "file_md5",
    "file_sha256",
    "fsync_dir",
    "fsync_tree",
    "make_staging_dir",
    "old_dir",
    "progress",
    "progress_enabled",
    "recover_dir",
    "staging_dir",
    "swap_in_dir",
    "swapped_meta",
]


def fsync_dir(path: str | Path) -> None:
    """Make the entries of folder ``path`` (creations, renames) durable. A no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows: folders cannot be opened; NTFS journals renames itself
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_replace(path: str | Path, write: Callable[[str], None]) -> None:
    """Write ``path`` atomically and durably with ``write(tmp_path)`` (any writer that takes a file name).

    Args:
        path: the target file; its folder is created if needed.
        write: writes the complete content to the temporary path it is given.
    """
    replace_together({Path(path): write})


def replace_together(writes: Mapping[Path, Callable[[str], None]]) -> None:
    """Replace several files as one set: all are written and ``fsync``-ed to temporary siblings, then renamed.

    If any writer fails (or the process is interrupted while writing), every temporary file is removed and every
    target keeps its old content. Then each temporary file is renamed over its target and each folder is
    ``fsync``-ed.

    Args:
        writes: target file -> writer that writes the complete content to the temporary path it is given.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, write in writes.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            staged.append((tmp, path))
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the result the usual permissions
            _fsync_file(tmp)
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise
    for folder in dict.fromkeys(path.parent for _, path in staged):
        fsync_dir(folder)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (see :func:`atomic_replace`)."""
    atomic_replace(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably."""
    atomic_write_bytes(path, text.encode())


def json_text(data: Any) -> str:
    """``data`` as indented, key-sorted JSON with a final newline: how metrics files are written."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON, atomically (metrics files that DVC compares)."""
    atomic_write_text(path, json_text(data))


def discard_dir(path: str | Path) -> None:
    """Delete a folder so that a kill midway cannot leave a half-deleted copy under its name.

    It is renamed to a hidden ``.trash_<name>_<pid>`` sibling first (atomic), then removed; leftovers of earlier
    kills next to it go too.
    """
    path = Path(path)
    trash = path.with_name(f".trash_{path.name}_{os.getpid()}")
    if path.exists():
        os.replace(path, trash)
    for old in path.parent.glob(f".trash_{path.name}_*"):
        shutil.rmtree(old, ignore_errors=True)


def fsync_tree(folder: str | Path) -> None:
    """``fsync`` every file and folder below ``folder`` (before it is renamed into place)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            _fsync_file(os.path.join(root, name))
        fsync_dir(root)


def old_dir(out: str | Path) -> Path:
    """Where :func:`swap_in_dir` parks the previous folder during a swap: ``.<name>.old`` beside it."""
    out = Path(out)
    return out.with_name(f".{out.name}.old")


def recover_dir(out: str | Path) -> None:
    """Finish a swap a crash interrupted: only ``.<name>.old`` is there, so it goes back to ``<name>``."""
    out = Path(out)
    old = old_dir(out)
    if old.is_dir() and not out.exists():
        with contextlib.suppress(FileNotFoundError):  # another process may have restored it first
            os.replace(old, out)


def swapped_meta(folder: str | Path, name: str = "meta.json") -> Path | None:
    """The metadata file of a folder written by :func:`staged_dir`, once a swap a crash interrupted is finished
    (:func:`recover_dir`, what every reader does first); None when there is no such file."""
    recover_dir(folder)
    meta = Path(folder) / name
    return meta if meta.is_file() else None


def staging_dir(out: str | Path, token: str) -> Path:
    """Where a writer builds the next version of folder ``out``: ``.<name>.tmp-<token>`` beside it.

    Args:
        out: the folder that :func:`swap_in_dir` will replace.
        token: tells writers apart (e.g. the main process's pid, so a killed writer's leftovers can be named).
    """
    out = Path(out)
    return out.with_name(f".{out.name}.tmp-{token}")


def make_staging_dir(out: str | Path, token: str) -> Path:
    """Create an empty :func:`staging_dir` for ``out``, after clearing what earlier writers left.

    An interrupted swap is finished first (:func:`recover_dir`); then ``.<name>.old`` and every
    ``.<name>.tmp-*`` go: they belong to killed writers, since one writer at a time is assumed.

    Returns:
        The new, empty staging folder.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(out)
    shutil.rmtree(old_dir(out), ignore_errors=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = staging_dir(out, token)
    staging.mkdir()
    return staging


@contextlib.contextmanager
def staged_dir(out: str | Path, token: str, *, main: bool = True,
               wait: Callable[[], None] | None = None) -> Iterator[Path]:
    """Write the next version of folder ``out`` in the block; it replaces ``out`` only when the block succeeds.

    The main process clears what earlier writers left and creates the staging folder (:func:`make_staging_dir`);
    the block writes into it; then the main process swaps it in (:func:`swap_in_dir`). If the block fails, the
    main process removes the staging folder and ``out`` keeps its previous content.

    Args:
        out: the folder to replace.
        token: names the staging folder (:func:`staging_dir`); every process of a group must pass the same one.
        main: whether this process creates, swaps and removes the folder (the other processes of a group write
            into it only).
        wait: the group's barrier (e.g. ``accelerator.wait_for_everyone``): once after the staging folder exists,
            and before and after the swap, so every process's writes are in before it and see the new folder after.

    Yields:
        The empty staging folder.
    """
    barrier = wait or (lambda: None)
    staging = make_staging_dir(out, token) if main else staging_dir(out, token)
    barrier()
    try:
        yield staging
        barrier()
        if main:
            swap_in_dir(staging, out)
    except BaseException:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    barrier()


def swap_in_dir(staging: str | Path, out: str | Path) -> None:
    """Replace folder ``out`` by the complete folder ``staging`` (same parent), atomically and durably."""
    staging, out = Path(staging), Path(out)
    fsync_tree(staging)
    old = old_dir(out)
    recover_dir(out)
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    # A crash here leaves only .old: recover_dir() renames it back.
    os.replace(staging, out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (ties soft labels, metrics and resume state to exact inputs)."""
    return _file_digest(path, hashlib.sha256(), chunk)


def file_md5(path: str | Path, chunk: int = 1 << 20) -> str:
    """MD5 of a file's bytes: the hash DVC 3 records for a file in ``dvc.lock`` (``hash: md5``)."""
    return _file_digest(path, hashlib.md5(), chunk)


def _file_digest(path: str | Path, h: Any, chunk: int) -> str:
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def progress_enabled() -> bool:
    """False when ``DISTILL_PROGRESS=0`` (tests, CI logs): no progress bar anywhere."""
    return os.environ.get("DISTILL_PROGRESS", "1") != "0"


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar on stderr, or a silent stand-in with the same ``update``/``set_postfix``/``close`` methods.

    Args:
        iterable: what to iterate over (None: call ``update(n)`` yourself).
        total: the number of units.
        desc: the label, e.g. the stage name.
        unit: the unit shown in the rate.
        enabled: False on non-main processes; ``DISTILL_PROGRESS=0`` turns every bar off.
    """
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5, file=sys.stderr,
                disable=not (enabled and progress_enabled()), **kwargs)
