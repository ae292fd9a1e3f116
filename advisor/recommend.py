"""Rank feasible plans for an objective and explain every rejection ("To fix: ...")."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields, replace

import numpy as np

from advisor.catalog.prices import price_label
from advisor.cost import DEFAULT_CONVERGENCE, CostEstimate, estimate_cost
from advisor.errors import InvalidInputError
from advisor.estimators import device as dev
from advisor.estimators import uncertainty as unc
from advisor.estimators.base import Estimate, Estimator, estimate_of
from advisor.estimators.terms import PlanTerms, SpeedCounts
from advisor.methods import DEFAULT_SEARCH, METHOD_NAMES, get_method
from advisor.plans import TrainingPlan
from advisor.platforms import platform_notes
from advisor.specs import GpuSpec, ModelSpec, Workload
from advisor.units import GIB

OBJECTIVES = ("cost", "time", "fit")
FIT_HEADROOM = 0.05  # the `fit` objective keeps 5% of the card free for fragmentation spikes


@dataclass(frozen=True)
class Constraints:
    max_budget_usd: float | None = None
    deadline_hours: float | None = None
    max_gpus: int = 8
    methods: tuple[str, ...] = DEFAULT_SEARCH
    #: GPUs named with a count (SkyPilot's ``A100:8``): (gpu id, count) pairs; plans on that GPU use exactly
    #: that many (a GPU not listed: any count up to max_gpus)
    gpu_counts: tuple[tuple[str, int], ...] = ()
    #: GPUs in one node: plans with more GPUs span nodes, their collectives crossing the network between them
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        if self.max_budget_usd is not None and not self.max_budget_usd > 0:
            raise InvalidInputError("max_budget_usd must be positive", field="max_budget_usd")
        if self.deadline_hours is not None and not self.deadline_hours > 0:
            raise InvalidInputError("deadline_hours must be positive", field="deadline_hours")
        if not 1 <= self.max_gpus <= 1024:
            raise InvalidInputError("max_gpus must be between 1 and 1024", field="max_gpus")
        if not 1 <= self.gpus_per_node <= 1024:
            raise InvalidInputError("gpus_per_node must be between 1 and 1024", field="gpus_per_node")
        bad = [m for m in self.methods if m not in METHOD_NAMES]
        if bad or not self.methods:
            raise InvalidInputError(f"methods must be a non-empty subset of {', '.join(METHOD_NAMES)}", field="methods")


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


@dataclass(frozen=True)
class Rejection:
    group: str
    reason: str
    to_fix: str
    closest: Candidate | None
    count: int
    kind: str = ""  # memory | deadline | budget: what the group's closest plan misses


#: the order rejections are listed in: those a constraint (budget, deadline) rejects come first, closest to
#: it first (cost for the budget, hours for the deadline), then those that do not fit in memory
_REJECTION_ORDER = {"budget": 0, "deadline": 1, "memory": 2}


def _rejection_key(r: Rejection, objective: str) -> tuple[float, ...]:
    c = r.closest
    if c is None:
        return (3.0, 0.0, 0.0)
    cost = c.cost.cost_usd if c.cost.cost_usd is not None else float("inf")
    if r.kind == "memory":
        over = c.estimate.memory.device_total_bytes - c.estimate.memory.device_bytes
        return (2.0, float(over), cost)
    first, second = (c.cost.hours, cost) if r.kind == "deadline" or objective == "time" else (cost, c.cost.hours)
    return (float(_REJECTION_ORDER.get(r.kind, 3)), first, second)


@dataclass
class Recommendation:
    objective: str
    plans: list[RankedPlan]
    rejected: list[Rejection]
    n_candidates: int
    n_feasible: int
    notes: list[str] = field(default_factory=list)
    n_risky: int = 0  # feasible candidates whose memory band crosses the GPU's memory
    smallest_single_gpu_gib: dict[str, float] = field(default_factory=dict)  # per method, for the study notes


def _group(plan: TrainingPlan, with_gpu: bool = True) -> str:
    shape = f" r={plan.lora_r} {','.join(plan.lora_targets)}" if get_method(plan.method).adapter else ""
    where = f"{plan.num_gpus}x {plan.gpu_id}" if with_gpu else f"{plan.num_gpus} GPU{'s' if plan.num_gpus > 1 else ''}"
    if plan.nodes > 1:
        where += f" over {plan.nodes} nodes"
    return f"{plan.method}{shape} on {where}" + (f" ({plan.sharding})" if plan.num_gpus > 1 else "")


def _why(c: Candidate, objective: str, best: Candidate | None) -> str:
    p, m = c.plan, c.estimate.memory
    knobs = f"micro-batch {p.micro_batch}, {'with' if p.grad_checkpointing else 'no'} checkpointing, {p.optimizer}"
    fit = f"peak {m.device_total_bytes / GIB:.1f} of {m.device_bytes / GIB:.1f} GiB"
    if m.band is not None and m.band.p90_pct is not None:
        fit += f" (band {m.low_bytes / GIB:.1f}-{m.high_bytes / GIB:.1f})"
    cost = "" if c.cost.cost_usd is None else f", ${c.cost.cost_usd:,.2f} at {price_label(c.gpu)}"
    head = f"{p.method} on {p.num_gpus}x {c.gpu.name}: {fit}, {c.cost.hours:.2f} h{cost} ({knobs})"
    if m.verdict == unc.BAND_CROSSES:
        head = f"RISKY, the memory band crosses the card: {head}"
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


@dataclass
class TermColumns:
    """The device layer's inputs for many plans, one array per term."""

    alloc: np.ndarray
    static: np.ndarray
    fpt: np.ndarray
    traffic: np.ndarray
    comm: np.ndarray
    passes: np.ndarray
    tokens: np.ndarray
    ngpu: np.ndarray
    method: np.ndarray  # index into METHOD_NAMES
    slack: np.ndarray  # the plans' allocator slack (PlanTerms.allocator_slack; NaN: the device's transient share)


