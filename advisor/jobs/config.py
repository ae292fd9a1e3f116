"""JobsConfig: the deployment's job settings as one plain dataclass, and the device jobs train on.

Why not pass the pydantic Settings around: the job layer is used by the API, tests and the benchmark
alike; a dataclass built once (``from_settings``) keeps pydantic at the boundary and makes every
knob visible in one place.

The fit check needs the target device as a GpuSpec. A GPU machine names its catalog GPU
(``ADVISOR_JOB_GPU``, or ``auto``: nvidia-smi's name matched against the catalog). A CPU-only
machine trains on the host CPU (``advisor.devices.host_cpu_spec``: a rough prior, stated in the spec's note).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advisor.catalog import Catalog
from advisor.devices import HOST_CPU_ID, host_cpu_spec, nvidia_gpus
from advisor.errors import AdvisorError, InvalidInputError
from advisor.specs import GpuSpec

__all__ = ["HOST_CPU_ID", "JobsConfig", "host_cpu_spec", "nvidia_gpus"]


def _split_paths(value: Any) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        value = [p for part in str(value).split(os.pathsep) for p in part.split(",")]
    return [Path(str(p).strip()).expanduser() for p in value if str(p).strip()]


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


@dataclass
class JobsConfig:
    data_dir: Path
    database_url: str
    gpu: GpuSpec  # the fit check's target: the local GPU model, or the host CPU
    device: str = "cpu"  # what the training processes use: cpu | cuda
    slots: list[str] = field(default_factory=lambda: ["cpu0"])
    model_roots: list[Path] = field(default_factory=list)
    launcher: str = "local"  # local | ray
    ray_address: str | None = None
    ray_python: str = "python"
    ray_storage_path: str | None = None  # Ray Train storage_path (advisor.jobs.ray_train)
    ray_auth_token: str | None = None
    train_python: str | None = None  # local launcher's interpreter (default: the server's)
    train_threads: int | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None
    webhook_backoff_scale: float = 1.0
    allow_download: bool = False
    allow_trust_remote_code: bool = False
    max_file_bytes: int = 512 * 2**20
    max_file_examples: int = 1_000_000
    cancel_grace_s: float = 10.0
    poll_interval_s: float = 1.0
    replica_id: str | None = None  # leases (advisor.jobs.leases); None: host-pid-random
    lease_s: float = 30.0

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def measurements_path(self) -> Path:
        return self.data_dir / "measurements" / "jobs.jsonl"

    @classmethod
    def from_settings(cls, settings: Any, catalog: Catalog) -> JobsConfig:
        """From the service Settings (``ADVISOR_*``); fields this layer adds are read with defaults."""

        def get(name: str, default: Any = None) -> Any:
            return getattr(settings, name, default)

        secret = get("webhook_secret")
        gpu_name = (get("job_gpu") or "auto").strip()
        count = get("job_gpu_count")
        if gpu_name == "auto":
            names = nvidia_gpus()
            gpu_name = names[0] if names else HOST_CPU_ID
            if count is None and names:
                count = len(names)
        if gpu_name == HOST_CPU_ID:
            gpu, device = host_cpu_spec(), "cpu"
            slots = [f"cpu{i}" for i in range(count or 1)]
        else:
            try:
                gpu = catalog.gpu(gpu_name)
            except AdvisorError as exc:
                raise InvalidInputError(f"ADVISOR_JOB_GPU: {exc}", field="job_gpu") from exc
            device = "cuda"
            slots = [str(i) for i in range(count or 1)]
        return cls(
            data_dir=Path(get("resolved_data_dir")),
            database_url=str(get("resolved_database_url")),
            gpu=gpu,
            device=device,
            slots=slots,
            model_roots=_split_paths(get("model_roots")),
            launcher=get("job_launcher", "local"),
            ray_address=get("ray_address"),
            ray_python=get("ray_python", "python") or "python",
            ray_storage_path=get("ray_storage_path"),
            ray_auth_token=_secret(get("ray_auth_token")),
            train_threads=get("job_cpu_threads"),
            webhook_url=get("webhook_url"),
            webhook_secret=secret.get_secret_value() if hasattr(secret, "get_secret_value") else secret,
            allow_download=bool(get("allow_model_download", False)),
            allow_trust_remote_code=bool(get("allow_trust_remote_code", False)),
            webhook_backoff_scale=float(get("webhook_retry_scale", 1.0)),
            max_file_bytes=int(get("max_file_bytes", 512 * 2**20)),
            max_file_examples=int(get("max_file_examples", 1_000_000)),
            cancel_grace_s=float(get("cancel_grace_s", 10.0)),
            poll_interval_s=float(get("job_poll_interval_s", 1.0)),
            replica_id=get("replica_id"),
            lease_s=float(get("replica_lease_s", 30.0)),
        )
