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
