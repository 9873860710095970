"""Warm stage processes: how the pipeline flow spares each DVC stage its start-up and teardown.

Every DVC stage command is ``python -m flows stage <name>``, a new Python process that imports torch,
Prefect, MLflow and matplotlib (about 3 s on 2 cores) and whose interpreter teardown after torch and
scikit-learn costs about another second. Seven stages pay that seven times. While ``python -m flows
pipeline`` runs, a *stage server* (``python -m flows.stage_server``) imports all of that once, and the
stage command DVC starts becomes a thin client: it hands its arguments, working directory, environment
and standard streams (the file descriptors themselves) to the server over a Unix socket. The server
forks a *worker*, a copy of itself with everything imported, which runs exactly what the command would
have run (``flows.__main__.main(argv)``) in the client's directory, with the client's environment and
streams; the client exits with the worker's exit status.

Nothing else changes. DVC runs every stage command and decides what is up to date; every stage is
still its own process (a fork: no state leaks from one stage into the next); a client that is killed
takes its worker with it, and SIGINT, SIGTERM and SIGHUP sent to the client reach the worker.

The client runs the stage itself, exactly as without a server, whenever the server cannot stand in for
a fresh process: no server named in the environment (plain ``dvc repro``), the server gone, the
project's code (``distill/``, ``flows/``) differing from what the server imported, or an environment
variable that may take effect at import time (``OMP_NUM_THREADS``, ``CUDA_VISIBLE_DEVICES``,
``PYTHONPATH`` ...) differing from the server's. It says why on stderr.

Protocol (one connection per stage command): the client sends a 4-byte big-endian length and a JSON
request ``{argv, cwd, env, fds}`` with its standard file descriptors attached (``SCM_RIGHTS``), then one
byte per signal to pass on; EOF means it is gone. The server answers with length-prefixed JSON
messages: ``{"decline": reason}``, or ``{"pid": worker}`` and later ``{"exit": status}``.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import struct
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

ENV_VAR = "DISTILL_STAGE_SERVER"
SWITCH = "DISTILL_WARM_STAGES"  # "0": no stage server, every stage starts cold (as under plain `dvc repro`)
# Environment variables read when they are used, not when a module is imported: they may differ between
# the server and a client (DVC, the pipeline flow and the shell set them per stage). Any other difference
# makes the client run the stage itself.
RUNTIME_PREFIXES = ("DVC_", "DISTILL_", "MLFLOW_", "_MLFLOW_", "PREFECT_API_", "GIT_")
RUNTIME_NAMES = frozenset({"PWD", "OLDPWD", "SHLVL", "_", "PS1", "TERM", "COLUMNS", "LINES"})
PACKAGES = ("distill", "flows")  # the project's code, compared between the server and a client's cwd
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_HEADER = struct.Struct(">I")
FIRST_REPLY_TIMEOUT = 300.0  # the server imports for a few seconds before it answers its first client


def warm_stages_enabled() -> bool:
    """On unless ``DISTILL_WARM_STAGES=0``; needs ``fork`` and Unix sockets with descriptor passing (POSIX)."""
    return os.environ.get(SWITCH, "1") != "0" and hasattr(os, "fork") and hasattr(socket, "send_fds")


# --------------------------------------------------------------------------------------------- framing
def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            raise EOFError("connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> dict[str, Any]:
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    return json.loads(_recv_exact(sock, size))


def _note(message: str) -> None:
    print(f"[flows] {message}", file=sys.stderr, flush=True)


def _log(message: str) -> None:
    print(f"[stage server] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- client
def delegate(argv: list[str]) -> Optional[int]:
    """Have the stage server run ``python -m flows <argv>``; returns its exit status, or None to run locally.

    None means the stage was not started, so running it here is safe: no server in the environment,
    the server unreachable, or the server declined (the reason is printed).
    """
    path = os.environ.get(ENV_VAR)
    if not path:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as err:
        _note(f"stage server {path} unreachable ({err}); running the stage in this process")
        sock.close()
        return None
    fds = [fd for fd in (0, 1, 2) if _is_open(fd)]
    request = json.dumps({"argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ), "fds": fds}).encode()
    try:
        socket.send_fds(sock, [_HEADER.pack(len(request))], fds)
        sock.sendall(request)
        sock.settimeout(FIRST_REPLY_TIMEOUT)
        first = _recv(sock)
    except (OSError, EOFError, ValueError) as err:
        _note(f"stage server {path} did not take the stage ({err}); running it in this process")
        sock.close()
        return None
    if "decline" in first:
        _note(f"stage server: {first['decline']}; running the stage in this process")
        sock.close()
        return None
    # From here on the worker runs: pass signals on, wait for its status.
    sock.settimeout(None)
    previous = {sig: signal.signal(sig, lambda signum, _frame: _forward(sock, signum)) for sig in FORWARDED_SIGNALS}
    try:
        while True:
            try:
                reply = _recv(sock)
            except (OSError, EOFError, ValueError) as err:
                _note(f"lost the stage server while it ran the stage (worker pid {first.get('pid')}): {err}")
                return 1
            if "exit" in reply:
                status = int(reply["exit"])
                return status if status >= 0 else 128 - status  # killed by signal N: the shell's 128 + N
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()


def _forward(sock: socket.socket, signum: int) -> None:
    try:
        sock.send(bytes([signum]))
    except OSError:
        pass


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------- server
def preload() -> None:
    """Import what the stages import, including what torch, accelerate and PIL import lazily on first use.

    Imports only: nothing here starts a thread or initialises CUDA, so forking afterwards is safe.
    """
    import importlib
    import pkgutil

    import distill.tracking  # noqa: F401  (first: it turns MLflow's telemetry off before MLflow is imported)
    import matplotlib

    matplotlib.use("Agg")
    for name in ("matplotlib.pyplot", "torch", "torch._dynamo", "torch.optim", "torch.utils.flop_counter",
                 "accelerate", "accelerate.utils", "safetensors.torch", "sklearn.datasets", "mlflow",
                 "mlflow.store.tracking.sqlalchemy_store", "prefect.flow_engine", "prefect.artifacts", "PIL.Image"):
        importlib.import_module(name)
    importlib.import_module("PIL.Image").init()  # image format plugins (the evaluate stage's PNGs)
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg_name + "."):
            importlib.import_module(info.name)


def code_digest(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every ``.py`` file of the project's packages under ``root``."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py")) if "__pycache__" not in p.parts}


def import_time_env(env: dict[str, str]) -> dict[str, str]:
    """The part of an environment that may act at import time (everything but :data:`RUNTIME_PREFIXES`/``NAMES``)."""
    return {k: v for k, v in env.items()
            if k not in RUNTIME_NAMES and not k.startswith(RUNTIME_PREFIXES) and k != ENV_VAR}


class Server:
    """The stage server's state: what it imported, from where, under which environment."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.code = code_digest(self.root)
        self.env = import_time_env(dict(os.environ))

    def decline_reason(self, request: dict[str, Any]) -> Optional[str]:
        """Why a worker forked from this server would not behave like a fresh process for ``request``, or None."""
        import torch

        client_env = import_time_env(request["env"])
        differ = sorted(k for k in set(client_env) | set(self.env) if client_env.get(k) != self.env.get(k))
        if differ:
            return f"the environment differs from the server's in {', '.join(differ[:5])}"
        try:
            client_code = code_digest(Path(request["cwd"]))
        except OSError as err:
            return f"cannot read the project's code under {request['cwd']} ({err})"
        if client_code != self.code:
            changed = sorted(set(client_code) ^ set(self.code) | {k for k in client_code
                                                                 if client_code[k] != self.code.get(k)})
            return f"the code under {request['cwd']} differs from what the server imported ({', '.join(changed[:3])})"
        if torch.cuda.is_initialized():
            return "CUDA is initialised in the server"
        return None

    def serve(self, listener: socket.socket) -> None:
        """Accept clients until the parent process goes away (or SIGTERM); one handler process per client."""
        parent = os.getppid()
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped automatically
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the clients, which pass it on
        listener.settimeout(1.0)
        while os.getppid() == parent:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            except InterruptedError:
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                code = 1
                try:
                    conn.settimeout(None)
                    code = self._handle(conn)
                finally:
                    os._exit(code)
            conn.close()

    def _handle(self, conn: socket.socket) -> int:
        """One client: check, fork the worker, relay signals, report the worker's exit status."""
        import selectors

        header, fds, _flags, _addr = socket.recv_fds(conn, _HEADER.size, 3)
        if len(header) < _HEADER.size:
            header += _recv_exact(conn, _HEADER.size - len(header))
        request = json.loads(_recv_exact(conn, _HEADER.unpack(header)[0]))
        what = f"`python -m flows {' '.join(request['argv'])}` in {request['cwd']}"
        reason = self.decline_reason(request)
        if reason:
            _log(f"declined {what}: {reason}")
            _send(conn, {"decline": reason})
            return 0
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            conn.close()
            _worker(request, fds)  # never returns
        for fd in fds:
            os.close(fd)
        _log(f"worker {pid} runs {what}")
        _send(conn, {"pid": pid})
        sel = selectors.DefaultSelector()
        sel.register(conn, selectors.EVENT_READ)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                _log(f"worker {pid} exited with status {code} after {time.monotonic() - started:.1f} s")
                _send(conn, {"exit": code})
                return 0
            if sel.select(timeout=0.05):
                data = conn.recv(64)
                if not data:  # the client is gone (killed): so is its stage
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    _log(f"worker {pid} killed: its client went away")
                    return 0
                for signum in data:
                    os.kill(pid, signum)


