"""What every estimator returns: a named memory breakdown in bytes, a step time, and where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

from advisor.estimators import device as dev
from advisor.estimators import uncertainty as unc
from advisor.estimators.terms import PlanTerms
from advisor.plans import TrainingPlan
from advisor.specs import GpuSpec, ModelSpec

#: Breakdown components, in the order they are shown.
COMPONENTS = (
    "weights",
    "adapters",
    "gradients",
    "optimizer_states",
    "activations",
    "logits",
    "quant_temporaries",
    "adapter_temporaries",
    "runtime_overhead",
)


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU memory. `components` sum to the device total; `allocated_peak_bytes` is what
    torch.cuda.max_memory_allocated would report, `reserved_peak_bytes` adds the caching allocator's
    slack, `device_total_bytes` adds the CUDA context (what nvidia-smi shows) and decides the fit."""

    components: dict[str, int]
    allocated_peak_bytes: int
    reserved_peak_bytes: int
    device_total_bytes: int
    paged_bytes: int  # paged optimiser states: unified memory, may spill to host RAM, not in the totals
    peak_phase: str  # "forward/backward" or "optimizer step"
    device_bytes: int
    #: how far the device total may be from the real run (``advisor.estimators.uncertainty``); None only
    #: before ``with_bands`` attached it
    band: unc.ErrorBand | None = None

    @property
    def fits(self) -> bool:
        """The point estimate is within the device's memory (True also when the band crosses the limit:
        ``verdict`` tells the two apart)."""
        return self.device_total_bytes <= self.device_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.device_bytes - self.device_total_bytes

    @property
    def low_bytes(self) -> int:
        """The band's low end of the device total."""
        return int(self.band.low(self.device_total_bytes)) if self.band else self.device_total_bytes

    @property
    def high_bytes(self) -> int:
        """The band's high end of the device total: the peak if the error is as large as the benches' p90."""
        return int(self.band.high(self.device_total_bytes)) if self.band else self.device_total_bytes

    @property
    def verdict(self) -> str:
        """fits | band_crosses_limit | does_not_fit (``uncertainty.verdict``)."""
        return unc.verdict(self.device_total_bytes, self.device_bytes, self.band)[0]

    @property
    def verdict_reason(self) -> str:
        return unc.verdict(self.device_total_bytes, self.device_bytes, self.band)[1]


@dataclass(frozen=True)
class SpeedEstimate:
    step_time_s: float  # one optimiser micro-step (forward + backward of micro_batch x seq_len per GPU)
    tokens_per_s: float  # across all GPUs
    flops_per_token: float
    compute_s: float
    memory_bound_s: float
    communication_s: float
    mfu: float
    band: unc.ErrorBand | None = None  # how far the step time may be from the real run

    @property
    def step_time_low_s(self) -> float:
        return self.band.low(self.step_time_s) if self.band else self.step_time_s

    @property
    def step_time_high_s(self) -> float:
        return self.band.high(self.step_time_s) if self.band else self.step_time_s


@dataclass(frozen=True)
class Estimate:
    plan: TrainingPlan
    memory: MemoryEstimate
    speed: SpeedEstimate
    source: str  # "analytical" | "calibrated:<profile id>" | "simulated"
    notes: tuple[str, ...] = field(default=())


class Estimator(Protocol):
    """The seam every estimator in the search implements: GPU-independent terms of a plan, the device
    layer's columns (GPU numbers x this estimator's coefficients) and notes. ``build_estimate`` and the
    vectorised search (``advisor.recommend``) combine them the same way for every estimator."""

    name: str
    source: str

    def plan_terms(self, model: ModelSpec, plan: TrainingPlan, cpu: bool = False) -> PlanTerms: ...

    def device(self, gpu: GpuSpec, dtype: str) -> dev.DeviceColumns: ...

    def notes(self, model: ModelSpec, gpu: GpuSpec, plan: TrainingPlan) -> list[str]: ...

    def estimate(self, model: ModelSpec, gpu: GpuSpec, plan: TrainingPlan) -> Estimate: ...


def build_estimate(estimator: Estimator, model: ModelSpec, gpu: GpuSpec, plan: TrainingPlan) -> Estimate:
    """One plan on one GPU: the estimator's terms through the device layer."""
    t = estimator.plan_terms(model, plan, gpu.gpu_class == "cpu")
    ev = dev.evaluate(
        estimator.device(gpu, plan.dtype),
        t.allocated,
        t.static,
        t.flops_per_token,
        t.memory_traffic_bytes,
        t.comm_bytes,
        t.passes,
        plan.micro_batch * plan.seq_len,
        plan.num_gpus,
        model.total_layers,
        t.speed,
        allocator_slack=t.allocator_slack,
    )
    return estimate_of(estimator, model, gpu, plan, t, ev)


def estimate_of(
    estimator: Estimator, model: ModelSpec, gpu: GpuSpec, plan: TrainingPlan, t: PlanTerms, ev: dev.Evaluation
) -> Estimate:
    """The typed estimate of one plan from its terms and its row of the device layer's evaluation."""
    total = int(ev.total)
    components = dict(t.components)
    components["runtime_overhead"] = int(total - sum(components.values()))
    memory = MemoryEstimate(
        components=components,
        allocated_peak_bytes=int(ev.allocated),
        reserved_peak_bytes=int(ev.reserved),
        device_total_bytes=total,
        paged_bytes=int(t.paged),
        peak_phase=t.peak_phase,
        device_bytes=gpu.memory_bytes,
    )
    speed = SpeedEstimate(
        step_time_s=float(ev.step_s),
        tokens_per_s=float(ev.tokens_per_s),
        flops_per_token=t.flops_per_token,
        compute_s=float(ev.compute_s),
        memory_bound_s=float(ev.memory_bound_s),
        communication_s=float(ev.communication_s),
        mfu=float(ev.mfu),
    )
    notes = [*t.notes, *speed_notes(gpu, plan)]
    if model.assumed:
        notes.append(model.note)
    notes.extend(estimator.notes(model, gpu, plan))
    est = Estimate(plan=plan, memory=memory, speed=speed, source=estimator.source, notes=tuple(notes))
    return with_bands(est, gpu)


def with_bands(est: Estimate, gpu: GpuSpec) -> Estimate:
    """The estimate with its error bands (memory and step time) for its source and kind of plan, from the
    committed band table; an estimate that has them already is returned as is. Every estimator's result
    passes here (``estimate_of``; the service for the simulated source), so every answer carries one."""
    if est.memory.band is not None and est.speed.band is not None:
        return est
    p, cpu = est.plan, gpu.gpu_class == "cpu"
    mem = unc.band_for(est.source, "memory", p.method, p.framework, p.num_gpus, cpu)
    step = unc.band_for(est.source, "step_time", p.method, p.framework, p.num_gpus, cpu)
    return replace(est, memory=replace(est.memory, band=mem), speed=replace(est.speed, band=step))


def speed_notes(gpu: GpuSpec, plan: TrainingPlan) -> list[str]:
    """What the speed of a plan on a GPU assumes beyond the GPU's own rate for the plan's dtype."""
    if gpu.tflops(plan.dtype) <= 0:
        return [f"{gpu.name} has no {plan.dtype} tensor cores; speed uses its fp16 rate"]
    return []
