"""The one device layer: GPU-independent plan terms x a GPU x coefficients -> memory totals and speed.

Every estimator that can join the recommend search (analytical, calibrated) produces the same named
terms per plan (``advisor.estimators.terms.PlanTerms``) and a ``DeviceCoefficients``; this module
turns them into an estimate, for one plan or for thousands at once (numpy arrays: the recommend
search evaluates every candidate on every GPU in one pass, rows of different GPUs side by side, each
row with its own GPU numbers and coefficients). Nothing here knows which estimator made the terms.

Memory: reserved = allocated + fragmentation x (allocated - static) (the caching allocator's slack on
the transient part), device total = reserved + the CUDA context (not on a CPU).

Speed (one micro-step, per GPU): matmul time at an efficiency that grows with the tokens of the step
(mfu x tokens / (tokens + tokens_half_efficiency)), memory-bound traffic at bandwidth x efficiency,
communication over the peer link partly overlapped with both, and a per-block launch overhead per
pass; throughput across GPUs loses multi_gpu_efficiency per doubling.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from advisor.specs import GpuSpec
from advisor.units import MIB

#: Fraction of dense peak the matmuls of an HF training step reach with enough tokens per step.
#: Priors from public HF/peft training throughputs (A100: ~40-50% MFU; consumer Ada/Ampere cards
#: reach more of their lower bf16 peak). Calibration replaces them.
MFU_PRIOR = {"datacenter": 0.45, "consumer": 0.55, "cpu": 0.5}


@dataclass(frozen=True)
class DeviceCoefficients:
    """The device-side constants (priors in the analytical model, fitted values in a profile)."""

    # caching-allocator slack on the transient part of the peak (activations, logits, gradients being
    # built): reserved = allocated + this x (allocated - static); static weights/states are allocated once
    allocator_fragmentation: float = 0.15
    cuda_context_bytes: int = 512 * MIB  # CUDA context + cuBLAS/cuDNN handles, outside the allocator
    mfu: float | None = None  # None -> the prior of the GPU class (MFU_PRIOR)
    tokens_half_efficiency: float = 256.0  # tokens per micro-step at which matmul efficiency is halved
    bandwidth_efficiency: float = 0.7
    layer_overhead_s: float = 0.0004  # launch/Python overhead per block per pass
    comm_overlap: float = 0.7
    multi_gpu_efficiency: float = 0.92  # extra loss per doubling of GPUs beyond communication


def peak_flops(gpu: GpuSpec, dtype: str) -> float:
    """Dense FLOP/s of the dtype; the fp16 rate where the card has no rate for it (no bf16 tensor cores)."""
    peak = gpu.tflops(dtype) * 1e12
    return peak if peak > 0 else gpu.fp16_tflops * 1e12


@dataclass(frozen=True)
class DeviceColumns:
    """Per-row GPU numbers and coefficients (scalars for one GPU, arrays for rows of several)."""

    memory_bytes: Any
    peak_flops: Any
    bandwidth: Any  # bytes/s
    link: Any  # bytes/s to peers
    context_bytes: Any  # 0 on a CPU
    fragmentation: Any
    mfu: Any
    tokens_half: Any
    bandwidth_efficiency: Any
    layer_overhead_s: Any
    comm_overlap: Any
    multi_gpu_efficiency: Any

    @classmethod
    def of(cls, gpu: GpuSpec, dtype: str, k: DeviceCoefficients) -> DeviceColumns:
        cpu = gpu.gpu_class == "cpu"
        return cls(
            memory_bytes=float(gpu.memory_bytes),
            peak_flops=peak_flops(gpu, dtype),
            bandwidth=gpu.memory_bandwidth_gbps * 1e9,
            link=gpu.interconnect_gbps * 1e9,
            context_bytes=0.0 if cpu else float(k.cuda_context_bytes),
            fragmentation=k.allocator_fragmentation,
            mfu=k.mfu if k.mfu is not None else MFU_PRIOR.get(gpu.gpu_class, 0.45),
            tokens_half=k.tokens_half_efficiency,
            bandwidth_efficiency=k.bandwidth_efficiency,
            layer_overhead_s=k.layer_overhead_s,
            comm_overlap=k.comm_overlap,
            multi_gpu_efficiency=k.multi_gpu_efficiency,
        )

    @classmethod
    def stack(cls, parts: list[tuple[DeviceColumns, int]]) -> DeviceColumns:
        """Rows of several GPUs side by side: each part's scalars repeated over its row count."""
        counts = np.array([n for _, n in parts])
        return cls(
            **{f.name: np.repeat(np.array([float(getattr(c, f.name)) for c, _ in parts]), counts) for f in fields(cls)}
        )


@dataclass(frozen=True)
class Evaluation:
    """Memory totals and speed of every row (arrays, or floats for one plan)."""

    allocated: Any
    reserved: Any
    total: Any
    fits: Any
    step_s: Any
    tokens_per_s: Any
    compute_s: Any
    memory_bound_s: Any
    communication_s: Any
    mfu: Any


def memory_totals(d: DeviceColumns, allocated, static):
    """(reserved, device total) from the allocated peak: slack on its transient part, then the CUDA context."""
    reserved = allocated + d.fragmentation * (allocated - static)
    return reserved, reserved + d.context_bytes


def evaluate(d: DeviceColumns, allocated, static, fpt, traffic, comm_bytes, passes, tokens, n, layers) -> Evaluation:
    """The device layer: scalars or numpy arrays alike (recommend evaluates thousands of rows at once)."""
    reserved, total = memory_totals(d, allocated, static)
    eff = d.mfu * tokens / (tokens + d.tokens_half)
    compute = tokens * fpt / (d.peak_flops * eff)
    memory_bound = traffic / (d.bandwidth * d.bandwidth_efficiency)
    multi = np.asarray(n) > 1
    comm = np.where(multi, comm_bytes / d.link, 0.0)
    busy = compute + memory_bound
    # communication overlaps with compute except for a (1 - overlap) share of the shorter of the two
    exposed = np.where(multi, np.maximum(busy, comm) - busy + (1 - d.comm_overlap) * np.minimum(busy, comm), 0.0)
    step = busy + exposed + d.layer_overhead_s * layers * passes
    tokens_per_s = n * tokens / step * d.multi_gpu_efficiency ** np.log2(np.maximum(n, 1))
    return Evaluation(
        allocated=allocated,
        reserved=reserved,
        total=total,
        fits=total <= d.memory_bytes,
        step_s=step,
        tokens_per_s=tokens_per_s,
        compute_s=compute,
        memory_bound_s=memory_bound,
        communication_s=comm,
        mfu=tokens * fpt / step / d.peak_flops,
    )
