"""POST /v1/recommend and /v1/estimate: the advice itself, straight from AdvisorService."""

from __future__ import annotations

from dataclasses import replace

from fastapi import APIRouter, Response
from pydantic import BaseModel

from advisor.api import views
from advisor.api.convert import model_arg, to_plan, to_recommend_request, to_workload
from advisor.api.deps import AppSettings, Service
from advisor.api.errors import ApiError, error_responses
from advisor.api.schemas import EstimateRequest, EstimateResponse, RecommendRequest, RecommendResponse

router = APIRouter(prefix="/v1", tags=["advice"])


@router.post(
    "/recommend",
    operation_id="recommend",
    summary="Rank training plans for a model, GPU(s) and workload",
    response_model=RecommendResponse,
    responses=error_responses(404, 409, 413, 422),
)
def recommend(body: RecommendRequest, svc: Service, settings: AppSettings) -> Response:
    """Every candidate plan (method x adapter shape x micro-batch x checkpointing x optimiser x GPUs) is
    estimated; feasible ones come back ranked by the objective with their memory breakdown, speed,
    hours, cost, estimate source and reason; rejected groups come back with what to change.
    Each plan has a stable `id` and can be posted back to /v1/estimate as is."""
    if body.simulate_top and not settings.allow_simulation:
        raise ApiError(422, "invalid_input", "simulation is disabled on this server", field="simulate_top")
    req, stated = to_recommend_request(body)
    return _json(views.recommend_response(svc.recommend(req), stated))


@router.post(
    "/estimate",
    operation_id="estimate",
    summary="Memory breakdown, speed, hours and cost of one plan",
    response_model=EstimateResponse,
    responses=error_responses(404, 413, 422),
)
def estimate(body: EstimateRequest, svc: Service, settings: AppSettings) -> Response:
    """One fully specified plan (e.g. one from /v1/recommend, posted back unchanged) -> the same estimate."""
    if body.source == "simulated" and not settings.allow_simulation:
        raise ApiError(422, "invalid_input", "simulation is disabled on this server", field="source")
    gpu_name = body.gpu or body.plan.gpu_id
    if gpu_name is None:
        raise ApiError(422, "invalid_input", "name the GPU: `gpu`, or `plan.gpu_id`", field="gpu")
    model = svc.model(model_arg(body.model), body.model_revision)
    gpu, count = svc.gpu_and_count(gpu_name)
    if count is not None:  # SkyPilot's NAME:COUNT sets the plan's GPUs unless the plan says otherwise
        if "num_gpus" in body.plan.model_fields_set and body.plan.num_gpus != count:
            raise ApiError(
                422,
                "invalid_input",
                f"gpu {gpu_name!r} says {count} GPUs, plan.num_gpus says {body.plan.num_gpus}. To fix: give one count",
                field="gpu",
            )
        body = body.model_copy(update={"plan": body.plan.model_copy(update={"num_gpus": count})})
    plan = replace(to_plan(body.plan, gpu), gpu_id=gpu.id)
    result = svc.estimate(
        model,
        gpu,
        plan,
        claimed_memory_gib=body.claimed_memory_gib,
        source=body.source,
        workload=to_workload(body.workload),
        convergence=body.convergence,
    )
    return _json(views.estimate_response(result))


def _json(model: BaseModel) -> Response:
    """The view's model is built and validated already: send its JSON as is (FastAPI would dump it,
    validate it again against the response model and encode it a second time)."""
    return Response(content=model.model_dump_json(), media_type="application/json")
