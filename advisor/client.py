"""Typed Python client for the tuneadvisor REST service (sync and async, over httpx).

    from advisor.client import AdvisorClient

    with AdvisorClient("http://127.0.0.1:8000") as client:
        rec = client.recommend("meta-llama/Llama-2-7b-hf", gpu="rtx-4090")
        best = rec.plans[0]
        again = client.estimate("meta-llama/Llama-2-7b-hf", best.plan)  # the same estimate

Requests are validated locally with the service's own schemas (a bad field fails before any
network call, as a pydantic ValidationError); every non-2xx answer raises ``AdvisorAPIError``
with the server's `code`, `field`, `suggestions` and `request_id`. Needs httpx and pydantic only.

How the two clients share one implementation (as httpx's Client and AsyncClient share BaseClient):
every endpoint is one request builder in ``_Requests`` (its signature and docstring are the public
method's), ``_BaseClient`` turns a built call into an httpx request and an httpx response into the
result or an AdvisorAPIError; the clients only send, blocking or awaited.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from advisor.api.schemas import (
    ConstraintsIn,
    ErrorResponse,
    EstimateRequest,
    EstimateResponse,
    FieldError,
    GpuList,
    GpuOut,
    Health,
    InlineModelConfig,
    ModelList,
    ModelOut,
    PlanIn,
    PlanOut,
    Readiness,
    RecommendRequest,
    RecommendResponse,
    WorkloadIn,
)

__all__ = ["AdvisorAPIError", "AdvisorClient", "AsyncAdvisorClient"]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
P = ParamSpec("P")


class AdvisorAPIError(Exception):
    """A non-2xx answer, with the server's ErrorResponse fields."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        field: str | None = None,
        suggestions: list[str] | None = None,
        errors: list[FieldError] | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.field = status, code, detail, field
        self.suggestions = list(suggestions or [])
        self.errors = list(errors or [])
        self.request_id = request_id

    def __str__(self) -> str:
        where = f" ({self.field})" if self.field else ""
        return f"HTTP {self.status} {self.code}{where}: {self.detail}"


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One request, built the same way for both clients, and what its answer parses into."""

    method: str
    path: str
    result: type[T]
    body: dict[str, Any] | None = None
    ok: tuple[int, ...] = (200,)


def _dump(model: BaseModel) -> dict[str, Any]:
    # exclude_unset: what the caller left out stays out, so the server states its defaults
    return model.model_dump(mode="json", by_alias=True, exclude_unset=True)


def _as(cls: type[M], value: M | Mapping[str, Any] | None) -> M | None:
    if value is None or isinstance(value, cls):
        return value
    return cls.model_validate(value)


def _model_ref(model: str | Mapping[str, Any] | InlineModelConfig) -> str | InlineModelConfig:
    return model if isinstance(model, (str, InlineModelConfig)) else InlineModelConfig.model_validate(dict(model))


def _given(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


class _Requests:
    """The request builder: one static method per endpoint, named and documented as the clients' methods.

    Bodies are validated here, with the service's own schemas, before anything is sent."""

    @staticmethod
    def recommend(
        model: str | Mapping[str, Any] | InlineModelConfig,
        gpu: str | list[str] | None = None,
        *,
        workload: WorkloadIn | Mapping[str, Any] | None = None,
        objective: str | None = None,
        constraints: ConstraintsIn | Mapping[str, Any] | None = None,
        dtype: str | None = None,
        limit: int | None = None,
        convergence: Mapping[str, float] | None = None,
    ) -> _Call[RecommendResponse]:
        """Ranked training plans for a model, GPU(s) and workload (POST /v1/recommend)."""
        fields = _given(
            gpu=gpu,
            workload=_as(WorkloadIn, workload),
            objective=objective,
            constraints=_as(ConstraintsIn, constraints),
            dtype=dtype,
            limit=limit,
            convergence=None if convergence is None else dict(convergence),
        )
        body = RecommendRequest(model=_model_ref(model), **fields)
        return _Call("POST", "/v1/recommend", RecommendResponse, _dump(body))

    @staticmethod
    def estimate(
        model: str | Mapping[str, Any] | InlineModelConfig,
        plan: PlanIn | PlanOut | Mapping[str, Any],
        gpu: str | None = None,
        *,
        workload: WorkloadIn | Mapping[str, Any] | None = None,
        claimed_memory_gib: float | None = None,
        source: str | None = None,
        convergence: Mapping[str, float] | None = None,
    ) -> _Call[EstimateResponse]:
        """Memory breakdown, speed, hours and cost of one plan (POST /v1/estimate); a plan from a
        recommendation is posted back as is."""
        if isinstance(plan, PlanOut):
            plan_in = PlanIn.model_validate(plan.model_dump(mode="json"))
        else:
            plan_in = _as(PlanIn, plan)
        fields = _given(
            gpu=gpu,
            workload=_as(WorkloadIn, workload),
            claimed_memory_gib=claimed_memory_gib,
            source=source,
            convergence=None if convergence is None else dict(convergence),
        )
        body = EstimateRequest(model=_model_ref(model), plan=plan_in, **fields)
        return _Call("POST", "/v1/estimate", EstimateResponse, _dump(body))

    @staticmethod
    def gpus() -> _Call[GpuList]:
        """The GPU catalog."""
        return _Call("GET", "/v1/gpus", GpuList)

    @staticmethod
    def gpu(gpu_id: str) -> _Call[GpuOut]:
        """One GPU by id or alias."""
        return _Call("GET", "/v1/gpus/" + quote(gpu_id, safe=""), GpuOut)

    @staticmethod
    def models() -> _Call[ModelList]:
        """The model catalog."""
        return _Call("GET", "/v1/models", ModelList)

    @staticmethod
    def model(model_id: str) -> _Call[ModelOut]:
        """One catalog model by name, Hugging Face id or alias."""
        return _Call("GET", "/v1/models/" + quote(model_id, safe="/"), ModelOut)

    @staticmethod
    def health() -> _Call[Health]:
        """Liveness."""
        return _Call("GET", "/healthz", Health)

    @staticmethod
    def ready() -> _Call[Readiness]:
        """The readiness report; a not-ready server answers 503 with the same body (no exception)."""
        return _Call("GET", "/readyz", Readiness, ok=(200, 503))

    @staticmethod
    def metrics() -> _Call[str]:
        """The Prometheus metrics text."""
        return _Call("GET", "/metrics", str)