@dataclass
class PlanTable(TermColumns):
    """Candidate plans of one model as columns: the GPU-independent terms of one estimator."""

    shapes: list[TrainingPlan]  # gpu_id left empty
    terms: list[PlanTerms]
    speed: SpeedCounts  # the terms' other speed counts, one array per field
    group: np.ndarray  # index into group_names
    group_names: list[str]


def build_table(estimator: Estimator, model: ModelSpec, shapes: list[TrainingPlan], cpu: bool) -> PlanTable:
    terms = [estimator.plan_terms(model, p, cpu) for p in shapes]
    names: dict[str, int] = {}
    group = [names.setdefault(_group(p, with_gpu=False), len(names)) for p in shapes]
    return PlanTable(
        shapes=shapes,
        terms=terms,
        speed=SpeedCounts.stack([c.speed for c in terms]),
        alloc=np.array([c.allocated for c in terms]),
        static=np.array([c.static for c in terms]),
        fpt=np.array([c.flops_per_token for c in terms]),
        traffic=np.array([c.memory_traffic_bytes for c in terms]),
        comm=np.array([c.comm_bytes for c in terms]),
        passes=np.array([c.passes for c in terms], dtype=float),
        tokens=np.array([p.micro_batch * p.seq_len for p in shapes], dtype=float),
        ngpu=np.array([p.num_gpus for p in shapes], dtype=float),
        method=np.array([METHOD_NAMES.index(p.method) for p in shapes]),
        slack=np.array([c.allocator_slack for c in terms], dtype=float),
        group=np.array(group),
        group_names=list(names),
    )


class _Segments:
    """Rows ordered by a group label, so that "the best row of each group" is a few O(n) passes
    (numpy's reduceat over contiguous segments) instead of a sort per request. Ties go to the row that
    comes first, as a stable sort would pick it."""

    def __init__(self, label: np.ndarray):
        self.order = np.argsort(label, kind="stable")
        #: rows already in label order (the stacked table keeps its rows by GPU and group): no gathers
        self.identity = bool(np.array_equal(self.order, np.arange(label.size)))
        sorted_label = label[self.order]
        self.starts = np.flatnonzero(np.r_[True, sorted_label[1:] != sorted_label[:-1]])
        self.segment = np.cumsum(np.r_[False, sorted_label[1:] != sorted_label[:-1]])  # segment of each sorted row
        self.label = sorted_label[self.starts]  # the label of each segment

    def best(self, mask: np.ndarray, *keys: np.ndarray) -> np.ndarray:
        """Row index of the best row (smallest keys, first key most significant) of each group among `mask`."""
        cand = mask.copy() if self.identity else mask[self.order]
        for k in keys:
            ks = np.where(cand, k if self.identity else k[self.order], np.inf)
            mins = np.minimum.reduceat(ks, self.starts)
            cand &= ks == mins[self.segment]
        idx = np.flatnonzero(cand)
        if idx.size == 0:
            return idx
        seg = self.segment[idx]
        first = idx[np.r_[True, seg[1:] != seg[:-1]]]
        return first if self.identity else self.order[first]


