"""Which Prefect API the flows of a ``python -m flows`` process talk to.

In order: ``PREFECT_API_URL`` from the environment; else a local ``prefect server start`` on the default
port; else a private ``prefect server start`` (no UI) on a free port for the length of the command (the
pipeline and seeds commands, and a stage under plain ``dvc repro``), started the moment the command starts so
that it comes up while this process imports. Prefect's own fallback, a temporary server that Prefect starts
only when the flow is called, would make the command wait for it, and it outlives a killed process (it has no
parent-death signal) and dies with it on Ctrl-C (it is in the terminal's process group). The private server
keeps its history in the same database (``PREFECT_HOME``), so the runs are in the UI of any later
``prefect server start``.

Nothing here imports Prefect: the environment is set before Prefect reads its settings.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, ContextManager, Optional

from flows.lifetime import die_with_parent

LOCAL_PREFECT = "http://127.0.0.1:4200/api"
STARTUP_TIMEOUT = 120.0


def healthy(api_url: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def use_local_server() -> bool:
    """Point ``PREFECT_API_URL`` at a running local ``prefect server start``; True if an API is configured."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    if healthy(LOCAL_PREFECT):
        os.environ["PREFECT_API_URL"] = LOCAL_PREFECT
        return True
    return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api_settings(server: Optional["PrivateServer"]) -> ContextManager[Any]:
    """Where the flows run: once ``server`` answers, nothing changes; if it cannot start, Prefect's settings
    without an API, for this block (Prefect read the server's URL when it was imported, and then starts its
    own temporary server). ``prefect.settings.temporary_settings`` is Prefect's public way to change them."""
    if server is None or server.wait():
        return contextlib.nullcontext()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(restore_defaults={PREFECT_API_URL})


class PrivateServer:
    """A ``prefect server start`` for this command only; :meth:`wait` before the first flow.

    It stops on every way the command ends: an ``atexit`` hook (a normal end, an error, Ctrl-C, and SIGTERM or
    SIGHUP, which the command turns into an exit), registered before Prefect starts any of its own, so that it
    runs after Prefect has sent its queued logs and events (Prefect drains its workers at exit), and, on Linux,
    the kernel's parent-death signal when the command is killed outright. If it does not come up, :meth:`wait`
    says so, stops it, and leaves the API unset: with :func:`api_settings`, Prefect then starts its own
    temporary server.
    """

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="distill-prefect-")
        self.log = Path(self._dir) / "server.log"
        self.api_url = f"http://127.0.0.1:{free_port()}/api"
        port = self.api_url.rsplit(":", 1)[1].split("/")[0]
        prefect = shutil.which("prefect", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                                   os.environ.get("PATH", "")]))
        self._proc: Optional[subprocess.Popen] = None
        if prefect is None:
            return
        with open(self.log, "w") as out:
            self._proc = subprocess.Popen(
                [prefect, "server", "start", "--host", "127.0.0.1", "--port", port, "--no-ui", "--analytics-off"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=die_with_parent)
        os.environ["PREFECT_API_URL"] = self.api_url
        atexit.register(self.stop)

    def wait(self, timeout: float = STARTUP_TIMEOUT) -> bool:
        """Block until the server answers; False (and the API unset) if it cannot start."""
        deadline = time.monotonic() + timeout
        while self._proc is not None and self._proc.poll() is None and time.monotonic() < deadline:
            if healthy(self.api_url):
                return True
            time.sleep(0.1)
        tail = self.log.read_text()[-2000:] if self.log.is_file() else ""
        print(f"[flows] the private Prefect server did not start; Prefect starts its own temporary one.\n{tail}",
              file=sys.stderr, flush=True)
        self.stop()  # unsets PREFECT_API_URL, for the processes this one starts
        return False

    def stop(self) -> None:
        if os.environ.get("PREFECT_API_URL") == self.api_url:  # nothing started from here on may reach for it
            del os.environ["PREFECT_API_URL"]
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, 15)
                self._proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self._proc.pid, 9)
                except ProcessLookupError:
                    pass
                self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
