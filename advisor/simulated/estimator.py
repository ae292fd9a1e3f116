"""The simulated estimator: memory from a traced full-size step (cached), speed from the analytical model.

Importing this module imports no torch: the trace (``advisor.simulated.trace``) is imported when one
runs in this process, or in a child process under a deadline (``advisor.simulated.runner``).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from advisor.errors import InvalidInputError
from advisor.estimators.analytical import DEFAULT_COEFFICIENTS, AnalyticalEstimator, Coefficients
from advisor.estimators.base import MemoryEstimate, speed_notes
from advisor.families import hf_config
from advisor.methods import get_method
from advisor.plans import TrainingPlan
from advisor.simulated.cache import TraceCache, cache_key, unavailable_reason
from advisor.simulated.results import SimulatedEstimate, TraceResult
from advisor.simulated.runner import run_trace
from advisor.specs import GpuSpec, ModelSpec
from advisor.stack.targets import lora_target_modules
from advisor.units import GIB


# ---- validation --------------------------------------------------------------------------------
def check_plan(plan: TrainingPlan) -> None:
    """What a single-process trace can represent; anything else is a clear 4xx."""
    if plan.num_gpus != 1:
        raise InvalidInputError(
            "the simulated source traces one GPU: multi-GPU plans (ddp/fsdp) need source analytical",
            field="num_gpus",
        )


def stack_notes(plan: TrainingPlan) -> list[str]:
    """What the trace of a litgpt / torchtune plan is: transformers' model code with that stack's
    dtype conventions, not the stack's own code."""
    fw = getattr(plan, "framework", "hf")
    notes = []
    if fw != "hf":
        notes.append(
            f"{fw} plan traced in transformers + peft + bitsandbytes code with {fw}'s dtype conventions "
            "(adapters and unquantised modules in the model dtype); its own model, LoRA and NF4 code may keep "
            "other tensors"
        )
    if getattr(plan, "chunked_loss", False):
        how = "128-token chunks in the logits dtype (litgpt)" if fw == "litgpt" else "8 chunks, each upcast to fp32"
        notes.append(f"loss traced as chunked cross-entropy over the sequence: {how}")
    return notes


class SimulatedEstimator:
    """Memory from a traced step (cached), speed from the analytical model."""

    name = "simulated"

    def __init__(
        self,
        cache_dir: Path | str | None = None,
        coefficients: Coefficients = DEFAULT_COEFFICIENTS,
        speed: AnalyticalEstimator | None = None,
        timeout_s: float | None = None,
        use_cache: bool = True,
    ):
        self.cache = TraceCache(cache_dir)
        self.k = coefficients
        self.speed_model = speed or AnalyticalEstimator(coefficients)
        self.timeout_s = timeout_s
        self.use_cache = use_cache

    def _prepare(self, model: ModelSpec, plan: TrainingPlan) -> tuple[dict, list[str], str]:
        reason = unavailable_reason()
        if reason:
            raise InvalidInputError(reason, field="source")
        check_plan(plan)
        config = hf_config(model)
        targets = list(lora_target_modules(model, plan)) if get_method(plan.method).adapter else []
        return config, targets, cache_key(config, plan)

    def cached(self, model: ModelSpec, plan: TrainingPlan) -> TraceResult | None:
        """The stored trace for this model and plan, if one exists (no tracing)."""
        if not self.use_cache:
            return None
        _, _, key = self._prepare(model, plan)
        return self.cache.get(key)

    def trace(self, model: ModelSpec, plan: TrainingPlan, timeout_s: float | None = None) -> TraceResult:
        """The traced step for this model and plan: from the cache, else run (and store) it.

        With a timeout (or the estimator's), the trace runs in a child process killed at the deadline.
        """
        config, targets, key = self._prepare(model, plan)
        if self.use_cache:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        limit = timeout_s if timeout_s is not None else self.timeout_s
        result = run_trace(config, plan, targets, limit)  # bounded by the request's pool inside the API
        expected = model.param_count
        if expected and abs(result.param_count - expected) > 0.005 * expected:
            result = replace(
                result,
                notes=(
                    *result.notes,
                    f"transformers builds {result.param_count:,} parameters for this config, the spec counts "
                    f"{expected:,} (e.g. transformers 5 always ties T5's lm_head to its embeddings)",
                ),
            )
        if self.use_cache:
            self.cache.put(key, result, config, plan)
        return result

    def memory_from_trace(self, trace: TraceResult, gpu: GpuSpec) -> MemoryEstimate:
        """Allocated = traced tensor peak + the fixed buffers no trace sees (cuBLAS workspaces, RNG
        state); reserved and device total from it with the analytical model's constants."""
        fixed = self.k.fixed_allocated_bytes
        allocated = trace.peak_bytes + fixed
        comp = trace.components
        static = comp.get("weights", 0) + comp.get("adapters", 0) + comp.get("optimizer_states", 0) + fixed
        reserved, total = self.speed_model.memory_totals(gpu, allocated, static)
        components = {c: int(v) for c, v in comp.items()}
        components["runtime_overhead"] = int(total - sum(components.values()))
        return MemoryEstimate(
            components=components,
            allocated_peak_bytes=int(allocated),
            reserved_peak_bytes=int(reserved),
            device_total_bytes=int(total),
            paged_bytes=int(trace.paged_bytes),
            peak_phase="optimizer step" if trace.peak_phase == "optimizer_step" else "forward/backward",
            device_bytes=gpu.memory_bytes,
        )

    def estimate(
        self, model: ModelSpec, gpu: GpuSpec, plan: TrainingPlan, timeout_s: float | None = None
    ) -> SimulatedEstimate:
        trace = self.trace(model, plan, timeout_s)
        mem = self.memory_from_trace(trace, gpu)
        speed = self.speed_model.speed(model, gpu, plan)
        k = self.k
        notes = [
            f"memory traced under FakeTensorMode ({trace.ops:,} ops, {trace.seconds:.1f} s, "
            f"torch {trace.versions.get('torch')}, transformers {trace.versions.get('transformers')}, "
            f"peft {trace.versions.get('peft')}, bitsandbytes {trace.versions.get('bitsandbytes')}); "
            f"peak in {trace.peak_phase.replace('_', ' ')}",
            f"allocated = traced tensor peak + {k.fixed_allocated_bytes / 2**20:.0f} MiB of fixed buffers; reserved adds "
            f"{k.device.allocator_fragmentation:.0%} allocator slack on the transient part, the device total "
            f"{k.device.cuda_context_bytes / 2**20:.0f} MiB of CUDA context (the analytical model's constants)",
            "speed is the analytical model's",
            *trace.notes,
            *speed_notes(gpu, plan),
        ]
        if model.assumed:
            notes.append(model.note)
        return SimulatedEstimate(
            plan=plan,
            memory=mem,
            speed=speed,
            source="simulated",
            notes=tuple(dict.fromkeys(notes)),
            phases=dict(trace.phases),
            trace=trace,
        )