@dataclass
class SearchTable(TermColumns):
    """Every candidate on every GPU as one set of columns: each GPU's rows carry its own numbers and its
    estimator's coefficients (``DeviceColumns``), so the device layer evaluates all of them in one pass.
    Built once per (model, GPUs, search space, sequence length) and cached by the service."""

    parts: list[tuple[GpuSpec, str, PlanTable, Estimator]]
    device: dev.DeviceColumns
    speed: SpeedCounts  # the plans' other speed counts (``PlanTable.speed``), rows in this table's order
    price: np.ndarray  # $/GPU-hour, inf where the GPU has no price
    single: np.ndarray  # one GPU per plan
    part: np.ndarray  # which GPU (index into parts) each row is on
    local: np.ndarray  # the row's index in its part's PlanTable
    group: np.ndarray  # index into group_names
    group_names: list[str]  # "method shape on N GPUs", across GPU types
    by_part_group: _Segments  # (GPU, group): the best plan of each
    by_group: _Segments  # group across GPU types: the closest plan of each rejected group
    group_size: dict[str, int]
    #: per row, the memory band's upper end over the estimate (1 / (1 - p90) of its source and kind of plan)
    mem_high: np.ndarray
    _estimates: dict[int, Estimate] = field(default_factory=dict)
    _evaluation: dev.Evaluation | None = None
    _band_over: np.ndarray | None = None

    def band_over(self, layers: int) -> np.ndarray:
        """Rows whose memory band's upper end is over the GPU's memory (made once, like the evaluation)."""
        if self._band_over is None:
            self._band_over = self.evaluation(layers).total * self.mem_high > self.device.memory_bytes
        return self._band_over

    def evaluation(self, layers: int) -> dev.Evaluation:
        """The device layer over every row (independent of the workload and the objective: made once)."""
        if self._evaluation is None:
            self._evaluation = dev.evaluate(
                self.device,
                self.alloc,
                self.static,
                self.fpt,
                self.traffic,
                self.comm,
                self.passes,
                self.tokens,
                self.ngpu,
                layers,
                self.speed,
                allocator_slack=self.slack,
            )
        return self._evaluation

    def estimate(self, row: int, model: ModelSpec) -> Estimate:
        """The typed estimate of one row (made once: it depends on neither the workload nor the objective)."""
        est = self._estimates.get(row)
        if est is None:
            part, local = int(self.part[row]), int(self.local[row])
            gpu, _, t, estimator = self.parts[part]
            plan = copy.copy(t.shapes[local])  # the candidate with its GPU filled in (validated already)
            object.__setattr__(plan, "gpu_id", gpu.id)
            ev = self.evaluation(model.total_layers)
            one = dev.Evaluation(**{f: getattr(ev, f)[row] for f in _EVALUATION_FIELDS})
            est = estimate_of(estimator, model, gpu, plan, t.terms[local], one)
            est = replace(est, notes=platform_notes(gpu, est.notes))  # a ROCm card's caveat on every plan
            if len(self._estimates) > 4096:
                self._estimates.clear()
            self._estimates[row] = est
        return est


