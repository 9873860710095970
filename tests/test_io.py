"""distill.io: atomic and durable writes, folder swaps that survive a crash between their renames, hashing,
the progress switch."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from distill.io import (
    atomic_replace,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    make_staging_dir,
    old_dir,
    progress,
    recover_dir,
    staged_dir,
    staging_dir,
    swap_in_dir,
)


@pytest.fixture()
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """Every ``os.fsync`` call, as ``(inode, is_folder)`` of what the descriptor pointed at."""
    calls: list[tuple[int, bool]] = []
    real = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        calls.append((st.st_ino, stat.S_ISDIR(st.st_mode)))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return calls


def test_atomic_write_replaces_the_content_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "m.json"
    atomic_write_json(target, {"b": 1, "a": [1.5]})
    assert target.read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and os.listdir(target.parent) == ["m.json"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()  # not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("when", ["before writing", "half written"])
def test_a_writer_that_raises_leaves_the_old_content(tmp_path: Path, when: str) -> None:
    target = tmp_path / "ckpt.bin"
    target.write_bytes(b"old content")

    def writer(tmp: str) -> None:
        if when == "half written":
            Path(tmp).write_bytes(b"new con")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        atomic_replace(target, writer)
    assert target.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["ckpt.bin"]  # the temporary file is gone too


def test_atomic_write_fsyncs_the_file_then_its_folder(tmp_path: Path, fsynced: list[tuple[int, bool]]) -> None:
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "{}")
    # The file is fsync-ed under its temporary name: the same inode that now has the final name.
    assert fsynced == [(target.stat().st_ino, False), (tmp_path.stat().st_ino, True)]


def _staged(out: Path, content: str) -> Path:
    staging = make_staging_dir(out, "1")
    (staging / "sub").mkdir()
    (staging / "sub" / "data.txt").write_text(content)
    return staging


def test_swap_in_dir_fsyncs_every_file_and_folder_and_the_parent(tmp_path: Path,
                                                                 fsynced: list[tuple[int, bool]]) -> None:
    out = tmp_path / "store"
    staging = _staged(out, "v1")
    inodes = {p: p.stat().st_ino for p in (staging, staging / "sub", staging / "sub" / "data.txt")}
    swap_in_dir(staging, out)
    assert (out / "sub" / "data.txt").read_text() == "v1"
    assert set(fsynced) >= {(inodes[staging], True), (inodes[staging / "sub"], True),
                            (inodes[staging / "sub" / "data.txt"], False), (tmp_path.stat().st_ino, True)}
    assert fsynced[-1] == (tmp_path.stat().st_ino, True)  # the renames are made durable last


def test_a_crash_between_the_swap_renames_is_recovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "store"
    swap_in_dir(_staged(out, "v1"), out)
    staging = _staged(out, "v2")
    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        if Path(src) == staging:  # the second rename: staging -> out
            raise OSError("killed between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="between the renames"):
        swap_in_dir(staging, out)
    monkeypatch.undo()
    assert not out.exists() and (old_dir(out) / "sub" / "data.txt").read_text() == "v1"  # what a kill there leaves
    recover_dir(out)  # what readers call first
    assert (out / "sub" / "data.txt").read_text() == "v1" and not old_dir(out).exists()
    recover_dir(out)  # a no-op on a complete folder
    assert (out / "sub" / "data.txt").read_text() == "v1"


def test_make_staging_dir_finishes_a_swap_and_clears_killed_writers(tmp_path: Path) -> None:
    out = tmp_path / "store"
    swap_in_dir(_staged(out, "v1"), out)
    os.replace(out, old_dir(out))  # a crash between the renames ...
    staging_dir(out, "123").mkdir()  # ... and a killed writer's staging folder
    staging = make_staging_dir(out, "456")
    assert staging == tmp_path / ".store.tmp-456" and list(staging.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [".store.tmp-456", "store"]
    assert (out / "sub" / "data.txt").read_text() == "v1"
    (staging / "data.txt").write_text("v2")
    swap_in_dir(staging, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"] and (out / "data.txt").read_text() == "v2"


def test_staged_dir_swaps_in_what_the_block_wrote_or_keeps_the_old_folder(tmp_path: Path) -> None:
    out = tmp_path / "store"
    with staged_dir(out, "1") as staging:
        (staging / "data.txt").write_text("v1")
        assert not out.exists()  # nothing is in place until the block ends
    assert (out / "data.txt").read_text() == "v1"
    with pytest.raises(RuntimeError, match="writer died"):
        with staged_dir(out, "2") as staging:
            (staging / "data.txt").write_text("v2, half")
            raise RuntimeError("writer died")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"] and (out / "data.txt").read_text() == "v1"


def test_staged_dir_of_a_process_group_swaps_once_all_wrote(tmp_path: Path) -> None:
    """Every process writes into the main process's staging folder; only the main one creates and swaps it."""
    out, events = tmp_path / "store", []
    with staged_dir(out, "g", main=True, wait=lambda: events.append("wait")) as staging:
        with staged_dir(out, "g", main=False) as other:  # another process of the group: the same folder
            assert other == staging and staging.is_dir()
            (other / "shard-1").write_text("1")
        assert not out.exists()  # a process that is not the main one never swaps
        (staging / "shard-0").write_text("0")
    assert sorted(p.name for p in out.iterdir()) == ["shard-0", "shard-1"]
    assert events == ["wait", "wait", "wait"]  # after creating it, before the swap and after it


def test_file_sha256(tmp_path: Path) -> None:
    data = os.urandom(3000)
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f", chunk=1024) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("env, enabled, shown", [("1", True, True), ("0", True, False), ("1", False, False)])
def test_progress_switch(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: str,
                         enabled: bool, shown: bool) -> None:
    monkeypatch.setenv("DISTILL_PROGRESS", env)
    with progress(total=3, desc="switch", unit="step", enabled=enabled) as bar:
        bar.update(3)
        bar.set_postfix_str("epoch=1/1")
    err = capsys.readouterr().err
    assert ("switch" in err and "3/3" in err and "epoch=1/1" in err) == shown
    assert shown or err == ""
