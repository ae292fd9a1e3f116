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
``_BaseClient`` holds every endpoint once, as its request builder (whose signature and docstring are
the public method's), turns a built call into an httpx request and an httpx response into the result
or an AdvisorAPIError; AdvisorClient and AsyncAdvisorClient only send, blocking or awaited.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, TypeVar, overload
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from advisor.api.schemas import (
    CheckpointList,
    ConstraintsIn,
    ErrorResponse,
    EstimateRequest,
    EstimateResponse,
    EventList,
    FieldError,
    FileDeleted,
    FileList,
    FileObject,
    FineTuningJob,
    GpuList,
    GpuOut,
    Health,
    InlineModelConfig,
    JobList,
    ModelList,
    ModelOut,
    OpenAIErrorResponse,
    OpenAIModel,
    OpenAIModelList,
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

#: a model: a catalog name, Hugging Face id or size, or an inline config (as a mapping or InlineModelConfig)
ModelLike = str | Mapping[str, Any] | InlineModelConfig
#: a workload (dataset_tokens, seq_len, epochs), as a mapping or WorkloadIn; None: the server's defaults
WorkloadLike = WorkloadIn | Mapping[str, Any] | None
#: measured convergence factors by method; None: the server's
ConvergenceLike = Mapping[str, float] | None


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
    params: dict[str, Any] | None = None
    files: dict[str, tuple[str, bytes]] | None = None  # a multipart upload (with `body` as its form fields)
    headers: dict[str, str] | None = None


def _dump(model: BaseModel) -> dict[str, Any]:
    # exclude_unset: what the caller left out stays out, so the server states its defaults
    return model.model_dump(mode="json", by_alias=True, exclude_unset=True)


def _as(cls: type[M], value: M | Mapping[str, Any] | None) -> M | None:
    if value is None or isinstance(value, cls):
        return value
    return cls.model_validate(value)


def _model_ref(model: ModelLike) -> str | InlineModelConfig:
    return model if isinstance(model, (str, InlineModelConfig)) else InlineModelConfig.model_validate(dict(model))


def _given(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


_READY_DOC = "The readiness report; a not-ready server answers 503 with the same body (no exception)."


def _get(name: str, path: str, result: type[T], doc: str, *, ok: tuple[int, ...] = (200,)) -> Callable[[], _Call[T]]:
    """The builder of a GET without parameters."""

    def build() -> _Call[T]:
        return _Call("GET", path, result, ok=ok)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc
    build.__annotations__["return"] = f"_Call[{result.__name__}]"
    return build


def _raise_for(response: httpx.Response) -> None:
    """The one translation of an error answer: an ErrorResponse (advice routes) or OpenAI's envelope
    (/v1/fine_tuning, /v1/files, /v1/models) both raise AdvisorAPIError with the same fields."""
    request_id = response.headers.get("x-request-id")
    try:
        doc = response.json()
        if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
            e = OpenAIErrorResponse.model_validate(doc).error
            err = ErrorResponse(
                code=e.code or e.type,
                detail=e.message,
                field=e.param,
                suggestions=e.suggestions,
                errors=e.errors,
                request_id=e.request_id,
            )
        else:
            err = ErrorResponse.model_validate(doc)
    except ValueError:
        raise AdvisorAPIError(response.status_code, "http_error", response.text[:500], request_id=request_id) from None
    raise AdvisorAPIError(
        response.status_code,
        err.code,
        err.detail,
        field=err.field,
        suggestions=err.suggestions,
        errors=err.errors,
        request_id=err.request_id or request_id,
    )


def _job_path(job_id: str, tail: str = "") -> str:
    return "/v1/fine_tuning/jobs/" + quote(job_id, safe="") + tail


def _page(after: str | None, limit: int | None, **more: Any) -> dict[str, Any]:
    return _given(after=after, limit=limit, **more)


def _headers(api_key: str | None, headers: Mapping[str, str] | None) -> dict[str, str]:
    out = {"accept": "application/json", "user-agent": "tuneadvisor-client"}
    out.update(headers or {})
    if api_key:
        out["authorization"] = f"Bearer {api_key}"
    return out


def _with_self(method: Callable[..., Any], build: Callable[..., Any]) -> None:
    """The builder's name, docstring and signature (plus `self`) on a client's method."""
    functools.update_wrapper(method, build)
    del method.__wrapped__  # type: ignore[attr-defined]
    sig = inspect.signature(build)
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    returns = str(sig.return_annotation).removeprefix("_Call[").removesuffix("]")  # what the call parses into
    sig = sig.replace(parameters=[this, *sig.parameters.values()], return_annotation=returns)
    method.__signature__ = sig  # type: ignore[attr-defined]


class _Endpoint(Generic[P, T]):
    """An endpoint of both clients, from its request builder: on AdvisorClient a blocking method, on
    AsyncAdvisorClient a coroutine method (each class's ``_method`` makes it; made once per class)."""

    def __init__(self, build: Callable[P, _Call[T]]):
        self.build = build
        self._methods: dict[type, Callable[..., Any]] = {}

    @overload
    def __get__(self, obj: None, owner: type) -> Callable[..., Any]: ...
    @overload
    def __get__(self, obj: AdvisorClient, owner: type) -> Callable[P, T]: ...
    @overload
    def __get__(self, obj: AsyncAdvisorClient, owner: type) -> Callable[P, Awaitable[T]]: ...
    def __get__(self, obj: Any, owner: type) -> Callable[..., Any]:
        method = self._methods.get(owner)
        if method is None:
            method = self._methods[owner] = owner._method(self.build)  # type: ignore[attr-defined]
            _with_self(method, self.build)
        return method if obj is None else types.MethodType(method, obj)


HttpClient = TypeVar("HttpClient", httpx.Client, httpx.AsyncClient)


class _BaseClient(Generic[HttpClient]):
    """What both clients share: the httpx client and its headers, the endpoints and their request
    builders (validated with the service's own schemas before anything is sent), the translation of
    an answer into its result or an AdvisorAPIError. A subclass only says how a call is sent."""

    _http_class: type[HttpClient]

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        http_client: HttpClient | None = None,
    ) -> None:
        """`http_client`: your own httpx client to reuse (its base_url is then used; it stays open)."""
        self._owns = http_client is None
        self._http: HttpClient = http_client or self._http_class(base_url=base_url, timeout=timeout)
        self._http.headers.update(_headers(api_key, headers))

    def _request(self, call: _Call[Any]) -> httpx.Request:
        if call.files is not None:
            return self._http.build_request(
                call.method, call.path, data=call.body, files=call.files, params=call.params, headers=call.headers
            )
        return self._http.build_request(
            call.method, call.path, json=call.body, params=call.params, headers=call.headers
        )

    @staticmethod
    def _result(call: _Call[T], response: httpx.Response) -> T:
        """The parsed answer, or AdvisorAPIError for a status the call does not accept."""
        if response.status_code not in call.ok:
            _raise_for(response)
        if call.result is str:
            return response.text  # type: ignore[return-value]
        return call.result.model_validate_json(response.content)  # type: ignore[attr-defined,no-any-return]

    @classmethod
    def _method(cls, build: Callable[..., _Call[Any]]) -> Callable[..., Any]:
        """The method (self, *args) that builds a call with `build`, sends it and returns its result."""
        raise NotImplementedError

    # ---- the endpoints ---------------------------------------------------------------------------
    @_Endpoint
    def recommend(
        model: ModelLike,
        gpu: str | list[str] | None = None,
        *,
        workload: WorkloadLike = None,
        objective: str | None = None,
        constraints: ConstraintsIn | Mapping[str, Any] | None = None,
        dtype: str | None = None,
        limit: int | None = None,
        convergence: ConvergenceLike = None,
        model_revision: str | None = None,
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
            model_revision=model_revision,
        )
        body = RecommendRequest(model=_model_ref(model), **fields)
        return _Call("POST", "/v1/recommend", RecommendResponse, _dump(body))

    @_Endpoint
    def estimate(
        model: ModelLike,
        plan: PlanIn | PlanOut | Mapping[str, Any],
        gpu: str | None = None,
        *,
        workload: WorkloadLike = None,
        claimed_memory_gib: float | None = None,
        source: str | None = None,
        convergence: ConvergenceLike = None,
        model_revision: str | None = None,
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
            model_revision=model_revision,
        )
        body = EstimateRequest(model=_model_ref(model), plan=plan_in, **fields)
        return _Call("POST", "/v1/estimate", EstimateResponse, _dump(body))

    @_Endpoint
    def gpu(gpu_id: str) -> _Call[GpuOut]:
        """One GPU by id or alias."""
        return _Call("GET", "/v1/gpus/" + quote(gpu_id, safe=""), GpuOut)

    @_Endpoint
    def model(model_id: str) -> _Call[ModelOut]:
        """One catalog model by name, Hugging Face id or alias (a Hugging Face id keeps its slash)."""
        return _Call("GET", "/v1/catalog/models/" + quote(model_id, safe="/"), ModelOut)

    # ---- files and fine-tuning jobs (OpenAI's API; an API key is needed) ------------------------------
    @_Endpoint
    def upload_file(filename: str, content: bytes, purpose: str = "fine-tune") -> _Call[FileObject]:
        """Upload a training file (JSONL: chat `messages` or `prompt`/`completion` lines) (POST /v1/files)."""
        return _Call("POST", "/v1/files", FileObject, {"purpose": purpose}, files={"file": (filename, content)})

    @_Endpoint
    def files(after: str | None = None, limit: int | None = None) -> _Call[FileList]:
        """Your uploaded files, newest first."""
        return _Call("GET", "/v1/files", FileList, params=_page(after, limit))

    @_Endpoint
    def delete_file(file_id: str) -> _Call[FileDeleted]:
        """Delete an uploaded file."""
        return _Call("DELETE", "/v1/files/" + quote(file_id, safe=""), FileDeleted)

    @_Endpoint
    def create_job(
        model: str,
        training_file: str,
        *,
        plan_id: str | None = None,
        method: Mapping[str, Any] | None = None,
        hyperparameters: Mapping[str, Any] | None = None,
        validation_file: str | None = None,
        suffix: str | None = None,
        seed: int | None = None,
        metadata: Mapping[str, str] | None = None,
        force: bool | None = None,
        idempotency_key: str | None = None,
    ) -> _Call[FineTuningJob]:
        """Start a fine-tuning job (POST /v1/fine_tuning/jobs): a `plan_id` from recommend runs that plan;
        `method` is OpenAI's ({type: supervised, supervised: {hyperparameters}, advisor: {type: lora, ...}})."""
        body = _given(
            model=model,
            training_file=training_file,
            plan_id=plan_id,
            method=None if method is None else dict(method),
            hyperparameters=None if hyperparameters is None else dict(hyperparameters),
            validation_file=validation_file,
            suffix=suffix,
            seed=seed,
            metadata=None if metadata is None else dict(metadata),
            force=force,
        )
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return _Call("POST", "/v1/fine_tuning/jobs", FineTuningJob, body, headers=headers)

    @_Endpoint
    def jobs(after: str | None = None, limit: int | None = None) -> _Call[JobList]:
        """Your fine-tuning jobs, newest first."""
        return _Call("GET", "/v1/fine_tuning/jobs", JobList, params=_page(after, limit))

    @_Endpoint
    def job(job_id: str) -> _Call[FineTuningJob]:
        """One fine-tuning job: status, progress, error, estimate and measurement."""
        return _Call("GET", _job_path(job_id), FineTuningJob)

    @_Endpoint
    def cancel_job(job_id: str) -> _Call[FineTuningJob]:
        """Cancel a job (a running one goes through `cancelling`)."""
        return _Call("POST", _job_path(job_id, "/cancel"), FineTuningJob)

    @_Endpoint
    def pause_job(job_id: str) -> _Call[FineTuningJob]:
        """Pause a job (a running one checkpoints first)."""
        return _Call("POST", _job_path(job_id, "/pause"), FineTuningJob)

    @_Endpoint
    def resume_job(job_id: str) -> _Call[FineTuningJob]:
        """Resume a paused job from its last checkpoint."""
        return _Call("POST", _job_path(job_id, "/resume"), FineTuningJob)

    @_Endpoint
    def job_events(
        job_id: str, after: str | None = None, limit: int | None = None, order: str | None = None
    ) -> _Call[EventList]:
        """A job's events, newest first (`order="asc"` to follow them as a log)."""
        return _Call("GET", _job_path(job_id, "/events"), EventList, params=_page(after, limit, order=order))

    @_Endpoint
    def job_checkpoints(job_id: str, after: str | None = None, limit: int | None = None) -> _Call[CheckpointList]:
        """A job's checkpoints, newest first, with OpenAI's metrics."""
        return _Call("GET", _job_path(job_id, "/checkpoints"), CheckpointList, params=_page(after, limit))

    @_Endpoint
    def job_logs(job_id: str, max_chars: int | None = None) -> _Call[str]:
        """The tail of the training process' log."""
        return _Call("GET", _job_path(job_id, "/logs"), str, params=_given(max_chars=max_chars))

    @_Endpoint
    def openai_models() -> _Call[OpenAIModelList]:
        """OpenAI's models list: the base models jobs start from and your fine-tuned models."""
        return _Call("GET", "/v1/models", OpenAIModelList)

    @_Endpoint
    def openai_model(model: str) -> _Call[OpenAIModel]:
        """One model of OpenAI's list (a fine-tuned model's id, a Hugging Face id, a local directory)."""
        return _Call("GET", "/v1/models/" + quote(model, safe="/:"), OpenAIModel)

    gpus = _Endpoint(_get("gpus", "/v1/gpus", GpuList, "The GPU catalog."))
    models = _Endpoint(_get("models", "/v1/catalog/models", ModelList, "The model catalog."))
    health = _Endpoint(_get("health", "/healthz", Health, "Liveness: the service answers."))
    ready = _Endpoint(_get("ready", "/readyz", Readiness, _READY_DOC, ok=(200, 503)))
    metrics = _Endpoint(_get("metrics", "/metrics", str, "The Prometheus metrics text."))


class AdvisorClient(_BaseClient[httpx.Client]):
    """Blocking client. Pass `http_client` to reuse your own httpx.Client (its base_url is then used)."""

    _http_class = httpx.Client

    @classmethod
    def _method(cls, build: Callable[..., _Call[Any]]) -> Callable[..., Any]:
        def method(self: AdvisorClient, *args: Any, **kwargs: Any) -> Any:
            call = build(*args, **kwargs)
            return self._result(call, self._http.send(self._request(call)))

        return method

    def __enter__(self) -> AdvisorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns:
            self._http.close()


class AsyncAdvisorClient(_BaseClient[httpx.AsyncClient]):
    """The same API as AdvisorClient, awaitable."""

    _http_class = httpx.AsyncClient

    @classmethod
    def _method(cls, build: Callable[..., _Call[Any]]) -> Callable[..., Any]:
        async def method(self: AsyncAdvisorClient, *args: Any, **kwargs: Any) -> Any:
            call = build(*args, **kwargs)
            return self._result(call, await self._http.send(self._request(call)))

        return method

    async def __aenter__(self) -> AsyncAdvisorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns:
            await self._http.aclose()
