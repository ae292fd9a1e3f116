"""Peak-memory meters: the CUDA caching allocator's own statistics, or live tensor bytes on the CPU.

Why two: on CUDA the allocator already counts what the analytical model predicts (allocated, reserved)
and the driver sees the total (context included). The CPU allocator keeps no such statistics and RSS
mixes tensors with the Python heap and shared libraries, so on the CPU we count tensor storages
ourselves: a ``TorchDispatchMode`` sees every op's outputs, each storage is counted once, and a
weakref finaliser subtracts it when the storage is freed. Peak RSS is recorded beside it.

Every reading says which meter produced it (``meter`` in ``advisor.stack.outcomes.MemoryReading``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from advisor.stack.outcomes import (
    CPU_LIVE_METER,
    CUDA_ALLOCATED_METER,
    CUDA_RESERVED_METER,
    MemoryReading,
    rss_now_bytes,
    rss_peak_bytes,
)

__all__ = [
    "CPU_LIVE_METER",
    "CUDA_ALLOCATED_METER",
    "CUDA_RESERVED_METER",
    "CpuContention",
    "LiveTensorMeter",
    "MemoryReading",
    "cpu_reading",
    "cuda_reading",
    "cuda_reset",
    "rss_now_bytes",
    "rss_peak_bytes",
]


class LiveTensorMeter(TorchDispatchMode):
    """Counts the bytes of live tensor storages created while active (each storage once).

    Tensors that exist before the meter starts (a loaded model, optimiser states) are added with
    ``track``; ``reset_peak`` starts a new peak from the current live bytes, like
    ``torch.cuda.reset_peak_memory_stats``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current_bytes = 0
        self.peak_bytes = 0

    def track(self, *tensors: Any) -> None:
        for t in tree_flatten(list(tensors))[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._add(t)

    def track_module(self, module: torch.nn.Module) -> None:
        """Parameters, buffers and any tensor held in module attributes (e.g. bitsandbytes quant states)."""
        for p in module.parameters():
            self._add(p)
            qs = getattr(p, "quant_state", None)
            if qs is not None:
                self.track(*_quant_state_tensors(qs))
        for b in module.buffers():
            self._add(b)

    def track_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for state in optimizer.state.values():
            self.track(*[v for v in state.values() if isinstance(v, torch.Tensor)])

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes

    def _add(self, t: torch.Tensor) -> None:
        if t.device.type != "cpu" or t.is_meta:
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse / opaque tensors have no storage
            return
        key = id(storage)
        if key in self._live:
            return
        n = storage.nbytes()
        self._live[key] = n
        self.current_bytes += n
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current_bytes -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def _quant_state_tensors(qs: Any) -> list[torch.Tensor]:
    out = [getattr(qs, name, None) for name in ("absmax", "code", "offset")]
    nested = getattr(qs, "state2", None)
    if nested is not None:
        out += _quant_state_tensors(nested)
    return [t for t in out if isinstance(t, torch.Tensor)]


# ---- contention ---------------------------------------------------------------------------------------
class CpuContention:
    """How much of this process' cores other processes took while it was timed.

    Why: on a shared machine another process on the same cores makes every step slower (worse with
    OpenMP's spinning barriers); a step time measured then describes the neighbours, not the device.
    Reads /proc/stat (all CPUs, busy ticks) and os.times() (this process); None where unavailable.
    """

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)) / hz
        t = os.times()
        return busy, t.user + t.system, time.monotonic()

    def stolen_fraction(self, threads: int) -> float | None:
        """Share of this process' `threads` cores that other processes took (0: undisturbed).

        Other processes only slow us down once they need more than the cores we leave free."""
        end = self._sample()
        if self._start is None or end is None:
            return None
        busy, mine, wall = (e - s for e, s in zip(end, self._start, strict=True))
        cpus = os.cpu_count() or 1
        if wall <= 0:
            return None
        others = max(0.0, busy - mine) / wall  # cores' worth of other processes
        threads = max(1, min(threads, cpus))
        return max(0.0, min(1.0, (others - (cpus - threads)) / threads))


# ---- CUDA ----------------------------------------------------------------------------------------
def cuda_reset(device: torch.device) -> None:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)


def cuda_device_used_bytes(device: torch.device) -> tuple[int, str]:
    """Memory used on the device as the driver sees it: NVML, else nvidia-smi, else cudaMemGetInfo."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used), "nvml:memory.used"
    except Exception:  # pynvml missing or NVML unavailable: fall through to the CLI
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits", f"--id={index}"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout.strip()
            return int(float(out.splitlines()[0]) * 1024**2), "nvidia-smi:memory.used"
        except (subprocess.SubprocessError, ValueError, IndexError, OSError):
            pass
    free, total = torch.cuda.mem_get_info(device)
    return int(total - free), "cudaMemGetInfo:total-free"


def cuda_reading(device: torch.device, rss_baseline: int) -> MemoryReading:
    torch.cuda.synchronize(device)
    used, meter = cuda_device_used_bytes(device)
    return MemoryReading(
        meter=CUDA_ALLOCATED_METER,
        peak_bytes=int(torch.cuda.max_memory_allocated(device)),
        reserved_bytes=int(torch.cuda.max_memory_reserved(device)),
        device_total_bytes=used,
        device_total_meter=meter,
        rss_peak_bytes=rss_peak_bytes(),
        rss_baseline_bytes=rss_baseline,
    )


def cpu_reading(meter: LiveTensorMeter, rss_baseline: int) -> MemoryReading:
    return MemoryReading(
        meter=CPU_LIVE_METER,
        peak_bytes=int(meter.peak_bytes),
        reserved_bytes=None,
        device_total_bytes=None,
        device_total_meter=None,
        rss_peak_bytes=rss_peak_bytes(),
        rss_baseline_bytes=rss_baseline,
    )
