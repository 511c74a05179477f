"""Content-addressed blob storage: one object per SHA-256, in a local folder or an S3 bucket.

Every blob's key is ``<sha[:2]>/<sha[2:4]>/<sha>``, under the folder (:class:`LocalBlobStore`,
the embedded default) or under ``s3://bucket/prefix/`` (:class:`S3BlobStore`, selected with
``CDI_BLOB_URL``). Callers only see :class:`BlobStore`: they store a spooled file or a stream,
read a blob as a stream (or as bytes), and delete it; none of them knows where blobs live, so
the API and the workers may run on hosts that share no filesystem.

Neither backend lets a reader see a partial blob: the folder's writes go to a temporary file
renamed into place, and an S3 PUT (or multipart upload) appears whole when it completes. Two
writers of the same content both succeed. What may be deleted, and when, is decided by the blob
ledger (:mod:`app.storage.ledger`), never here.
"""

from __future__ import annotations

import abc
import hashlib
import os
import re
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from app.storage.s3url import parse_s3_url

if TYPE_CHECKING:
    from app.settings import Settings

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1024 * 1024


class BlobNotFound(LookupError):
    pass


class BlobStoreUnavailable(RuntimeError):
    """The store cannot be used at all (missing bucket, wrong credentials, unreachable endpoint)."""


def blob_key(sha256: str) -> str:
    """The content-addressed key of a blob, the same in every backend: ``ab/cd/abcd...``."""
    if not _SHA256.match(sha256):
        raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
    return f"{sha256[:2]}/{sha256[2:4]}/{sha256}"


class BlobStore(abc.ABC):
    """Where blobs live. ``spool_dir`` is a local folder for temporary files (streams are
    spooled there while they are hashed)."""

    spool_dir: Path
    #: Each read is a network round trip (readers of many blobs read ahead: worker/runner.py).
    remote: bool = False

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the blobs are, for logs and errors (no credentials)."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise :class:`BlobStoreUnavailable` with the reason if the store cannot be used."""

    @abc.abstractmethod
    def exists(self, sha256: str) -> bool: ...

    @abc.abstractmethod
    def put_file(self, src: str | os.PathLike[str], sha256: str) -> None:
        """Store the local file ``src`` (whose hash the caller computed) and remove ``src``.

        A blob already stored is not written again.
        """

    @abc.abstractmethod
    def open(self, sha256: str) -> BinaryIO:
        """A stream of the blob's bytes (close it). Raises :class:`BlobNotFound`."""

    @abc.abstractmethod
    def delete(self, sha256: str) -> bool:
        """Delete the blob; False if there was none."""

    def put_stream(self, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Store the concatenated ``chunks``; returns (sha256, size). Spooled to a temporary file
        while hashed, so a large stream is never held in memory."""
        h = hashlib.sha256()
        size = 0
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.spool_dir, prefix=f"put-{socket.gethostname()}-{os.getpid()}-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    h.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
            digest = h.hexdigest()
            self.put_file(tmp, digest)
            return digest, size
        finally:
            Path(tmp).unlink(missing_ok=True)

    def put_bytes(self, data: bytes) -> str:
        return self.put_stream([data])[0]

    def read(self, sha256: str) -> bytes:
        with self.open(sha256) as f:
            return f.read()

    def iter_chunks(self, sha256: str, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        """The blob in chunks (for a streamed HTTP response). Raises :class:`BlobNotFound` at once."""
        f = self.open(sha256)

        def gen() -> Iterator[bytes]:
            with f:
                while chunk := f.read(chunk_size):
                    yield chunk

        return gen()

    @contextmanager
    def local_copy(self, sha256: str) -> Iterator[Path]:
        """A local file with the blob's bytes, removed on exit (for readers that need a path)."""
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.spool_dir, prefix=f"get-{socket.gethostname()}-{os.getpid()}-")
        try:
            with os.fdopen(fd, "wb") as out, self.open(sha256) as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
            yield Path(tmp)
        finally:
            Path(tmp).unlink(missing_ok=True)


