"""GET /healthz (the process answers), /readyz (named checks pass), /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from advisor.api.deps import run_readiness
from advisor.api.schemas import CheckResult, Health, Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz", operation_id="healthz", summary="Liveness: the process answers", response_model=Health)
def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    operation_id="readyz",
    summary="Readiness: catalogs loaded, data directory (store) reachable",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "a check failed; `checks` says which"}},
)
def readyz(request: Request) -> Response:
    checks = [CheckResult(name=n, ok=ok, detail=d) for n, ok, d in run_readiness(request.app)]
    ready = all(c.ok for c in checks)
    body = Readiness(status="ready" if ready else "not ready", checks=checks)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics: request counts and latencies by route and status",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "text format 0.0.4"}},
)
def metrics(request: Request) -> Response:
    payload, content_type = request.app.state.metrics.exposition()
    return Response(payload, media_type=content_type)
