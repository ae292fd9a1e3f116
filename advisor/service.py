"""The one place that wires specs -> plans -> estimates -> ranking -> response.

Both the CLI and the HTTP API call this; neither computes anything itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from advisor.catalog import Catalog, default_catalog, model_from_config, resolve_model
from advisor.cost import CostEstimate
from advisor.errors import InvalidInputError
from advisor.estimators.analytical import AnalyticalEstimator
from advisor.estimators.base import Estimate, Estimator, with_bands
from advisor.estimators.calibrated import CalibratedEstimator, StaleProfileError, nearest_profile
from advisor.estimators.uncertainty import FITS
from advisor.hardware import LOCAL_NAMES, local_gpus
from advisor.hub import HubOptions
from advisor.methods import get_method
from advisor.plans import SearchSpace, TrainingPlan, enumerate_shapes
from advisor.platforms import platform_notes
from advisor.profiles import ProfileStore
from advisor.recommend import (
    Constraints,
    PlanTable,
    Recommendation,
    SearchTable,
    build_table,
    closest_notes,
    make_candidate,
    search,
    stack_tables,
    study_notes,
)
from advisor.specs import GpuSpec, ModelSpec, Workload
from advisor.study import ClaimCheck, check_memory_claim
from advisor.units import DTYPE_BYTES

ESTIMATE_SOURCES = ("auto", "analytical", "simulated")


@dataclass(frozen=True)
class RecommendRequest:
    model: str | dict[str, Any]  # name / HF id / path / size, or an inline config.json dict
    gpus: tuple[str, ...] | None = None  # None: every catalog GPU
    workload: Workload = field(default_factory=Workload)
    objective: str = "cost"
    constraints: Constraints = field(default_factory=Constraints)
    dtype: str | None = None  # None: bf16 where the GPU has it, else fp16
    convergence: dict[str, float] | None = None
    limit: int = 10
    # trace the top single-GPU plans under FakeTensorMode (needs the train extra); off by default, and
    # bounded: traces stop when simulate_budget_s is spent (a running trace is killed at the deadline)
    simulate_top: int = 0
    simulate_budget_s: float = 120.0
    # prices: the providers to price GPUs at (None: the cheapest listed provider per GPU) and the basis
    providers: tuple[str, ...] | None = None
    price_basis: str = "on-demand"
    # a branch, tag or commit sha of a Hugging Face model (also `org/name@revision` in `model`)
    model_revision: str | None = None


@dataclass
class RecommendResult:
    model: ModelSpec
    gpus: list[GpuSpec]
    workload: Workload
    recommendation: Recommendation
    assumptions: list[str]
    simulations: list[dict] | None = None  # only when the request asked for simulate_top


@dataclass(frozen=True)
class EstimateResult:
    """One plan's estimate with what it was made for: the model, the GPU, the workload's hours and cost
    (when a workload was given) and a published claim's check (when one was given)."""

    estimate: Estimate
    model: ModelSpec
    gpu: GpuSpec
    cost: CostEstimate | None = None
    workload: Workload | None = None
    claim: ClaimCheck | None = None
    assumptions: tuple[str, ...] = ()