def _worker(request: dict[str, Any], fds: list[int]) -> None:
    """In the forked worker: become the client's process and run its command; exits, never returns."""
    code = 1
    try:
        for target, fd in zip(request["fds"], fds):
            if fd != target:
                os.dup2(fd, target)
                os.close(fd)
        for target in {0, 1, 2} - set(request["fds"]):
            os.dup2(os.open(os.devnull, os.O_RDWR), target)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.pop(ENV_VAR, None)  # processes this stage starts (accelerate ranks) run for themselves
        sys.argv = [sys.argv[0], *request["argv"]]
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        sys.stdout.reconfigure(line_buffering=os.isatty(1))
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()  # Prefect read its settings from the server's environment at import
        from flows.__main__ import main

        code = main(request["argv"]) or 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what the interpreter would print for an uncaught exception
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        _exit(code)


def _exit(code: int) -> None:
    """Exit like a normal interpreter (threads joined, atexit handlers run, streams flushed), minus teardown.

    The interpreter's own teardown after torch and scikit-learn takes about a second and does nothing a
    finished stage needs; ``os._exit`` skips it, as :mod:`multiprocessing` does for its forked children.
    """
    import atexit
    import threading

    for step in (getattr(threading, "_shutdown", None), atexit._run_exitfuncs, sys.stdout.flush, sys.stderr.flush):
        try:
            if step is not None:
                step()
        except BaseException:  # noqa: BLE001
            pass
    os._exit(code)


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m flows.stage_server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--fd", type=int, help="a listening Unix socket inherited from the parent")
    where.add_argument("--socket", help="bind and listen on this path")
    args = ap.parse_args(argv)
    if args.fd is not None:
        listener = socket.socket(fileno=args.fd)
    else:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(args.socket)
        listener.listen(16)
    server = Server(Path.cwd())
    preload()
    # What the imports made is the same in every worker: frozen, the collector of a worker neither walks
    # these objects again nor writes to their pages (which would copy them, page by page, after the fork).
    gc.collect()
    gc.freeze()
    server.serve(listener)
    return 0


