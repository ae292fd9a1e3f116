"""Rank feasible plans for an objective and explain every rejection ("To fix: ...")."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from advisor.cost import CostEstimate, estimate_cost
from advisor.errors import InvalidInputError
from advisor.estimators.base import Estimate
from advisor.plans import METHODS, TrainingPlan
from advisor.specs import GpuSpec, ModelSpec, Workload
from advisor.units import GIB

OBJECTIVES = ("cost", "time", "fit")
FIT_HEADROOM = 0.05  # the `fit` objective keeps 5% of the card free for fragmentation spikes


@dataclass(frozen=True)
class Constraints:
    max_budget_usd: float | None = None
    deadline_hours: float | None = None
    max_gpus: int = 8
    methods: tuple[str, ...] = METHODS

    def __post_init__(self) -> None:
        if self.max_budget_usd is not None and not self.max_budget_usd > 0:
            raise InvalidInputError("max_budget_usd must be positive", field="max_budget_usd")
        if self.deadline_hours is not None and not self.deadline_hours > 0:
            raise InvalidInputError("deadline_hours must be positive", field="deadline_hours")
        if not 1 <= self.max_gpus <= 1024:
            raise InvalidInputError("max_gpus must be between 1 and 1024", field="max_gpus")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise InvalidInputError(f"methods must be a non-empty subset of {', '.join(METHODS)}", field="methods")


@dataclass(frozen=True)
class Candidate:
    estimate: Estimate
    cost: CostEstimate
    gpu: GpuSpec

    @property
    def plan(self) -> TrainingPlan:
        return self.estimate.plan


@dataclass(frozen=True)
class RankedPlan:
    rank: int
    candidate: Candidate
    why: str

    def to_dict(self) -> dict:
        d = self.candidate.estimate.to_dict()
        d.update(self.candidate.cost.to_dict())
        d["rank"] = self.rank
        d["gpu"] = {
            "id": self.candidate.gpu.id,
            "name": self.candidate.gpu.name,
            "price_usd_per_hour": self.candidate.gpu.price_usd_per_hour,
        }
        d["why"] = self.why
        return d


@dataclass(frozen=True)
class Rejection:
    group: str
    reason: str
    to_fix: str
    closest: Candidate | None
    count: int

    def to_dict(self) -> dict:
        d = {"group": self.group, "reason": self.reason, "to_fix": self.to_fix, "candidates": self.count}
        if self.closest is not None:
            d["closest_plan"] = self.closest.plan.to_dict()
            d["closest_peak_memory_gib"] = round(self.closest.estimate.memory.device_total_bytes / GIB, 2)
        return d


@dataclass
class Recommendation:
    objective: str
    plans: list[RankedPlan]
    rejected: list[Rejection]
    n_candidates: int
    n_feasible: int
    notes: list[str] = field(default_factory=list)


def _sort_key(objective: str) -> Callable[[Candidate], tuple]:
    def cost_of(c: Candidate) -> float:
        return c.cost.cost_usd if c.cost.cost_usd is not None else math.inf

    if objective == "cost":
        return lambda c: (cost_of(c), c.cost.hours)
    if objective == "time":
        return lambda c: (c.cost.hours, cost_of(c))
    # fit: fewest GPUs on the user's card, then fastest
    return lambda c: (c.plan.num_gpus, c.cost.hours, cost_of(c))


def _group(plan: TrainingPlan) -> str:
    shape = "" if plan.method == "full" else f" r={plan.lora_r} {','.join(plan.lora_targets)}"
    gpus = f"{plan.num_gpus}x {plan.gpu_id}" + (f" ({plan.sharding})" if plan.num_gpus > 1 else "")
    return f"{plan.method}{shape} on {gpus}"


def _why(c: Candidate, objective: str, best: Candidate | None) -> str:
    p, m = c.plan, c.estimate.memory
    knobs = f"micro-batch {p.micro_batch}, {'with' if p.grad_checkpointing else 'no'} checkpointing, {p.optimizer}"
    fit = f"peak {m.device_total_bytes / GIB:.1f} of {m.device_bytes / GIB:.1f} GiB"
    cost = "" if c.cost.cost_usd is None else f", ${c.cost.cost_usd:,.2f}"
    head = f"{p.method} on {p.num_gpus}x {c.gpu.name}: {fit}, {c.cost.hours:.2f} h{cost} ({knobs})"
    if best is None or best is c:
        lead = {
            "cost": "cheapest plan that fits",
            "time": "fastest plan that fits",
            "fit": "fastest plan that fits on the fewest of your GPUs",
        }[objective]
        return f"{lead}: {head}"
    if objective == "time":
        return f"{c.cost.hours / best.cost.hours:.2f}x the time of the best: {head}"
    if objective == "cost" and best.cost.cost_usd and c.cost.cost_usd is not None:
        return f"{c.cost.cost_usd / best.cost.cost_usd:.2f}x the cost of the best: {head}"
    return head


def rank(
    candidates: Iterable[Candidate],
    objective: str,
    constraints: Constraints,
    limit: int = 10,
) -> Recommendation:
    if objective not in OBJECTIVES:
        raise InvalidInputError(f"objective must be one of {', '.join(OBJECTIVES)}", field="objective")
    feasible: list[Candidate] = []
    rejected: dict[tuple[str, str], list[Candidate]] = {}
    n = 0
    for c in candidates:
        n += 1
        reason = _rejection_kind(c, objective, constraints)
        if reason is None:
            feasible.append(c)
        else:
            rejected.setdefault((_group(c.plan), reason), []).append(c)

    key = _sort_key(objective)
    feasible.sort(key=key)
    # one plan per group (method x adapter shape x GPU x count), best first: alternatives, not near-duplicates
    seen: set[str] = set()
    best_per_group: list[Candidate] = []
    for c in feasible:
        g = _group(c.plan)
        if g not in seen:
            seen.add(g)
            best_per_group.append(c)
    top = best_per_group[:limit]
    best = top[0] if top else None
    ranked = [RankedPlan(rank=i + 1, candidate=c, why=_why(c, objective, best)) for i, c in enumerate(top)]

    rejections = [_explain(group, kind, cs, constraints, objective) for (group, kind), cs in rejected.items()]
    # a group with a feasible plan is not interesting as a rejection
    rejections = [r for r in rejections if r.group not in seen]
    rejections.sort(key=lambda r: r.closest.estimate.memory.device_total_bytes if r.closest else 0)
    return Recommendation(
        objective=objective, plans=ranked, rejected=rejections, n_candidates=n, n_feasible=len(feasible)
    )


def _rejection_kind(c: Candidate, objective: str, k: Constraints) -> str | None:
    m = c.estimate.memory
    limit = m.device_bytes * (1 - FIT_HEADROOM) if objective == "fit" else m.device_bytes
    if m.device_total_bytes > limit:
        return "memory"
    if k.deadline_hours is not None and c.cost.hours > k.deadline_hours:
        return "deadline"
    if k.max_budget_usd is not None and c.cost.cost_usd is not None and c.cost.cost_usd > k.max_budget_usd:
        return "budget"
    return None


def _explain(group: str, kind: str, cs: list[Candidate], k: Constraints, objective: str) -> Rejection:
    if kind == "memory":
        c = min(cs, key=lambda c: c.estimate.memory.device_total_bytes)
        m, p = c.estimate.memory, c.plan
        top = sorted(m.components.items(), key=lambda kv: -kv[1])[:3]
        parts = ", ".join(f"{name} {v / GIB:.1f}" for name, v in top)
        reason = (
            f"needs at least {m.device_total_bytes / GIB:.1f} GiB per GPU (largest: {parts} GiB) "
            f"but {c.gpu.name} has {m.device_bytes / GIB:.1f} GiB"
        )
        short = m.device_total_bytes - m.device_bytes
        fixes = []
        if p.method == "full":
            fixes.append("use lora or qlora (frozen base weights, no full optimiser states)")
        elif p.method == "lora":
            fixes.append("use qlora (4-bit base weights)")
        if m.components.get("weights", 0) > m.device_bytes * 0.6 and p.num_gpus < k.max_gpus:
            fixes.append(f"shard over {min(k.max_gpus, max(2, p.num_gpus * 2))}+ GPUs with fsdp")
        if not p.grad_checkpointing:
            fixes.append("turn gradient checkpointing on")
        fixes.append(f"a GPU with more than {(m.device_total_bytes) / GIB:.0f} GiB")
        return Rejection(
            group, reason + f" (short by {short / GIB:.1f} GiB)", "To fix: " + "; or ".join(fixes), c, len(cs)
        )
    if kind == "deadline":
        c = min(cs, key=lambda c: c.cost.hours)
        reason = f"takes {c.cost.hours:.1f} h at best, over the {k.deadline_hours:g} h deadline"
        return Rejection(
            group, reason, "To fix: more or faster GPUs, fewer tokens or epochs, or a later deadline", c, len(cs)
        )
    c = min(cs, key=lambda c: c.cost.cost_usd or 0)
    reason = f"costs ${c.cost.cost_usd:,.2f} at best, over the ${k.max_budget_usd:,.2f} budget"
    return Rejection(
        group, reason, "To fix: a cheaper GPU, qlora on a smaller card, fewer tokens, or a larger budget", c, len(cs)
    )


def make_candidate(
    estimate: Estimate, gpu: GpuSpec, workload: Workload, convergence: dict[str, float] | None
) -> Candidate:
    cost = estimate_cost(
        estimate.plan.method, estimate.speed.tokens_per_s, estimate.plan.num_gpus, gpu, workload, convergence
    )
    return Candidate(estimate=estimate, cost=cost, gpu=gpu)


def study_notes(model: ModelSpec, rec: Recommendation, memory_of: Callable[[str], float | None]) -> list[str]:
    """The study's rules and claims for this model, each marked agrees / disagrees with physics."""
    from advisor.study import RULES, STUDY, check_memory_claim, claims_for

    notes: list[str] = []
    size_b = model.param_count / 1e9
    methods_ok = {r.candidate.plan.method for r in rec.plans}
    if rec.plans:
        winner = rec.plans[0].candidate.plan.method
        if winner in RULES:
            expected = "qlora" if size_b >= 30 else "lora"
            agree = "agrees" if winner == expected or (winner == "qlora" and "lora" not in methods_ok) else "differs"
            notes.append(
                f"{STUDY} rule: {RULES[winner]} Here the top plan is {winner} for a {size_b:.1f}B model: physics {agree}."
            )
    for claim in claims_for(model):
        if claim.claimed_gib is not None:
            chk = check_memory_claim(model, claim.method, claim.claimed_gib)
            ours = memory_of(claim.method)
            verdict = "agrees" if chk["possible"] else "is physically impossible"
            tail = f"; our smallest {claim.method} plan needs {ours:.1f} GiB" if ours else ""
            notes.append(f"{STUDY} claims '{claim.text}': {verdict}: {chk['reason']}{tail}.")
    return notes
