"""What the command line says when something goes wrong: one line that says what to do, no traceback.

Each case runs the real ``cdi`` command in a subprocess (the way a person meets it): a usage
error, an interrupt, a closed pipe, a CUDA device on a CPU build, an unknown model, a
service that is not running, an α out of range. And the progress displays: the units of
the audit's stages, and ``--wait``'s single redrawn line.
"""

from __future__ import annotations

import http.server
import io
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CDI = [sys.executable, "-c", "import sys; from cdi.cli import main; sys.exit(main())"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}


def cdi(*args: str, timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CDI, *args], capture_output=True, text=True, timeout=timeout, env=ENV, **kw)


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cdi import zoo

    root = tmp_path_factory.mktemp("digits")
    zoo.get("digits-memorised").export(root, members=4, held_out=4)
    return root / "published"


def test_usage_errors_print_usage_not_a_traceback(tmp_path: Path) -> None:
    proc = cdi("audit", "--model", "digits-memorised")
    assert proc.returncode == 2 and "usage: cdi audit" in proc.stderr and "required" in proc.stderr
    no_traceback(proc)
    proc = cdi("audit", "--model", "digits-memorised", "--published", str(tmp_path / "absent"),
               "--unpublished", str(tmp_path / "absent"))
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "absent" in proc.stderr
    no_traceback(proc)


def test_alpha_out_of_range_is_refused_in_one_line(digits: Path) -> None:
    proc = cdi("audit", "--model", "digits-memorised", "--published", str(digits), "--unpublished", str(digits),
               "--alpha", "0.5")
    assert proc.returncode == 2 and "alpha" in proc.stderr and "0.5" in proc.stderr
    no_traceback(proc)


def test_unknown_model_lists_the_known_ones(digits: Path, tmp_path: Path) -> None:
    from cdi import zoo

    known = [m.name for m in zoo.list_models()]
    proc = cdi("features", "--model", "no-such-model", "--images", str(digits), "--out", str(tmp_path / "f.csv"))
    assert proc.returncode == 2 and "no-such-model" in proc.stderr
    assert all(name in proc.stderr for name in known) and "cdi models" in proc.stderr
    no_traceback(proc)
    proc = cdi("demo", "--model", "no-such-model")
    assert proc.returncode == 2 and all(name in proc.stderr for name in known)
    no_traceback(proc)


def test_cuda_on_a_build_without_it_says_use_cpu(digits: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():  # pragma: no cover - a GPU machine: the message cannot arise
        proc = cdi("features", "--model", "digits-memorised", "--images", str(digits), "--out",
                   str(tmp_path / "f.csv"), "--device", f"cuda:{torch.cuda.device_count()}")
        assert proc.returncode == 2 and "numbered from 0" in proc.stderr
        no_traceback(proc)
        return
    proc = cdi("features", "--model", "digits-memorised", "--images", str(digits), "--out", str(tmp_path / "f.csv"),
               "--device", "cuda")
    assert proc.returncode == 2 and "--device cuda" in proc.stderr and "use --device cpu" in proc.stderr
    no_traceback(proc)
    proc = cdi("features", "--model", "digits-memorised", "--images", str(digits), "--out", str(tmp_path / "f.csv"),
               "--device", "tpu")
    assert proc.returncode == 2 and "unknown device" in proc.stderr
    no_traceback(proc)


def test_ctrl_c_ends_quietly() -> None:
    # The child must take Ctrl-C as a terminal's process does: a test runner's worker process
    # may ignore SIGINT, and an ignored SIGINT is inherited (Python then never raises
    # KeyboardInterrupt).
    proc = subprocess.Popen([*CDI, "demo", "--members", "40", "--held-out", "40"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # Wait until the demo is under way (it prints its first line), then interrupt it.
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("demo:"), first
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err


# --- the HTTP client's commands -------------------------------------------------------------


class _Reports(http.server.BaseHTTPRequestHandler):
    """A service answering every report request with a large JSON document."""

    def do_GET(self) -> None:
        body = json.dumps({"verdict": "used", "p_value": 0.001, "rows": ["x" * 100] * 20_000}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def report_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Reports)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_a_closed_pipe_ends_quietly(report_server: str) -> None:
    """``cdi fetch ID | head``: head closes the pipe early; cdi stops without a word."""
    command = " ".join([*(f"'{a}'" for a in CDI), "fetch", "some-id", "--url", report_server, "--api-key", "k",
                        "| head -n 2"])
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=120,
                          env=ENV)
    assert proc.stdout.splitlines()[0] == "{"
    assert proc.stderr == "", proc.stderr
    assert proc.returncode in (0, 141)


def test_a_service_that_is_not_running_is_named_with_how_to_start_it() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    proc = cdi("status", "some-id", "--url", url, "--api-key", "k")
    assert proc.returncode == 2
    assert url in proc.stderr and "scripts/run" in proc.stderr and "cdi serve" in proc.stderr
    assert "--url" in proc.stderr and "CDI_URL" in proc.stderr
    no_traceback(proc)


# --- progress displays ----------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _status(state: str, stage: str | None = None, done: int = 0, total: int = 0, **extra: Any) -> dict[str, Any]:
    return {"id": "a1", "state": state, "progress": {"stage": stage, "done": done, "total": total}, **extra}


STATUSES = [_status("queued"), _status("validating", "validating", 3, 30), _status("extracting", "extracting", 10, 30),
            _status("extracting", "extracting", 20, 30), _status("extracting", "extracting", 30, 30),
            _status("done", "testing", 2, 2, verdict="used", p_value=0.001)]


def test_wait_redraws_one_line_on_a_terminal() -> None:
    from app.cli import StatusLine

    out = _Terminal()
    line = StatusLine(out)
    for s in STATUSES:
        line(s)
    text = out.getvalue()
    assert text.count("\r") == len(STATUSES) and text.count("\n") == 1 and text.endswith("\n")
    # Each redraw covers what the longer line before it left.
    frames = text.rstrip("\n").split("\r")[1:]
    assert all(len(b) >= len(a.rstrip()) for a, b in itertools.pairwise(frames))
    assert "verdict=used" in frames[-1] and "extracting" not in frames[-1]


def test_wait_prints_a_line_per_stage_in_a_log() -> None:
    from app.cli import StatusLine

    out = io.StringIO()
    line = StatusLine(out)
    for s in STATUSES:
        line(s)
    lines = out.getvalue().splitlines()
    assert [ln.split()[1] for ln in lines] == ["queued", "validating", "extracting", "done"]


def test_stage_bars_count_images_or_steps(capsys: pytest.CaptureFixture[str]) -> None:
    from cdi.audit import Progress
    from cdi.cli import AuditProgress

    progress = AuditProgress()
    for p in [Progress("extracting", 0, 4), Progress("extracting", 4, 4), Progress("scoring", 0, 1),
              Progress("scoring", 1, 1), Progress("testing", 0, 2), Progress("testing", 2, 2)]:
        progress(p)
    err = capsys.readouterr().err
    bars = {ln.split(":")[0].strip(): ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()}
    assert "img" in bars["extracting"]
    assert "step" in bars["scoring"] and "/img" not in bars["scoring"] and "img/" not in bars["scoring"]
    assert "s/step" not in bars["scoring"] and "step/s" not in bars["testing"]
