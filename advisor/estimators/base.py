"""What every estimator returns: a named memory breakdown in bytes, a step time, and where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from advisor.estimators import device as dev
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

    @property
    def fits(self) -> bool:
        return self.device_total_bytes <= self.device_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.device_bytes - self.device_total_bytes


@dataclass(frozen=True)
class SpeedEstimate:
    step_time_s: float  # one optimiser micro-step (forward + backward of micro_batch x seq_len per GPU)
    tokens_per_s: float  # across all GPUs
    flops_per_token: float
    compute_s: float
    memory_bound_s: float
    communication_s: float
    mfu: float


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
    return Estimate(plan=plan, memory=memory, speed=speed, source=estimator.source, notes=tuple(notes))


def speed_notes(gpu: GpuSpec, plan: TrainingPlan) -> list[str]:
    """What the speed of a plan on a GPU assumes beyond the GPU's own rate for the plan's dtype."""
    if gpu.tflops(plan.dtype) <= 0:
        return [f"{gpu.name} has no {plan.dtype} tensor cores; speed uses its fp16 rate"]
    return []