class AdvisorService:
    def __init__(
        self,
        catalog: Catalog | None = None,
        profiles: ProfileStore | None = None,
        allow_model_paths: bool = True,
        hub: HubOptions | None = None,
    ):
        self.allow_model_paths = allow_model_paths  # False in the HTTP service: clients post configs inline
        # Hugging Face Hub look-ups for ids outside the catalog (advisor.hub): on unless turned off
        self.hub = hub if hub is not None else HubOptions.from_env()
        # calibration profiles (default: <data dir>/profiles); a calibrated device the catalog lacks
        # (a CPU) joins the catalog so it can be named like a GPU
        self.profiles = profiles if profiles is not None else ProfileStore.default()
        base = catalog or default_catalog()
        extra = [g for g in self.profiles.devices() if g.id not in {c.id for c in base.gpus}]
        self.catalog = base.with_gpus(extra) if extra else base
        self.analytical = AnalyticalEstimator()
        self._calibrated: dict[tuple[str, str, bool], CalibratedEstimator] = {}
        self._tables: dict[tuple, tuple[ModelSpec, PlanTable]] = {}
        self._stacked: dict[tuple, tuple[ModelSpec, SearchTable]] = {}
        self._simulated = None

    def simulated(self):
        """The simulated estimator (traces under FakeTensorMode; needs the train extra, imported on use)."""
        from advisor.simulated import SimulatedEstimator

        if self._simulated is None:
            self._simulated = SimulatedEstimator(coefficients=self.analytical.k)
        return self._simulated

    # ---- resolution -----------------------------------------------------------------------------
    def model(self, model: str | dict[str, Any], revision: str | None = None) -> ModelSpec:
        """A posted config, or a name: catalog, size, local path (CLI only), Hugging Face id (advisor.hub)."""
        if isinstance(model, dict):
            if revision is not None:
                raise InvalidInputError(
                    "model_revision applies to a Hugging Face id, not to an inline config. To fix: leave it out",
                    field="model_revision",
                )
            return model_from_config(
                model, name=str(model.get("_name_or_path") or model.get("name") or "inline-config")
            )
        return resolve_model(model, self.catalog, allow_paths=self.allow_model_paths, revision=revision, hub=self.hub)

    def gpu(self, name: str) -> GpuSpec:
        """A catalog GPU by id/alias, or 'local' for the first GPU nvidia-smi sees in this box."""
        return self.gpu_and_count(name)[0]

    def gpu_and_count(self, name: str, catalog: Catalog | None = None) -> tuple[GpuSpec, int | None]:
        """One card and the count it was named with (``A100:8`` -> the 40 GB A100, 8); a memory filter
        that matches several cards is an error listing them (an estimate is for one card)."""
        if name.strip().lower() in LOCAL_NAMES:
            return local_gpus(self.catalog)[0], None
        gpus, count = (catalog or self.catalog).gpus_for(name)
        if len(gpus) > 1:
            listed = ", ".join(g.id for g in gpus)
            raise InvalidInputError(
                f"{name!r} matches {len(gpus)} GPUs ({listed}): an estimate is for one. To fix: name one of them",
                field="gpu",
            )
        return gpus[0], count

    def _request_gpus(self, names: tuple[str, ...], catalog: Catalog) -> tuple[list[GpuSpec], dict[str, int]]:
        """The cards a request names (names, ``NAME:COUNT``, ``80GB+``) and the counts given with them."""
        gpus: dict[str, GpuSpec] = {}
        counts: dict[str, int] = {}
        for name in names:
            if name.strip().lower() in LOCAL_NAMES:
                found = [local_gpus(catalog)[0]]
                count = None
            else:
                found, count = catalog.gpus_for(name)
            for g in found:
                gpus.setdefault(g.id, g)
                if count is not None:
                    if counts.get(g.id, count) != count:
                        raise InvalidInputError(
                            f"{g.id} is named with two counts ({counts[g.id]} and {count}). To fix: one count per GPU",
                            field="gpu",
                        )
                    counts[g.id] = count
        return list(gpus.values()), counts

    def estimator_for(self, gpu: GpuSpec, installed: list | None = None) -> Estimator:
        """The estimator for a device: calibrated where a profile matches it (name and memory); else the
        nearest calibrated device of its class scaled by spec ratios (FLOP/s, bandwidth); else analytical.
        `installed`: every profile, read once for a request that asks for many GPUs."""
        installed = self.profiles.all() if installed is None else installed
        profiles = [p for p in installed if not p.stale]
        profile = next((p for p in profiles if p.matches(gpu)), None)
        scaled = profile is None
        if profile is None:
            stale = next((p for p in installed if p.stale and p.matches(gpu)), None)
            if stale is not None:  # loud, not a silent fall-back to another profile or the priors
                raise StaleProfileError(stale.stale_reason(), field="gpu")
            profile = nearest_profile(profiles, gpu)
            if profile is None:
                return self.analytical
        key = (profile.id, gpu.id, scaled)
        if key not in self._calibrated:
            self._calibrated[key] = CalibratedEstimator(profile, gpu, scaled=scaled)
        return self._calibrated[key]

    # ---- estimate ---------------------------------------------------------------------------------
    def estimate(
        self,
        model: ModelSpec,
        gpu: GpuSpec,
        plan: TrainingPlan,
        claimed_memory_gib: float | None = None,
        source: str = "auto",
        workload: Workload | None = None,
        convergence: dict[str, float] | None = None,
    ) -> EstimateResult:
        """One plan's estimate. source: auto (calibrated where a profile matches, else analytical) | analytical
        | simulated (one training step traced under FakeTensorMode: exact tensor bytes, seconds to minutes).
        With a workload, also the hours and cost exactly as recommend computes them."""
        if source not in ESTIMATE_SOURCES:
            raise InvalidInputError(f"source must be one of {', '.join(ESTIMATE_SOURCES)}", field="source")
        if plan.gpu_id != gpu.id:
            plan = replace(plan, gpu_id=gpu.id)
        if plan.dtype == "bf16" and not gpu.bf16_supported:
            raise InvalidInputError(f"{gpu.name} has no bf16 support: use dtype fp16 or fp32", field="dtype")
        context_note = model.check_seq_len(plan.seq_len, field="plan.seq_len")
        refusals = get_method(plan.method).model_errors(model, plan)
        if refusals:  # every source refuses a plan the checkpoint cannot train (the trace would not know)
            raise InvalidInputError(refusals[0][1], field=refusals[0][0])
        if source == "simulated":
            try:
                est = with_bands(self.simulated().estimate(model, gpu, plan), gpu)  # the trace's own error band
            except (RuntimeError, TimeoutError) as exc:
                raise InvalidInputError(f"{exc}; the analytical source answers at once", field="source") from exc
        else:
            estimator = self.analytical if source == "analytical" else self.estimator_for(gpu)
            est = estimator.estimate(model, gpu, plan)
        est = replace(est, notes=platform_notes(gpu, est.notes))
        if context_note:
            est = replace(est, notes=(*est.notes, context_note))
        assumptions = [*(workload.stated_defaults if workload else ()), *([model.note] if model.assumed else [])]
        claim = None
        if claimed_memory_gib is not None:
            claim = check_memory_claim(model, plan.method, claimed_memory_gib, DTYPE_BYTES[plan.dtype])
        return EstimateResult(
            estimate=est,
            model=model,
            gpu=gpu,
            cost=make_candidate(est, gpu, workload, convergence).cost if workload is not None else None,
            workload=workload,
            claim=claim,
            assumptions=tuple(assumptions),
        )

    def _table(
        self,
        estimator: Estimator,
        model: ModelSpec,
        space: SearchSpace,
        seq_len: int,
        dtype: str,
        gpu: GpuSpec,
    ) -> PlanTable:
        """Candidate columns for (model, search space, dtype): cached, since the catalog's models are long-lived."""
        cpu = gpu.gpu_class == "cpu"
        key = (id(model), id(estimator), space, seq_len, dtype, cpu)
        hit = self._tables.get(key)
        if hit is not None and hit[0] is model:
            return hit[1]
        every = list(enumerate_shapes(seq_len, space, dtype))
        # a pre-quantized checkpoint (GPTQ, AWQ, FP8, bitsandbytes) trains adapters only: search what it can run
        shapes = [p for p in every if not get_method(p.method).model_errors(model, p)]
        if every and not shapes:  # e.g. methods ["full"] on a GPTQ repo: the first refusal, naming its field
            field, message = get_method(every[0].method).model_errors(model, every[0])[0]
            raise InvalidInputError(message, field=field)
        table = build_table(estimator, model, shapes, cpu)
        if len(self._tables) > 256:
            self._tables.clear()
        self._tables[key] = (model, table)
        return table

    def _search_table(
        self, model: ModelSpec, gpus: list[GpuSpec], space: SearchSpace, seq_len: int, dtype: str | None
    ) -> SearchTable:
        """Every GPU's candidate columns side by side (cached: the same question is asked again and again)."""
        parts = []
        installed = self.profiles.all()
        for gpu in gpus:
            dt = dtype or gpu.default_dtype()
            estimator = self.estimator_for(gpu, installed)
            parts.append((gpu, dt, self._table(estimator, model, space, seq_len, dt, gpu), estimator))
        # the GPU's price is part of the key: the same cards priced at another provider or basis
        key = (
            id(model),
            tuple((g.id, g.price_usd_per_hour, g.price_source, dt, id(t), id(e)) for g, dt, t, e in parts),
        )
        hit = self._stacked.get(key)
        if hit is not None and hit[0] is model:
            return hit[1]
        stacked = stack_tables(parts)
        if len(self._stacked) > 64:
            self._stacked.clear()
        self._stacked[key] = (model, stacked)
        return stacked

    # ---- recommend --------------------------------------------------------------------------------
    def recommend(self, req: RecommendRequest) -> RecommendResult:
        model = self.model(req.model, req.model_revision)
        context_note = model.check_seq_len(req.workload.seq_len)
        assumptions = list(req.workload.stated_defaults)
        if model.assumed:
            assumptions.append(model.note)
        catalog = self.catalog
        if req.providers or req.price_basis != "on-demand":
            catalog = catalog.priced(req.providers, req.price_basis)
        counts: dict[str, int] = {}
        if req.gpus:
            gpus, counts = self._request_gpus(req.gpus, catalog)
        else:
            if req.objective == "fit":
                raise InvalidInputError("objective 'fit' needs your GPU: name one with gpu", field="gpu")
            gpus = list(catalog.gpus)
            assumptions.append("no GPU named: searched every catalog GPU")
            if req.providers:
                offered = [g for g in gpus if g.price_usd_per_hour is not None]
                if not offered:
                    raise InvalidInputError(
                        f"no catalog GPU has a {req.price_basis} price at {', '.join(req.providers)}. "
                        "To fix: other providers, or price_basis on-demand",
                        field="providers",
                    )
                gpus = offered
                assumptions.append(f"searched the GPUs {', '.join(req.providers)} list {req.price_basis} prices for")
        assumptions.append(
            f"prices: {req.price_basis}, "
            + (f"the cheapest of {', '.join(req.providers)}" if req.providers else "the cheapest listed provider")
            + " per GPU (each plan names its provider, region and source)"
        )
        if req.dtype == "bf16":
            no_bf16 = [g.id for g in gpus if not g.bf16_supported]
            if no_bf16 and len(no_bf16) == len(gpus):
                raise InvalidInputError(f"{', '.join(no_bf16)} cannot train in bf16: use fp16", field="dtype")
            gpus = [g for g in gpus if g.bf16_supported]
        searched = {n for n in (1, 2, 4, 8, 16, 32) if n <= req.constraints.max_gpus}
        if counts and len(counts) == len(gpus):
            searched = set(counts.values())  # every GPU named with its count: those counts only
        else:
            searched |= set(counts.values())
        space = SearchSpace(
            methods=req.constraints.methods,
            gpu_counts=tuple(sorted(searched)),
            gpus_per_node=req.constraints.gpus_per_node,
        )
        constraints = req.constraints
        if counts:
            constraints = replace(constraints, gpu_counts=tuple(sorted(counts.items())))
        rec = search(
            model,
            self._search_table(model, gpus, space, req.workload.seq_len, req.dtype),
            req.workload,
            req.objective,
            constraints,
            req.convergence,
            req.limit,
        )
        rec.notes.extend(study_notes(model, rec))
        for gpu in dict.fromkeys(r.candidate.gpu for r in rec.plans if r.candidate.plan.nodes > 1):
            gbit, source = gpu.node_network
            rec.notes.append(
                f"plans past {req.constraints.gpus_per_node} GPUs span nodes: {gpu.id} nodes talk over "
                f"{gbit:g} Gb/s ({source}); set constraints.gpus_per_node for other nodes"
            )
        if context_note:
            rec.notes.append(context_note)
        if not rec.plans:
            rec.notes.append("no plan fits: see `rejected` for the closest candidates and what to change")
            rec.notes.extend(closest_notes(rec, req.constraints))
        elif all(r.candidate.estimate.memory.verdict != FITS for r in rec.plans):
            rec.notes.append(
                "every plan's memory band crosses its GPU's memory: they may run out of memory (see each plan's "
                "verdict_reason); more GPUs, a larger card or a lighter method leave a margin"
            )
        elif rec.n_risky:
            rec.notes.append(
                f"{rec.n_risky} feasible candidate{' has' if rec.n_risky == 1 else 's have'} a memory band that "
                "crosses the GPU's memory: each group keeps "
                "a safe plan where it has one, and risky plans rank after every safe one"
            )
        simulations = None
        if req.simulate_top:
            from advisor.simulated import simulate_ranked

            simulations = simulate_ranked(self.simulated(), model, rec.plans, req.simulate_top, req.simulate_budget_s)
        return RecommendResult(
            model=model,
            gpus=gpus,
            workload=req.workload,
            recommendation=rec,
            assumptions=assumptions,
            simulations=simulations,
        )
