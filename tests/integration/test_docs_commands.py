"""The README's "Try it" section and docs/service.md's command-line and curl flows, run as written.

``scripts/run`` starts the embedded service (SQLite, a local worker, the API); the shell
blocks are extracted from the documents and run by bash in a fresh folder, with
``.venv/bin`` first on the PATH (the README's ``. .venv/bin/activate``). The one change made
to the commands: the service listens on a free port instead of 8000, so that test runs do
not collide; the client commands get it through ``CDI_URL``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from .conftest import ROOT, free_port, spawn, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def shell_blocks(path: Path, heading: str) -> list[str]:
    """The ```sh blocks of the section under ``heading`` (up to the next heading of its level or above)."""
    lines = path.read_text().splitlines()
    level = len(heading) - len(heading.lstrip("#"))
    start = lines.index(heading)
    section: list[str] = []
    fenced = False
    for line in lines[start + 1:]:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(rf"#{{1,{level}}} ", line):
            break
        section.append(line)
    return re.findall(r"```sh\n(.*?)```", "\n".join(section) + "\n", re.S)


def test_the_sections_hold_the_flows() -> None:
    readme = shell_blocks(ROOT / "README.md", "### Try it")
    assert len(readme) == 2 and "cdi demo" in readme[0] and "ID=$(curl" in readme[1]
    service = shell_blocks(ROOT / "docs" / "service.md", "## Run it on one machine (embedded mode)")
    assert len(service) == 3 and "cdi serve" in service[0] and "ID=$(curl" in service[1]
    assert "cdi submit" in service[2]


def test_readme_and_service_docs_run_literally(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = tmp_path / ".cdi"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDI_")}
    env.update({"CDI_DATA_DIR": str(data), "CDI_URL": url, "VIRTUAL_ENV": str(ROOT / ".venv"),
                "PATH": f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
                "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"), "OMP_WAIT_POLICY": "PASSIVE",
                # `cdi audit` caches features in the user's cache folder: this run's own, not the user's.
                "XDG_CACHE_HOME": str(tmp_path / "cache")})
    serve = spawn([str(ROOT / "scripts" / "run"), "--port", str(port)], env, tmp_path / "serve.log")
    try:
        wait_http(f"{url}/readyz", serve, timeout=300)
        assert (data / "api-key").is_file()
        readme = shell_blocks(ROOT / "README.md", "### Try it")
        # docs/service.md's first block installs and starts the service: scripts/run did that.
        service = shell_blocks(ROOT / "docs" / "service.md", "## Run it on one machine (embedded mode)")[1:]
        script = "set -euo pipefail\n" + "\n".join(readme + service).replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=2400)
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{serve.output()[-3000:]}"
    finally:
        serve.kill()

    out = proc.stdout
    # cdi demo, then cdi audit: the summary's verdict line.
    assert out.count("verdict        USED") == 2, out[-3000:]
    assert json.loads((tmp_path / "report.json").read_text())["verdict"] in ("used", "not_detected", "inconclusive")
    # The curl flows printed the report JSON (README, then docs/service.md).
    # (curl prints no newline after a body: the documents are found by decoding, not by line.)
    decoder = json.JSONDecoder()
    reports = [decoder.raw_decode(out, m.start())[0] for m in re.finditer(r'\{"schema_version"', out)]
    assert len(reports) >= 2 and all(r["verdict"] == "used" and "service" in r for r in reports)
    assert (tmp_path / "report.pdf").read_bytes().startswith(b"%PDF-")
    # docs/service.md's cdi flow overwrote report.json with the service's report.
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verdict"] == "used" and report["service"]["model"] == "digits-memorised"
    assert (tmp_path / "demo.zip").is_file() and (tmp_path / "demo" / "published").is_dir()
