"""The one device layer: GPU-independent plan terms x a GPU x coefficients -> memory totals and speed.

Every estimator that can join the recommend search (analytical, calibrated) produces the same named
terms per plan (``advisor.estimators.terms.PlanTerms``) and a ``DeviceCoefficients``; this module
turns them into an estimate, for one plan or for thousands at once (numpy arrays: the recommend
search evaluates every candidate on every GPU in one pass, rows of different GPUs side by side, each
row with its own GPU numbers and coefficients). Nothing here knows which estimator made the terms.

Memory: reserved = allocated + the caching allocator's slack (the plan's ``allocator_slack`` term where its
estimator counts one from tensor sizes, else fragmentation x the transient part allocated - static), device
total = reserved + the CUDA context (neither on a CPU).

Speed (one micro-step, per GPU; every term is named in ``evaluate`` where it is computed):

* compute: the GEMMs at mfu x tokens / (tokens + tokens_half_efficiency) of the card's achievable matmul
  rate (``matmul_flops``: measured, not the datasheet peak; the reported MFU stays against the peak), divided by the wave
  quantisation of the widest GEMM on the GPU's SMs; the attention kernels at an efficiency that grows with
  the sequence length;
* memory-bound traffic (element-wise ops, dequantisation, narrow LoRA matmuls, the optimiser step
  amortised over the micro-steps of one optimiser step) at bandwidth x efficiency;
* communication: FSDP all-gathers prefetched block by block under the compute, gradient reduction
  overlapped with backward bucket by bucket; the link is NVLink, PCIe peer-to-peer or, without P2P
  (GeForce), PCIe staged through host memory (half the bandwidth, more latency per collective);
* the host-bound floor: a GPU step takes at least the time the host needs to issue its ops
  (step = max(device time, host time)); on a CPU the ops run where they are issued, and a per-block
  overhead is added instead;
* throughput across GPUs loses multi_gpu_efficiency per doubling beyond what communication explains.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from advisor.estimators.terms import SpeedCounts
from advisor.specs import GpuSpec
from advisor.units import MIB

#: Fraction of the card's achievable matmul rate (``matmul_flops``: the MEASURED sustained dense matmul rate,
#: not the datasheet peak) that the GEMMs of a training step reach with enough tokens per step; the attention
#: kernels, the memory-bound work and the host are modelled apart. One prior for every GPU: what used to
#: separate datacenter from consumer cards (how much of its datasheet peak a card can reach at all) is now the
#: catalog's measured rate. Value: a transformer training step on an A100 reaches "180+ TFLOPS" with
#: FlashAttention (S. Bekman, ml-engineering, compute/accelerator/README.md @b9e29720, 'Maximum Achievable FLOPS')
#: against the 271.2 TFLOPS the same source measures for the A100's best matmul: 180 / 271 = 0.66 (a whole-step
#: figure, so as the GEMMs' own share it leans low). Not fitted to published rows. A CPU's prior is relative to
#: its own measured rate (the device's fp32_tflops). Calibration replaces them.
MFU_PRIOR = {"datacenter": 0.66, "consumer": 0.66, "cpu": 0.5}

#: Share of the datasheet's dense half-precision peak a card without a published matmul measurement
#: (``GpuSpec.matmul_tflops_measured`` None) is taken to sustain: the median measured / datasheet share of the
#: catalog's measured cards (tools/build_gpu_catalog.py MATMUL, 2026-11-30: A100 0.87, H100 0.80, RTX 4090 0.97,
#: RTX 3090 1.07, L4 0.49, MI300X 0.51, T4 0.64 -> median 0.80).
DEFAULT_MATMUL_SHARE = 0.80

#: The one candidate constant of the GPU speed model fitted to published rows: a scale on the GPU classes'
#: MFU priors (not on the CPU's, not on a calibrated MFU), fitted as the median of measured / predicted
#: throughput over the scored rows without stack notes (``python -m bench.throughput``). Checked
#: leave-one-SOURCE-out it does NOT validate (2026-11-30, with the measured matmul rates: median 43% / 25% on
#: published_1 / published_2 against 21% / 21% unfitted; only two rows carry no stack notes, one per source, so
#: each held-out source is predicted with the other's GPU and stack), so it stays 1.0 (no fitted constant); the
#: bench re-checks it on every run.
MFU_FIT_SCALE = 1.0

#: Host seconds per operation of an eager PyTorch step (Python bytecode, pybind, autograd recording,
#: ATen dispatch, cudaLaunchKernel): "~5-25 us of CPU-side work per op" (J. Lin, "From PyTorch op to kernel
#: launch", jiahuanglin.xyz gpu_kernel_serving lesson 18, layer-by-layer costs); 10 us, near the geometric
#: middle (autograd issues backward ops from C++, at the low end). A prior, not fitted: no scorable
#: published row is host-bound (bench/results/throughput.md); a GPU run should measure it.
HOST_OP_S = 10e-6

#: The link between GPUs by kind (``GpuSpec.peer_link``): the share of ``interconnect_gbps`` a collective
#: reaches, and the latency each collective call pays (NCCL ring over NVLink ~10 us; over PCIe P2P ~20 us;
#: without P2P NCCL copies through pinned host memory: half the PCIe bandwidth, ~50 us per call).
LINK_EFFICIENCY = {"nvlink": 0.8, "pcie": 0.8, "pcie-host": 0.4}
LINK_LATENCY_S = {"nvlink": 10e-6, "pcie": 20e-6, "pcie-host": 50e-6}
#: The network between nodes (``GpuSpec.node_network``): the share of its line rate NCCL's inter-node
#: collectives reach (nccl-tests bus bandwidth over InfiniBand / RoCE: ~80-90% of line rate; 0.8), and the
#: latency each collective call adds when it crosses nodes (a network round of RDMA / TCP: ~20 us, a prior).
NETWORK_EFFICIENCY = 0.8
NETWORK_LATENCY_S = 20e-6

#: DDP's gradient bucket (torch DistributedDataParallel bucket_cap_mb=25): the last bucket's all-reduce
#: starts when backward ends, so at least one bucket is never hidden.
DDP_BUCKET_BYTES = 25 * 2**20

#: GEMM tile (rows x columns of the output) whose count, against the SM count, sets the wave
#: quantisation: cuBLAS' large bf16 kernels on Ampere/Hopper use 128x128 or 256x128 output tiles.
GEMM_TILE = 128

#: SDPA's flash / memory-efficient attention kernels: efficiency relative to the GEMMs grows with the
#: sequence length (FlashAttention-2, Dao 2023, Fig. 4-6: throughput at 512 tokens ~0.75-0.8 of that at 8k)
#: -> s / (s + ATTENTION_HALF_SEQ).
ATTENTION_HALF_SEQ = 128.0


@dataclass(frozen=True)
class DeviceCoefficients:
    """The device-side constants (priors in the analytical model, fitted values in a profile)."""

    # caching-allocator slack as a share of the transient part of the peak (activations, logits, gradients
    # being built): reserved = allocated + this x (allocated - static). Used where a plan's terms carry no
    # allocator slack of their own (traced peaks; calibrated profiles, which fit this share on CUDA); the
    # analytical terms count the slack from tensor sizes (AnalyticalEstimator.allocator_slack)
    allocator_fragmentation: float = 0.15
    cuda_context_bytes: int = 512 * MIB  # CUDA context + cuBLAS/cuDNN handles, outside the allocator
    mfu: float | None = None  # None -> the prior of the GPU class (MFU_PRIOR)
    tokens_half_efficiency: float = 256.0  # tokens per micro-step at which matmul efficiency is halved
    bandwidth_efficiency: float = 0.7
    layer_overhead_s: float = 0.0004  # CPU devices: launch/Python overhead per block per pass (added)
    comm_overlap: float = 0.7  # kept for old profiles; the overlap is now modelled per collective kind
    multi_gpu_efficiency: float = 0.92  # extra loss per doubling of GPUs beyond communication
    # GPU devices: host seconds per issued op (the host-bound floor; 0 turns it off), and a per-block
    # per-pass overhead added to the step on a GPU (0 for the analytical model: the floor accounts for it;
    # a calibrated GPU profile may carry its fitted per-block term here)
    host_op_s: float = HOST_OP_S
    gpu_layer_overhead_s: float = 0.0
    mfu_prior_scale: float = MFU_FIT_SCALE  # on the GPU classes' MFU_PRIOR only (mfu=None)


def _mfu_prior(gpu_class: str, scale: float) -> float:
    """The class's MFU prior; the fitted scale applies to GPUs (capped below 1: no step beats the peak)."""
    prior = MFU_PRIOR.get(gpu_class, MFU_PRIOR["datacenter"])
    return prior if gpu_class == "cpu" else min(prior * scale, 0.95)


