"""The wire format, built in one place: typed core results -> the response models of ``schemas``.

The core returns dataclasses (``EstimateResult``, ``RecommendResult``, ``Estimate``, ``RankedPlan`` ...)
and never a JSON dict; the response models in ``advisor.api.schemas`` are the one definition of every
output field, and the functions here fill them (the parts as plain dicts, the whole body validated once
against its model: a field the model does not declare, or a missing one, fails here). The HTTP routes return these models and the CLI's
``--json`` prints the same ones, so the two cannot drift. Rounding for display (GiB to 3 decimals,
seconds to 4) happens here, not in the core. Imports pydantic and the core only (no FastAPI).
"""

from __future__ import annotations

from typing import Any

from advisor.api import schemas as S
from advisor.cost import CostEstimate
from advisor.estimators.base import Estimate
from advisor.estimators.uncertainty import ErrorBand
from advisor.launchable import LaunchTarget, launchability
from advisor.plans import TrainingPlan
from advisor.platforms import platform_of
from advisor.recommend import RankedPlan, Rejection
from advisor.service import EstimateResult, RecommendResult
from advisor.specs import GpuSpec, ModelSpec, Workload
from advisor.study import ClaimCheck
from advisor.units import GIB


def _gib(b: float) -> float:
    return round(b / GIB, 3)


def plan_out(p: TrainingPlan) -> dict[str, Any]:
    return p.to_dict()


def model_summary(m: ModelSpec) -> dict[str, Any]:
    return {
        "name": m.name,
        "hf_id": m.hf_id,
        "family": m.family,
        "params": m.param_count,
        "params_b": round(m.param_count / 1e9, 3),
        "assumed": m.assumed,
        "source": m.source,
        "note": m.note,
        "checkpoint_params": m.checkpoint_params,
        "checkpoint_dtypes": dict(m.checkpoint_dtypes),
        "revision": m.revision,
        "active_params": m.active_param_count,
        "active_params_b": round(m.active_param_count / 1e9, 3),
        "num_experts": m.num_experts,
        "experts_per_token": m.experts_per_token,
        "prequantized": m.prequantized.to_dict() if m.prequantized is not None else None,
    }


def workload_out(w: Workload) -> dict[str, Any]:
    return {
        "dataset_tokens": w.dataset_tokens,
        "seq_len": w.seq_len,
        "epochs": w.epochs,
        "total_tokens": w.total_tokens,
    }


def band_out(value: float, band: ErrorBand | None, scale: float, digits: int) -> dict[str, Any]:
    """An ErrorBandOut of `value` (bytes or seconds) in the display unit (`value / scale`)."""
    b = band or ErrorBand(None, 0, "no band attached")
    return {
        "low": round(b.low(value) / scale, digits),
        "high": round(b.high(value) / scale, digits),
        "p90_pct": b.p90_pct,
        "n": b.n,
        "basis": b.basis,
    }


def estimate_fields(e: Estimate) -> dict[str, Any]:
    """The EstimateFields of one estimate (a simulated one adds its traced phases)."""
    m, s = e.memory, e.speed
    d: dict[str, Any] = {
        "plan": plan_out(e.plan),
        "source": e.source,
        "peak_memory_gib": _gib(m.device_total_bytes),
        "allocated_peak_gib": _gib(m.allocated_peak_bytes),
        "reserved_peak_gib": _gib(m.reserved_peak_bytes),
        "device_memory_gib": _gib(m.device_bytes),
        "headroom_gib": _gib(m.headroom_bytes),
        "fits": m.fits,
        "verdict": m.verdict,
        "verdict_reason": m.verdict_reason,
        "peak_memory_band_gib": band_out(m.device_total_bytes, m.band, GIB, 3),
        "peak_phase": m.peak_phase,
        "paged_optimizer_gib": _gib(m.paged_bytes),
        "breakdown_gib": {k: _gib(v) for k, v in m.components.items()},
        "step_time_s": round(s.step_time_s, 4),
        "step_time_band_s": band_out(s.step_time_s, s.band, 1.0, 4),
        "tokens_per_s": round(s.tokens_per_s, 1),
        "flops_per_token": s.flops_per_token,
        "time_split_s": {
            "compute": round(s.compute_s, 4),
            "memory_bound": round(s.memory_bound_s, 4),
            "communication": round(s.communication_s, 4),
        },
        "mfu": round(s.mfu, 3),
        "notes": list(e.notes),
    }
    phases = getattr(e, "phases", None)  # a SimulatedEstimate (advisor.simulated): its traced phases
    if phases:
        d["phases_gib"] = {k: _gib(v) for k, v in phases.items()}
    trace = getattr(e, "trace", None)
    if trace is not None:
        d["simulation"] = {
            "traced_peak_gib": _gib(trace.peak_bytes),
            "peak_phase": trace.peak_phase,
            "ops": trace.ops,
            "trace_seconds": round(trace.seconds, 2),
            "versions": trace.versions,
        }
    return d


