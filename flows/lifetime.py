"""No process outlives the command that started it.

Two kernel mechanisms, Linux only (elsewhere these are no-ops and the commands' own stops cover every ending
but a SIGKILL):

* :func:`die_with_parent`: the parent-death signal (``PR_SET_PDEATHSIG``). The private Prefect servers get it
  (:mod:`flows.prefect_api`), so a server dies with the process that started it, however that one dies.
* :func:`stop_with`: a stage process sends itself SIGTERM, which ends it the way Ctrl-C does (its Prefect run is
  marked crashed, its private server stops, the resume state of its last finished epoch stays), when the command
  it runs under has ended: ``python -m flows pipeline`` (its pid comes in ``DISTILL_PIPELINE_PID``) or DVC when
  it leads the stage's process group (``dvc repro`` started from a terminal, or by the pipeline, which runs DVC
  in a group of its own). A parent-death signal cannot do this: DVC runs a stage through ``$SHELL -c``, and
  ``dash`` (Debian's ``/bin/sh``) stays between DVC and the stage instead of exec-ing it. DVC itself is not
  signalled: once its stage has ended it records the failure, releases its lock and exits.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
from typing import Callable, Iterable, Optional

__all__ = ["PIPELINE_PID_ENV", "die_with_parent", "stop_with", "command_pids"]

PIPELINE_PID_ENV = "DISTILL_PIPELINE_PID"
_PR_SET_PDEATHSIG = 1


def _prctl() -> Optional[Callable[..., int]]:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()  # resolved here, in the parent: a child between fork and exec only calls it


def die_with_parent() -> None:
    """``preexec_fn`` of a child process: the kernel sends it SIGTERM when the process that started it dies,
    SIGKILL included (kept across ``exec``)."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def _runs_dvc(pid: int) -> bool:
    """True if process ``pid`` runs DVC (``dvc ...`` or ``python .../dvc ...``; Linux ``/proc``)."""
    try:
        args = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[:2]
    except OSError:
        return False
    return any(os.path.basename(a) == b"dvc" for a in args)


def command_pids(environ: Optional[dict[str, str]] = None) -> list[int]:
    """The processes whose end ends this one: the pipeline command, and DVC when it leads this process group.

    Only DVC as the leader: a script that started ``dvc repro &`` and went on or ended leads the group too.
    """
    environ = os.environ if environ is None else environ
    pids = []
    if environ.get(PIPELINE_PID_ENV, "").isdigit():
        pids.append(int(environ[PIPELINE_PID_ENV]))
    leader = os.getpgid(0)
    if leader != os.getpid() and _runs_dvc(leader):
        pids.append(leader)
    return sorted(set(pids) - {os.getpid()})


def stop_with(pids: Iterable[int], sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to this process as soon as any of ``pids`` has ended (at once if one already has).

    A daemon thread waits on the processes' pidfds, which become readable when a process ends, before its parent
    reaps it: nothing polls.
    """
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            os.kill(os.getpid(), sig)
            return
        except (OSError, AttributeError):  # no pidfd (not Linux, or an old kernel): the command's own stop covers it
            continue
    if not fds:
        return

    def watch() -> None:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        poller.poll()
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="distill-stop-with-command", daemon=True).start()
