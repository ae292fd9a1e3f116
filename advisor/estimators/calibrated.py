"""Calibrated estimator: the analytical model's terms times coefficients fitted on one device (a profile).

Why corrections of the analytical model rather than a free regression: a profile is fitted on a small
design (a few architectures, short sequences, small vocabularies) and then asked about everything
else; a regression of its own structure extrapolates its design's accidents, a few multiplicative
corrections of the analytical model's physics extrapolate as the physics does (checked on real runs
outside the design: ``python -m bench.cpu_truth``). Every coefficient is pulled toward its prior (the
analytical model's value) by the fit (``calibration.fit``). Everything here is pure Python: a profile
is data, loaded without scikit-learn or torch.

Memory (allocated peak, bytes): the analytical model itself (its phases, heads and max(), every term
it counts) with two of its documented scales fitted, plus a constant:

    allocated = analytical(activation_scale = a[f], logits_scale = l).allocated + c

``a[f]`` scales every saved activation, the recomputed block and the backward temporaries of family
``f`` (the structural count of its transformers code), ``l`` the loss's tokens x vocabulary tensors,
``c`` what the meter sees that no term counts (small buffers, the RNG state). A family without trials
in the profile keeps a = 1 (the estimate says so).

Speed (seconds per micro-step): every coefficient multiplies one of the analytical model's own time
terms at the device's peak FLOP/s (P) and bandwidth (BW), so a profile is a set of *corrections* of
physical quantities, each with a prior (the analytical model's value, ``speed_priors``) the fit is
pulled toward (ridge), and it extrapolates as the physics does:

    x_gemm * tokens*(F - F_attn)/P          the GEMMs (x_gemm = 1/MFU; >= its floor: nothing beats the peak)
  + x_narrow * tokens*(F - F_attn)/P * 128/hidden     small-K GEMMs lose efficiency (narrow models)
  + x_attn * tokens*F_attn/P                the attention kernels (SDPA)
  + x_eager * tokens*F_eager/P              attention as matmuls over the full s x s: eager, and a CPU's SDPA
                                            math path (attention dropout on: no fused CPU kernel)
  + x_traffic * (element-wise and LoRA-matmul traffic)/BW
  + x_opt * (the optimiser step's traffic)/BW
  + x_dequant * (NF4 dequantisation traffic)/BW
  + x_weights * (per-step temporaries on whole adapted weights)/BW   DoRA's weight norm, every forward pass
  + x_logits * (logits and loss bytes)/BW   the loss's passes over tokens x vocabulary (softmax, its gradient)
  + x_fresh * (the same bytes)/BW           CPU only, where a tokens x vocabulary fp32 tensor exceeds glibc's
                                            mmap threshold (32 MiB): fresh pages (faults, zeroing) every step
  + x_host * host ops                       seconds per op the host issues (Python, dispatcher, launch)
  + x_step                                  seconds per micro-step

F is ``flops_per_token``, F_attn its attention share, host ops ``SpeedCounts.host_ops`` (what the
analytical model counts for the GPU host-bound floor; on a CPU the ops run inline, so they add).
The *scaled* rule for a catalog GPU without a profile: take the nearest calibrated
GPU (same class; nearest in log peak FLOP/s and log bandwidth), keep its efficiencies and overheads
and its memory coefficients, and apply them to the target's own peak and bandwidth (so compute time
scales with the FLOP/s ratio and memory-bound time with the bandwidth ratio). Such estimates say
``scaled:<profile id>``; estimates on the profiled device say ``calibrated:<profile id>``.

The multi-GPU terms (communication) stay analytical: trials run on one device.

The estimator is not an analytical one with other constants: it makes its own plan terms (the
calibrated memory peak and traffic above, from the analytical terms as features) and its own device
coefficients (1/x_gemm as MFU at every token count; on a GPU x_host as the host seconds per op of the
host-bound floor; every other term folded into the traffic, as seconds at the device's bandwidth), and
both go through the one device layer (``advisor.estimators.device``) like the analytical model's. The
features are the analytical terms of ``TERMS_VERSION`` (``advisor.estimators.terms``); a profile
fitted on other terms is refused when it is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from advisor.errors import InvalidInputError
from advisor.estimators import device as dev
from advisor.estimators.analytical import DEFAULT_COEFFICIENTS, AnalyticalEstimator
from advisor.estimators.base import Estimate, build_estimate
from advisor.estimators.device import DeviceCoefficients, peak_flops
from advisor.estimators.terms import PlanTerms
from advisor.methods import get_method
from advisor.plans import TrainingPlan
from advisor.profiles import Profile
from advisor.specs import GpuSpec, ModelSpec
from advisor.units import DTYPE_BYTES


class StaleProfileError(InvalidInputError):
    """A profile fitted on other analytical terms than this advisor computes (refit it)."""


#: the memory coefficients: activation scale per family, logits scale, constant bytes (see the docstring)
MEMORY_COEFFICIENTS = ("activation_scale", "logits_scale", "fixed_bytes")
#: what the memory coefficients are pulled toward: the analytical model as is
MEMORY_PRIOR = {"activation_scale": 1.0, "logits_scale": 1.0, "fixed_bytes": 0.0}
SPEED_TERMS = (
    "gemm",
    "narrow",
    "attention",
    "eager_attention",
    "traffic",
    "optimizer_traffic",
    "dequant_traffic",
    "adapter_weight_traffic",
    "logits",
    "logits_fresh",
    "host_ops",
    "step_s",
)
#: glibc's largest mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit): a CPU tensor above it is always a fresh
#: mmap, so every step pays page faults and zeroing on it (process CPU time); smaller ones are reused from the heap
FRESH_PAGES_BYTES = 32 * 2**20
#: matmuls narrower than this lose efficiency (the narrow term scales with NARROW_WIDTH / hidden size)
NARROW_WIDTH = 128


@dataclass(frozen=True)
class Features:
    """One plan as the calibrated model sees it: what the memory model re-evaluates, and the speed terms."""

    family: str
    checkpointing: bool
    model: ModelSpec
    plan: TrainingPlan
    cpu: bool
    static: float  # weights + adapters + optimizer states + accumulated gradients (analytical, unscaled)
    speed: dict[str, float]  # SPEED_TERMS, each already divided so its coefficient is dimensionless or seconds


def features(base: AnalyticalEstimator, model: ModelSpec, gpu: GpuSpec, plan: TrainingPlan) -> Features:
    """Features of `plan` on `gpu` from an analytical estimator with the default coefficients."""
    cpu = gpu.gpu_class == "cpu"
    t = base.terms(model, plan, cpu)
    b, s = plan.micro_batch, plan.seq_len
    static = t["weights"] + t["adapters"] + t["optimizer_states"] + t["accumulated_gradients"]
    # the rate the device layer's GEMM efficiency is relative to: the achievable matmul rate (the peak on a CPU)
    peak = dev.matmul_flops(gpu, plan.dtype)
    bw = gpu.memory_bandwidth_gbps * 1e9
    tokens = b * s
    pt = base.plan_terms(model, plan, cpu)
    fpt = t["flops_per_token"]
    # attention as matmuls over the full s x s (eager; the CPU's SDPA math path): apart from the fused kernels
    f_eager = _eager_attention_flops(model, plan, cpu)
    f_attn = 0.0 if f_eager else min(float(pt.speed.attention_flops_per_token), fpt)
    # the attention FLOPs flops_per_token holds (eager: the full s x s; otherwise the fused kernels' causal count)
    f_in = min(f_eager if plan.attention == "eager" else float(pt.speed.attention_flops_per_token), fpt)
    # the GEMMs at the peak, in the device layer's waves of output tiles (1 on a CPU or an unknown SM count)
    sms = 0.0 if cpu else float(gpu.sm_count or 0)
    gemm = tokens * (fpt - f_in) / peak / float(dev.wave_efficiency(tokens, pt.speed.gemm_n, sms))
    other_traffic = max(0.0, pt.memory_traffic_bytes - t["quant_traffic_bytes"] - t["optimizer_traffic_bytes"])
    # per-step adapter work on whole weights (DoRA's weight norm: W + BA and its norm, every forward pass)
    method = get_method(plan.method)
    _, groups = base.adapters(model, plan)
    e = DTYPE_BYTES[plan.dtype]
    weight_tmp = sum(
        blk.count * method.forward_temporaries(model, plan, [lin], e) for blk, lins in groups for lin in lins
    )
    speed = {
        "gemm": gemm,
        "narrow": gemm * NARROW_WIDTH / model.hidden_size,
        "attention": tokens * f_attn / peak,
        "eager_attention": tokens * f_eager / peak,
        # not a term: the attention time inside flops_per_token at the peak (what the device layer charges at x_gemm)
        "attention_in_flops": tokens * f_in / peak,
        "traffic": other_traffic / bw,
        "optimizer_traffic": t["optimizer_traffic_bytes"] / bw,
        "dequant_traffic": t["quant_traffic_bytes"] / bw,
        "adapter_weight_traffic": weight_tmp * (pt.passes - 1) / bw,
        "logits": t["logits"] / bw,
        # a CPU's logits-sized tensors (fp32 tokens x vocabulary) above the mmap threshold are fresh pages each step
        "logits_fresh": t["logits"] / bw if cpu and tokens * model.vocab_size * 4 > FRESH_PAGES_BYTES else 0.0,
        "host_ops": float(pt.speed.host_ops),
        "step_s": 1.0,
    }
    return Features(model.family, plan.grad_checkpointing, model, plan, cpu, static, speed)


def _eager_attention_flops(model: ModelSpec, plan: TrainingPlan, cpu: bool) -> float:
    """FLOPs per token of attention run as plain matmuls over the full s x s scores (every head: forward,
    backward at twice the forward, and the recompute): eager attention, and on a CPU SDPA's math path, which
    runs whenever attention dropout is on (PyTorch's CPU flash kernel refuses dropout: GPT-2, T5); 0 where a
    fused SDPA kernel runs."""
    hf = plan.framework == "hf"
    eager = plan.attention == "eager" or (hf and not model.sdpa)
    math_path = cpu and hf and model.dropout > 0
    if not (eager or math_path):
        return 0.0
    s = plan.seq_len
    per_pass = sum(blk.count * 4 * s * model.q_dim * (2 if blk.kind == "cross_decoder" else 1) for blk in model.blocks)
    return per_pass * (4 if plan.grad_checkpointing else 3)


# ---- the fitted model ------------------------------------------------------------------------------
_SCALED: dict[tuple[float, float], AnalyticalEstimator] = {}


def scaled_analytical(activation_scale: float, logits_scale: float) -> AnalyticalEstimator:
    """The analytical model with these two scales (cached: the fit evaluates a few hundred of them)."""
    key = (round(activation_scale, 12), round(logits_scale, 12))
    est = _SCALED.get(key)
    if est is None:
        if len(_SCALED) > 512:
            _SCALED.clear()
        k = replace(DEFAULT_COEFFICIENTS, activation_scale=key[0], logits_scale=key[1])
        est = _SCALED[key] = AnalyticalEstimator(k)
    return est


def memory_scales(coef: dict[str, Any], family: str) -> tuple[float, float, float]:
    """(activation scale of `family`, logits scale, constant bytes); a family without trials keeps 1."""
    per = coef.get("activation_scale") or {}
    return (
        float(per.get(family, MEMORY_PRIOR["activation_scale"])),
        float(coef.get("logits_scale", MEMORY_PRIOR["logits_scale"])),
        float(coef.get("fixed_bytes", MEMORY_PRIOR["fixed_bytes"])),
    )


def memory_prediction(coef: dict[str, Any], f: Features) -> tuple[float, str, PlanTerms]:
    """(allocated peak, peak phase, the scaled analytical terms) of the calibrated memory model for one plan."""
    a, lg, c = memory_scales(coef, f.family)
    t = scaled_analytical(a, lg).plan_terms(f.model, f.plan, f.cpu)
    return t.allocated + c, t.peak_phase, t


def speed_priors(gpu: GpuSpec) -> dict[str, float]:
    """The analytical model's value of each speed coefficient on `gpu` (what the fit is pulled toward, and
    what a term no trial informs keeps): 1/MFU prior for the GEMMs and attention, 1/bandwidth efficiency
    for the traffic terms, the host seconds per op; no narrow-GEMM loss, no per-step constant."""
    k = DEFAULT_COEFFICIENTS.device
    mfu = k.mfu if k.mfu is not None else dev.MFU_PRIOR.get(gpu.gpu_class, 0.45)
    return {
        "gemm": 1.0 / mfu,
        "narrow": 0.0,
        "attention": 1.0 / mfu,
        "eager_attention": 1.0 / mfu,
        "traffic": 1.0 / k.bandwidth_efficiency,
        "optimizer_traffic": 1.0 / k.bandwidth_efficiency,
        "dequant_traffic": 1.0 / k.bandwidth_efficiency,
        "adapter_weight_traffic": 1.0 / k.bandwidth_efficiency,
        "logits": 1.0,
        "logits_fresh": 0.0,
        "host_ops": k.host_op_s,
        "step_s": 0.0,
    }


def speed_features(memory_coef: dict[str, Any], f: Features) -> dict[str, float]:
    """SPEED_TERMS for one plan (seconds at the device's peak and bandwidth, host ops, 1). `memory_coef` is
    not used (kept for callers: older speed features moved the calibrated activation bytes)."""
    return {name: float(f.speed[name]) for name in SPEED_TERMS}


def speed_prediction(coef: dict[str, Any], f: Features) -> float:
    """Seconds per micro-step; `coef` is a profile's coefficients (speed and memory)."""
    x = speed_features(coef["memory"], f)
    return sum(float(coef["speed"].get(name, 0.0)) * x[name] for name in SPEED_TERMS)


# ---- the estimator -------------------------------------------------------------------------------
class CalibratedEstimator:
    """Estimates for one device from a profile (its own device, or another GPU under the scaled rule).
    Implements the ``advisor.estimators.base.Estimator`` seam: calibrated plan terms, fitted device
    coefficients, the shared device layer."""

    name = "calibrated"

    def __init__(self, profile: Profile, gpu: GpuSpec | None = None, scaled: bool = False):
        if profile.stale:
            raise StaleProfileError(profile.stale_reason(), field="gpu")
        coef = profile.coefficients
        self.profile = profile
        self.gpu = gpu or profile.gpu
        self.scaled = scaled
        self.source = ("scaled:" if scaled else "calibrated:") + profile.id
        self.memory_coef = coef["memory"]
        self.speed_coef = {k: float(v) for k, v in coef["speed"].items()}
        missing = [name for name in SPEED_TERMS if name not in self.speed_coef]
        missing += [name for name in MEMORY_COEFFICIENTS if name not in coef["memory"]]
        if missing:
            raise StaleProfileError(
                f"profile {profile.id} has no coefficient for {', '.join(missing)}: it was fitted on an older "
                "form of the calibrated model; refit it (python -m calibration.fit RUN_DIR) or calibrate again",
                field="gpu",
            )
        x_gemm = max(self.speed_coef["gemm"], 1e-9)
        runtime = coef.get("runtime", {})
        self.coefficients = DeviceCoefficients(
            allocator_fragmentation=float(runtime.get("allocator_fragmentation", 0.0)),
            cuda_context_bytes=int(runtime.get("cuda_context_bytes", 0)),
            mfu=1.0 / x_gemm,
            tokens_half_efficiency=0.0,  # the narrow and per-step terms carry what small steps lose
            bandwidth_efficiency=1.0,  # the fitted traffic coefficients are folded into the terms' traffic
            layer_overhead_s=0.0,  # per-op host time is the host_ops term
            gpu_layer_overhead_s=0.0,
            # a GPU: the fitted host seconds per op set the host-bound floor (the device layer's max());
            # a CPU runs its ops inline: they are added with the other terms below
            host_op_s=self.speed_coef["host_ops"],
        )
        self._base = AnalyticalEstimator(DEFAULT_COEFFICIENTS)
        self._calibrated: dict[tuple, tuple[ModelSpec, PlanTerms]] = {}

    def device(self, gpu: GpuSpec, dtype: str) -> dev.DeviceColumns:
        return dev.DeviceColumns.of(gpu, dtype, self.coefficients)

    def plan_terms(self, model: ModelSpec, plan: TrainingPlan, cpu: bool = False) -> PlanTerms:
        """The analytical terms with calibrated memory and traffic (see the module docstring)."""
        key = (id(model), plan.shape_key, cpu)
        hit = self._calibrated.get(key)
        if hit is not None and hit[0] is model:
            return hit[1]
        base = self._base.plan_terms(model, plan, cpu)
        f = features(self._base, model, self.gpu, plan)
        allocated, phase, mt = memory_prediction(self.memory_coef, f)
        # the device layer charges every FLOP at the fitted GEMM efficiency (1/x_gemm); everything else rides
        # on the memory-bound term, as seconds at the profiled device's bandwidth: the attention kernels' (SDPA
        # and eager) difference from the GEMMs, narrow GEMMs, traffic, dequantisation, the loss, the per-step constant
        # and, on a CPU, the host ops (a GPU takes them as its host-bound floor instead)
        sc = self.speed_coef
        x = speed_features(self.memory_coef, f)
        rest = [
            "narrow",
            "traffic",
            "optimizer_traffic",
            "dequant_traffic",
            "adapter_weight_traffic",
            "logits",
            "logits_fresh",
            "step_s",
        ] + (["host_ops"] if cpu else [])
        seconds = (
            sum(sc[name] * x[name] for name in rest)
            + sc["attention"] * x["attention"]
            + sc["eager_attention"] * x["eager_attention"]
            - sc["gemm"] * f.speed["attention_in_flops"]
        )
        traffic = seconds * self.gpu.memory_bandwidth_gbps * 1e9
        terms = replace(
            base,
            components=dict(mt.components),  # the constant bytes show as runtime overhead
            allocated=allocated,
            static=mt.static,
            peak_phase=phase,
            memory_traffic_bytes=traffic,
            speed=replace(base.speed, attention_flops_per_token=0.0),
            allocator_slack=float("nan"),  # the profile's fitted fragmentation (runtime) stands for the slack
        )
        if len(self._calibrated) > 50_000:
            self._calibrated.clear()
        self._calibrated[key] = (model, terms)
        return terms

    def estimate(self, model: ModelSpec, gpu: GpuSpec, plan: TrainingPlan) -> Estimate:
        return build_estimate(self, model, gpu, plan)

    def notes(self, model: ModelSpec, gpu: GpuSpec, plan: TrainingPlan) -> list[str]:
        p = self.profile
        h = p.held_out
        out = [
            f"calibrated on {p.device_name} ({p.created_at[:10]}): held-out median error "
            f"{h.memory_median_abs_pct_error:.1f}% memory, "
            + (
                f"{h.step_time_median_abs_pct_error:.1f}% step time"
                if h.step_time_median_abs_pct_error is not None
                else "step time not fitted"
            )
        ]
        if self.scaled:
            ratio_f = peak_flops(self.gpu, plan.dtype) / max(peak_flops(p.gpu, plan.dtype), 1.0)
            ratio_b = self.gpu.memory_bandwidth_gbps / max(p.gpu.memory_bandwidth_gbps, 1e-9)
            out.append(
                f"no profile for {self.gpu.name}: efficiencies and memory coefficients of {p.device_name} "
                f"applied to its peak FLOP/s (x{ratio_f:.2f}) and bandwidth (x{ratio_b:.2f})"
            )
        outside = p.fitted_range.outside(model, plan)
        if outside:
            out.append("extrapolating beyond the calibration: " + "; ".join(outside))
        fams = set(p.fitted_range.families)
        if fams and model.family not in fams:
            out.append(f"no {model.family} trials in the profile: its activation coefficients are analytical")
        return out


def nearest_profile(profiles: list[Profile], gpu: GpuSpec) -> Profile | None:
    """The scaled rule's source: a profile of the same device class, nearest in log FLOP/s and log bandwidth."""
    dtype = gpu.default_dtype()
    best: tuple[float, Profile] | None = None
    for p in profiles:
        src = p.gpu
        if (src.gpu_class == "cpu") != (gpu.gpu_class == "cpu") or src.id == gpu.id:
            continue
        pf, tf = peak_flops(src, dtype), peak_flops(gpu, dtype)
        if pf <= 0 or tf <= 0 or src.memory_bandwidth_gbps <= 0 or gpu.memory_bandwidth_gbps <= 0:
            continue
        d = math.hypot(math.log(tf / pf), math.log(gpu.memory_bandwidth_gbps / src.memory_bandwidth_gbps))
        if best is None or d < best[0]:
            best = (d, p)
    return best[1] if best else None
