"""/v1/fine_tuning/jobs: OpenAI's fine-tuning jobs API (its clients work as they are), plus our extensions.

Extensions: ``method`` {type: full | lora | qlora, lora, quantization, gradient_checkpointing, optimizer,
micro_batch_size, num_gpus, sharding, seq_len, packing, chat_format, checkpoint_every_steps}, a
``plan_id`` or ``plan`` from /v1/recommend, ``force`` (start a plan the estimator says will not fit),
and on the job object ``estimate`` (predicted at launch) beside ``measured``.

This module also holds the app-state glue of the job layer (config, store, reconciler) that
``/v1/files`` shares: built and started by this router's lifespan (or by the first request), never
at import or in ``create_app``, so exporting the OpenAPI document touches no disk.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, WithJsonSchema

from advisor.api.auth import ApiKey, require_api_key
from advisor.api.deps import add_readiness_check, set_body_limit
from advisor.api.errors import ApiError, error_responses, request_id_of
from advisor.api.schemas import ErrorResponse, LoraTarget, Optimizer, PlanOut
from advisor.jobs import objects
from advisor.jobs.config import JobsConfig
from advisor.jobs.errors import FileValidationError, JobsError, UnavailableError
from advisor.jobs.manager import JobManager
from advisor.jobs.service import JobRequest, JobService, LoraParams, MethodParams
from advisor.jobs.store import Store

# ---- app state ------------------------------------------------------------------------------------------
_lock = threading.Lock()
MULTIPART_SLACK = 1 << 20


def jobs_state(app: FastAPI) -> JobService:
    """The app's JobService, built and started on first use (idempotent, thread-safe).

    Raises UnavailableError while the data directory does not exist: creating it is `advisor serve`'s
    job (and /readyz says it is missing), not a side effect of building or starting the app."""
    svc: JobService | None = getattr(app.state, "jobs", None)
    if svc is not None and svc.manager.started:
        return svc
    with _lock:
        _register_check(app)
        svc = getattr(app.state, "jobs", None)
        if svc is None:
            cfg = JobsConfig.from_settings(app.state.settings, app.state.service.catalog)
            store = Store(cfg.database_url) if cfg.data_dir.is_dir() else None
            if store is None:
                raise UnavailableError(f"the data directory {cfg.data_dir} does not exist", field="data_dir")
            svc = JobService(cfg, store, app.state.service, JobManager(cfg, store))
            app.state.jobs = svc
        if not svc.manager.started:
            svc.manager.start()
    return svc


def _register_check(app: FastAPI) -> None:
    """The `job_store` readiness check, and the upload body limit of /v1/files (the training file
    limit plus room for the multipart envelope) in place of the service-wide one."""
    if not any(c.name == "job_store" for c in app.state.readiness):
        add_readiness_check(app, "job_store", lambda: _store_check(app))
    limits = getattr(app.state, "body_limits", None)
    if limits is not None and "/v1/files" not in limits:
        set_body_limit(app, "/v1/files", int(app.state.settings.max_file_bytes) + MULTIPART_SLACK)


def _store_check(app: FastAPI) -> tuple[bool, str]:
    try:
        svc = jobs_state(app)
    except JobsError as exc:
        return False, f"job store not started: {exc}"
    ok, detail = svc.store.ping()
    if svc.manager.last_error:
        return False, f"{detail}; reconciler: {svc.manager.last_error}"
    return ok, detail + ("; reconciling" if svc.manager.leader else "; another process reconciles")


def stop_jobs(app: FastAPI) -> None:
    svc: JobService | None = getattr(app.state, "jobs", None)
    if svc is not None:
        svc.manager.stop()
        svc.store.close()
        app.state.jobs = None


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the reconciler with the server (a restart re-adopts running jobs at once); stop it after."""
    try:
        jobs_state(app)
    except UnavailableError:  # /readyz says why; the first request after the fix starts it
        with _lock:
            _register_check(app)
    try:
        yield
    finally:
        stop_jobs(app)


def get_jobs(request: Request) -> JobService:
    try:
        return jobs_state(request.app)
    except JobsError as exc:
        raise ApiError(exc.status, exc.code, str(exc), field=exc.field) from exc


Jobs = Annotated[JobService, Depends(get_jobs)]


