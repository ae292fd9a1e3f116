"""What a measured training run records, for calibration trials and real jobs alike (no torch).

* status: ``ok``, ``oom`` (the allocator ran out: a measurement, not a crash) or ``error``;
  ``classify`` tells an out-of-memory from any other failure;
* ``MemoryReading``: a peak-memory reading and the meter that produced it (meter names below);
* ``TrialResult``: the record a calibration trial writes and a job writes as ``measurement.json``.
"""

from __future__ import annotations

import resource
from dataclasses import asdict, dataclass, field
from typing import Any

OK, OOM, ERROR = "ok", "oom", "error"
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "std::bad_alloc")

#: names recorded in measurements and profiles
CPU_LIVE_METER = "cpu:torch_dispatch_live_storage_bytes"
CPU_RSS_METER = "cpu:rss_peak_bytes"
CUDA_ALLOCATED_METER = "cuda:max_memory_allocated"
CUDA_RESERVED_METER = "cuda:max_memory_reserved"


def classify(exc: BaseException) -> str:
    """oom when the allocator (CUDA or the CPU's malloc) ran out, else error."""
    if isinstance(exc, MemoryError):
        return OOM
    name = type(exc).__name__
    text = str(exc).lower()
    if name == "OutOfMemoryError" or any(m in text for m in _OOM_MARKERS):
        return OOM
    if isinstance(exc, SystemError) and "without exception set" in text:
        return OOM  # C code whose malloc failed under an address-space cap, without raising MemoryError
    return ERROR


def rss_peak_bytes() -> int:
    """Peak RSS of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_now_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return rss_peak_bytes()


@dataclass(frozen=True)
class MemoryReading:
    """Peak memory of the measured steps, in bytes; None where the device has no such figure."""

    meter: str  # what `peak_bytes` is: CPU live storages or CUDA max_memory_allocated
    peak_bytes: int  # the figure the estimator's allocated peak is compared with
    reserved_bytes: int | None  # CUDA caching allocator peak (max_memory_reserved)
    device_total_bytes: int | None  # what NVML / nvidia-smi shows used on the device (context included)
    device_total_meter: str | None
    rss_peak_bytes: int  # peak resident set of the trial process (whole lifetime)
    rss_baseline_bytes: int  # RSS when the meter started (interpreter + libraries + model)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrialResult:
    trial_id: str
    group: str
    status: str  # ok | oom | error
    arch: dict[str, Any]
    plan: dict[str, Any]
    device: str
    error: str | None = None
    memory: dict[str, Any] | None = None  # MemoryReading.to_dict()
    step_time_s: float | None = None  # median of the timed steps
    step_times_s: list[float] = field(default_factory=list)  # every timed step, in order (step_time_meter)
    step_wall_times_s: list[float] = field(default_factory=list)  # the same steps on the wall clock
    step_time_meter: str | None = None  # wall | cuda_synchronized_wall | process_cpu_time (1-thread CPU)
    timing_spread: float | None = None  # max / min over the steps the median was taken from
    cpu_contention: float | None = None  # share of this trial's cores other processes took while timing
    warmup_steps: int = 0
    timed_steps: int = 0
    threads: int | None = None
    build_s: float | None = None
    wall_s: float | None = None
    trainable_params: int | None = None
    lora_modules: list[str] = field(default_factory=list)
    loss: float | None = None
    started_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
