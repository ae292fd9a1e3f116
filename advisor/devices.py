"""The one device probe of the pure core: what this box has, read without torch.

Visible NVIDIA GPUs come from nvidia-smi (name and total memory); the host CPU from /proc (model
name, clock, memory). The catalog matching lives in ``advisor.hardware``; measurements that need
torch (matmul rate, copy bandwidth, CUDA properties) in ``advisor.stack.device``. Everything here is
stdlib only, so the service, the job layer and calibration all ask the same functions.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

from advisor.specs import GpuSpec

HOST_CPU_ID = "cpu"


# ---- NVIDIA GPUs --------------------------------------------------------------------------------
def query_nvidia_smi(timeout_s: float = 10.0) -> list[tuple[str, float]]:
    """(name, total memory in MiB) for every visible NVIDIA GPU; empty when there is none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, _, mem = line.rpartition(",")
        try:
            gpus.append((name.strip(), float(mem)))
        except ValueError:
            continue
    return gpus


def nvidia_gpus(timeout_s: float = 20.0) -> list[str]:
    """Names of the visible NVIDIA GPUs (nvidia-smi), [] when there is none."""
    return [name for name, _ in query_nvidia_smi(timeout_s)]


# ---- the host CPU -------------------------------------------------------------------------------
def system_memory_bytes() -> int:
    """Total system memory (/proc/meminfo, else sysconf)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def cpu_mhz() -> float:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("cpu mhz"):
                    return float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return 2000.0


def host_cpu_spec() -> GpuSpec:
    """The host CPU as a device the estimators understand (gpu_class cpu: fp32, no CUDA context).

    A rough prior, not a measurement (``advisor.stack.device.describe`` measures): peak rate from
    core count x clock x 32 fp32 FLOP/cycle (AVX2 FMA), memory from /proc/meminfo."""
    cores = os.cpu_count() or 1
    tflops = cores * cpu_mhz() * 1e6 * 32 / 1e12
    mem = system_memory_bytes()
    return GpuSpec(
        id=HOST_CPU_ID,
        name=f"host CPU ({cores} cores)",
        memory_gib=mem / 2**30,
        memory_gb=mem / 1e9,
        bf16_tflops=None,
        fp16_tflops=tflops,
        fp32_tflops=tflops,
        memory_bandwidth_gbps=20.0,
        bf16_supported=False,
        price_usd_per_hour=None,
        gpu_class="cpu",
        note="rough prior: memory from /proc/meminfo, peak = cores x clock x 32 FLOP/cycle, 20 GB/s assumed",
    )
