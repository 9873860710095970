"""The pipeline flow's own logic (flows/pipeline.py); the flow itself runs in test_pipeline_e2e.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.pipeline import StageFailed, run_dvc

from helpers import REPO

# A stand-in for `dvc exp run` running a stage: like DVC, it ignores SIGINT while its stage runs, and relies on
# the stage receiving the interrupt too (as Ctrl-C in a terminal delivers it); the stage records how it stopped.
STAGE = """
import signal, sys, time, pathlib
marker = pathlib.Path(sys.argv[1])
signal.signal(signal.SIGINT, lambda *_: (marker.write_text("interrupted"), sys.exit(130)))
marker.write_text("running")
time.sleep(60)
"""
CHILD = f"""
import signal, subprocess, sys
stage = subprocess.Popen([sys.executable, "-c", {STAGE!r}, sys.argv[1]])
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.exit(stage.wait())
"""
# The pipeline command's process: `python -m flows pipeline` turns SIGTERM/SIGHUP into an exit, then run_dvc.
PARENT = """
import sys
from pathlib import Path
from flows.__main__ import _exit_on_hangup_and_term
from flows.pipeline import run_dvc
_exit_on_hangup_and_term()
run_dvc([sys.executable, "-c", sys.argv[1], sys.argv[2]], cwd=Path("."), env=None)
"""


@pytest.mark.parametrize("argv", [["--help"], ["stage", "--help"], ["pipeline", "--help"], ["seeds", "--help"]])
def test_every_help_prints(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A `%` in a help string is argparse's format character: `python -m flows --help` once crashed on `95 % CI`."""
    from flows.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m flows"), out
    if argv == ["--help"]:
        assert "95 % CI" in out, out


def test_a_failing_dvc_command_fails_the_flow_naming_its_status(tmp_path: Path) -> None:
    with pytest.raises(StageFailed, match="exited with status 3"):
        run_dvc([sys.executable, "-c", "import sys; sys.exit(3)"], cwd=tmp_path, env=dict(os.environ))
    run_dvc([sys.executable, "-c", "pass"], cwd=tmp_path, env=dict(os.environ))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_stopping_the_pipeline_interrupts_dvc_first(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM, SIGHUP or Ctrl-C to the pipeline: DVC and the stage it runs get SIGINT, in time (DVC ignores it)."""
    marker = tmp_path / "child"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(marker)], cwd=tmp_path, env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr
    proc.send_signal(sig)
    proc.wait(timeout=20)  # under the 30 s after which the group would be killed
    assert proc.returncode != 0
    assert marker.read_text() == "interrupted"