def peak_flops(gpu: GpuSpec, dtype: str) -> float:
    """Dense FLOP/s of the dtype; the fp16 rate where the card has no rate for it (no bf16 tensor cores)."""
    peak = gpu.tflops(dtype) * 1e12
    return peak if peak > 0 else gpu.fp16_tflops * 1e12


def matmul_flops(gpu: GpuSpec, dtype: str) -> float:
    """The dense matmul rate a GPU sustains in the dtype, which the GEMM efficiency (MFU_PRIOR) is relative to:
    the card's measured half-precision rate (``GpuSpec.matmul_tflops_measured``: a power-limited card such as the
    72 W L4 sustains half its datasheet rate) for bf16 / fp16; a card without a measurement, DEFAULT_MATMUL_SHARE
    of its datasheet peak. fp32 (and CPU devices, whose fp32 rate is measured on the device) use the peak."""
    peak = peak_flops(gpu, dtype)
    if gpu.gpu_class == "cpu" or dtype not in ("bf16", "fp16"):
        return peak
    if gpu.matmul_tflops_measured is not None:
        return gpu.matmul_tflops_measured * 1e12
    return peak * DEFAULT_MATMUL_SHARE


@dataclass(frozen=True)
class DeviceColumns:
    """Per-row GPU numbers and coefficients (scalars for one GPU, arrays for rows of several)."""

    memory_bytes: Any
    peak_flops: Any  # datasheet dense rate (the denominator of the reported MFU)
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
    # speed model, GPU side (neutral on a CPU: no waves, no host floor, attention at the GEMMs' efficiency)
    sm_count: Any = 0.0  # 0 = unknown (no wave quantisation)
    link_efficiency: Any = 1.0
    collective_latency_s: Any = 0.0
    host_op_s: Any = 0.0
    attention_half_seq: Any = 0.0
    # the achievable dense matmul rate the GEMMs run at x mfu (``matmul_flops``); 0 = the peak (old callers)
    matmul_flops: Any = 0.0
    # bytes/s between a node and the others (GpuSpec.node_network x NETWORK_EFFICIENCY); 0 = no network modelled
    node_network: Any = 0.0

    @classmethod
    def of(cls, gpu: GpuSpec, dtype: str, k: DeviceCoefficients) -> DeviceColumns:
        cpu = gpu.gpu_class == "cpu"
        return cls(
            memory_bytes=float(gpu.memory_bytes),
            peak_flops=peak_flops(gpu, dtype),
            bandwidth=gpu.memory_bandwidth_gbps * 1e9,
            link=gpu.interconnect_gbps * 1e9,
            context_bytes=0.0 if cpu else float(k.cuda_context_bytes),
            fragmentation=0.0 if cpu else k.allocator_fragmentation,  # no caching allocator on a CPU
            mfu=k.mfu if k.mfu is not None else _mfu_prior(gpu.gpu_class, k.mfu_prior_scale),
            tokens_half=k.tokens_half_efficiency,
            bandwidth_efficiency=k.bandwidth_efficiency,
            layer_overhead_s=k.layer_overhead_s if cpu else k.gpu_layer_overhead_s,
            comm_overlap=k.comm_overlap,
            multi_gpu_efficiency=k.multi_gpu_efficiency,
            sm_count=0.0 if cpu else float(gpu.sm_count or 0),
            link_efficiency=LINK_EFFICIENCY[gpu.peer_link],
            collective_latency_s=LINK_LATENCY_S[gpu.peer_link],
            host_op_s=0.0 if cpu else k.host_op_s,
            attention_half_seq=0.0 if cpu else ATTENTION_HALF_SEQ,
            matmul_flops=matmul_flops(gpu, dtype),
            node_network=gpu.node_network[0] / 8 * 1e9 * NETWORK_EFFICIENCY,
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


def memory_totals(d: DeviceColumns, allocated, static, allocator_slack=None):
    """(reserved, device total) from the allocated peak: the caching allocator's slack, then the CUDA context.

    ``allocator_slack`` is the plan's own slack in bytes (``PlanTerms.allocator_slack``: segment rounding and
    cached temporaries counted from the tensors the plan allocates; 0 on a CPU). Where a plan has none (NaN or
    None: a traced peak, a calibrated profile's terms) the slack is the fitted share ``fragmentation`` of the
    transient part of the peak (allocated - static), as calibration fits it. Scalars or arrays alike."""
    transient_share = d.fragmentation * (allocated - static)
    if allocator_slack is None:
        slack = transient_share
    else:
        slack = np.where(np.isnan(allocator_slack), transient_share, allocator_slack)
        if np.ndim(slack) == 0:
            slack = float(slack)
    reserved = allocated + slack
    return reserved, reserved + d.context_bytes


def wave_efficiency(tokens, gemm_n, sm_count):
    """Share of the SMs a GEMM of `tokens` rows and `gemm_n` columns keeps busy: its 128x128 output tiles run
    in waves of one tile per SM, and the last wave is partly empty (1.0 where the SM count is unknown)."""
    sms = np.maximum(sm_count, 1.0)
    tiles = np.ceil(tokens / GEMM_TILE) * np.ceil(np.maximum(gemm_n, 1.0) / GEMM_TILE)
    waves = tiles / sms
    return np.where((np.asarray(sm_count) > 0) & (np.asarray(gemm_n) > 0), waves / np.ceil(waves), 1.0)


def evaluate(
    d: DeviceColumns,
    allocated,
    static,
    fpt,
    traffic,
    comm_bytes,
    passes,
    tokens,
    n,
    layers,
    speed=None,
    allocator_slack=None,
) -> Evaluation:
    """The device layer: scalars or numpy arrays alike (recommend evaluates thousands of rows at once).
    `speed` holds the plan's other speed counts (``terms.SpeedCounts``, scalars or stacked arrays); without
    it (old callers) all communication is treated as gradient reduction and there is no host floor."""
    reserved, total = memory_totals(d, allocated, static, allocator_slack)
    if speed is None:
        speed = SpeedCounts(grad_comm_bytes=comm_bytes)
    multi = np.asarray(n) > 1
    # compute: GEMMs at the prior MFU, lower for few tokens per step (small GEMMs) ...
    eff = d.mfu * tokens / (tokens + d.tokens_half)
    # ... and for the last, partly empty wave of output tiles on the SMs (widest GEMM of a block)
    wave = wave_efficiency(tokens, speed.gemm_n, d.sm_count)
    attn_fpt = np.minimum(speed.attention_flops_per_token, fpt)
    # the rate the efficiencies are relative to: the card's achievable (measured) matmul rate
    rate = np.where(np.asarray(d.matmul_flops) > 0, d.matmul_flops, d.peak_flops)
    gemm_s = tokens * (fpt - attn_fpt) / (rate * eff * wave)
    # attention kernels (SDPA flash / efficient): less efficient than the GEMMs on short sequences
    seq = np.maximum(speed.seq_len, 1.0)
    attention_eff = eff * seq / (seq + d.attention_half_seq)
    attention_s = tokens * attn_fpt / (rate * attention_eff)
    compute = gemm_s + attention_s
    # memory-bound: element-wise ops, dequantisation, narrow LoRA matmuls, the optimiser step (amortised)
    memory_bound = traffic / (d.bandwidth * d.bandwidth_efficiency)
    busy = compute + memory_bound
    # communication: bytes over the link at its efficiency (host-staged PCIe: less), plus latency per call
    link = d.link * d.link_efficiency
    gather_s = speed.gather_bytes / link
    grad_s = speed.grad_comm_bytes / link
    latency_s = speed.collectives * d.collective_latency_s
    # across nodes (hierarchical): the inter-node step of each collective over the node's network, after the
    # intra-node one; it carries the same overlap as the rest (FSDP prefetch, gradient buckets)
    crossing = np.asarray(speed.internode_gather_bytes + speed.internode_grad_bytes) > 0
    net = np.where(np.asarray(d.node_network) > 0, d.node_network, np.inf)
    gather_s = gather_s + speed.internode_gather_bytes / net
    grad_s = grad_s + speed.internode_grad_bytes / net
    latency_s = latency_s + np.where(crossing, speed.collectives * NETWORK_LATENCY_S, 0.0)
    comm = np.where(multi, gather_s + grad_s + latency_s, 0.0)
    # overlap: FSDP prefetches the next block's all-gather under this block's compute (the first block's
    # gather is never hidden); gradients are reduced bucket by bucket as backward produces them, so they
    # hide only under the backward share of the step (backward ~2 forward passes; with checkpointing the
    # recompute runs inside backward too: passes / (passes + 1)), and the last bucket, issued when backward
    # ends, is never hidden. The link carries both: what the compute cannot cover is exposed.
    backward_busy = busy * passes / (passes + 1.0)
    first_gather = gather_s / np.maximum(layers, 1)
    last_bucket = np.minimum(grad_s, DDP_BUCKET_BYTES / link)
    uncovered = np.maximum(np.maximum(comm - busy, grad_s - backward_busy), 0.0)
    exposed = np.where(multi, uncovered + first_gather + last_bucket, 0.0)
    device = busy + exposed
    # host-bound floor (GPU): the host issues every op of the step; the GPU cannot finish before it has
    host = speed.host_ops * d.host_op_s
    step = np.maximum(device, host) + d.layer_overhead_s * layers * passes
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