# ------------------------------------------------------------------------------------- the flow's side
class StageServer:
    """Start a stage server for ``root`` (a context manager); ``env_var()`` is what the stages' environment needs.

    The listening socket is made here, before the server process starts, so a stage command can connect
    at once: its connection waits in the backlog while the server imports. The server exits when this
    process does, or at :meth:`close`. It writes a line per stage it serves or declines to ``log`` (a
    file; default: this process's stderr).
    """

    def __init__(self, root: Path, env: Optional[dict[str, str]] = None, log: Optional[Path] = None) -> None:
        import subprocess
        import tempfile

        self._dir = tempfile.mkdtemp(prefix="distill-stages-")
        self.path = os.path.join(self._dir, "sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
            listener.listen(16)
            env = dict(os.environ if env is None else env)
            env.pop(ENV_VAR, None)
            out = open(log, "a") if log is not None else None
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "flows.stage_server", "--fd", str(listener.fileno())], cwd=root, env=env,
                    pass_fds=(listener.fileno(),), start_new_session=True, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT if out is not None else None)
            finally:
                if out is not None:
                    out.close()
        finally:
            listener.close()  # the server holds it now; when the server is gone, clients are refused

    def env_var(self) -> dict[str, str]:
        return {ENV_VAR: self.path}

    def close(self) -> None:
        import shutil
        import subprocess

        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "StageServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def warm_stages(root: Path, env: Optional[dict[str, str]] = None) -> Iterator[dict[str, str]]:
    """A stage server for ``root`` while the block runs; yields what the stage commands' environment needs.

    Yields ``{}`` (and starts nothing) when warm stages are off, or when ``env`` (default: this process's
    environment) already names a server: the CLI starts one before the flow, a deployment run does not.
    """
    env = dict(os.environ if env is None else env)
    if not warm_stages_enabled() or env.get(ENV_VAR):
        yield {}
        return
    with StageServer(root, env) as server:
        yield server.env_var()


if __name__ == "__main__":
    sys.exit(main())