class LocalBlobStore(BlobStore):
    """Blobs as files under ``root`` (the embedded mode's default, or a shared volume)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        # Beside the blobs, on the same filesystem: put_file is a rename.
        self.spool_dir = self.root / "tmp"

    def _path(self, sha256: str) -> Path:
        return self.root / blob_key(sha256)

    def describe(self) -> str:
        return f"the folder {self.root}"

    def check(self) -> None:
        try:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BlobStoreUnavailable(f"cannot create the blob folder {self.root}: {exc.strerror}") from None

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    def put_file(self, src: str | os.PathLike[str], sha256: str) -> None:
        dst = self._path(sha256)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)

    def open(self, sha256: str) -> BinaryIO:
        try:
            return self._path(sha256).open("rb")
        except FileNotFoundError:
            raise BlobNotFound(sha256) from None

    def delete(self, sha256: str) -> bool:
        try:
            self._path(sha256).unlink()
            return True
        except FileNotFoundError:
            return False


#: boto3's error codes of a missing object or bucket.
_MISSING = {"404", "NoSuchKey", "NotFound"}


class S3BlobStore(BlobStore):
    """Blobs as objects ``<prefix>/<sha[:2]>/<sha[2:4]>/<sha>`` in an S3-compatible bucket.

    Files are uploaded with boto3's managed transfer (multipart above 16 MiB in parts of 8 MiB,
    read from the spooled file part by part: a large file is never held in memory); reads stream the object's body.
    Transient errors (throttling, 5xx, dropped connections) are retried by botocore's
    ``standard`` retry mode.
    """

    remote = True

    def __init__(self, bucket: str, prefix: str, client: Any, spool_dir: str | os.PathLike[str],
                 endpoint: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client
        self.spool_dir = Path(spool_dir)
        self.endpoint = endpoint
        from boto3.s3.transfer import TransferConfig

        # At most max_concurrency parts of multipart_chunksize in flight: memory stays bounded
        # whatever the size of the file.
        self._transfer = TransferConfig(multipart_threshold=16 * _CHUNK, multipart_chunksize=8 * _CHUNK,
                                        max_concurrency=4)

    @classmethod
    def from_settings(cls, settings: Settings) -> S3BlobStore:
        import boto3
        from botocore.config import Config

        bucket, prefix = parse_s3_url(settings.blob_url)
        endpoint = settings.s3_endpoint_url or None
        config = Config(
            retries={"max_attempts": 6, "mode": "standard"}, connect_timeout=10, read_timeout=120,
            # MinIO, Ceph and moto serve buckets by path, not by virtual host.
            s3={"addressing_style": "path" if endpoint else "auto"},
        )
        secret = settings.aws_secret_access_key.get_secret_value() or None
        client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint, region_name=settings.aws_region or None,
            aws_access_key_id=settings.aws_access_key_id or None, aws_secret_access_key=secret, config=config)
        return cls(bucket, prefix, client, settings.upload_tmp_dir, endpoint)

    def key(self, sha256: str) -> str:
        k = blob_key(sha256)
        return f"{self.prefix}/{k}" if self.prefix else k

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return f"{where} at {self.endpoint}" if self.endpoint else where

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _MISSING or code == "NoSuchBucket":
                raise BlobStoreUnavailable(
                    f"the bucket {self.bucket!r} does not exist ({self.describe()}); create it, or fix "
                    "CDI_BLOB_URL / CDI_S3_ENDPOINT_URL") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise BlobStoreUnavailable(
                    f"access to the bucket {self.bucket!r} was refused ({self.describe()}, {code}); check "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and their s3:ListBucket permission") from None
            raise BlobStoreUnavailable(f"the object store answered {code} for {self.describe()}") from None
        except BotoCoreError as exc:
            raise BlobStoreUnavailable(f"cannot reach the object store ({self.describe()}): {exc}") from None

    def exists(self, sha256: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(sha256))
            return True
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in _MISSING:
                return False
            raise

    def put_file(self, src: str | os.PathLike[str], sha256: str) -> None:
        try:
            if not self.exists(sha256):
                self.client.upload_file(os.fspath(src), self.bucket, self.key(sha256), Config=self._transfer)
        finally:
            Path(src).unlink(missing_ok=True)

    def open(self, sha256: str) -> BinaryIO:
        from botocore.exceptions import ClientError

        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key(sha256))
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) in _MISSING:
                raise BlobNotFound(sha256) from None
            raise
        return obj["Body"]  # botocore's StreamingBody, an io.IOBase

    def delete(self, sha256: str) -> bool:
        # DELETE answers 204 whether or not the object was there: ask first, for the count.
        if not self.exists(sha256):
            return False
        self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))
        return True


def open_blob_store(settings: Settings) -> BlobStore:
    """The store the settings name: ``CDI_BLOB_URL=s3://...``, else the folder ``CDI_BLOB_DIR``."""
    if settings.blob_url:
        return S3BlobStore.from_settings(settings)
    return LocalBlobStore(settings.blobs)
