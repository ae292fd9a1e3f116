"""The device being calibrated or trained on, as a GpuSpec the estimators understand (torch side).

Why measured at runtime: a CPU is no catalog entry, and the analytical model needs a peak FLOP/s and
a memory bandwidth for it. We measure both (a large fp32 matmul, a large copy) with the thread
count the trials will use. A CUDA GPU is matched to its catalog entry (same name, memory within 6%)
so a profile attaches to the GPU id users ask for; an unknown GPU is measured like the CPU. What
needs no torch (nvidia-smi, /proc) is ``advisor.devices``.
"""

from __future__ import annotations

import platform
import re
import time
from dataclasses import replace
from typing import Any

import torch

from advisor.catalog import Catalog, default_catalog
from advisor.devices import cpu_model_name, system_memory_bytes
from advisor.errors import InvalidInputError
from advisor.specs import GpuSpec
from advisor.units import GB, GIB

DEVICES = ("auto", "cuda", "cpu")


def resolve_device(choice: str) -> str:
    """auto -> cuda:0 when a GPU is visible, else cpu; cuda without a GPU is an input error."""
    if choice not in DEVICES and not choice.startswith("cuda:"):
        raise InvalidInputError(f"device must be one of {', '.join(DEVICES)}", field="device")
    if choice == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        if choice in ("auto", "cuda"):
            return "cuda:0"
        index = choice.split(":", 1)[1]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise InvalidInputError(
                f"{choice}: torch sees {torch.cuda.device_count()} CUDA device(s) (cuda:0..)", field="device"
            )
        return choice
    if choice == "auto":
        return "cpu"
    raise InvalidInputError("no CUDA device is visible to torch: use --device cpu", field="device")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device):
    """The clock trials are timed with: process CPU time for a single-threaded CPU (see trial.py)."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.process_time
    return time.perf_counter


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """Best-of-`repeats` dense matmul rate (TFLOP/s): the device's practical peak for this dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    _sync(device)
    best = float("inf")
    inner = 1 if device.type == "cpu" else 20
    clock = _clock(device)
    for _ in range(repeats):
        t = clock()
        for _ in range(inner):
            torch.matmul(a, b)
        _sync(device)
        best = min(best, (clock() - t) / inner)
    return 2 * n**3 / best / 1e12


def measure_bandwidth_gbps(device: torch.device, n_bytes: int, repeats: int = 5) -> float:
    """Best-of-`repeats` copy bandwidth (read + write bytes per second), GB/s."""
    x = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(device)
    best = float("inf")
    clock = _clock(device)
    for _ in range(repeats):
        t = clock()
        y.copy_(x)
        _sync(device)
        best = min(best, clock() - t)
    return 2 * x.numel() * 4 / best / GB


def describe(device: str, threads: int | None = None, catalog: Catalog | None = None) -> tuple[GpuSpec, dict[str, Any]]:
    """The GpuSpec of `device` and the raw measurements behind it."""
    dev = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    if dev.type == "cuda":
        return _describe_cuda(dev, catalog or default_catalog())
    return _describe_cpu()


def _describe_cpu() -> tuple[GpuSpec, dict[str, Any]]:
    dev = torch.device("cpu")
    threads = torch.get_num_threads()
    # best of several sizes and repeats: a neighbour's burst can only make a measurement slower
    fp32 = max(measure_matmul_tflops(dev, torch.float32, n) for n in (1024, 2048))
    bw = measure_bandwidth_gbps(dev, 256 * 1024**2, repeats=8)
    mem = system_memory_bytes()
    name = cpu_model_name()
    spec = GpuSpec(
        id=f"cpu-{_slug(name)}-{threads}t",
        name=f"CPU {name} ({threads} threads)",
        memory_gib=round(mem / GIB, 3),
        memory_gb=round(mem / GB, 3),
        bf16_tflops=None,
        fp16_tflops=round(fp32, 4),  # not measured: CPU trials run fp32 (see note)
        fp32_tflops=round(fp32, 4),
        memory_bandwidth_gbps=round(bw, 2),
        bf16_supported=False,
        price_usd_per_hour=None,
        spec_source="measured by advisor.stack.device: best of 5 fp32 matmuls of 1024^3 and 2048^3, best of 8 copies "
        "of 256 MiB (at the start and the end of the run, the higher kept; process CPU time when single-threaded)",
        vendor="cpu",
        gpu_class="cpu",
        note="CPU device: trials and estimates in fp32 (half-precision matmuls are emulated and far slower); "
        "memory is system RAM; fp16_tflops repeats the fp32 figure",
    )
    return spec, {"threads": threads, "fp32_tflops": fp32, "copy_gbps": bw, "memory_bytes": mem}