def cost_fields(c: CostEstimate) -> dict[str, Any]:
    return {
        "hours": round(c.hours, 3),
        "gpu_hours": round(c.gpu_hours, 3),
        "cost_usd": None if c.cost_usd is None else round(c.cost_usd, 2),
        "convergence_factor": c.convergence_factor,
    }


def claim_check(c: ClaimCheck) -> dict[str, Any]:
    return {
        "claimed_gib": round(c.claimed_gib, 2),
        "possible": c.possible,
        "weights_floor_gib": round(c.weights_floor_bytes / GIB, 2),
        "reason": c.reason,
    }


def ranked_plan(r: RankedPlan, target: LaunchTarget | None = None) -> dict[str, Any]:
    c = r.candidate
    launch = launchability(c.plan, target or LaunchTarget())
    return {
        **estimate_fields(c.estimate),
        **cost_fields(c.cost),
        "rank": r.rank,
        "gpu": plan_gpu(c.gpu),
        "why": r.why,
        "launchable": launch.launchable,
        "not_launchable_reason": launch.reason,
    }


def plan_gpu(g: GpuSpec) -> dict[str, Any]:
    """The GPU of a plan with where its price comes from (provider, region, basis, source, date) and its caveat."""
    return {
        "id": g.id,
        "name": g.name,
        "price_usd_per_hour": g.price_usd_per_hour,
        "price_provider": g.price_provider,
        "price_region": g.price_region,
        "price_basis": g.price_basis,
        "price_source": g.price_source,
        "price_date": g.price_date,
        "platform": platform_of(g),
        "caveat": g.caveat,
    }


def rejection(r: Rejection) -> dict[str, Any]:
    closest = r.closest
    return {
        "group": r.group,
        "reason": r.reason,
        "to_fix": r.to_fix,
        "candidates": r.count,
        "closest_plan": plan_out(closest.plan) if closest else None,
        "closest_peak_memory_gib": round(closest.estimate.memory.device_total_bytes / GIB, 2) if closest else None,
    }


def recommend_response(
    res: RecommendResult, extra_assumptions: list[str] | None = None, target: LaunchTarget | None = None
) -> S.RecommendResponse:
    """The /v1/recommend body (validated once, as a whole, against its response model); each plan says whether
    `target` (the configured job runner) can launch it."""
    rec = res.recommendation
    return S.RecommendResponse.model_validate(
        {
            "model": model_summary(res.model),
            "gpus": [g.id for g in res.gpus],
            "objective": rec.objective,
            "workload": workload_out(res.workload),
            "plans": [ranked_plan(r, target) for r in rec.plans],
            "rejected": [rejection(r) for r in rec.rejected],
            "candidates_evaluated": rec.n_candidates,
            "candidates_feasible": rec.n_feasible,
            "candidates_risky": rec.n_risky,
            "assumptions": [*res.assumptions, *(extra_assumptions or [])],
            "notes": list(rec.notes),
            "simulations": res.simulations,
        }
    )


def estimate_response(res: EstimateResult) -> S.EstimateResponse:
    """The /v1/estimate body (validated once against its response model)."""
    return S.EstimateResponse.model_validate(
        {
            **estimate_fields(res.estimate),
            **(cost_fields(res.cost) if res.cost is not None else {}),
            "model": model_summary(res.model),
            "gpu": {"id": res.gpu.id, "name": res.gpu.name, "memory_gib": res.gpu.memory_gib},
            "workload": workload_out(res.workload) if res.workload is not None else None,
            "claim_check": claim_check(res.claim) if res.claim is not None else None,
            "assumptions": list(res.assumptions),
        }
    )


def as_json(model: S.BaseModel) -> dict[str, Any]:
    """What the HTTP service sends, as a dict (the CLI's --json prints it)."""
    return model.model_dump(mode="json", exclude_none=False)