def jobs_error(request: Request, exc: JobsError) -> JSONResponse:
    """A JobsError as the service's ErrorResponse, with its extra fields (e.g. `estimate`, `line`)."""
    body = ErrorResponse(
        code=exc.code,
        detail=str(exc),
        field=exc.field,
        errors=[{"field": exc.field, "message": exc.message, "type": exc.code}] if exc.field else [],
        request_id=request_id_of(request),
    ).model_dump(mode="json")
    body.update(exc.extra)
    if isinstance(exc, FileValidationError) and exc.line:
        body["line"] = exc.line
    return JSONResponse(body, status_code=exc.status)


# ---- request and response bodies ---------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


JobId = Annotated[str, Path(max_length=64, description="a fine-tuning job id (ftjob-...)")]
Cursor = Annotated[str | None, Query(max_length=64, description="the last id of the previous page")]


def _auto_or_number(integer: bool, lo: float, hi: float, lo_open: bool = False) -> Any:
    """ "auto" or a number in range, as one type: errors name the field, not a union branch."""
    kind = "an integer" if integer else "a number"
    bound = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"

    def check(v: Any) -> Any:
        if v == "auto":
            return v
        ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok_type or v != v or not (lo < v <= hi if lo_open else lo <= v <= hi):
            raise ValueError(f'must be "auto" or {kind} in {bound}')
        return v

    number = {"type": "integer" if integer else "number", "maximum": hi}
    number["exclusiveMinimum" if lo_open else "minimum"] = lo
    schema = {"anyOf": [{"const": "auto", "type": "string"}, number], "default": "auto"}
    return Annotated[Any, BeforeValidator(check), WithJsonSchema(schema)]


class HyperparametersIn(_Strict):
    n_epochs: _auto_or_number(True, 1, 100) = "auto"  # type: ignore[valid-type]
    batch_size: _auto_or_number(True, 1, 4096) = Field(  # type: ignore[valid-type]
        "auto", description="training sequences per optimiser step (packed sequences when packing is on)"
    )
    learning_rate_multiplier: _auto_or_number(False, 0, 1000, lo_open=True) = Field(  # type: ignore[valid-type]
        "auto", description="scales the method's base rate: full 2e-5, LoRA/QLoRA 2e-4"
    )


class SupervisedIn(_Strict):
    hyperparameters: HyperparametersIn | None = None


class LoraIn(_Strict):
    r: int | None = Field(None, ge=1, le=4096)
    alpha: int | None = Field(None, ge=1, le=65536, description="default 2 x r")
    dropout: float | None = Field(None, ge=0, lt=1, allow_inf_nan=False)
    target_modules: list[LoraTarget] | None = Field(
        None, min_length=1, max_length=64, description="all-linear, roles (q, k, v, o, gate, up, down) or module names"
    )


class QuantizationIn(_Strict):
    bits: Literal[4] = 4
    quant_type: Literal["nf4"] = "nf4"
    double_quant: bool = True


class MethodIn(_Strict):
    """OpenAI's `method` ({type: supervised, supervised: {hyperparameters}}) or ours (type full | lora | qlora)."""

    type: Literal["supervised", "full", "lora", "qlora"] = Field("lora", description="supervised = lora")
    supervised: SupervisedIn | None = None
    lora: LoraIn | None = None
    quantization: QuantizationIn | None = Field(None, description="qlora only: bitsandbytes NF4")
    gradient_checkpointing: bool | None = None
    optimizer: Optimizer | None = Field(None, description="default: paged-adamw-8bit for QLoRA on a GPU, else adamw")
    micro_batch_size: int | None = Field(None, ge=1, le=4096)
    num_gpus: int | None = Field(None, ge=1, le=1024)
    sharding: Literal["none", "ddp", "fsdp"] | None = None
    seq_len: int | None = Field(None, ge=8, le=1_048_576, description="training sequence length (default 2048)")
    packing: bool = Field(True, description="concatenate examples into seq_len blocks")
    chat_format: Literal["auto", "template", "plain"] = "auto"
    checkpoint_every_steps: int | None = Field(None, ge=1, le=10_000_000, description="default: every epoch")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, allow_inf_nan=False)


MetaKey = Annotated[str, StringConstraints(min_length=1, max_length=64)]
MetaValue = Annotated[str, StringConstraints(max_length=512)]


