"""What a first user of the service's commands meets: a busy port, a missing or refused key."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from app.cli import main, port_problem


def test_serve_on_a_busy_port_says_so_before_creating_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CDI_DATA_DIR", str(tmp_path / "data"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert "in use" in (port_problem("127.0.0.1", port) or "")
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"127.0.0.1:{port}" in err and "--port" in err and "in use" in err
    assert not (tmp_path / "data").exists()  # no database, tenant, key or worker
    assert port_problem("127.0.0.1", port) is None  # free again
    assert port_problem("127.0.0.1", 70000) is not None


def test_client_commands_without_a_key_say_where_one_is_looked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("CDI_API_KEY", raising=False)
    monkeypatch.delenv("CDI_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    # Nothing is listening there: the key is missing before any request is tried.
    assert main(["status", "some-id", "--url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "--api-key" in err and "CDI_API_KEY" in err and str(tmp_path / ".cdi" / "api-key") in err
