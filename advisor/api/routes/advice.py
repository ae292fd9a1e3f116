"""POST /v1/recommend and /v1/estimate: the advice itself, straight from AdvisorService.

Simulation (simulate_top, source=simulated) is the one expensive thing here: it needs an API key unless
ADVISOR_SIMULATION_WITHOUT_KEY opens it, runs in trace processes of a bounded pool (429/503 with
Retry-After when full), under a per-request deadline, and is killed when the client goes away.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

from fastapi import APIRouter, FastAPI, Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from advisor.api import views
from advisor.api.auth import match_key
from advisor.api.convert import model_arg, to_plan, to_recommend_request, to_workload
from advisor.api.deps import AppSettings, Service
from advisor.api.errors import ApiError, error_responses
from advisor.api.schemas import EstimateRequest, EstimateResponse, RecommendRequest, RecommendResponse
from advisor.api.settings import Settings
from advisor.launchable import LaunchTarget
from advisor.tracepool import Bounds, SimulationBusy, SimulationCancelled, TracePool, bounds

router = APIRouter(prefix="/v1", tags=["advice"])


@router.post(
    "/recommend",
    operation_id="recommend",
    summary="Rank training plans for a model, GPU(s) and workload",
    response_model=RecommendResponse,
    responses=error_responses(401, 404, 409, 413, 422, 429, 503),
)
async def recommend(body: RecommendRequest, svc: Service, settings: AppSettings, request: Request) -> Response:
    """Every candidate plan (method x adapter shape x micro-batch x checkpointing x optimiser x GPUs) is
    estimated; feasible ones come back ranked by the objective with their memory breakdown, speed,
    hours, cost, estimate source and reason; rejected groups come back with what to change.
    Each plan has a stable `id` and can be posted back to /v1/estimate as is."""
    if not body.simulate_top:
        return await run_in_threadpool(_recommend, body, svc, settings, request)
    check_simulation_allowed(request, settings, "simulate_top")
    if body.simulate_budget_s > settings.simulation_deadline_s:
        raise ApiError(
            422,
            "invalid_input",
            f"simulate_budget_s is at most {settings.simulation_deadline_s:g} on this server",
            field="simulate_budget_s",
        )
    return await bounded_simulation(request, settings, lambda: _recommend(body, svc, settings, request))


def _recommend(body: RecommendRequest, svc: Service, settings: Settings, request: Request) -> Response:
    req, stated = to_recommend_request(body)
    return _json(views.recommend_response(svc.recommend(req), stated, launch_target(request, settings)))


def launch_target(request: Request, settings: object) -> LaunchTarget:
    """The job runner plans are launched on: the jobs runtime's launcher (a local one with its device count),
    else what the settings name."""
    runtime = getattr(request.app.state, "jobs", None)
    if runtime is not None:
        return runtime.launch_target()
    return LaunchTarget(str(getattr(settings, "job_launcher", "local")), None)


@router.post(
    "/estimate",
    operation_id="estimate",
    summary="Memory breakdown, speed, hours and cost of one plan",
    response_model=EstimateResponse,
    responses=error_responses(401, 404, 413, 422, 429, 503),
)
async def estimate(body: EstimateRequest, svc: Service, settings: AppSettings, request: Request) -> Response:
    """One fully specified plan (e.g. one from /v1/recommend, posted back unchanged) -> the same estimate."""
    if body.source != "simulated":
        return await run_in_threadpool(_estimate, body, svc)
    check_simulation_allowed(request, settings, "source")
    return await bounded_simulation(request, settings, lambda: _estimate(body, svc))


def _estimate(body: EstimateRequest, svc: Service) -> Response:
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


# ---- simulation bounds ----------------------------------------------------------------------------------
T = TypeVar("T")
#: how often a waiting request looks whether its client is still there
DISCONNECT_POLL_S = 0.25


def check_simulation_allowed(request: Request, settings: Settings, field: str) -> None:
    """422 when the server has simulation off; 401 for a caller without a valid key unless
    ADVISOR_SIMULATION_WITHOUT_KEY opens simulation to everyone."""
    if not settings.allow_simulation:
        raise ApiError(422, "invalid_input", "simulation is disabled on this server", field=field)
    if settings.simulation_without_key:
        return
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    keys = [k.get_secret_value() for k in settings.api_keys]
    if not (scheme.lower() == "bearer" and presented.strip() and keys and match_key(presented.strip(), keys)):
        raise ApiError(
            401,
            "unauthorized",
            "simulation needs an API key (`Authorization: Bearer <key>`); the analytical source needs none",
            field=field,
            headers={"WWW-Authenticate": 'Bearer realm="tuneadvisor"'},
        )


def trace_pool(app: FastAPI, settings: Settings) -> TracePool:
    """The app's pool (one per app, made on first use on the event loop thread, so no race)."""
    pool = getattr(app.state, "trace_pool", None)
    if pool is None:
        pool = TracePool(settings.simulation_workers, settings.simulation_queue, settings.simulation_queue_wait_s)
        app.state.trace_pool = pool
    return pool


async def bounded_simulation(request: Request, settings: Settings, work: Callable[[], T]) -> T | Response:
    """Run `work` in a worker thread under this request's simulation bounds (pool, deadline), watching the
    connection meanwhile: when the client goes away its trace process is killed."""
    b = Bounds(trace_pool(request.app, settings), time.monotonic() + settings.simulation_deadline_s, threading.Event())

    def bounded() -> T:
        token = bounds.set(b)
        try:
            return work()
        finally:
            bounds.reset(token)

    task = asyncio.ensure_future(run_in_threadpool(bounded))
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                b.cancel.set()  # the worker thread kills the trace process and returns at once
        return task.result()
    except SimulationBusy as exc:
        raise ApiError(
            exc.status, "simulation_busy", str(exc), headers={"Retry-After": str(exc.retry_after_s)}
        ) from None
    except SimulationCancelled:
        return Response(status_code=499)  # nobody reads it: the client is gone (nginx's "client closed request")
    except asyncio.CancelledError:
        b.cancel.set()
        raise


def _json(model: BaseModel) -> Response:
    """The view's model is built and validated already: send its JSON as is (FastAPI would dump it,
    validate it again against the response model and encode it a second time)."""
    return Response(content=model.model_dump_json(), media_type="application/json")
