"""The service's one configuration object, read from ``CDI_*`` environment variables.

Every process of the service (API, worker, operator commands, embedded mode) builds its
configuration from :class:`Settings`; the Celery configuration is derived from it too
(:func:`app.queue.make_celery`). Defaults give the embedded mode: SQLite, a broker
in a SQLite file and blobs under ``CDI_DATA_DIR`` (``./.cdi``), so ``cdi serve`` needs no
server and no configuration.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cdi.runtime import DEFAULT_BATCH_SIZE

Environment = Literal["development", "production", "test"]


class Settings(BaseSettings):
    """Service configuration. Each field is the environment variable ``CDI_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="CDI_", env_file=None, extra="ignore")

    environment: Environment = "development"

    #: Folder of the embedded mode's SQLite files and blobs, and the default of the paths below.
    data_dir: Path = Path(".cdi")
    #: SQLAlchemy URL. Postgres: ``postgresql+psycopg://user:pw@host/db``. Default: SQLite in data_dir.
    database_url: str = ""
    #: Celery broker URL. Production: ``redis://host:6379/0``. Default: a SQLite file in data_dir.
    broker_url: str = ""
    #: Where uploaded images are stored, one file per SHA-256. Default: data_dir/blobs.
    blob_dir: Path | None = None
    #: Blobs in an S3-compatible object store instead: ``s3://bucket/prefix`` (the bucket must
    #: exist). Then the API and the workers share nothing but the database, the broker and the
    #: bucket. Empty: the folder blob_dir.
    blob_url: str = ""
    #: The object store's endpoint (MinIO, Ceph...: ``http://minio:9000``). Empty: AWS S3.
    s3_endpoint_url: str = ""
    #: The object store's credentials and region, under their standard names (``AWS_*``, no
    #: ``CDI_`` prefix). Empty: boto3's own chain (instance role, ~/.aws, ...).
    aws_access_key_id: str = Field(default="", validation_alias=AliasChoices("aws_access_key_id",
                                                                             "AWS_ACCESS_KEY_ID"))
    aws_secret_access_key: SecretStr = Field(default=SecretStr(""), validation_alias=AliasChoices(
        "aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"))
    aws_region: str = Field(default="", validation_alias=AliasChoices("aws_region", "AWS_REGION",
                                                                      "AWS_DEFAULT_REGION"))

    #: Seconds a broker message stays invisible to others while a worker holds it unacknowledged
    #: (Redis). A worker that dies (SIGKILL, lost machine) has its audit redelivered after this
    #: long. An audit running longer than this is redelivered to a second worker, which finds the
    #: first one's lease alive and waits: work is guarded by a lease, never run twice at once.
    broker_visibility_timeout: int = Field(default=3600, ge=5)
    #: Seconds a worker's lease on an audit lasts without a heartbeat; heartbeats come every third.
    lease_seconds: int = Field(default=120, ge=3)
    #: Queue name of audit tasks (a GPU worker pool listens on it).
    audit_queue: str = "audits"
    #: Queue of callback deliveries (light work; any worker).
    callback_queue: str = "callbacks"
    worker_concurrency: int = Field(default=1, ge=1)
    worker_pool: Literal["prefork", "solo", "threads"] = "prefork"
    #: torch device of the worker: "cpu", "cuda", "cuda:1", "auto" (cuda when available).
    worker_device: str = "auto"
    worker_batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1)
    #: Images per shard: an audit with more images has its feature extraction split into
    #: shards that any worker can take (each a task of its own), then scored by one final task.
    #: The default keeps small audits to one task.
    shard_size: int = Field(default=500, ge=1)

    # --- upload limits -------------------------------------------------------------------
    #: Largest request body (all uploaded files together), bytes.
    max_upload_bytes: int = Field(default=2 * 1024**3, ge=1024)
    #: Largest total uncompressed size of the images in the archives, bytes.
    max_uncompressed_bytes: int = Field(default=4 * 1024**3, ge=1024)
    #: Largest uncompressed/compressed ratio of one archive member (zip bombs).
    max_compression_ratio: float = Field(default=200.0, gt=1.0)
    #: Most images in one audit (published and unpublished together).
    max_images: int = Field(default=20_000, ge=2)
    #: Most members of one archive (including folders).
    max_archive_members: int = Field(default=50_000, ge=2)
    #: Largest image, in pixels (width × height).
    max_image_pixels: int = Field(default=40_000_000, ge=64)
    #: Largest captions or labels file, bytes (the library refuses more than 8 MiB anyway).
    max_captions_bytes: int = Field(default=8 * 1024**2, ge=1024)

    #: Largest single image, bytes (a PNG padded with junk after its last chunk counts whole).
    max_image_bytes: int = Field(default=64 * 1024**2, ge=1024)

    # --- quotas per tenant (0: no limit) -------------------------------------------------
    #: Audits of one tenant queued or running at once.
    max_concurrent_audits: int = Field(default=10, ge=0)
    #: Audits one tenant may submit per UTC day.
    max_audits_per_day: int = Field(default=200, ge=0)
    #: Images one tenant may upload per UTC day.
    max_images_per_day: int = Field(default=200_000, ge=0)
    #: Bytes of images one tenant may have stored at once (retained and in-flight uploads).
    max_stored_bytes: int = Field(default=100 * 1024**3, ge=0)
    #: Uploads of one tenant being received at once (per API process).
    max_concurrent_uploads: int = Field(default=4, ge=0)
    #: Requests per minute and tenant (a token bucket of this size, shared by the API processes
    #: through Redis: see rate_limit_url).
    rate_limit_per_minute: int = Field(default=600, ge=0)
    #: Requests per minute from one client address, counted before the API key is checked
    #: (requests with a bad key or none are throttled too). Behind a reverse proxy, the address
    #: is the one uvicorn takes from ``X-Forwarded-For`` (its ``--forwarded-allow-ips``).
    address_rate_limit_per_minute: int = Field(default=600, ge=0)
    #: Redis that holds the rate limits' counters, shared by all API processes. Default: the
    #: broker's, when it is Redis; otherwise (the embedded mode, one API process) in memory.
    rate_limit_url: str = ""

    # --- lifetimes -----------------------------------------------------------------------
    #: Keep uploaded images after their audit ends (an audit can ask with retain_images=true).
    retain_images: bool = False
    #: Days an ended audit keeps its image records, report and PDF; then the reconciler erases
    #: them as a DELETE does. A tenant sets its own (PUT /v1/retention) up to max_retention_days.
    #: 0: kept until deleted.
    retention_days: int = Field(default=90, ge=0)
    #: The longest retention a tenant may ask for, days (0: no limit, and "until deleted" allowed).
    max_retention_days: int = Field(default=730, ge=0)
    #: Whose features an audit may reuse: "tenant" (the default: only those its own tenant's
    #: audits computed; another tenant's audits of the same images change nothing in its report,
    #: timings or status) or "shared" (any tenant's: repeat audits of the same images across
    #: tenants compute nothing, and a tenant's report and timings then show that some tenant
    #: audited those images against that model before).
    feature_cache_scope: Literal["tenant", "shared"] = "tenant"
    #: Seconds an upload's claim on its blobs lasts before it must have committed its audit.
    blob_claim_seconds: int = Field(default=3600, ge=10)
    #: Seconds between two runs of the reconciler (requeues lost audits, collects blobs, spool).
    reconcile_interval: float = Field(default=60.0, gt=0)
    #: Seconds an audit may stay queued before the reconciler sends it again, when the broker
    #: cannot tell whether its task is still waiting (with Redis it looks in the queue).
    requeue_after: int = Field(default=900, ge=1)
    #: Seconds a spool file of an upload may live before it is taken for a dead upload's.
    spool_max_age: int = Field(default=6 * 3600, ge=60)
    #: Seconds between worker heartbeats; /readyz wants one younger than three of these.
    worker_heartbeat_seconds: float = Field(default=10.0, gt=0)
    #: /readyz also requires a live worker (turn off for an API-only deployment's probe).
    ready_requires_worker: bool = True

    # --- callbacks -----------------------------------------------------------------------
    #: Networks or hosts callbacks may reach although they are private, loopback, link-local...
    #: (comma-separated: ``10.0.0.0/8,hooks.internal``). Default: only public addresses.
    callback_allow: str = ""

    # --- API -----------------------------------------------------------------------------
    default_page_size: int = Field(default=50, ge=1, le=500)
    #: Callback deliveries: attempts and the first retry delay (doubles each time), seconds.
    callback_attempts: int = Field(default=6, ge=1)
    callback_backoff: float = Field(default=5.0, gt=0)
    callback_timeout: float = Field(default=10.0, gt=0)
    #: Register the shipped test models (cdi.zoo) in GET /v1/models.
    register_zoo_models: bool = True
    #: Log format: "json" (one structured line per event) or "text".
    log_format: Literal["json", "text"] = "text"
    log_level: str = "INFO"

    @field_validator("data_dir", "blob_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @model_validator(mode="after")
    def _defaults_and_production_checks(self) -> Settings:
        data = self.data_dir.absolute()
        if not self.database_url:
            self.database_url = f"sqlite:///{data / 'cdi.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{data / 'broker.db'}"
        if self.blob_dir is None:
            self.blob_dir = data / "blobs"
        if self.blob_url:
            from app.storage.s3url import parse_s3_url

            try:
                parse_s3_url(self.blob_url)
            except ValueError as exc:
                raise ValueError(f"CDI_BLOB_URL must be s3://bucket/prefix (or empty: the folder "
                                 f"CDI_BLOB_DIR): {exc}") from None
        if self.environment == "production":
            # The embedded defaults are for one machine; a production deployment that
            # silently fell back to them would lose its data on the next container restart.
            if self.database_url.startswith("sqlite"):
                raise ValueError("CDI_DATABASE_URL must name a server database (Postgres) in production")
            if self.broker_url.startswith("sqla+"):
                raise ValueError("CDI_BROKER_URL must name a broker server (Redis) in production")
            _require_password("CDI_DATABASE_URL", self.database_url)
            if self.broker_url.startswith(("redis://", "rediss://")):
                _require_password("CDI_BROKER_URL", self.broker_url)
            secret = self.aws_secret_access_key.get_secret_value()
            # Empty: boto3's own credentials (an instance role); a well-known one is refused.
            if self.blob_url and secret and secret in WEAK_PASSWORDS | {"minioadmin", "testing"}:
                raise ValueError("AWS_SECRET_ACCESS_KEY is a default one (such as MinIO's 'minioadmin'): "
                                 "set the object store's real secret in production")
        return self

    @property
    def blobs(self) -> Path:
        assert self.blob_dir is not None
        return self.blob_dir

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def upload_tmp_dir(self) -> Path:
        """Where uploads are spooled while they are validated: beside local blobs (same
        filesystem: storing one is a rename), or a local folder of data_dir with an object store."""
        if self.blob_url:
            return self.data_dir.absolute() / "spool"
        return self.blobs / "tmp"


#: Passwords that are not: refused in production.
WEAK_PASSWORDS = frozenset({"", "cdi", "postgres", "password", "changeme", "secret", "redis", "admin"})


def _require_password(name: str, url: str) -> None:
    """In production a server URL carries a password, and not a well-known one (Redis: AUTH)."""
    from urllib.parse import urlsplit

    password = urlsplit(url).password
    if password is None or password in WEAK_PASSWORDS:
        raise ValueError(f"{name} must carry a password in production (and not a default one such as 'cdi'): "
                         "e.g. postgresql+psycopg://cdi:<password>@host/cdi, redis://:<password>@host:6379/0")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
