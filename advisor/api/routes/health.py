"""GET /healthz (the process answers), /readyz (named checks pass), /metrics (Prometheus).

/readyz is open (load balancers call it without a key), so what it says to a caller without a valid key
is reduced: ready or not and each check's name and state, with details that carry no paths, no
credentials in URLs and no raw exception text; a caller with a valid API key gets the details whole.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from advisor.api.auth import match_key
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
    """Ready when every check passes; details whole only for a caller with a valid API key."""
    full = _has_valid_key(request)
    checks = [
        CheckResult(name=n, ok=ok, detail=d if full else public_detail(d)) for n, ok, d in run_readiness(request.app)
    ]
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


#: two or more /segments: a file system path (also inside sqlite:///... URLs)
_PATH = re.compile(r"(?:/[\w.@%+~=-]+){2,}/?")
#: user:password@ in a URL
_CREDENTIALS = re.compile(r"://[^/@\s]+@")
#: what run_readiness writes for a check that raised: "ExceptionType: message"
_RAISED = re.compile(r"^([A-Z]\w*(?:Error|Exception|Exit|Interrupt|Warning)): ")
PUBLIC_DETAIL_CHARS = 200


def public_detail(detail: str) -> str:
    """`detail` fit for a caller without a key: a raised check's type only, paths and URL credentials
    masked, at most PUBLIC_DETAIL_CHARS characters."""
    raised = _RAISED.match(detail)
    if raised:
        return f"check raised {raised.group(1)} (details with an API key)"
    text = _PATH.sub("<path>", _CREDENTIALS.sub("://***@", detail))
    return text if len(text) <= PUBLIC_DETAIL_CHARS else text[: PUBLIC_DETAIL_CHARS - 3] + "..."


def _has_valid_key(request: Request) -> bool:
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    keys = [k.get_secret_value() for k in request.app.state.settings.api_keys]
    return (
        scheme.lower() == "bearer" and bool(presented) and bool(keys) and match_key(presented.strip(), keys) is not None
    )
