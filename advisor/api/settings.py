"""Service settings: environment variables with the prefix ``ADVISOR_``, overridden by CLI flags.

Built in the app factory (or by ``advisor serve``), never at import, so tests and workers each get
their own. Later issues add fields here (model roots, webhook URL, ...): add a typed field with a
default and it is read from ``ADVISOR_<NAME>`` automatically.
"""

from __future__ import annotations

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
    webhook_url: str | None = Field(None, pattern=r"^https?://", description="terminal job states are POSTed here")
    webhook_secret: SecretStr | None = Field(None, description="Standard Webhooks signing secret (whsec_...)")
    webhook_retry_scale: float = Field(1.0, gt=0, le=100, description="scales the retry delays (5 s, 5 min, ...)")
    allow_model_download: bool = Field(False, description="jobs may download Hugging Face models")
    allow_trust_remote_code: bool = Field(False, description="accept models whose config needs custom code")
    max_file_bytes: int = Field(512 * 2**20, ge=1024, le=2**40, description="largest training file upload")
    max_file_examples: int = Field(1_000_000, ge=1, le=10**9, description="most examples per training file")

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