def _norm(text: str) -> str:
    t = text.lower()
    for word in ("nvidia", "geforce", "tesla"):
        t = t.replace(word, "")
    return re.sub(r"[^a-z0-9]", "", t)


def match_catalog_gpu(name: str, memory_bytes: int, catalog: Catalog) -> GpuSpec | None:
    """The catalog GPU with this name (or alias) and memory within 6%, else None."""
    key = _norm(name)
    best: tuple[int, GpuSpec] | None = None
    for g in catalog.gpus:
        if abs(g.memory_bytes - memory_bytes) > 0.06 * memory_bytes:
            continue
        # the longest catalog name or alias inside the device name wins ("h100pcie" beats "h100")
        score = max((len(n) for n in (_norm(x) for x in (g.name, g.id, *g.aliases)) if n and n in key), default=0)
        if score and (best is None or score > best[0]):
            best = (score, g)
    return best[1] if best else None


def _describe_cuda(dev: torch.device, catalog: Catalog) -> tuple[GpuSpec, dict[str, Any]]:
    props = torch.cuda.get_device_properties(dev)
    total = int(props.total_memory)
    name = torch.cuda.get_device_name(dev)
    # native bf16 (Ampere, compute capability 8.0, and later) of THIS device: torch.cuda.is_bf16_supported()
    # asks about the current device and, by default, also says True where bf16 is only emulated (V100, T4)
    bf16 = torch.cuda.get_device_capability(dev) >= (8, 0)
    half = torch.bfloat16 if bf16 else torch.float16
    raw: dict[str, Any] = {
        "name": name,
        "total_memory_bytes": total,
        "capability": list(torch.cuda.get_device_capability(dev)),
        "half_tflops": measure_matmul_tflops(dev, half, 8192),
        "fp32_tflops": measure_matmul_tflops(dev, torch.float32, 4096),
        "copy_gbps": measure_bandwidth_gbps(dev, 1024**3),
    }
    found = match_catalog_gpu(name, total, catalog)
    if found is not None:
        raw["catalog_id"] = found.id
        return replace(found, memory_gib=round(total / GIB, 3)), raw
    spec = GpuSpec(
        id=_slug(name),
        name=name,
        memory_gib=round(total / GIB, 3),
        memory_gb=round(total / GB, 3),
        bf16_tflops=round(raw["half_tflops"], 1) if bf16 else None,
        fp16_tflops=round(raw["half_tflops"], 1),
        fp32_tflops=round(raw["fp32_tflops"], 1),
        memory_bandwidth_gbps=round(raw["copy_gbps"], 1),
        bf16_supported=bf16,
        price_usd_per_hour=None,
        spec_source="measured by advisor.stack.device (not in the catalog): best-of-5 matmul and copy",
    )
    return spec, raw


def best_of(a: GpuSpec, b: GpuSpec) -> GpuSpec:
    """The same device measured twice (start and end of a run): the faster figures are the less disturbed."""
    if a.id != b.id:
        return a
    return replace(
        a,
        fp32_tflops=max(a.fp32_tflops, b.fp32_tflops),
        fp16_tflops=max(a.fp16_tflops, b.fp16_tflops),
        bf16_tflops=None if a.bf16_tflops is None else max(a.bf16_tflops, b.bf16_tflops or 0.0),
        memory_bandwidth_gbps=max(a.memory_bandwidth_gbps, b.memory_bandwidth_gbps),
    )


def software_versions() -> dict[str, str | None]:
    """Versions of everything that changes what a step costs."""
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    out["cuda"] = torch.version.cuda
    for mod in ("transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # a missing optional package is recorded as None
            out[mod] = None
    return out
