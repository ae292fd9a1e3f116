"""Errors -> HTTP, at one boundary: every error body is an ``ErrorResponse`` carrying the request id,
or on OpenAI's routes (``/v1/fine_tuning``, ``/v1/files``, ``/v1/models``) OpenAI's envelope.

Why two shapes: the advice routes have documented ``ErrorResponse`` bodies and 422s that clients
already read, while OpenAI's clients (the ``openai`` package, LangChain, ...) read
``{"error": {message, type, param, code}}`` and pick their exception class from the status, so an
invalid request there must be a 400 (their ``BadRequestError``), not a 422. The envelope keeps our
fields (``errors``, ``suggestions``, ``request_id`` and a job error's extras) inside ``error``.

One exception handler (``handle_error``) answers every error type: the core's AdvisorErrors, the job
layer's JobsErrors (their own status, code and extra body fields, e.g. `estimate`, `line`), request
validation, the HTTP layer's ApiError and Starlette's HTTPException; ``problem_of`` is the one mapping.
Routes never catch errors to answer them; they let them raise.

AdvisorError subclasses map to status codes here and nowhere else:
unknown model/GPU -> 404 with close-match suggestions, invalid input or a closed model -> 422
naming the field, nothing feasible -> 409. Request validation lists every bad field at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from advisor.api.schemas import ErrorResponse, FieldError, OpenAIError, OpenAIErrorResponse
from advisor.errors import (
    AdvisorError,
    ClosedModelError,
    InvalidInputError,
    NoFeasiblePlanError,
    UnknownGpuError,
    UnknownModelError,
)
from advisor.jobs.errors import JobsError

#: AdvisorError subclass -> (HTTP status, error code); the first match in order wins.
STATUS_BY_ERROR: tuple[tuple[type[AdvisorError], int, str], ...] = (
    (UnknownModelError, 404, "unknown_model"),
    (UnknownGpuError, 404, "unknown_gpu"),
    (ClosedModelError, 422, "closed_model"),
    (InvalidInputError, 422, "invalid_input"),
    (NoFeasiblePlanError, 409, "no_feasible_plan"),
)

#: core field name -> JSON path in the request bodies (the core does not know where a value came from)
FIELD_PATHS: dict[str, str] = {
    **{f: f"workload.{f}" for f in ("dataset_tokens", "seq_len", "epochs")},
    **{f: f"constraints.{f}" for f in ("max_budget_usd", "deadline_hours", "max_gpus", "methods")},
    **{
        f: f"plan.{f}"
        for f in (
            "method",
            "micro_batch",
            "optimizer",
            "attention",
            "sharding",
            "num_gpus",
            "lora_r",
            "lora_alpha",
            "lora_dropout",
            "lora_targets",
            "grad_accum",
            "framework",
        )
    },
}

#: union-branch tags pydantic puts into error locations; not part of the JSON path a client sent
_UNION_TAGS = frozenset({"model-name", "inline-config", "gpu-name", "gpu-list"})

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    408: "request_timeout",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
    507: "insufficient_storage",
}


@dataclass(frozen=True)
class Problem:
    """What any error answers: the status, headers and the fields of its ErrorResponse body.

    `extra` keys join the body (a job error's `estimate`, a bad file's `line`)."""

    status: int
    code: str
    detail: str
    field: str | None = None
    suggestions: Sequence[str] = ()
    errors: Sequence[FieldError] = ()
    headers: Mapping[str, str] = dataclass_field(default_factory=dict)
    extra: Mapping[str, Any] = dataclass_field(default_factory=dict)

    def response(self, request_id: str | None, openai: bool = False) -> JSONResponse:
        """The answer; `openai`: OpenAI's envelope and status (422 -> 400) instead of an ErrorResponse."""
        if openai:
            return JSONResponse(
                self.openai_body(request_id), status_code=openai_status(self.status), headers=dict(self.headers)
            )
        body = ErrorResponse(
            code=self.code,
            detail=self.detail,
            field=self.field,
            suggestions=list(self.suggestions),
            errors=list(self.errors),
            request_id=request_id,
        ).model_dump(mode="json")
        body.update(self.extra)
        return JSONResponse(body, status_code=self.status, headers=dict(self.headers))

    def openai_body(self, request_id: str | None) -> dict[str, Any]:
        error = OpenAIError(
            message=self.detail,
            type=openai_type(self.status),
            param=self.field,
            code=self.code,
            errors=list(self.errors),
            suggestions=list(self.suggestions),
            request_id=request_id,
        ).model_dump(mode="json")
        error.update(self.extra)
        return {"error": error}


#: path prefixes of the routes that speak OpenAI's API, and so answer errors in OpenAI's envelope
OPENAI_PREFIXES = ("/v1/fine_tuning/", "/v1/files", "/v1/models")


