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
    max_body_bytes: int = Field(1_048_576, ge=1024, le=1_073_741_824, description="larger bodies get 413")
    log_level: str = Field("info", pattern=r"^(?i:debug|info|warning|error|critical)$")
    access_log: bool = Field(True, description="one JSON line per request on the `advisor.access` logger")

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

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_data_dir / 'advisor.db'}"


def default_settings() -> Settings:
    """The built-in defaults, ignoring the environment (for the exported OpenAPI document)."""
    return Settings.model_construct()
