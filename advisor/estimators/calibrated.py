"""Calibrated estimator: the analytical model's terms times coefficients fitted on one device (a profile).

Why not only new values for the analytical constants: measured on a real stack, the peak is a max
over phases the analytical model adds together (with checkpointing, the end of the forward pass
holds the logits and the loss; the recomputed block comes later, after they are freed), and the
activation bytes of a block differ by family (GPT-2's unfused GELU and dropout masks, attention
scores some kernels materialise). So the analytical terms become features, and each term gets a
coefficient per regime, fitted by ``calibration.fit``. Everything here is pure Python: a profile is
data, loaded without scikit-learn or torch.

Memory (allocated peak, bytes); ``f`` is the model family, ``L`` its layer count:

    static        = weights + adapters + optimizer states (+ gradients kept by accumulation)   (x1, exact)
    no checkpoint = static + b[f]*blocks + a[f]*scores + t*tail + l*logits + q*quant + x*transient + d*grads + c
    checkpoint    = static + r*residuals + d*grads + c
                    + max(t*tail + l*logits,  k[f]*block + a[f]*scores/L + q*quant + x*transient)
    optimizer     = weights + adapters + optimizer states + g*gradients + c   (g >= 1: the step's temporaries)
    peak          = max(the forward/backward phase, the optimizer phase)

``blocks`` are the saved activations of all blocks, ``block`` one block's (recomputed under
checkpointing), ``residuals`` the checkpointed block inputs, ``tail`` the final norm and embedding
output, ``scores`` the attention probabilities b*heads*s^2*L*4 bytes (kept only by some attention
kernels, e.g. SDPA's math path under dropout), ``transient`` the analytical backward temporaries,
``grads`` the trainable parameters' gradients (full fine-tuning builds them during backward, so a
share of them is alive at the activation peak). A
family without trials in the profile keeps the analytical 1.0 and no scores term (the estimate says so).

Speed (seconds per micro-step); F = FLOPs per token, P = the dtype's peak FLOP/s, BW = bandwidth:

    x1*tokens*F/P + x2*F/P + xn*tokens*F/P*128/hidden
      + x3*(3*activations + optimizer traffic)/BW + x4*(dequantisation traffic)/BW
      + x5*layers*passes + x6*(LoRA modules)*passes + x7

x1 = 1/MFU and x3 = 1/bandwidth efficiency are inverse efficiencies (x1 >= 1: no step beats the
peak), x2 the per-step matmul overhead, xn the loss of narrow matmuls (small hidden sizes);
``activations`` are the calibrated activation bytes (the memory fit's, so a family's extra
element-wise tensors cost time too); x5..x7 are seconds of per-op overhead. The *scaled* rule for a catalog GPU without a profile: take the nearest calibrated
GPU (same class; nearest in log peak FLOP/s and log bandwidth), keep its efficiencies and overheads
and its memory coefficients, and apply them to the target's own peak and bandwidth (so compute time
scales with the FLOP/s ratio and memory-bound time with the bandwidth ratio). Such estimates say
``scaled:<profile id>``; estimates on the profiled device say ``calibrated:<profile id>``.

The multi-GPU terms (communication) stay analytical: trials run on one device.

The estimator is not an analytical one with other constants: it makes its own plan terms (the
calibrated memory peak and traffic above, from the analytical terms as features) and its own device
coefficients (1/x1 as MFU, x2/x1 as the tokens at half efficiency, x5 as the per-block overhead), and
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
from advisor.plans import TrainingPlan
from advisor.profiles import Profile
from advisor.specs import GpuSpec, ModelSpec


class StaleProfileError(InvalidInputError):
    """A profile fitted on other analytical terms than this advisor computes (refit it)."""


#: the coefficient a family without trials keeps (the analytical structural count as is)
PRIOR = {"blocks": 1.0, "recompute_block": 1.0, "attention_scores": 0.0}
MEMORY_TERMS_NO_CKPT = ("tail", "logits", "quant_temporaries", "backward_transient", "gradients", "fixed_bytes")
MEMORY_TERMS_CKPT = (
    "residuals",
    "tail",
    "logits",
    "quant_temporaries",
    "backward_transient",
    "gradients",
    "fixed_bytes",
)
SPEED_TERMS = (
    "compute",
    "compute_per_step",
    "compute_narrow",
    "memory_traffic",
    "dequant_traffic",
    "layer_passes_s",
    "adapter_passes_s",
    "step_s",
)
FAMILY_TERMS_NO_CKPT = ("blocks", "attention_scores")
#: the analytical prior for how often element-wise ops move the saved activations (Coefficients.elementwise_passes)
ELEMENTWISE_PASSES = DEFAULT_COEFFICIENTS.elementwise_passes
#: matmuls narrower than this lose efficiency (the compute_narrow term scales with NARROW_WIDTH / hidden size)
NARROW_WIDTH = 128
FAMILY_TERMS_CKPT = ("recompute_block", "attention_scores")


@dataclass(frozen=True)
class Features:
    """The analytical terms of one plan, split the way the calibrated model combines them (bytes, seconds)."""

    family: str
    checkpointing: bool
    static: float  # weights + adapters + optimizer states + accumulated gradients
    optimizer_static: float  # weights + adapters + optimizer states (what the optimiser step adds gradients to)
    memory: dict[str, float]  # blocks, block, residuals, tail, scores, logits, quant, transient, gradients
    speed: dict[str, float]  # SPEED_TERMS, each already divided so its coefficient is dimensionless or seconds


def features(base: AnalyticalEstimator, model: ModelSpec, gpu: GpuSpec, plan: TrainingPlan) -> Features:
    """Features of `plan` on `gpu` from an analytical estimator with the default coefficients."""
    cpu = gpu.gpu_class == "cpu"
    t = base.terms(model, plan, cpu)
    nock = replace(plan, grad_checkpointing=False)
    blocks_all = base.terms(model, nock, cpu)["activations"]
    # one block and the tail (final norm, embedding output), from the same model at one and two layers
    a1 = base.terms(_with_layers(model, 1), nock, cpu)["activations"]
    a2 = base.terms(_with_layers(model, 2), nock, cpu)["activations"]
    l1, l2 = _with_layers(model, 1).total_layers, _with_layers(model, 2).total_layers
    block = max(0.0, (a2 - a1) / (l2 - l1))
    tail = max(0.0, a1 - l1 * block)
    blocks = max(0.0, blocks_all - tail)
    residuals = max(0.0, t["activations"] - block - tail) if plan.grad_checkpointing else 0.0
    b, s = plan.micro_batch, plan.seq_len
    scores = 4.0 * b * model.num_attention_heads * s * s * model.total_layers
    memory = {
        "blocks": blocks,
        "block": block,
        "residuals": residuals,
        "tail": tail,
        "scores": scores,
        "scores_one_layer": scores / max(1, model.total_layers),
        "logits": t["logits"],
        "quant_temporaries": t["quant_temporaries"],
        "backward_transient": t["backward_transient"],
        "gradients": t["gradients"],
    }
    static = t["weights"] + t["adapters"] + t["optimizer_states"] + t["accumulated_gradients"]
    optimizer_static = t["weights"] + t["adapters"] + t["optimizer_states"]
    peak = peak_flops(gpu, plan.dtype)
    bw = gpu.memory_bandwidth_gbps * 1e9
    tokens = b * s
    passes = 3 if plan.grad_checkpointing else 2
    speed = {
        "compute": tokens * t["flops_per_token"] / peak,
        "compute_per_step": t["flops_per_token"] / peak,
        "compute_narrow": tokens * t["flops_per_token"] / peak * NARROW_WIDTH / model.hidden_size,
        "optimizer_traffic": t["optimizer_traffic_bytes"] / bw,
        "per_byte": 1.0 / bw,
        "dequant_traffic": t["quant_traffic_bytes"] / bw,
        "layer_passes_s": float(model.total_layers * passes),
        "adapter_passes_s": float(t["lora_modules"] * passes),
        "step_s": 1.0,
    }
    return Features(model.family, plan.grad_checkpointing, static, optimizer_static, memory, speed)


def _with_layers(model: ModelSpec, n: int) -> ModelSpec:
    return replace(model, num_layers=n, num_decoder_layers=n if model.is_encoder_decoder else None)


# ---- the fitted model ------------------------------------------------------------------------------
def _fam(table: dict[str, Any], name: str, family: str) -> float:
    per = table.get(name) or {}
    return float(per.get(family, PRIOR[name]))


def memory_prediction(coef: dict[str, Any], f: Features) -> tuple[float, str, dict[str, float]]:
    """(allocated peak, peak phase, named parts) of the calibrated memory model for one plan."""
    m = f.memory
    if f.checkpointing:
        k = coef["checkpointing"]
        fwd = k["tail"] * m["tail"] + k["logits"] * m["logits"]
        rec = (
            _fam(k, "recompute_block", f.family) * m["block"]
            + _fam(k, "attention_scores", f.family) * m["scores_one_layer"]
            + k["quant_temporaries"] * m["quant_temporaries"]
            + k["backward_transient"] * m["backward_transient"]
        )
        resid = k["residuals"] * m["residuals"] + k.get("gradients", 0.0) * m["gradients"]
        if fwd >= rec:
            parts = {"activations": resid + k["tail"] * m["tail"], "logits": k["logits"] * m["logits"]}
        else:
            parts = {
                "activations": resid + rec - k["quant_temporaries"] * m["quant_temporaries"],
                "quant_temporaries": k["quant_temporaries"] * m["quant_temporaries"],
            }
    else:
        k = coef["no_checkpointing"]
        parts = {
            "activations": _fam(k, "blocks", f.family) * m["blocks"]
            + _fam(k, "attention_scores", f.family) * m["scores"]
            + k["tail"] * m["tail"]
            + k["backward_transient"] * m["backward_transient"]
            + k.get("gradients", 0.0) * m["gradients"],
            "logits": k["logits"] * m["logits"],
            "quant_temporaries": k["quant_temporaries"] * m["quant_temporaries"],
        }
    fixed = float(k["fixed_bytes"])
    phase_a = f.static + sum(parts.values()) + fixed
    g = float((coef.get("optimizer_step") or {}).get("gradients", 1.0))
    phase_b = f.optimizer_static + g * m["gradients"] + fixed
    if phase_a >= phase_b:
        return phase_a, "forward/backward", parts
    return phase_b, "optimizer step", {}


def activation_bytes(memory_coef: dict[str, Any], f: Features) -> float:
    """The calibrated bytes of all saved activations without checkpointing (what element-wise ops move)."""
    k = memory_coef["no_checkpointing"]
    m = f.memory
    return (
        _fam(k, "blocks", f.family) * m["blocks"]
        + _fam(k, "attention_scores", f.family) * m["scores"]
        + k["tail"] * m["tail"]
    )


def speed_features(memory_coef: dict[str, Any], f: Features) -> dict[str, float]:
    """SPEED_TERMS for one plan; the traffic term moves the *calibrated* activation bytes (so GPT-2's extra
    element-wise tensors, found by the memory fit, cost time too) ELEMENTWISE_PASSES times."""
    out = {name: f.speed[name] for name in SPEED_TERMS if name in f.speed}
    out["memory_traffic"] = (
        f.speed["optimizer_traffic"] + ELEMENTWISE_PASSES * activation_bytes(memory_coef, f) * f.speed["per_byte"]
    )
    return out


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
        x1 = max(self.speed_coef["compute"], 1e-9)
        runtime = coef.get("runtime", {})
        self.coefficients = DeviceCoefficients(
            allocator_fragmentation=float(runtime.get("allocator_fragmentation", 0.0)),
            cuda_context_bytes=int(runtime.get("cuda_context_bytes", 0)),
            mfu=1.0 / x1,
            tokens_half_efficiency=self.speed_coef.get("compute_per_step", 0.0) / x1,
            bandwidth_efficiency=1.0,  # the fitted traffic coefficients are folded into the terms' traffic
            layer_overhead_s=self.speed_coef.get("layer_passes_s", 0.0),
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
        allocated, phase, parts = memory_prediction(self.memory_coef, f)
        t = base.terms
        components = {
            "weights": int(t["weights"]),
            "adapters": int(t["adapters"]),
            "gradients": int(t["gradients"] if phase == "optimizer step" else t["accumulated_gradients"]),
            "optimizer_states": int(t["optimizer_states"]),
            "activations": int(parts.get("activations", 0.0)),
            "logits": int(parts.get("logits", 0.0)),
            "quant_temporaries": int(parts.get("quant_temporaries", 0.0)),
            "adapter_temporaries": 0,  # not in the fitted model (no DoRA trials): see the fitted-range note
        }
        # everything but the matmul time at the fitted MFU (x1, x2) rides on the memory-bound term, as
        # bytes at the device's bandwidth: traffic, narrow-matmul inefficiency, per-op overheads
        # (layer overheads stay in the device coefficients' layer_overhead_s, as in the analytical model)
        sc = self.speed_coef
        x = speed_features(self.memory_coef, f)
        rest = ("compute_narrow", "memory_traffic", "dequant_traffic", "adapter_passes_s", "step_s")
        traffic = sum(sc.get(name, 0.0) * x[name] for name in rest) * self.gpu.memory_bandwidth_gbps * 1e9
        terms = replace(
            base,
            components=components,
            allocated=allocated,
            static=f.static,
            peak_phase=phase,
            memory_traffic_bytes=traffic,
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
