"""Which Prefect API the ``python -m flows`` commands use (flows/prefect_api.py).

A real ``prefect server start`` for the private server; its fallback, when it cannot start, hands over
to Prefect's own temporary server by leaving ``PREFECT_API_URL`` unset.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows import prefect_api
from flows.prefect_api import PrivateServer, healthy, use_local_server

from helpers import processes_with


def test_a_configured_api_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:1/api")
    assert use_local_server() and os.environ["PREFECT_API_URL"] == "http://127.0.0.1:1/api"


def test_no_api_and_no_local_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(prefect_api, "LOCAL_PREFECT", "http://127.0.0.1:1/api")  # nothing listens on port 1
    assert not use_local_server() and "PREFECT_API_URL" not in os.environ


def test_a_server_that_cannot_start_leaves_the_api_unset(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(prefect_api.shutil, "which", lambda *a, **k: None)  # no `prefect` executable
    server = PrivateServer()
    assert server.wait(timeout=5) is False
    assert "PREFECT_API_URL" not in os.environ
    assert "did not start" in capsys.readouterr().err


@pytest.mark.slow
def test_private_server_serves_then_stops(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    server = PrivateServer()
    try:
        assert os.environ["PREFECT_API_URL"] == server.api_url
        assert server.wait(), server.log.read_text() if server.log.is_file() else ""
        assert healthy(server.api_url)
        assert (tmp_path / "prefect" / "prefect.db").is_file()  # the history goes to PREFECT_HOME's database
    finally:
        server.stop()
    assert not healthy(server.api_url)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads the process table from /proc")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGKILL"])
def test_the_pipelines_private_server_stops_however_the_pipeline_ends(sig, tiny_project, base_env, tmp_path):
    """`python -m flows pipeline` without a Prefect API starts its own server; TERM, HUP or KILL stops it too."""
    import signal
    import subprocess
    import sys
    import time
    import uuid

    project = tmp_path / "project"
    subprocess.run(["git", "clone", "-q", str(tiny_project), str(project)], check=True, env=base_env)
    marker = f"DISTILL_TEST_MARKER={uuid.uuid4().hex}"
    env = {**base_env, marker.split("=")[0]: marker.split("=")[1], "PREFECT_HOME": str(tmp_path / "prefect")}
    with open(tmp_path / "pipeline.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flows", "pipeline"], cwd=project, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "Running stage" not in (tmp_path / "pipeline.log").read_text():  # the server is up, DVC is running
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "pipeline.log").read_text()
            time.sleep(0.2)
        assert processes_with(marker, server=True), "no private server found"
        proc.send_signal(getattr(signal, sig))
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while processes_with(marker, server=True) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not processes_with(marker, server=True), f"the private Prefect server outlived the pipeline ({sig})"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in processes_with(marker):  # after SIGKILL, DVC and its stage run on: this test's processes only
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads the process table from /proc")
def test_a_stage_without_a_prefect_api_leaves_no_temporary_server(tiny_project, base_env, tmp_path):
    """Plain `dvc repro` with no server anywhere: Prefect starts a temporary one per stage, and it must stop."""
    import subprocess
    import sys
    import time
    import uuid

    project = tmp_path / "project"
    subprocess.run(["git", "clone", "-q", str(tiny_project), str(project)], check=True, env=base_env)
    marker = uuid.uuid4().hex
    env = {**base_env, "DISTILL_TEST_MARKER": marker, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-m", "flows", "stage", "data"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    deadline = time.monotonic() + 20
    while processes_with(f"DISTILL_TEST_MARKER={marker}") and time.monotonic() < deadline:
        time.sleep(0.2)
    left = processes_with(f"DISTILL_TEST_MARKER={marker}")
    for pid in left:
        os.kill(pid, 9)
    assert not left, "the stage left processes behind (Prefect's temporary server)"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads the process table from /proc")
def test_the_pipeline_with_its_private_server_sends_every_log_before_stopping_it(tiny_project, base_env, tmp_path):
    """A whole `python -m flows pipeline` on its private server: the flow's last logs reach the server before it
    stops (else Prefect's log worker retries the stopped server for a minute and prints `Error logging to API`)."""
    import subprocess
    import sys
    import uuid

    project = tmp_path / "project"
    subprocess.run(["git", "clone", "-q", str(tiny_project), str(project)], check=True, env=base_env)
    marker = uuid.uuid4().hex
    env = {**base_env, "DISTILL_TEST_MARKER": marker, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-m", "flows", "pipeline"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=900, stdin=subprocess.DEVNULL, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Finished in state Completed()" in out
    assert "Error logging to API" not in out and "Error sending" not in out, out[-3000:]
    assert not processes_with(f"DISTILL_TEST_MARKER={marker}", server=True), "the private server outlived the run"


# ------------------------------------------------------------------ Prefect through its public API
def test_a_server_that_cannot_start_hands_over_to_prefects_own_server(monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Prefect read the private server's URL when it was imported: ``api_settings`` takes it back, for the flows of
    its block, with ``temporary_settings`` (before, a private helper, ``refresh_global_settings_context``)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.prefect_api import api_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setattr(prefect_api.shutil, "which", lambda *a, **k: None)  # no `prefect` executable
    server = PrivateServer()
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):  # as if read at import
        with api_settings(server):
            assert PREFECT_API_URL.value() is None  # Prefect starts its own temporary server
        assert PREFECT_API_URL.value() == server.api_url
    assert "did not start" in capsys.readouterr().err
    with api_settings(None):  # no private server: nothing changes
        pass


def test_the_calls_below_prefects_public_api_still_exist() -> None:
    """Pins the workaround of flows/stage.py: linked_flow_run (PrefectHQ/prefect#9527: no public way to make a flow
    run in another process a subflow). A Prefect upgrade that renames these fails here first."""
    import inspect

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.flow_engine import run_flow

    assert {"flow", "flow_run", "parameters"} <= set(inspect.signature(run_flow).parameters)
    assert {"task", "flow_run_id", "dynamic_key", "name", "extra_tags"} <= set(
        inspect.signature(SyncPrefectClient.create_task_run).parameters)
    assert {"flow", "name", "parameters", "tags", "parent_task_run_id"} <= set(
        inspect.signature(SyncPrefectClient.create_flow_run).parameters)


@pytest.mark.slow
def test_a_flow_run_in_another_process_is_linked_as_a_subflow(sub_env: dict[str, str]) -> None:
    """What a stage process does under the pipeline, in this process: a flow run made as the subflow of a flow run
    that ran elsewhere, then run here, shows under it (its stand-in task run belongs to the parent)."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.stage import linked_flow_run

    @flow(name="pin-parent", persist_result=False)
    def parent() -> None:
        pass

    @flow(name="pin-child", persist_result=False)
    def child(x: int) -> int:
        return x + 1

    with temporary_settings(updates={PREFECT_API_URL: sub_env["PREFECT_API_URL"]}):
        parent_id = parent(return_state=True).state_details.flow_run_id
        run = linked_flow_run(child, name="linked", parameters={"x": 1}, parent=str(parent_id), tags=["pin"])
        assert run_flow(child, flow_run=run, parameters={"x": 1}) == 2
        with get_client(sync_client=True) as client:
            done = client.read_flow_run(run.id)
            assert done.state.is_completed() and done.parent_task_run_id is not None and "pin" in done.tags
            assert client.read_task_run(done.parent_task_run_id).flow_run_id == parent_id
