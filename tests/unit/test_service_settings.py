"""Settings: CDI_* environment variables, embedded defaults, production checks; Celery config."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import Settings


def test_embedded_defaults_live_under_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("CDI_DATABASE_URL", "CDI_BROKER_URL", "CDI_BLOB_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("CDI_DATA_DIR", str(tmp_path))
    s = Settings()
    assert s.database_url == f"sqlite:///{tmp_path / 'cdi.db'}"
    assert s.broker_url == f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    assert s.blobs == tmp_path / "blobs"
    assert s.is_sqlite


def test_environment_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CDI_DATABASE_URL", "postgresql+psycopg://u:s3cret-pg@db/cdi")
    monkeypatch.setenv("CDI_BROKER_URL", "redis://:s3cret-redis@redis:6379/0")
    monkeypatch.setenv("CDI_BLOB_DIR", str(tmp_path / "b"))
    monkeypatch.setenv("CDI_MAX_IMAGES", "500")
    monkeypatch.setenv("CDI_MAX_UPLOAD_BYTES", "1048576")
    monkeypatch.setenv("CDI_ENVIRONMENT", "production")
    s = Settings()
    assert (s.database_url, s.broker_url, s.blobs) == ("postgresql+psycopg://u:s3cret-pg@db/cdi",
                                                       "redis://:s3cret-redis@redis:6379/0", tmp_path / "b")
    assert s.max_images == 500 and s.max_upload_bytes == 1048576


def test_production_refuses_the_embedded_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CDI_DATABASE_URL", raising=False)
    with pytest.raises(ValidationError, match="CDI_DATABASE_URL"):
        Settings(environment="production")
    with pytest.raises(ValidationError, match="CDI_BROKER_URL"):
        Settings(environment="production", database_url="postgresql+psycopg://u:s3cret@db/cdi")


@pytest.mark.parametrize("db,broker,bad", [
    ("postgresql+psycopg://cdi@db/cdi", "redis://:s3cret@redis:6379/0", "CDI_DATABASE_URL"),
    ("postgresql+psycopg://cdi:cdi@db/cdi", "redis://:s3cret@redis:6379/0", "CDI_DATABASE_URL"),
    ("postgresql+psycopg://cdi:s3cret@db/cdi", "redis://redis:6379/0", "CDI_BROKER_URL"),
])
def test_production_requires_passwords(db: str, broker: str, bad: str) -> None:
    with pytest.raises(ValidationError, match=bad):
        Settings(environment="production", database_url=db, broker_url=broker)
    Settings(environment="development", database_url=db, broker_url=broker)


@pytest.mark.parametrize("field,value", [("max_images", 1), ("max_compression_ratio", 0.5), ("lease_seconds", 0),
                                         ("worker_pool", "gevent")])
def test_invalid_values_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        Settings(**{field: value})


def test_celery_config_is_built_from_settings() -> None:
    from app.queue import celery_config

    s = Settings(broker_url="redis://localhost:6379/3", broker_visibility_timeout=77, audit_queue="gpu")
    conf = celery_config(s)
    assert conf["broker_url"] == "redis://localhost:6379/3"
    assert conf["broker_transport_options"] == {"visibility_timeout": 77}
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"] and conf["task_acks_on_failure_or_timeout"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_routes"]["worker.tasks.run_audit"] == {"queue": "gpu"}
    embedded = celery_config(Settings(broker_url="sqla+sqlite:////tmp/x.db"))
    assert embedded["broker_transport_options"] == {}


def test_the_object_store_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from app.storage.blobs import LocalBlobStore, S3BlobStore, open_blob_store

    monkeypatch.setenv("CDI_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CDI_BLOB_DIR", raising=False)
    monkeypatch.delenv("CDI_BLOB_URL", raising=False)
    local = Settings()
    assert isinstance(open_blob_store(local), LocalBlobStore)
    assert local.upload_tmp_dir == tmp_path / "blobs" / "tmp"  # beside the blobs: storing is a rename
    monkeypatch.setenv("CDI_BLOB_URL", "s3://cdi-blobs/tenant/a/")
    monkeypatch.setenv("CDI_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cret-key")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    s = Settings()
    assert (s.aws_access_key_id, s.aws_secret_access_key.get_secret_value(), s.aws_region) == \
        ("key-id", "s3cret-key", "eu-west-3")
    assert "s3cret-key" not in repr(s)
    assert s.upload_tmp_dir == tmp_path / "spool"  # a local folder: the blobs are elsewhere
    store = open_blob_store(s)  # no request is made until it is used
    assert isinstance(store, S3BlobStore)
    assert (store.bucket, store.prefix, store.endpoint) == ("cdi-blobs", "tenant/a", "http://minio:9000")
    sha = "ab" * 32
    assert store.key(sha) == f"tenant/a/ab/ab/{sha}"
    assert store.client.meta.region_name == "eu-west-3"
    assert "s3cret-key" not in store.describe()


@pytest.mark.parametrize("url", ["s3://", "s3://UPPER/x", "s3://a/x", "http://bucket/x", "s3://bucket/a/../b",
                                 "s3://bucket/a//b"])
def test_a_bad_blob_url_is_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="CDI_BLOB_URL must be s3://bucket/prefix"):
        Settings(blob_url=url)


def test_production_refuses_a_default_object_store_secret() -> None:
    server = {"environment": "production", "database_url": "postgresql+psycopg://u:s3cret@db/cdi",
              "broker_url": "redis://:s3cret@redis:6379/0", "blob_url": "s3://cdi-blobs"}
    with pytest.raises(ValidationError, match="AWS_SECRET_ACCESS_KEY"):
        Settings(**server, aws_secret_access_key="minioadmin")
    Settings(**server, aws_secret_access_key="a-real-secret")
    Settings(**server)  # no secret: boto3's own chain (an instance role)
