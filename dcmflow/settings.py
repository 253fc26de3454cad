"""The one settings class of dcmflow (environment variables ``DCMFLOW_*``).

Settings are built only at entry points (a CLI command, the receiver's main, a flow body)
and passed on as arguments; nothing else in the code base reads ``os.environ``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]

DEFAULT_HOME = Path(".dcmflow")
DEFAULT_AE_TITLE = "DCMFLOW"
DEFAULT_DICOM_PORT = 11112
DEFAULT_STABLE_AGE = 60.0
DEFAULT_BUCKET = "dcmflow"
DEFAULT_MAX_PARALLEL_JOBS = 4
DEFAULT_PREFECT_PORT = 4200
DEFAULT_MAX_FLOW_RUNS = 4
DEFAULT_CALLBACK_TIMEOUT = 30.0  # services_registry.callbacks.DEFAULT_CALLBACK_TIMEOUT
DEFAULT_STUDY_WEBHOOK_TIMEOUT = 10.0
DEFAULT_STUDY_WEBHOOK_RETRIES = 4
DEFAULT_STUDY_WEBHOOK_RETRY_DELAY = 2.0


class Settings(BaseSettings):
    """dcmflow configuration, read from ``DCMFLOW_*`` environment variables.

    With nothing set, everything lives under ``DCMFLOW_HOME`` (``./.dcmflow``): a SQLite
    database, a local object store, the receive spool and installed services.

    Paths are absolute once validated: ``home`` and the TLS files given relative are taken
    relative to the current directory (``~`` expanded) and resolved, and so is the file of a
    relative SQLite ``database_url``. A record, a child process or a flow run on a worker
    therefore never gets a path that means something else in another working directory.
    """

    model_config = SettingsConfigDict(env_prefix="DCMFLOW_", extra="ignore")

    home: Path = Field(
        DEFAULT_HOME,
        validate_default=True,
        description="Folder for the embedded defaults (database, objects, spool, services); made absolute.",
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the records database; unset = SQLite file in DCMFLOW_HOME."
    )
    s3_endpoint: str | None = Field(
        None, description="host:port of MinIO/S3; unset = local object store in DCMFLOW_HOME/objects."
    )
    s3_access_key: str | None = Field(None, description="S3 access key.")
    s3_secret_key: SecretStr | None = Field(None, description="S3 secret key.")
    s3_bucket: str = Field(DEFAULT_BUCKET, description="Bucket holding every dcmflow object (created if missing).")
    s3_secure: bool = Field(False, description="Use HTTPS to reach the S3 endpoint.")
    s3_region: str | None = Field(None, description="S3 region, if the endpoint needs one.")
    # PS3.5 §6.2 (AE VR): 1-16 characters of the default repertoire, no backslash or control chars.
    ae_title: str = Field(
        DEFAULT_AE_TITLE,
        min_length=1,
        max_length=16,
        pattern=r"^[ -\[\]-~]*[!-\[\]-~][ -\[\]-~]*$",
        description="Our DICOM Application Entity title (1-16 characters, no backslash).",
    )
    dicom_port: int = Field(DEFAULT_DICOM_PORT, ge=1, le=65535, description="TCP port of the DICOM receiver.")
    stable_age: float = Field(
        DEFAULT_STABLE_AGE, ge=0, description="Seconds of quiet after which a series counts as stable."
    )

    accept_any_caller: bool = Field(
        False, description="Accept associations from any caller (default: loopback, trusted networks, peers)."
    )
    trusted_networks: list[str] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        description='Networks whose callers are always accepted, as a JSON list: ["10.0.0.0/8"].',
    )
    require_called_aet: bool = Field(True, description="Refuse associations addressed to another Called AE Title.")
    spool_min_free_bytes: int = Field(
        1024**3, ge=0, description="Answer C-STORE with 0xA700 (out of resources) below this much free spool disk."
    )
    spool_min_free_fraction: float = Field(
        0.02, ge=0, le=1, description="…or below this fraction of the spool disk free."
    )
    receiver_processes: int = Field(
        0,
        ge=0,
        description="Receiving (SCP) processes sharing the DICOM port (SO_REUSEPORT), each with its own spool; "
        "0 = min(2, cores).",
    )
    max_parallel_jobs: int = Field(
        DEFAULT_MAX_PARALLEL_JOBS, ge=1, description="Jobs of one processing run that may run at once."
    )
    prefect_api_url: str | None = Field(
        None,
        validation_alias="PREFECT_API_URL",
        description="PREFECT_API_URL: the Prefect server to use; unset = `dcmflow up` starts its own.",
    )
    prefect_host: str = Field(
        "127.0.0.1", description="Address the Prefect server that `dcmflow up` starts listens on (UI and API)."
    )
    prefect_port: int = Field(
        DEFAULT_PREFECT_PORT, ge=1, le=65535, description="Port of the Prefect server that `dcmflow up` starts."
    )
    max_backfill_runs: int = Field(
        1, ge=1, description="Manual runs (reprocess, imports) that `dcmflow up` runs at once, beside the live ones."
    )
    work_pool: str | None = Field(
        None,
        description="Prefect process work pool the flows run on (`dcmflow up` registers them there and "
        "`prefect worker start --pool NAME` runs them, on any machine); unset = `dcmflow up` serves them itself.",
    )
    max_flow_runs: int = Field(
        DEFAULT_MAX_FLOW_RUNS, ge=1, description="Flow runs (series, studies) that `dcmflow up` runs at once."
    )
    callback_timeout: float = Field(
        DEFAULT_CALLBACK_TIMEOUT,
        gt=0,
        description="Seconds one service callback may take (each runs in a child process); after that its job "
        "is not selected, with the reason in the plan and the run's job table.",
    )
    channel_wait: float = Field(
        30.0,
        ge=0,
        description="Seconds a job on a channel (e.g. gpu) waits for a worker to poll the queue channel-<name> "
        "before it fails with 'no worker serves channel'.",
    )
    tls_cert: Path | None = Field(
        None,
        description="PEM certificate chain of this node: the receiver's TLS certificate (enables TLS) and the "
        "client certificate presented to peers marked tls.",
    )
    tls_key: Path | None = Field(None, description="PEM private key of DCMFLOW_TLS_CERT.")
    tls_ca: Path | None = Field(
        None, description="PEM CA bundle that peers' TLS certificates are verified with (default: the system's)."
    )
    deid_key: SecretStr | None = Field(
        None,
        description="Key of the built-in deid service's UID hashing (HMAC-SHA256): the same key maps the same UID "
        "to the same new one on every run and machine. Its job reads it from the environment; keep it secret and "
        "the same on every worker.",
    )
    study_webhook_url: SecretStr | None = Field(
        None,
        description="http(s) URL the study card of every new study is POSTed to as JSON by the study-received "
        "flow (unset = artifact only). Kept secret (it often holds a token); user:password@ in it is sent as HTTP "
        "basic auth, and logs show it without credentials or query.",
    )
    study_webhook_timeout: float = Field(
        DEFAULT_STUDY_WEBHOOK_TIMEOUT, gt=0, description="Seconds one POST to DCMFLOW_STUDY_WEBHOOK_URL may take."
    )
    study_webhook_retries: int = Field(
        DEFAULT_STUDY_WEBHOOK_RETRIES,
        ge=0,
        le=50,
        description="Retries of a failed webhook POST (network error, 408, 429 or 5xx) before the run fails.",
    )
    study_webhook_retry_delay: float = Field(
        DEFAULT_STUDY_WEBHOOK_RETRY_DELAY,
        ge=0,
        description="Seconds before the first webhook retry; each further retry waits twice as long.",
    )

    @field_validator("home", "tls_cert", "tls_key", "tls_ca", mode="after")
    @classmethod
    def _absolute_path(cls, path: Path | None) -> Path | None:
        return None if path is None else path.expanduser().resolve()

    @field_validator("database_url", mode="after")
    @classmethod
    def _absolute_sqlite_file(cls, url: str | None) -> str | None:
        """``sqlite:///rel.db`` names a file relative to the current directory: make it absolute."""
        if not url or not url.startswith("sqlite"):
            return url
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            parsed = make_url(url)
        except ArgumentError:
            return url  # not a URL at all: the engine says so, in its words, where it is opened
        database = parsed.database
        if not database or database == ":memory:" or database.startswith("file:") or "uri" in parsed.query:
            return url
        if Path(database).is_absolute():
            return url
        return parsed.set(database=str(Path(database).expanduser().resolve())).render_as_string(hide_password=False)

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("DCMFLOW_TLS_CERT and DCMFLOW_TLS_KEY go together: set both or neither")
        return self

    @property
    def effective_database_url(self) -> str:
        """The database URL to use: ``database_url`` or the SQLite file under ``home`` (absolute)."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'dcmflow.db'}"

    @property
    def objects_dir(self) -> Path:
        """Root of the local object store (used when no S3 endpoint is set); absolute, as ``home``."""
        return self.home / "objects"

    @property
    def spool_dir(self) -> Path:
        """Where the receiver spools raw instances before ingest."""
        return self.home / "spool"

    @property
    def services_dir(self) -> Path:
        """Where installed services are copied."""
        return self.home / "services"
