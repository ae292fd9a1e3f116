"""/v1/fine_tuning/jobs: OpenAI's fine-tuning jobs API (its clients work as they are), plus our extensions.

``method`` is OpenAI's: ``{type: supervised, supervised: {hyperparameters}}``; what to run (full | lora |
qlora and their knobs: lora, quantization, gradient_checkpointing, optimizer, micro_batch_size,
num_gpus, sharding, seq_len, packing, chat_format, checkpoint_every_steps, warmup_ratio) goes in its
``advisor`` extension object, and the job object answers the same way. The older form (``type: lora``
with the knobs beside it) is still accepted. Also ours: a ``plan_id`` or ``plan`` from /v1/recommend,
``force`` (start a plan the estimator says will not fit), and on the job object ``estimate``
(predicted at launch) beside ``measured``. Errors answer OpenAI's ``{"error": {...}}`` envelope, 400 for
an invalid request (advisor.api.errors).

The job layer itself (store, reconciler) is background state of the app's lifespan
(advisor.api.background); routes get it as ``jobs: Jobs`` and let its errors raise to the app's handler.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, WithJsonSchema

from advisor.api.auth import ApiKey, require_api_key
from advisor.api.deps import Jobs
from advisor.api.errors import error_responses
from advisor.api.routes.common import page_of, paging, route
from advisor.api.schemas import (
    CheckpointList,
    ErrorResponse,
    EventList,
    FineTuningJob,
    JobList,
    LoraTarget,
    Optimizer,
    PlanOut,
)
from advisor.jobs import objects
from advisor.jobs.errors import JobsError
from advisor.jobs.service import JobRequest, LoraParams, MethodParams
from advisor.methods import METHOD_NAMES


# ---- request and response bodies ---------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


JobId = Annotated[str, Path(max_length=64, description="a fine-tuning job id (ftjob-...)")]


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


class AdvisorMethodKnobs(_Strict):
    """What a supervised job runs: the method (full | lora | qlora ...) and its knobs."""

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


class AdvisorMethodIn(AdvisorMethodKnobs):
    """`method.advisor`: our extension of OpenAI's supervised method."""

    type: Literal[METHOD_NAMES] = Field("lora", description="the training method")  # type: ignore[valid-type]


class MethodIn(AdvisorMethodKnobs):
    """OpenAI's `method` ({type: supervised, supervised: {hyperparameters}, advisor: {type, knobs}}), or the
    older form: type full | lora | qlora with the knobs beside it."""

    type: Literal[("supervised", "dpo", "reinforcement", *METHOD_NAMES)] = Field(  # type: ignore[valid-type]
        "supervised", description="supervised (OpenAI's; what runs is `advisor.type`, default lora)"
    )
    supervised: SupervisedIn | None = None
    advisor: AdvisorMethodIn | None = Field(None, description="what a supervised job runs (our extension)")
    dpo: dict[str, Any] | None = Field(None, description="not supported here (refused)")
    reinforcement: dict[str, Any] | None = Field(None, description="not supported here (refused)")

    def knobs(self) -> tuple[str, AdvisorMethodKnobs]:
        """(method name, its knobs) from either form; mixing them is refused, naming the field."""
        if self.type in ("dpo", "reinforcement"):
            raise JobsError(
                f"method.type {self.type!r} is not supported here: only supervised fine-tuning", field="method.type"
            )
        if self.advisor is None:
            return ("lora" if self.type == "supervised" else self.type), self
        if self.type != "supervised":
            raise JobsError("method.advisor goes with method.type supervised", field="method.advisor")
        beside = sorted(self.model_fields_set & set(AdvisorMethodKnobs.model_fields))
        if beside:
            raise JobsError(
                f"give the method's knobs in method.advisor, not beside it: {', '.join(beside)}",
                field=f"method.{beside[0]}",
            )
        return self.advisor.type, self.advisor


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
    plan_id: str | None = Field(
        None,
        max_length=512,
        pattern=r"^plan_([0-9a-f]{16}|v[0-9]+\.[A-Za-z0-9_-]+)$",
        description="a plan id from /v1/recommend: it encodes the plan, which the job runs as is",
    )
    plan: PlanOut | None = Field(None, description="a plan object from /v1/recommend, posted back unchanged")
    force: bool = Field(False, description="start even when the estimator says the plan does not fit")
    integrations: list[Any] | None = Field(None, max_length=0, description="not supported (must be empty)")


def to_request(body: JobCreate) -> JobRequest:
    """The validated body as the job layer's dataclass; method.supervised.hyperparameters wins over the
    deprecated top-level hyperparameters, as in OpenAI's API."""
    method = body.method or MethodIn()
    kind, m = method.knobs()
    hp = (method.supervised.hyperparameters if method.supervised and method.supervised.hyperparameters else None) or (
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
            type=None if body.method is None else kind,
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
)

_JOB_409 = {
    409: {"model": ErrorResponse, "description": "the plan does not fit (`estimate` has the breakdown), or a conflict"},
}