def is_openai_path(path: str) -> bool:
    """`path` belongs to OpenAI's API (``/v1/files`` and ``/v1/files/...``, not ``/v1/filesystem``)."""
    return any(path == p.rstrip("/") or path.startswith(p if p.endswith("/") else p + "/") for p in OPENAI_PREFIXES)


def openai_status(status: int) -> int:
    """OpenAI answers an invalid request with 400; its clients raise BadRequestError for it."""
    return 400 if status == 422 else status


def openai_type(status: int) -> str:
    """OpenAI's `error.type`: what kind of failure, by status."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def error_response(request_id: str | None, status: int, code: str, detail: str, **more: Any) -> JSONResponse:
    """An ErrorResponse; `more`: Problem's other fields (field, suggestions, errors, headers, extra)."""
    return Problem(status, code, detail, **more).response(request_id)


def api_field(field: str | None) -> str | None:
    """The JSON path of a core field name (``seq_len`` -> ``workload.seq_len``)."""
    if field is None:
        return None
    return FIELD_PATHS.get(field, field)


def _loc_to_field(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p not in _UNION_TAGS]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts) or "body"


def validation_errors(errors: Iterable[Mapping[str, Any]]) -> list[FieldError]:
    """pydantic errors as FieldErrors; inputs are left out (they may be large, or secrets)."""
    out: list[FieldError] = []
    seen: set[tuple[str, str]] = set()
    for e in errors:
        if e.get("type") == "json_invalid":  # loc is ("body", <character offset>)
            loc = tuple(e.get("loc", ()))
            reason = (e.get("ctx") or {}).get("error", "")
            fe = FieldError(field="body", message=f"invalid JSON at character {loc[-1]}: {reason}", type="json_invalid")
        else:
            loc = e.get("loc", ())
            fe = FieldError(field=_loc_to_field(loc), message=str(e.get("msg", "")), type=str(e.get("type")))
        if (fe.field, fe.message) not in seen:
            seen.add((fe.field, fe.message))
            out.append(fe)
    return out


# ---- each error type -> its Problem ------------------------------------------------------------------------
def _field_problem(status: int, code: str, detail: str, field: str | None, message: str, **more: Any) -> Problem:
    """A Problem about one input field: `errors` names it (plus any `errors` given)."""
    errors = [FieldError(field=field, message=message, type=code)] if field else []
    errors += more.pop("errors", [])
    return Problem(status, code, detail, field=field, errors=errors, **more)


class ApiError(Exception):
    """An error of the HTTP layer itself (auth, a plan id that does not match its plan, ...)."""

    def __init__(
        self, status: int, code: str, detail: str, *, field: str | None = None, headers: Mapping[str, str] | None = None
    ):
        super().__init__(detail)
        self.problem = _field_problem(status, code, detail, field, detail, headers=dict(headers or {}))


def _advisor_problem(exc: AdvisorError) -> Problem:
    if isinstance(exc, JobsError):  # the job layer's errors carry their status and code; fields are API paths
        return _field_problem(exc.status, exc.code, str(exc), exc.field, exc.message, extra=exc.extra)
    status, code = next(((st, cd) for cls, st, cd in STATUS_BY_ERROR if isinstance(exc, cls)), (422, "invalid_input"))
    field = api_field(exc.field)
    reasons = exc.reasons if isinstance(exc, NoFeasiblePlanError) else []
    return _field_problem(
        status,
        code,
        str(exc),
        field,
        exc.message,
        suggestions=exc.suggestions,
        errors=[FieldError(field=field or "body", message=r, type=code) for r in reasons],
    )