def stack_tables(tables: list[tuple[GpuSpec, str, PlanTable, Estimator]]) -> SearchTable:
    names: dict[str, int] = {}
    groups, parts_dev = [], []
    for gpu, dtype, t, estimator in tables:
        remap = np.array([names.setdefault(n, len(names)) for n in t.group_names])
        groups.append(remap[t.group])
        parts_dev.append((estimator.device(gpu, dtype), len(t.shapes)))
    sizes = [len(t.shapes) for _, _, t, _ in tables]

    def col(name: str) -> np.ndarray:
        return np.concatenate([getattr(t, name) for _, _, t, _ in tables])

    group = np.concatenate(groups)
    mem_high = np.concatenate([_mem_high(gpu, t, estimator) for gpu, _, t, estimator in tables])
    part = np.repeat(np.arange(len(tables)), sizes)
    # rows by GPU, then by group within it (stable): the best-per-group passes need no gathers
    order = np.argsort(part * len(names) + group, kind="stable")
    ngpu = col("ngpu")[order]
    price = np.repeat([g.price_usd_per_hour if g.price_usd_per_hour is not None else np.inf for g, *_ in tables], sizes)
    device = dev.DeviceColumns.stack(parts_dev)
    group_names = list(names)
    labels, counts = np.unique(group, return_counts=True)
    part, group = part[order], group[order]
    return SearchTable(
        **{f.name: col(f.name)[order] for f in fields(TermColumns)},
        parts=list(tables),
        device=dev.DeviceColumns(**{f.name: getattr(device, f.name)[order] for f in fields(dev.DeviceColumns)}),
        speed=SpeedCounts(
            **{
                f: np.concatenate([getattr(t.speed, f) for _, _, t, _ in tables])[order]
                for f in SpeedCounts.__dataclass_fields__
            }
        ),
        price=price.astype(float)[order],
        single=ngpu == 1,
        part=part,
        local=np.concatenate([np.arange(n) for n in sizes])[order],
        group=group,
        group_names=group_names,
        by_part_group=_Segments(part * len(group_names) + group),
        by_group=_Segments(group),
        group_size={group_names[g]: int(c) for g, c in zip(labels, counts, strict=True)},
        mem_high=mem_high[order],
    )


def _mem_high(gpu: GpuSpec, t: PlanTable, estimator: Estimator) -> np.ndarray:
    """Per candidate of one GPU, the memory band's upper end as a multiple of the estimate: one band lookup
    per kind of plan (method x stack x scale), not per row."""
    cpu = gpu.gpu_class == "cpu"
    kinds: dict[tuple[str, str, int], float] = {}
    out = np.empty(len(t.shapes))
    for i, p in enumerate(t.shapes):
        k = (p.method, p.framework, min(p.num_gpus, 2))
        f = kinds.get(k)
        if f is None:
            f = kinds[k] = unc.band_for(estimator.source, "memory", p.method, p.framework, p.num_gpus, cpu).high(1.0)
        out[i] = f
    return out