@route(
    router.post,
    "/jobs",
    "createFineTuningJob",
    "Create a fine-tuning job (checked against the estimator first)",
    FineTuningJob,
    errors=(404, 409, 422),
    responses=_JOB_409,
)
def create_job(
    body: JobCreate,
    response: Response,
    caller: ApiKey,
    jobs: Jobs,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)] = None,
) -> Any:
    """The job starts as `validating_files`, is `queued` until its devices are free, then `running`.
    A plan the estimator says will not fit the deployment's device is refused with 409 and the
    breakdown (`estimate`), unless `force` is true. Repeating a request with the same
    `Idempotency-Key` returns the first job (header `Idempotent-Replayed: true`)."""
    row, created = jobs.create(to_request(body), caller.key_id, idempotency_key)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return objects.job_object(row)


@route(router.get, "/jobs", "listFineTuningJobs", "List your fine-tuning jobs, newest first", JobList)
def list_jobs(
    request: Request,
    caller: ApiKey,
    jobs: Jobs,
    page: paging(20, 100),  # type: ignore[valid-type]
) -> Any:
    """Cursor pages as in OpenAI's API; `metadata[key]=value` query parameters filter on metadata."""
    meta = {k[9:-1]: v for k, v in request.query_params.items() if k.startswith("metadata[") and k.endswith("]")}
    listing = jobs.store.list_jobs(caller.key_id, metadata_filter=meta or None, **page.query)
    return page_of(listing, objects.job_object)


@route(
    router.get,
    "/jobs/{fine_tuning_job_id}",
    "retrieveFineTuningJob",
    "One job: status, error, prediction and measurement",
    FineTuningJob,
    errors=(404,),
)
def get_job(fine_tuning_job_id: JobId, caller: ApiKey, jobs: Jobs) -> Any:
    return objects.job_object(jobs.job(caller.key_id, fine_tuning_job_id))


@route(
    router.post,
    "/jobs/{fine_tuning_job_id}/cancel",
    "cancelFineTuningJob",
    "Cancel a job (a running one goes through `cancelling`)",
    FineTuningJob,
    errors=(404, 409),
)
def cancel_job(fine_tuning_job_id: JobId, caller: ApiKey, jobs: Jobs) -> Any:
    """A queued job is cancelled at once; a running one gets SIGTERM (SIGKILL after the grace period)
    and is `cancelling` until its process has ended."""
    return objects.job_object(jobs.cancel(caller.key_id, fine_tuning_job_id))


@route(
    router.get,
    "/jobs/{fine_tuning_job_id}/events",
    "listFineTuningEvents",
    "A job's events, newest first (metrics events carry step, loss, learning rate, tokens/s, peak memory)",
    EventList,
    errors=(404,),
)
def list_events(
    fine_tuning_job_id: JobId,
    caller: ApiKey,
    jobs: Jobs,
    page: paging(20, 1000, ordered=True),  # type: ignore[valid-type]
) -> Any:
    jobs.job(caller.key_id, fine_tuning_job_id)  # 404 unless the caller's
    listing = jobs.store.list_events(fine_tuning_job_id, **page.query)
    return page_of(listing, objects.event_object)


@route(
    router.get,
    "/jobs/{fine_tuning_job_id}/checkpoints",
    "listFineTuningCheckpoints",
    "A job's checkpoints, newest first (the last few are kept)",
    CheckpointList,
    errors=(404,),
)
def list_checkpoints(
    fine_tuning_job_id: JobId,
    caller: ApiKey,
    jobs: Jobs,
    page: paging(10, 100),  # type: ignore[valid-type]
) -> Any:
    job = jobs.job(caller.key_id, fine_tuning_job_id)
    listing = jobs.store.list_checkpoints(fine_tuning_job_id, **page.query)
    return page_of(listing, lambda row: objects.checkpoint_object(row, job))


@route(
    router.get,
    "/jobs/{fine_tuning_job_id}/logs",
    "fineTuningJobLogs",
    "The tail of the training process' log (stdout and stderr)",
    response_class=PlainTextResponse,
    errors=(404,),
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
def job_logs(
    fine_tuning_job_id: JobId,
    caller: ApiKey,
    jobs: Jobs,
    max_chars: Annotated[int, Query(ge=1, le=1_000_000)] = 20_000,
) -> Any:
    handle = jobs.job(caller.key_id, fine_tuning_job_id).get("handle") or {}
    return PlainTextResponse(jobs.manager.launcher.log_tail(handle, max_chars) if handle else "")


@route(
    router.post,
    "/jobs/{fine_tuning_job_id}/pause",
    "pauseFineTuningJob",
    "Pause a job (a running one checkpoints, then stops; `paused` until resumed)",
    FineTuningJob,
    errors=(404, 409),
)
def pause_job(fine_tuning_job_id: JobId, caller: ApiKey, jobs: Jobs) -> Any:
    """A queued job is paused at once; a running one checkpoints at its next step, then its process stops
    and the job is `paused` (it is `running` until then)."""
    return objects.job_object(jobs.pause(caller.key_id, fine_tuning_job_id))


@route(
    router.post,
    "/jobs/{fine_tuning_job_id}/resume",
    "resumeFineTuningJob",
    "Resume a paused job (queued again; training continues from its last checkpoint and step)",
    FineTuningJob,
    errors=(404, 409),
)
def resume_job(fine_tuning_job_id: JobId, caller: ApiKey, jobs: Jobs) -> Any:
    """The job goes back to `queued`; its run loads the last checkpoint (weights, optimiser state, step)."""
    return objects.job_object(jobs.resume(caller.key_id, fine_tuning_job_id))