def _validation_problem(exc: RequestValidationError) -> Problem:
    errors = validation_errors(exc.errors())
    fields = ", ".join(dict.fromkeys(e.field for e in errors))
    detail = f"invalid request: {fields}" if fields else "invalid request"
    return Problem(422, "invalid_input", detail, field=errors[0].field if errors else None, errors=errors)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path. Starlette's 405 names only the first route that
    matched the path, so a path with a GET route and a POST route answered `Allow: POST` alone."""
    allowed = []
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return allowed


def _http_problem(exc: StarletteHTTPException, request: Request) -> Problem:
    if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        # FastAPI's "error parsing the body": a body that is not UTF-8 is invalid JSON like any other
        cause = exc.__cause__
        message = f"not UTF-8 at byte {cause.start}: {cause.reason}"
        error = FieldError(field="body", message=message, type="json_invalid")
        return Problem(422, "invalid_input", "invalid request: body", field="body", errors=[error])
    if exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):
        # FastAPI's "error parsing the body" for JSON nested past the parser's recursion limit: name the field
        from advisor.api.nesting import deep_field

        field = deep_field(getattr(request, "_body", b""))  # the body FastAPI read, cached on this request
        message = "JSON nested too deeply to parse"
        error = FieldError(field=field, message=message, type="json_too_deep")
        return Problem(422, "invalid_input", f"invalid request: {field}", field=field, errors=[error])
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_allowed_methods(request)) or headers.get("Allow", "")
    return Problem(exc.status_code, HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail), headers=headers)


def problem_of(exc: Exception, request: Request) -> Problem:
    """The one mapping of every handled error type to its answer."""
    if isinstance(exc, AdvisorError):
        return _advisor_problem(exc)
    if isinstance(exc, RequestValidationError):
        return _validation_problem(exc)
    if isinstance(exc, ApiError):
        return exc.problem
    if isinstance(exc, StarletteHTTPException):
        return _http_problem(exc, request)
    raise TypeError(f"no error mapping for {type(exc).__name__}")  # pragma: no cover - see HANDLED


#: the error types `handle_error` answers; anything else is a 500 (observability's middleware)
HANDLED: tuple[type[Exception], ...] = (AdvisorError, RequestValidationError, ApiError, StarletteHTTPException)


async def handle_error(request: Request, exc: Exception) -> JSONResponse:
    """The exception handler of every handled error type: its Problem as an ErrorResponse (OpenAI's
    envelope on OpenAI's routes)."""
    return problem_of(exc, request).response(request_id_of(request), openai=is_openai_path(request.url.path))


def install_error_handlers(app: FastAPI) -> None:
    for error_type in HANDLED:
        app.add_exception_handler(error_type, handle_error)


def errors_as_json(doc: dict[str, Any]) -> dict[str, Any]:
    """Document every ErrorResponse as application/json, which is what the handlers above send.

    FastAPI files a `responses=` model under the route's own media type, so a route answering
    text/plain on success (e.g. job logs) would claim its errors are text/plain too; and it documents
    its own HTTPValidationError for 422 on every route with parameters, where our handler sends an
    ErrorResponse."""
    ref = "#/components/schemas/ErrorResponse"
    for ops in doc.get("paths", {}).values():
        for op in ops.values():
            for status, response in op.get("responses", {}).items():
                content = response.get("content", {})
                for body in content.values():
                    if body.get("schema", {}).get("$ref") == "#/components/schemas/HTTPValidationError":
                        body["schema"]["$ref"] = ref
                        response["description"] = "invalid input; `errors` names every bad field"
                if not status.isdigit() or int(status) < 400 or "application/json" in content:
                    continue
                for media_type, body in list(content.items()):
                    if body.get("schema", {}).get("$ref") == ref:
                        content["application/json"] = content.pop(media_type)
    schemas = doc.get("components", {}).get("schemas", {})
    _openai_errors(doc, ref)
    if "HTTPValidationError" in schemas and "#/components/schemas/HTTPValidationError" not in json.dumps(doc["paths"]):
        schemas.pop("HTTPValidationError")
        if "#/components/schemas/ValidationError" not in json.dumps(schemas):
            schemas.pop("ValidationError", None)
    return doc


def _openai_errors(doc: dict[str, Any], ref: str) -> None:
    """On OpenAI's routes, document what `handle_error` sends there: OpenAIErrorResponse, 400 for 422."""
    openai_ref = "#/components/schemas/OpenAIErrorResponse"
    used = False
    for path, ops in doc.get("paths", {}).items():
        if not is_openai_path(path):
            continue
        for op in ops.values():
            responses = op.get("responses", {})
            for status in [s for s in responses if s.isdigit() and int(s) >= 400]:
                for body in responses[status].get("content", {}).values():
                    if body.get("schema", {}).get("$ref") == ref:
                        body["schema"]["$ref"] = openai_ref
                        used = True
                moved = openai_status(int(status))
                if moved != int(status):
                    responses[str(moved)] = responses.pop(status)
            op["responses"] = dict(sorted(responses.items()))
    if used:
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        defs = OpenAIErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, schema in defs.pop("$defs", {}).items():
            schemas.setdefault(name, schema)
        schemas["OpenAIErrorResponse"] = defs


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries documenting error statuses with the ErrorResponse body."""
    text = {
        401: "missing or invalid API key (`Authorization: Bearer <key>`)",
        404: "unknown model or GPU; `suggestions` lists close matches",
        409: "no plan is feasible",
        413: "request body over the size limit",
        422: "invalid input; `errors` names every bad field",
        429: "too many requests waiting: retry after `Retry-After` seconds",
        503: "not ready, or busy: retry after `Retry-After` seconds when given",
        507: "the server's disk is full: delete files to free space",
    }
    return {s: {"model": ErrorResponse, "description": text.get(s, "error")} for s in statuses}
