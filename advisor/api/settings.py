"""Service settings: environment variables with the prefix ``ADVISOR_``, overridden by CLI flags.

Built in the app factory (or by ``advisor serve``), never at import, so tests and workers each get
their own. Later issues add fields here (model roots, webhook URL, ...): add a typed field with a
default and it is read from ``ADVISOR_<NAME>`` automatically.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from advisor.hub import HubOptions

DEFAULT_DATA_DIR = Path("~/.local/share/tuneadvisor")


def _split_commas(value: object) -> object:
    """`a, b,,c` -> ["a", "b", "c"]: env vars carry lists as comma-separated text."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Everything the service reads from its environment; each field is ``ADVISOR_<FIELD>``."""

    # hide_input_in_errors: a rejected API key must not appear in the error text
    model_config = SettingsConfigDict(
        env_prefix="ADVISOR_", extra="ignore", validate_default=True, hide_input_in_errors=True
    )

    host: str = Field("127.0.0.1", description="interface `advisor serve` binds")
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes")
    data_dir: Path = Field(DEFAULT_DATA_DIR, description="where the service keeps its state (job store, profiles)")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the store; default: SQLite in data_dir (advisor.db)"
    )
    gpu_files: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="extra/overriding GPU catalog files (JSON), comma-separated"
    )
    price_file: Path | None = Field(None, description="price overrides (JSON) for catalog GPUs")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="accepted Bearer keys, comma-separated; never logged"
    )
    lock_advice: bool = Field(False, description="require an API key for the advice endpoints too")
    allow_simulation: bool = Field(
        True, description="serve source=simulated and simulate_top (CPU-heavy traces; needs the train extra)"
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, le=1_073_741_824, description="larger bodies get 413")
    log_level: str = Field("info", pattern=r"^(?i:debug|info|warning|error|critical)$")
    access_log: bool = Field(True, description="one JSON line per request on the `advisor.access` logger")

    # ---- fine-tuning jobs (/v1/files, /v1/fine_tuning; advisor.jobs.config reads these) --------------
    model_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="directories local models may be trained from (':' or ',' separated)"
    )
    job_launcher: str = Field("local", pattern=r"^(local|ray)$", description="where training runs: local | ray")
    job_gpu: str = Field("auto", description="catalog GPU id of the local GPUs; `cpu`: the host CPU; auto: nvidia-smi")
    job_gpu_count: int | None = Field(None, ge=1, le=1024, description="local device slots (default: GPUs found, or 1)")
    job_cpu_threads: int | None = Field(None, ge=1, le=1024, description="torch threads per CPU training process")
    job_poll_interval_s: float = Field(1.0, gt=0, le=60, description="how often the job reconciler looks")
    cancel_grace_s: float = Field(10.0, ge=0, le=3600, description="SIGTERM -> SIGKILL delay on cancel")
    ray_address: str | None = Field(None, pattern=r"^https?://", description="Ray dashboard URL (Jobs API)")
    ray_python: str = Field("python", min_length=1, description="the Python interpreter on the Ray nodes")
    ray_storage_path: str | None = Field(
        None,
        min_length=1,
        description="Ray Train storage_path: a directory the service and every node share, or an object store URI "
        "(s3://bucket/prefix); job inputs, events, checkpoints and outputs go there (default: <data dir>/ray-storage)",
    )
    ray_auth_token: SecretStr | None = Field(None, description="Ray's token (RAY_AUTH_MODE=token clusters)")
    webhook_url: str | None = Field(None, pattern=r"^https?://", description="terminal job states are POSTed here")
    webhook_secret: SecretStr | None = Field(None, description="Standard Webhooks signing secret (whsec_...)")
    webhook_retry_scale: float = Field(1.0, gt=0, le=100, description="scales the retry delays (5 s, 5 min, ...)")
    allow_model_download: bool = Field(False, description="jobs may download Hugging Face models")
    allow_trust_remote_code: bool = Field(False, description="accept models whose config needs custom code")
    max_file_bytes: int = Field(512 * 2**20, ge=1024, le=2**40, description="largest training file upload")
    max_file_examples: int = Field(1_000_000, ge=1, le=10**9, description="most examples per training file")
    replica_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="this replica's name in the job database's leases (default: host-pid-random)",
    )
    replica_lease_s: float = Field(
        30.0,
        ge=0.5,
        le=3600,
        description="a replica that stops renewing its lease for this long is taken over by another (docs/deploy.md)",
    )

    # ---- Hugging Face Hub look-ups (advisor.hub): model ids outside the catalog ------------------------
    # the token, cache (HF_HOME), offline mode (HF_HUB_OFFLINE) and endpoint (HF_ENDPOINT) are huggingface_hub's own
    hub_lookups: bool = Field(
        True, description="resolve Hugging Face ids (org/name) on the Hub; off for air-gapped deployments"
    )
    hub_endpoint: str | None = Field(
        None, pattern=r"^https?://", description="Hub endpoint or mirror (default: HF_ENDPOINT, else huggingface.co)"
    )
    hub_timeout_s: float = Field(10.0, gt=0, le=300, description="timeout of each request to the Hub")
    hub_deadline_s: float = Field(
        30.0, gt=0, le=600, description="the whole resolution of one Hub id, retries included"
    )
    calibration_install_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="fingerprints (key_<12 hex>) of the API keys that may install a calibration explicitly "
        "(POST /v1/calibrations install=force), comma-separated; empty: none may (the operator uses the CLI)",
    )

    # ---- simulation under abuse (advisor.tracepool): who may trace, how many at once, how long --------
    simulation_without_key: bool = Field(
        False, description="callers without an API key may ask for simulation (simulate_top, source=simulated)"
    )
    simulation_workers: int = Field(2, ge=1, le=64, description="trace processes running at once (per server process)")
    simulation_queue: int = Field(
        4, ge=0, le=1000, description="requests that may wait for a trace process; more get 429 with Retry-After"
    )
    simulation_queue_wait_s: float = Field(
        30.0, ge=0, le=600, description="longest wait for a trace process; then 503 with Retry-After"
    )
    simulation_deadline_s: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="wall-clock limit of one request's simulation (its traces are killed there); also the "
        "largest simulate_budget_s accepted",
    )
    request_head_timeout_s: float = Field(
        10.0, gt=0, le=600, description="a connection whose request line and headers are not complete by then is closed"
    )
    request_body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="longest wait for the next piece of a request body; then 408"
    )

    @field_validator("calibration_install_keys", mode="before")
    @classmethod
    def _install_keys(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("calibration_install_keys")
    @classmethod
    def _install_keys_are_fingerprints(cls, keys: list[str]) -> list[str]:
        if any(not re.fullmatch(r"key_[0-9a-f]{12}", k) for k in keys):  # the value is not echoed: it may be a key
            raise ValueError("every entry must be a key fingerprint (key_ and 12 hex digits), not the key itself")
        return keys

    @field_validator("model_roots", mode="before")
    @classmethod
    def _path_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [p.strip() for part in value.split(":") for p in part.split(",") if p.strip()]
        return value

    @field_validator("gpu_files", "api_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("api_keys")
    @classmethod
    def _keys_not_trivial(cls, keys: list[SecretStr]) -> list[SecretStr]:
        if any(len(k.get_secret_value()) < 16 for k in keys):
            raise ValueError("every API key must be at least 16 characters")
        return keys

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser()

    def hub_options(self) -> HubOptions:
        """How the service resolves Hugging Face ids (advisor.hub), from the hub_* settings."""
        return HubOptions(
            enabled=self.hub_lookups,
            endpoint=self.hub_endpoint,
            request_timeout_s=self.hub_timeout_s,
            deadline_s=self.hub_deadline_s,
        )

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_data_dir / 'advisor.db'}"


def default_settings() -> Settings:
    """The built-in defaults, ignoring the environment (for the exported OpenAPI document)."""
    return Settings.model_construct()