def search(
    model: ModelSpec,
    table: SearchTable,
    workload: Workload,
    objective: str,
    constraints: Constraints,
    convergence: dict[str, float] | None = None,
    limit: int = 10,
) -> Recommendation:
    """Evaluate every candidate on every GPU in one pass of the device layer, keep the best plan per
    method x adapter shape x GPU x count for the objective, and explain each shape that fits nowhere.
    Each GPU's rows come from its own estimator (calibrated where a profile matches it)."""
    if objective not in OBJECTIVES:
        raise InvalidInputError(f"objective must be one of {', '.join(OBJECTIVES)}", field="objective")
    factors = {**DEFAULT_CONVERGENCE, **(convergence or {})}
    conv = np.array([factors[m] for m in METHOD_NAMES])
    t = table
    ev = t.evaluation(model.total_layers)
    total = ev.total
    cap = t.device.memory_bytes * (1 - FIT_HEADROOM if objective == "fit" else 1)
    mem_ok = total <= cap
    hours = workload.total_tokens * conv[t.method] / ev.tokens_per_s / 3600
    with np.errstate(invalid="ignore"):
        cost = hours * t.ngpu * t.price
    everything = _count_mask(t, constraints)  # rows whose GPU count is allowed (all, unless named `A100:8`)
    dl_ok = hours <= constraints.deadline_hours if constraints.deadline_hours is not None else everything
    bud_ok = cost <= constraints.max_budget_usd if constraints.max_budget_usd is not None else everything
    ok = mem_ok & dl_ok & bud_ok & everything
    # a plan whose memory band crosses the card may run out of memory: within its group a safe plan is
    # preferred to it, and it ranks after every safe plan (flagged in its verdict and `why`)
    risky = ok & t.band_over(model.total_layers)
    keys = {"cost": (cost, hours), "time": (hours, cost), "fit": (t.ngpu, hours, cost)}[objective]
    ranking = (risky, *keys) if risky.any() else keys  # no risky row: the extra key would change nothing
    rows = t.by_part_group.best(ok, *ranking)
    if rows.size:
        order = np.lexsort(tuple(k[rows] for k in reversed(ranking)))
        ranked_rows = rows[order][:limit]
    else:
        ranked_rows = rows
    feasible_groups = set(np.unique(t.group[rows]).tolist())

    def materialise(row: int) -> Candidate:
        est = t.estimate(row, model)
        return make_candidate(est, t.parts[int(t.part[row])][0], workload, convergence)

    chosen = [materialise(int(r)) for r in ranked_rows]
    top = chosen[0] if chosen else None
    ranked = [RankedPlan(rank=i + 1, candidate=c, why=_why(c, objective, top)) for i, c in enumerate(chosen)]

    rejections = []
    closest: dict[int, tuple[str, int]] = {}  # group -> (kind, its closest row), the most telling kind first
    mem_ok = mem_ok & everything
    dl_ok = dl_ok & everything
    for kind, rs in (
        ("memory", t.by_group.best(everything, total)),
        ("deadline", t.by_group.best(mem_ok, hours)),
        ("budget", t.by_group.best(mem_ok & dl_ok, cost)),
    ):
        closest.update(zip(t.group[rs].tolist(), ((kind, int(r)) for r in rs), strict=True))
    for g, name in enumerate(t.group_names):
        if g in feasible_groups or g not in closest:  # no row of the group has an allowed GPU count
            continue
        kind, row = closest[g]
        rejections.append(_explain(name, kind, materialise(row), t.group_size[name], constraints, len(t.parts), model))
    rejections.sort(key=lambda r: _rejection_key(r, objective))
    smallest = {}
    for mi, m in enumerate(METHOD_NAMES):
        sel = t.single & (t.method == mi)
        if sel.any():
            smallest[m] = float(total[sel].min()) / GIB
    return Recommendation(
        objective=objective,
        plans=ranked,
        rejected=rejections,
        n_candidates=len(t.alloc),
        n_feasible=int(ok.sum()),
        n_risky=int(risky.sum()),
        smallest_single_gpu_gib=smallest,
    )


_EVALUATION_FIELDS = [f.name for f in fields(dev.Evaluation)]


def _count_mask(t: SearchTable, k: Constraints) -> np.ndarray:
    """Rows whose GPU count is allowed: exactly the count a GPU was named with (``A100:8``), else any."""
    if not k.gpu_counts:
        return np.ones(t.part.shape, dtype=bool)
    want = dict(k.gpu_counts)
    per_part = np.array([want.get(gpu.id, 0) for gpu, *_ in t.parts])[t.part]
    return (per_part == 0) | (t.ngpu == per_part)