def _raise_for(response: httpx.Response) -> None:
    try:
        err = ErrorResponse.model_validate(response.json())
    except ValueError:
        raise AdvisorAPIError(
            response.status_code,
            "http_error",
            response.text[:500],
            request_id=response.headers.get("x-request-id"),
        ) from None
    raise AdvisorAPIError(
        response.status_code,
        err.code,
        err.detail,
        field=err.field,
        suggestions=err.suggestions,
        errors=err.errors,
        request_id=err.request_id or response.headers.get("x-request-id"),
    )


def _headers(api_key: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    out = {"accept": "application/json", "user-agent": "tuneadvisor-client"}
    out.update(headers or {})
    if api_key:
        out["authorization"] = f"Bearer {api_key}"
    return out


HttpClient = TypeVar("HttpClient", httpx.Client, httpx.AsyncClient)


class _BaseClient(Generic[HttpClient]):
    """What both clients share: the httpx client and its headers, building requests, translating answers."""

    def __init__(self, http: HttpClient, *, owns: bool, api_key: str | None, headers: Mapping[str, str] | None):
        self._owns = owns
        self._http: HttpClient = http
        self._http.headers.update(_headers(api_key, headers))

    def _request(self, call: _Call[Any]) -> httpx.Request:
        return self._http.build_request(call.method, call.path, json=call.body)

    @staticmethod
    def _result(call: _Call[T], response: httpx.Response) -> T:
        """The parsed answer, or AdvisorAPIError for a status the call does not accept."""
        if response.status_code not in call.ok:
            _raise_for(response)
        if call.result is str:
            return response.text  # type: ignore[return-value]
        return call.result.model_validate_json(response.content)  # type: ignore[attr-defined,no-any-return]


def _with_self(method: Callable[..., Any], build: Callable[..., Any]) -> None:
    """The builder's name, docstring and signature (plus `self`) on the client's method."""
    functools.update_wrapper(method, build)
    del method.__wrapped__  # type: ignore[attr-defined]
    sig = inspect.signature(build)
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    returns = str(sig.return_annotation).removeprefix("_Call[").removesuffix("]")  # what the call parses into
    sig = sig.replace(parameters=[this, *sig.parameters.values()], return_annotation=returns)
    method.__signature__ = sig  # type: ignore[attr-defined]


def _blocking(build: Callable[P, _Call[T]]) -> Callable[Concatenate[AdvisorClient, P], T]:
    def method(self: AdvisorClient, *args: P.args, **kwargs: P.kwargs) -> T:
        call = build(*args, **kwargs)
        return self._result(call, self._http.send(self._request(call)))

    _with_self(method, build)
    return method


def _awaitable(build: Callable[P, _Call[T]]) -> Callable[Concatenate[AsyncAdvisorClient, P], Awaitable[T]]:
    async def method(self: AsyncAdvisorClient, *args: P.args, **kwargs: P.kwargs) -> T:
        call = build(*args, **kwargs)
        return self._result(call, await self._http.send(self._request(call)))

    _with_self(method, build)
    return method


class AdvisorClient(_BaseClient[httpx.Client]):
    """Blocking client. Pass `http_client` to reuse your own httpx.Client (its base_url is then used)."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        http = http_client or httpx.Client(base_url=base_url, timeout=timeout)
        super().__init__(http, owns=http_client is None, api_key=api_key, headers=headers)

    def __enter__(self) -> AdvisorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns:
            self._http.close()

    recommend = _blocking(_Requests.recommend)
    estimate = _blocking(_Requests.estimate)
    gpus = _blocking(_Requests.gpus)
    gpu = _blocking(_Requests.gpu)
    models = _blocking(_Requests.models)
    model = _blocking(_Requests.model)
    health = _blocking(_Requests.health)
    ready = _blocking(_Requests.ready)
    metrics = _blocking(_Requests.metrics)


class AsyncAdvisorClient(_BaseClient[httpx.AsyncClient]):
    """The same API as AdvisorClient, awaitable."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        http = http_client or httpx.AsyncClient(base_url=base_url, timeout=timeout)
        super().__init__(http, owns=http_client is None, api_key=api_key, headers=headers)

    async def __aenter__(self) -> AsyncAdvisorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns:
            await self._http.aclose()

    recommend = _awaitable(_Requests.recommend)
    estimate = _awaitable(_Requests.estimate)
    gpus = _awaitable(_Requests.gpus)
    gpu = _awaitable(_Requests.gpu)
    models = _awaitable(_Requests.models)
    model = _awaitable(_Requests.model)
    health = _awaitable(_Requests.health)
    ready = _awaitable(_Requests.ready)
    metrics = _awaitable(_Requests.metrics)