class JobCreate(_Strict):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "/models/tiny-llama",
                    "training_file": "file-abc123",
                    "hyperparameters": {"n_epochs": 3},
                    "method": {"type": "qlora", "lora": {"r": 16}},
                }
            ]
        },
    )

    model: str = Field(
        min_length=1, max_length=512, description="catalog model / Hugging Face id, or a local directory"
    )
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, min_length=1, max_length=64)
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[MetaKey, MetaValue] | None = Field(None, max_length=16)
    hyperparameters: HyperparametersIn | None = None
    method: MethodIn | None = None
    plan_id: str | None = Field(None, pattern=r"^plan_[0-9a-f]{16}$", description="a plan id from /v1/recommend")
    plan: PlanOut | None = Field(None, description="a plan object from /v1/recommend, posted back unchanged")
    force: bool = Field(False, description="start even when the estimator says the plan does not fit")
    integrations: list[Any] | None = Field(None, max_length=0, description="not supported (must be empty)")


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["fine_tuning.job"]
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: Literal["validating_files", "queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None
    metadata: dict[str, str] | None
    method: dict[str, Any] | None = Field(description="the method run (full | lora | qlora and its settings)")
    plan_id: str | None
    plan: dict[str, Any] | None
    estimate: dict[str, Any] | None = Field(description="what the estimator predicted at launch")
    measured: dict[str, Any] | None = Field(description="what the run measured, with `vs_estimate` ratios")
    progress: dict[str, Any] | None


class JobList(BaseModel):
    object: Literal["list"]
    data: list[FineTuningJob]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"]
    created_at: int
    level: str
    message: str
    data: dict[str, Any] | None
    type: Literal["message", "metrics"]


class EventList(BaseModel):
    object: Literal["list"]
    data: list[JobEvent]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class Checkpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"]
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int


class CheckpointList(BaseModel):
    object: Literal["list"]
    data: list[Checkpoint]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


def to_request(body: JobCreate) -> JobRequest:
    """The validated body as the job layer's dataclass; method.supervised.hyperparameters wins over the
    deprecated top-level hyperparameters, as in OpenAI's API."""
    m = body.method or MethodIn()
    hp = (m.supervised.hyperparameters if m.supervised and m.supervised.hyperparameters else None) or (
        body.hyperparameters or HyperparametersIn()
    )
    lora = m.lora or LoraIn()
    return JobRequest(
        model=body.model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        suffix=body.suffix,
        seed=body.seed,
        metadata=dict(body.metadata) if body.metadata else None,
        n_epochs=hp.n_epochs,
        batch_size=hp.batch_size,
        learning_rate_multiplier=hp.learning_rate_multiplier,
        method=MethodParams(
            type=None if body.method is None else m.type,
            lora=LoraParams(
                lora.r, lora.alpha, lora.dropout, tuple(lora.target_modules) if lora.target_modules else None
            ),
            quantization=m.quantization.model_dump() if m.quantization else None,
            gradient_checkpointing=m.gradient_checkpointing,
            optimizer=m.optimizer,
            micro_batch_size=m.micro_batch_size,
            num_gpus=m.num_gpus,
            sharding=m.sharding,
            seq_len=m.seq_len,
            packing=m.packing,
            chat_format=m.chat_format,
            checkpoint_every_steps=m.checkpoint_every_steps,
            warmup_ratio=m.warmup_ratio,
        ),
        plan_id=body.plan_id,
        plan=body.plan.model_dump() if body.plan else None,
        force=body.force,
    )


# ---- routes ---------------------------------------------------------------------------------------------------
router = APIRouter(
    prefix="/v1/fine_tuning",
    tags=["fine-tuning"],
    dependencies=[Depends(require_api_key)],
    responses=error_responses(401),
    lifespan=lifespan,
)

_JOB_ERRORS: dict[int | str, dict[str, Any]] = {
    **error_responses(404, 409, 422),
    409: {"model": ErrorResponse, "description": "the plan does not fit (`estimate` has the breakdown), or a conflict"},
}


@router.post(
    "/jobs",
    operation_id="createFineTuningJob",
    summary="Create a fine-tuning job (checked against the estimator first)",
    response_model=FineTuningJob,
    responses=_JOB_ERRORS,
)
def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    caller: ApiKey,
    jobs: Jobs,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)] = None,
) -> Any:
    """The job starts as `validating_files`, is `queued` until its devices are free, then `running`.
    A plan the estimator says will not fit the deployment's device is refused with 409 and the
    breakdown (`estimate`), unless `force` is true. Repeating a request with the same
    `Idempotency-Key` returns the first job (header `Idempotent-Replayed: true`)."""
    try:
        row, created = jobs.create(to_request(body), caller.key_id, idempotency_key)
    except JobsError as exc:
        return jobs_error(request, exc)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return objects.job_object(row)


