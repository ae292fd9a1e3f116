"""Hours and dollars for a workload, including the convergence factor of the method."""

from __future__ import annotations

from dataclasses import dataclass

from advisor.methods import METHODS
from advisor.specs import GpuSpec, Workload

#: Optimiser steps a method needs relative to full fine-tuning to reach the same quality.
#: QLoRA "may require 20-30% more training steps" is a claim of the source study
#: (LoRA vs QLoRA benchmarking study, "Convergence Analysis"); we take the midpoint.
#: LoRA is taken as step-for-step equal to full fine-tuning. Override per request. Each method's own
#: module holds its factor (advisor.methods); a request's dict overrides the methods it names.
DEFAULT_CONVERGENCE = {name: m.convergence for name, m in METHODS.items()}


@dataclass(frozen=True)
class CostEstimate:
    hours: float
    cost_usd: float | None  # None when the GPU has no price
    convergence_factor: float
    gpu_hours: float


def estimate_cost(
    method: str,
    tokens_per_s: float,
    num_gpus: int,
    gpu: GpuSpec,
    workload: Workload,
    convergence: dict[str, float] | None = None,
) -> CostEstimate:
    factor = (convergence or {}).get(method, DEFAULT_CONVERGENCE[method])
    seconds = workload.total_tokens * factor / tokens_per_s
    hours = seconds / 3600
    gpu_hours = hours * num_gpus
    price = gpu.price_usd_per_hour
    cost = None if price is None else gpu_hours * price
    return CostEstimate(hours=hours, cost_usd=cost, convergence_factor=factor, gpu_hours=gpu_hours)
