"""Validated request bodies -> the core's dataclasses, with every assumed default stated.

No logic beyond translation: defaults match the CLI's, and each one a request left out becomes a
sentence in the response's `assumptions`.
"""

from __future__ import annotations

from typing import Any

from advisor.api.errors import ApiError
from advisor.api.schemas import ConstraintsIn, InlineModelConfig, PlanIn, RecommendRequest, WorkloadIn
from advisor.errors import InvalidInputError
from advisor.plans import TrainingPlan, make_plan
from advisor.recommend import Constraints
from advisor.service import RecommendRequest as CoreRecommendRequest
from advisor.specs import GpuSpec, Workload


def model_arg(model: str | InlineModelConfig) -> str | dict[str, Any]:
    return model if isinstance(model, str) else model.config_dict()


def to_workload(w: WorkloadIn) -> Workload:
    tokens = w.examples * w.avg_example_tokens if w.examples is not None else w.dataset_tokens
    return Workload.given(dataset_tokens=tokens, seq_len=w.seq_len, epochs=w.epochs)


def to_constraints(c: ConstraintsIn) -> Constraints:
    return Constraints(
        max_budget_usd=c.max_budget_usd,
        deadline_hours=c.deadline_hours,
        max_gpus=c.max_gpus,
        methods=tuple(dict.fromkeys(c.methods)),
        gpus_per_node=c.gpus_per_node,
    )


def to_recommend_request(body: RecommendRequest) -> tuple[CoreRecommendRequest, list[str]]:
    """The core request and the defaults assumed beyond the workload's (those travel inside it)."""
    gpus = None if body.gpu is None else ((body.gpu,) if isinstance(body.gpu, str) else tuple(body.gpu))
    given = body.model_fields_set
    stated: list[str] = []
    if "objective" not in given:
        stated.append("objective not given: cheapest plan first (cost)")
    if "dtype" not in given:
        stated.append("dtype not given: bf16 where the GPU supports it, else fp16")
    if "constraints" not in given:
        stated.append("constraints not given: no budget or deadline, up to 8 GPUs, methods full, lora and qlora")
    req = CoreRecommendRequest(
        model=model_arg(body.model),
        gpus=gpus or None,
        workload=to_workload(body.workload),
        objective=body.objective,
        constraints=to_constraints(body.constraints),
        dtype=body.dtype,
        convergence=dict(body.convergence) if body.convergence else None,
        limit=body.limit,
        simulate_top=body.simulate_top,
        simulate_budget_s=body.simulate_budget_s,
        providers=tuple(body.providers) if body.providers else None,
        price_basis=body.price_basis,
        model_revision=body.model_revision,
    )
    return req, stated


def to_plan(p: PlanIn, gpu: GpuSpec) -> TrainingPlan:
    """A TrainingPlan on `gpu`; the defaults left open (dtype, sharding, alpha) resolve in make_plan."""
    given = p.model_dump(exclude={"id", "method"})
    try:
        plan = make_plan(p.method, gpu, **given)
    except InvalidInputError as exc:
        raise InvalidInputError(exc.message, field=f"plan.{exc.field}" if exc.field else "plan") from exc
    if p.id is not None and p.id != plan.id:
        raise ApiError(
            422,
            "plan_id_mismatch",
            f"plan.id {p.id!r} does not match the plan's fields (their id is {plan.id!r}): "
            "post a plan unchanged, or leave its id out",
            field="plan.id",
        )
    return plan
