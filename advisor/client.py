"""Typed Python client for the tuneadvisor REST service (sync and async, over httpx).

    from advisor.client import AdvisorClient

    with AdvisorClient("http://127.0.0.1:8000") as client:
        rec = client.recommend("meta-llama/Llama-2-7b-hf", gpu="rtx-4090")
        best = rec.plans[0]
        again = client.estimate("meta-llama/Llama-2-7b-hf", best.plan)  # the same estimate

Requests are validated locally with the service's own schemas (a bad field fails before any
network call, as a pydantic ValidationError); every non-2xx answer raises ``AdvisorAPIError``
with the server's `code`, `field`, `suggestions` and `request_id`. Needs httpx and pydantic only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
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
T = TypeVar("T", bound=BaseModel)


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
class _Call:
    """One request, built the same way by both clients."""

    method: str
    path: str
    body: dict[str, Any] | None = None
    ok: tuple[int, ...] = (200,)


def _dump(model: BaseModel) -> dict[str, Any]:
    # exclude_unset: what the caller left out stays out, so the server states its defaults
    return model.model_dump(mode="json", by_alias=True, exclude_unset=True)


def _as(cls: type[T], value: T | Mapping[str, Any] | None) -> T | None:
    if value is None or isinstance(value, cls):
        return value
    return cls.model_validate(value)


def _model_ref(model: str | Mapping[str, Any] | InlineModelConfig) -> str | InlineModelConfig:
    return model if isinstance(model, (str, InlineModelConfig)) else InlineModelConfig.model_validate(dict(model))


def _recommend_call(
    model: str | Mapping[str, Any] | InlineModelConfig,
    gpu: str | list[str] | None,
    workload: WorkloadIn | Mapping[str, Any] | None,
    objective: str | None,
    constraints: ConstraintsIn | Mapping[str, Any] | None,
    dtype: str | None,
    limit: int | None,
    convergence: Mapping[str, float] | None,
) -> _Call:
    fields: dict[str, Any] = {"model": _model_ref(model)}
    optional = {
        "gpu": gpu,
        "workload": _as(WorkloadIn, workload),
        "objective": objective,
        "constraints": _as(ConstraintsIn, constraints),
        "dtype": dtype,
        "limit": limit,
        "convergence": None if convergence is None else dict(convergence),
    }
    fields.update({k: v for k, v in optional.items() if v is not None})
    return _Call("POST", "/v1/recommend", _dump(RecommendRequest(**fields)))


def _estimate_call(
    model: str | Mapping[str, Any] | InlineModelConfig,
    plan: PlanIn | PlanOut | Mapping[str, Any],
    gpu: str | None,
    workload: WorkloadIn | Mapping[str, Any] | None,
    claimed_memory_gib: float | None,
    source: str | None,
    convergence: Mapping[str, float] | None,
) -> _Call:
    if isinstance(plan, PlanOut):  # a plan from a recommendation, posted back as is
        plan_in = PlanIn.model_validate(plan.model_dump(mode="json"))
    else:
        plan_in = _as(PlanIn, plan)
    fields: dict[str, Any] = {"model": _model_ref(model), "plan": plan_in}
    optional = {
        "gpu": gpu,
        "workload": _as(WorkloadIn, workload),
        "claimed_memory_gib": claimed_memory_gib,
        "source": source,
        "convergence": None if convergence is None else dict(convergence),
    }
    fields.update({k: v for k, v in optional.items() if v is not None})
    return _Call("POST", "/v1/estimate", _dump(EstimateRequest(**fields)))


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


def _parse(response: httpx.Response, call: _Call, cls: type[T]) -> T:
    if response.status_code not in call.ok:
        _raise_for(response)
    return cls.model_validate_json(response.content)


def _headers(api_key: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    out = {"accept": "application/json", "user-agent": "tuneadvisor-client"}
    out.update(headers or {})
    if api_key:
        out["authorization"] = f"Bearer {api_key}"
    return out


class AdvisorClient:
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
        self._owns = http_client is None
        self._http = http_client or httpx.Client(base_url=base_url, timeout=timeout)
        self._http.headers.update(_headers(api_key, headers))

    def __enter__(self) -> AdvisorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns:
            self._http.close()

    def _send(self, call: _Call) -> httpx.Response:
        return self._http.request(call.method, call.path, json=call.body)

    # ---- advice ---------------------------------------------------------------------------------
    def recommend(
        self,
        model: str | Mapping[str, Any] | InlineModelConfig,
        gpu: str | list[str] | None = None,
        *,
        workload: WorkloadIn | Mapping[str, Any] | None = None,
        objective: str | None = None,
        constraints: ConstraintsIn | Mapping[str, Any] | None = None,
        dtype: str | None = None,
        limit: int | None = None,
        convergence: Mapping[str, float] | None = None,
    ) -> RecommendResponse:
        call = _recommend_call(model, gpu, workload, objective, constraints, dtype, limit, convergence)
        return _parse(self._send(call), call, RecommendResponse)

    def estimate(
        self,
        model: str | Mapping[str, Any] | InlineModelConfig,
        plan: PlanIn | PlanOut | Mapping[str, Any],
        gpu: str | None = None,
        *,
        workload: WorkloadIn | Mapping[str, Any] | None = None,
        claimed_memory_gib: float | None = None,
        source: str | None = None,
        convergence: Mapping[str, float] | None = None,
    ) -> EstimateResponse:
        call = _estimate_call(model, plan, gpu, workload, claimed_memory_gib, source, convergence)
        return _parse(self._send(call), call, EstimateResponse)

    # ---- catalogs -------------------------------------------------------------------------------
    def gpus(self) -> GpuList:
        call = _Call("GET", "/v1/gpus")
        return _parse(self._send(call), call, GpuList)

    def gpu(self, gpu_id: str) -> GpuOut:
        call = _Call("GET", "/v1/gpus/" + quote(gpu_id, safe=""))
        return _parse(self._send(call), call, GpuOut)

    def models(self) -> ModelList:
        call = _Call("GET", "/v1/models")
        return _parse(self._send(call), call, ModelList)

    def model(self, model_id: str) -> ModelOut:
        call = _Call("GET", "/v1/models/" + quote(model_id, safe="/"))
        return _parse(self._send(call), call, ModelOut)

    # ---- operations -----------------------------------------------------------------------------
    def health(self) -> Health:
        call = _Call("GET", "/healthz")
        return _parse(self._send(call), call, Health)

    def ready(self) -> Readiness:
        """The readiness report; a not-ready server answers 503 with the same body (no exception)."""
        call = _Call("GET", "/readyz", ok=(200, 503))
        return _parse(self._send(call), call, Readiness)

    def metrics(self) -> str:
        response = self._http.get("/metrics")
        if response.status_code != 200:
            _raise_for(response)
        return response.text


class AsyncAdvisorClient:
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
        self._owns = http_client is None
        self._http = http_client or httpx.AsyncClient(base_url=base_url, timeout=timeout)
        self._http.headers.update(_headers(api_key, headers))

    async def __aenter__(self) -> AsyncAdvisorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns:
            await self._http.aclose()

    async def _send(self, call: _Call) -> httpx.Response:
        return await self._http.request(call.method, call.path, json=call.body)

    async def recommend(
        self,
        model: str | Mapping[str, Any] | InlineModelConfig,
        gpu: str | list[str] | None = None,
        *,
        workload: WorkloadIn | Mapping[str, Any] | None = None,
        objective: str | None = None,
        constraints: ConstraintsIn | Mapping[str, Any] | None = None,
        dtype: str | None = None,
        limit: int | None = None,
        convergence: Mapping[str, float] | None = None,
    ) -> RecommendResponse:
        call = _recommend_call(model, gpu, workload, objective, constraints, dtype, limit, convergence)
        return _parse(await self._send(call), call, RecommendResponse)

    async def estimate(
        self,
        model: str | Mapping[str, Any] | InlineModelConfig,
        plan: PlanIn | PlanOut | Mapping[str, Any],
        gpu: str | None = None,
        *,
        workload: WorkloadIn | Mapping[str, Any] | None = None,
        claimed_memory_gib: float | None = None,
        source: str | None = None,
        convergence: Mapping[str, float] | None = None,
    ) -> EstimateResponse:
        call = _estimate_call(model, plan, gpu, workload, claimed_memory_gib, source, convergence)
        return _parse(await self._send(call), call, EstimateResponse)

    async def gpus(self) -> GpuList:
        call = _Call("GET", "/v1/gpus")
        return _parse(await self._send(call), call, GpuList)

    async def gpu(self, gpu_id: str) -> GpuOut:
        call = _Call("GET", "/v1/gpus/" + quote(gpu_id, safe=""))
        return _parse(await self._send(call), call, GpuOut)

    async def models(self) -> ModelList:
        call = _Call("GET", "/v1/models")
        return _parse(await self._send(call), call, ModelList)

    async def model(self, model_id: str) -> ModelOut:
        call = _Call("GET", "/v1/models/" + quote(model_id, safe="/"))
        return _parse(await self._send(call), call, ModelOut)

    async def health(self) -> Health:
        call = _Call("GET", "/healthz")
        return _parse(await self._send(call), call, Health)

    async def ready(self) -> Readiness:
        call = _Call("GET", "/readyz", ok=(200, 503))
        return _parse(await self._send(call), call, Readiness)

    async def metrics(self) -> str:
        response = await self._http.get("/metrics")
        if response.status_code != 200:
            _raise_for(response)
        return response.text