MAX_SIMULATE_TOP = 20
MAX_SIMULATE_BUDGET_S = 3600.0


def simulate_ranked(estimator: SimulatedEstimator, model: ModelSpec, ranked, top: int, budget_s: float) -> list[dict]:
    """Trace the `top` ranked plans within `budget_s` seconds in all (a trace past the deadline is
    killed): each entry says the simulated peak next to the analytical one, or why it was skipped."""
    if not 0 <= top <= MAX_SIMULATE_TOP:
        raise InvalidInputError(f"simulate_top must be between 0 and {MAX_SIMULATE_TOP}", field="simulate_top")
    if not 0 < budget_s <= MAX_SIMULATE_BUDGET_S:
        raise InvalidInputError(
            f"simulate_budget_s must be in (0, {MAX_SIMULATE_BUDGET_S:.0f}]", field="simulate_budget_s"
        )
    reason = unavailable_reason()
    if reason:
        raise InvalidInputError(reason, field="simulate_top")
    deadline = time.monotonic() + budget_s
    out: list[dict] = []
    for rp in list(ranked)[:top]:
        cand = rp.candidate
        plan, gpu = cand.plan, cand.gpu
        entry: dict[str, Any] = {
            "rank": rp.rank,
            "plan_id": plan.id,
            "analytical_peak_memory_gib": round(cand.estimate.memory.device_total_bytes / GIB, 3),
        }
        try:
            check_plan(plan)
        except InvalidInputError as exc:
            out.append({**entry, "skipped": str(exc)})
            continue
        left = deadline - time.monotonic()
        cached = estimator.cached(model, plan)
        if cached is None and left <= 0:
            out.append({**entry, "skipped": "simulation time budget spent"})
            continue
        try:
            est = estimator.estimate(model, gpu, plan, timeout_s=None if cached is not None else left)
        except (TimeoutError, RuntimeError) as exc:
            out.append({**entry, "skipped": str(exc)})
            continue
        mem = est.memory
        out.append(
            {
                **entry,
                "peak_memory_gib": round(mem.device_total_bytes / GIB, 3),
                "allocated_peak_gib": round(mem.allocated_peak_bytes / GIB, 3),
                "fits": mem.fits,
                "peak_phase": est.trace.peak_phase if est.trace else mem.peak_phase,
                "phases_gib": {k: round(v / GIB, 3) for k, v in est.phases.items()},
                "cached": cached is not None,
                "trace_seconds": round(est.trace.seconds, 2) if est.trace else None,
            }
        )
    return out
