"""The two blob backends behind one interface: the local folder and an S3 bucket on a real S3
server (moto's server mode, boto3's real client over HTTP).

Both must behave the same for every caller: storing a file or a stream, reading a blob whole,
as a stream or as a local copy, existence, deletion, the not-found error, and the key a blob is
stored under (``<sha[:2]>/<sha[2:4]>/<sha>`` below the folder or the bucket's prefix).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.storage.blobs import BlobNotFound, BlobStore, BlobStoreUnavailable, LocalBlobStore, open_blob_store

from .conftest import S3Server

pytestmark = pytest.mark.integration


def _settings(tmp_path: Path, **extra: str) -> Any:
    from app.settings import Settings

    return Settings(data_dir=tmp_path / "data", blob_dir=tmp_path / "blobs",
                    **{k.removeprefix("CDI_").lower(): v for k, v in extra.items()})


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    env = request.getfixturevalue("s3_env") if request.param == "s3" else {}
    blobs = open_blob_store(_settings(tmp_path, **env))
    blobs.check()
    return blobs


def _spooled(blobs: BlobStore, data: bytes) -> Path:
    blobs.spool_dir.mkdir(parents=True, exist_ok=True)
    path = blobs.spool_dir / f"test-{hashlib.sha256(data).hexdigest()[:8]}-{os.urandom(4).hex()}"
    path.write_bytes(data)
    return path


def test_round_trip(store: BlobStore) -> None:
    data = b"\x89PNG round trip " + os.urandom(64)
    sha = hashlib.sha256(data).hexdigest()
    assert not store.exists(sha)
    assert store.put_stream(iter([data[:5], data[5:]])) == (sha, len(data))
    assert store.exists(sha)
    assert store.read(sha) == data
    with store.open(sha) as f:
        assert f.read(5) == data[:5] and f.read() == data[5:]
    assert b"".join(store.iter_chunks(sha, chunk_size=7)) == data
    with store.local_copy(sha) as path:
        assert path.read_bytes() == data
    assert not path.exists()
    assert store.put_bytes(data) == sha  # the same content twice: one blob, no error
    assert store.delete(sha) is True
    assert not store.exists(sha) and store.delete(sha) is False


def test_not_found(store: BlobStore) -> None:
    sha = hashlib.sha256(b"never stored").hexdigest()
    with pytest.raises(BlobNotFound):
        store.open(sha)
    with pytest.raises(BlobNotFound):
        store.read(sha)
    with pytest.raises(BlobNotFound):  # at once, not when the response starts streaming
        store.iter_chunks(sha)
    with pytest.raises(BlobNotFound), store.local_copy(sha):
        pass
    assert list(store.spool_dir.iterdir()) == []  # the failed copy left nothing behind
    with pytest.raises(ValueError, match="SHA-256"):
        store.exists("../../etc/passwd")


def test_put_file_consumes_the_spooled_file_and_never_uploads_twice(store: BlobStore) -> None:
    data = b"first content"
    sha = hashlib.sha256(data).hexdigest()
    first = _spooled(store, data)
    store.put_file(first, sha)
    assert not first.exists() and store.read(sha) == data
    # A second file announced under the same hash is not written: the blob is already there.
    # (Different bytes here, to see which copy the store keeps.)
    second = _spooled(store, b"other bytes, same announced hash")
    store.put_file(second, sha)
    assert not second.exists()
    if isinstance(store, LocalBlobStore):
        # The folder renames over the old file (same content in real use): nothing to compare.
        return
    assert store.read(sha) == data


def test_content_addressing_is_the_same_in_both_backends(tmp_path: Path, s3_server: S3Server) -> None:
    bucket = s3_server.new_bucket()
    local = LocalBlobStore(tmp_path / "local")
    s3 = open_blob_store(_settings(tmp_path, **s3_server.env(bucket, prefix="tenant-blobs/v1")))
    shas = [local.put_bytes(bytes([i]) * (100 + i)) for i in range(3)]
    assert [s3.put_bytes(bytes([i]) * (100 + i)) for i in range(3)] == shas
    files = sorted(p.relative_to(local.root).as_posix() for p in local.root.rglob("*")
                   if p.is_file() and p.parent != local.spool_dir)
    assert files == sorted(f"{s[:2]}/{s[2:4]}/{s}" for s in shas)
    assert sorted(s3_server.keys(bucket)) == [f"tenant-blobs/v1/{f}" for f in files]
    for sha in shas:
        s3.delete(sha)
    assert s3_server.keys(bucket) == []


def _chunks(total: int, seed: bytes) -> Iterator[bytes]:
    block = hashlib.sha256(seed).digest() * (1 << 15)  # 1 MiB, not all one byte
    for i in range(total // len(block)):
        yield bytes([i % 256]) + block[1:]


def test_a_large_object_streams_in_bounded_memory(tmp_path: Path, s3_server: S3Server) -> None:
    """48 MiB in and out of S3 (a multipart upload) with far less than 48 MiB of Python memory."""
    bucket = s3_server.new_bucket()
    store = open_blob_store(_settings(tmp_path, **s3_server.env(bucket)))
    size = 48 * 1024 * 1024
    expected = hashlib.sha256(b"".join(_chunks(size, b"large"))).hexdigest()
    tracemalloc.start()
    try:
        sha, stored = store.put_stream(_chunks(size, b"large"))
        _, peak_put = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        h = hashlib.sha256()
        for chunk in store.iter_chunks(sha):
            h.update(chunk)
        _, peak_get = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (sha, stored) == (expected, size) and h.hexdigest() == expected
    head = s3_server.client().head_object(Bucket=bucket, Key=store.key(sha))  # type: ignore[attr-defined]
    assert head["ContentLength"] == size
    assert head["ETag"].strip('"').endswith("-6"), head["ETag"]  # six parts of 8 MiB: multipart
    assert peak_put < size // 2, f"uploading held {peak_put / 2**20:.0f} MiB"
    assert peak_get < size // 8, f"reading held {peak_get / 2**20:.0f} MiB"
    assert list(store.spool_dir.iterdir()) == []
    assert store.delete(sha) and s3_server.keys(bucket) == []


def test_a_missing_bucket_is_a_clear_error_at_start(tmp_path: Path, s3_server: S3Server, migrated: str) -> None:
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = _settings(tmp_path, **s3_server.env("cdi-no-such-bucket"))
    with pytest.raises(BlobStoreUnavailable, match="the bucket 'cdi-no-such-bucket' does not exist"):
        open_blob_store(settings).check()
    settings = settings.model_copy(update={"database_url": migrated})

    class _Queue:
        def ping(self) -> None:
            pass

    app = create_app(settings, queue=_Queue())  # type: ignore[arg-type]
    with pytest.raises(BlobStoreUnavailable, match="cdi-no-such-bucket"), TestClient(app):
        pass


def test_the_worker_refuses_to_start_without_its_bucket(tmp_path: Path, s3_server: S3Server, migrated: str,
                                                      redis_url: str) -> None:
    from .conftest import service_env, spawn

    env = service_env(migrated, redis_url, tmp_path / "blobs", **s3_server.env("cdi-no-such-bucket"))
    argv = [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery", "worker",
            "--loglevel=INFO", f"--queues={env['CDI_AUDIT_QUEUE']}", "--concurrency=1", "--pool=solo",
            "--without-gossip", "--without-mingle"]
    proc = spawn(argv, env, tmp_path / "worker.log")
    try:
        assert proc.popen.wait(timeout=60) != 0
    finally:
        proc.kill()
    assert "the bucket 'cdi-no-such-bucket' does not exist" in proc.output()


def test_the_worker_reads_images_ahead_in_order(tmp_path: Path, s3_server: S3Server) -> None:
    """BlobImages keeps reads in flight from an object store; the library still sees its order,
    and a missing image fails at its place."""
    from worker.runner import BlobImages

    store = open_blob_store(_settings(tmp_path, **s3_server.env(s3_server.new_bucket())))
    assert store.remote
    payloads = [bytes([i]) * (50 + i) for i in range(40)]
    rows = [(f"i{i:02d}.png", store.put_bytes(data)) for i, data in enumerate(payloads)]
    images = list(BlobImages(store, rows))
    assert [f.name for f in images] == [name for name, _ in rows] and [f.data for f in images] == payloads
    gone = ("gone.png", hashlib.sha256(b"never stored").hexdigest())
    it = iter(BlobImages(store, [*rows[:25], gone, *rows[25:]]))
    assert [next(it).data for _ in range(25)] == payloads[:25]
    with pytest.raises(BlobNotFound):
        next(it)
