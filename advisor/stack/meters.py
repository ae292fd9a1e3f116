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


def _nvml_handle(pynvml: Any, device: torch.device) -> Any:
    """The NVML handle of this CUDA device. NVML numbers GPUs in PCI bus order and ignores
    CUDA_VISIBLE_DEVICES, while torch's index counts the visible devices in CUDA_DEVICE_ORDER (fastest
    first by default): the same index can name two different GPUs, so match by UUID where torch has it."""
    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        text = str(uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}")
    return pynvml.nvmlDeviceGetHandleByIndex(device.index if device.index is not None else torch.cuda.current_device())


def cuda_device_used_bytes(device: torch.device) -> tuple[int, str]:
    """Memory this process uses on the device as the driver sees it (CUDA context, allocator pools, cuBLAS
    workspaces; the unified memory of paged optimisers is reported apart by the estimator): NVML's per-process figure, else the
    device-wide NVML / nvidia-smi figure (includes other processes: only right on a device of our own),
    else cudaMemGetInfo (device-wide too)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = _nvml_handle(pynvml, device)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                used = getattr(proc, "usedGpuMemory", None)
                if proc.pid == os.getpid() and isinstance(used, int) and used > 0:
                    return used, "nvml:process.usedGpuMemory"
            # our pid is not listed (a container's PID namespace): the device-wide figure
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used), "nvml:memory.used (device-wide)"
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # pynvml missing or NVML unavailable: fall through to the CLI
        pass
    smi = shutil.which("nvidia-smi")
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    ident = (str(uuid) if str(uuid).startswith("GPU-") else f"GPU-{uuid}") if uuid is not None else str(index)
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits", f"--id={ident}"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout.strip()
            return int(float(out.splitlines()[0]) * 1024**2), "nvidia-smi:memory.used (device-wide)"
        except (subprocess.SubprocessError, ValueError, IndexError, OSError):
            pass
    free, total = torch.cuda.mem_get_info(device)
    return int(total - free), "cudaMemGetInfo:total-free (device-wide)"


def cuda_reading(device: torch.device, rss_baseline: int) -> MemoryReading:
    """The step's peaks from the caching allocator's statistics, and the device total at the peak.

    The driver's figure is read after the step, when the allocator may hold less than at its peak
    (``max_memory_reserved`` is the peak of its pools, ``memory_reserved`` what it holds now), so the
    peak device total is the driver's figure now plus the pools' peak over their present size: what
    nvidia-smi showed at the peak (context, workspaces and the pools' peak)."""
    torch.cuda.synchronize(device)
    used, meter = cuda_device_used_bytes(device)
    reserved_now = int(torch.cuda.memory_reserved(device))
    reserved_peak = int(torch.cuda.max_memory_reserved(device))
    return MemoryReading(
        meter=CUDA_ALLOCATED_METER,
        peak_bytes=int(torch.cuda.max_memory_allocated(device)),
        reserved_bytes=reserved_peak,
        device_total_bytes=used + max(0, reserved_peak - reserved_now),
        device_total_meter=meter + " + (max_memory_reserved - memory_reserved)",
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