def _explain(
    group: str, kind: str, c: Candidate, count: int, k: Constraints, n_gpu_types: int, model: ModelSpec
) -> Rejection:
    where = f" (closest of {n_gpu_types} GPU types: {c.gpu.id})" if n_gpu_types > 1 else ""
    if kind == "memory":
        m, p = c.estimate.memory, c.plan
        top = sorted(m.components.items(), key=lambda kv: -kv[1])[:3]
        parts = ", ".join(f"{name} {v / GIB:.1f}" for name, v in top)
        reason = (
            f"needs at least {m.device_total_bytes / GIB:.1f} GiB per GPU (largest: {parts} GiB) "
            f"but {c.gpu.name} has {m.device_bytes / GIB:.1f} GiB{where}"
        )
        short = m.device_total_bytes - m.device_bytes
        method = get_method(p.method)
        fixes = [method.lighter] if method.lighter else []
        if model.is_moe and method.quantized:  # the 4-bit method barely shrinks a mixture of experts
            fixes.insert(
                0,
                "use lora sharded with fsdp (QLoRA leaves this mixture of experts' fused expert weights "
                "unquantised: bitsandbytes quantises nn.Linear only, so it saves little over lora)",
            )
        if m.components.get("weights", 0) > m.device_bytes * 0.6 and p.num_gpus < k.max_gpus:
            fixes.append(f"shard over {min(k.max_gpus, max(2, p.num_gpus * 2))}+ GPUs with fsdp")
        if not p.grad_checkpointing:
            fixes.append("turn gradient checkpointing on")
        fixes.append(f"a GPU with more than {m.device_total_bytes / GIB:.0f} GiB")
        if short <= 0:  # fits the card but not the 5% headroom the `fit` objective keeps
            reason += f" and the fit objective keeps {FIT_HEADROOM:.0%} free"
            return Rejection(group, reason, "To fix: " + "; or ".join(fixes), c, count, "memory")
        return Rejection(
            group, reason + f" (short by {short / GIB:.1f} GiB)", "To fix: " + "; or ".join(fixes), c, count, "memory"
        )
    if kind == "deadline":
        reason = f"takes {c.cost.hours:.1f} h at best, over the {k.deadline_hours:g} h deadline{where}"
        return Rejection(
            group,
            reason,
            f"To fix: a deadline of {_ceil_to(c.cost.hours, 0.1):g} h or later; or more or faster GPUs; "
            "or fewer tokens or epochs",
            c,
            count,
            "deadline",
        )
    if c.cost.cost_usd is None:
        return Rejection(
            group,
            f"fits only on GPUs without a price ({c.gpu.id}: {c.gpu.price_source}): its cost cannot be held to "
            f"the ${k.max_budget_usd:,.2f} budget",
            "To fix: bring a price file with this GPU's price, or other providers",
            c,
            count,
            "budget",
        )
    reason = f"costs ${c.cost.cost_usd:,.2f} at best, over the ${k.max_budget_usd:,.2f} budget{where}"
    return Rejection(
        group,
        reason,
        f"To fix: a budget of ${_ceil_to(c.cost.cost_usd or 0.0, 1):,.0f} or more; or spot prices or another "
        "provider; or fewer tokens",
        c,
        count,
        "budget",
    )


def _ceil_to(x: float, step: float) -> float:
    """x rounded up to a multiple of step (what to raise a budget or deadline to)."""
    return round(math.ceil(x / step - 1e-9) * step, 6)


def closest_notes(rec: Recommendation, k: Constraints, n: int = 3) -> list[str]:
    """When no plan fits: the closest plans by the constraint that rejected them (cost for a budget, hours
    for a deadline) and what it would take, e.g. 'raise the budget to $75'."""
    notes = []
    for kind in ("budget", "deadline"):
        rs = [r for r in rec.rejected if r.kind == kind and r.closest is not None][:n]
        for r in rs:
            c = r.closest
            assert c is not None
            price = price_label(c.gpu)
            if kind == "budget" and c.cost.cost_usd is not None:
                need = f"raise the budget to ${_ceil_to(c.cost.cost_usd, 1):,.0f}"
                if c.gpu.price_basis == "on-demand":
                    need += " or price it on spot (price_basis spot) where the provider lists spot"
            else:
                need = f"move the deadline to {_ceil_to(c.cost.hours, 0.1):g} h"
            cost = "" if c.cost.cost_usd is None else f", ${c.cost.cost_usd:,.2f}"
            notes.append(
                f"closest by {'cost' if kind == 'budget' else 'time'}: {r.group} on {c.plan.num_gpus}x {c.gpu.id} "
                f"({c.cost.hours:.2f} h{cost}, {price}): {need}"
            )
    return notes


def make_candidate(
    estimate: Estimate, gpu: GpuSpec, workload: Workload, convergence: dict[str, float] | None
) -> Candidate:
    cost = estimate_cost(
        estimate.plan.method, estimate.speed.tokens_per_s, estimate.plan.num_gpus, gpu, workload, convergence
    )
    return Candidate(estimate=estimate, cost=cost, gpu=gpu)


def study_notes(model: ModelSpec, rec: Recommendation) -> list[str]:
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
            ours = rec.smallest_single_gpu_gib.get(claim.method)
            verdict = "agrees" if chk.possible else "is physically impossible"
            tail = f"; our smallest {claim.method} plan needs {ours:.1f} GiB" if ours else ""
            notes.append(f"{STUDY} claims '{claim.text}': {verdict}: {chk.reason}{tail}.")
    return notes