@router.get(
    "/jobs",
    operation_id="listFineTuningJobs",
    summary="List your fine-tuning jobs, newest first",
    response_model=JobList,
)
def list_jobs(
    request: Request,
    caller: ApiKey,
    jobs: Jobs,
    after: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Any:
    """Cursor pages as in OpenAI's API; `metadata[key]=value` query parameters filter on metadata."""
    meta = {k[9:-1]: v for k, v in request.query_params.items() if k.startswith("metadata[") and k.endswith("]")}
    rows, more = jobs.store.list_jobs(caller.key_id, after=after, limit=limit, metadata_filter=meta or None)
    return objects.page([objects.job_object(r) for r in rows], more)


@router.get(
    "/jobs/{fine_tuning_job_id}",
    operation_id="retrieveFineTuningJob",
    summary="One job: status, error, prediction and measurement",
    response_model=FineTuningJob,
    responses=error_responses(404),
)
def get_job(fine_tuning_job_id: JobId, request: Request, caller: ApiKey, jobs: Jobs) -> Any:
    try:
        return objects.job_object(jobs.job(caller.key_id, fine_tuning_job_id))
    except JobsError as exc:
        return jobs_error(request, exc)


@router.post(
    "/jobs/{fine_tuning_job_id}/cancel",
    operation_id="cancelFineTuningJob",
    summary="Cancel a job (a running one goes through `cancelling`)",
    response_model=FineTuningJob,
    responses=error_responses(404, 409),
)
def cancel_job(fine_tuning_job_id: JobId, request: Request, caller: ApiKey, jobs: Jobs) -> Any:
    """A queued job is cancelled at once; a running one gets SIGTERM (SIGKILL after the grace period)
    and is `cancelling` until its process has ended."""
    try:
        return objects.job_object(jobs.cancel(caller.key_id, fine_tuning_job_id))
    except JobsError as exc:
        return jobs_error(request, exc)


@router.get(
    "/jobs/{fine_tuning_job_id}/events",
    operation_id="listFineTuningEvents",
    summary="A job's events, newest first (metrics events carry step, loss, learning rate, tokens/s, peak memory)",
    response_model=EventList,
    responses=error_responses(404),
)
def list_events(
    fine_tuning_job_id: JobId,
    request: Request,
    caller: ApiKey,
    jobs: Jobs,
    after: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    order: Annotated[Literal["asc", "desc"], Query(description="desc (OpenAI's) or asc to follow a log")] = "desc",
) -> Any:
    try:
        jobs.job(caller.key_id, fine_tuning_job_id)
    except JobsError as exc:
        return jobs_error(request, exc)
    rows, more = jobs.store.list_events(fine_tuning_job_id, after=after, limit=limit, order=order)
    return objects.page([objects.event_object(r) for r in rows], more)


@router.get(
    "/jobs/{fine_tuning_job_id}/checkpoints",
    operation_id="listFineTuningCheckpoints",
    summary="A job's checkpoints, newest first (the last few are kept)",
    response_model=CheckpointList,
    responses=error_responses(404),
)
def list_checkpoints(
    fine_tuning_job_id: JobId,
    request: Request,
    caller: ApiKey,
    jobs: Jobs,
    after: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> Any:
    try:
        job = jobs.job(caller.key_id, fine_tuning_job_id)
    except JobsError as exc:
        return jobs_error(request, exc)
    rows, more = jobs.store.list_checkpoints(fine_tuning_job_id, after=after, limit=limit)
    return objects.page([objects.checkpoint_object(r, job) for r in rows], more)


@router.get(
    "/jobs/{fine_tuning_job_id}/logs",
    operation_id="fineTuningJobLogs",
    summary="The tail of the training process' log (stdout and stderr)",
    response_class=PlainTextResponse,
    responses={**error_responses(404), 200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def job_logs(
    fine_tuning_job_id: JobId,
    request: Request,
    caller: ApiKey,
    jobs: Jobs,
    max_chars: Annotated[int, Query(ge=1, le=1_000_000)] = 20_000,
) -> Any:
    try:
        job = jobs.job(caller.key_id, fine_tuning_job_id)
    except JobsError as exc:
        return jobs_error(request, exc)
    handle = job.get("handle") or {}
    return PlainTextResponse(jobs.manager.launcher.log_tail(handle, max_chars) if handle else "")
