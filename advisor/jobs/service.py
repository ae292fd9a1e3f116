"""Job requests -> checked, stored jobs; and the file, event and checkpoint queries behind the routes.

Why all the checks happen here, before a row exists: a job that cannot run (unknown model, a path
outside the allowed roots, a plan the estimator says will not fit, a batch that does not split) must
be refused with a 4xx naming the field, not accepted and failed a minute later. The estimator check
is the same ``AdvisorService.estimate`` that ``/v1/estimate`` answers with, so the refusal carries
the breakdown a user already knows how to read; ``force`` starts the job anyway.

Plans: a ``plan_id`` from ``/v1/recommend`` encodes its plan (``plan_v2.<base64url of its fields>``,
``advisor.plans.decode_plan_id``): it decodes to the whole plan, and method fields given beside it must agree
with it; an old hash id is answered 404 (ask /v1/recommend again). A full ``plan`` object from a recommend
response is accepted as well and checked against its id.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from advisor.api import views
from advisor.catalog import model_from_config
from advisor.errors import InvalidInputError
from advisor.jobs import store as S
from advisor.jobs.config import JobsConfig
from advisor.jobs.errors import ConflictError, JobsError, ModelSourceError, NotFoundError, PlanDoesNotFitError
from advisor.jobs.files import save_upload
from advisor.jobs.manager import PAUSED, JobManager
from advisor.jobs.spec import HF_ID, JobSpec, ModelSource, local_model_source, new_id, resolve_hyperparameters
from advisor.jobs.train import PAUSE
from advisor.launchable import LaunchTarget
from advisor.methods import METHOD_NAMES, get_method
from advisor.plans import PlanIdError, TrainingPlan, decode_plan_id, make_plan, resolve_targets
from advisor.service import AdvisorService
from advisor.specs import GpuSpec, ModelSpec
from advisor.units import GIB

FINE_TUNE = "fine-tune"
#: sequence lengths tried when re-deriving a plan id without one given (recommend's default first)
#: TrainingPlan field -> the request field a user set it with
PLAN_FIELDS = {
    "method": "method.type",
    "micro_batch": "method.micro_batch_size",
    "seq_len": "method.seq_len",
    "plan.seq_len": "method.seq_len",
    "optimizer": "method.optimizer",
    "num_gpus": "method.num_gpus",
    "sharding": "method.sharding",
    "lora_r": "method.lora.r",
    "lora_alpha": "method.lora.alpha",
    "lora_dropout": "method.lora.dropout",
    "lora_targets": "method.lora.target_modules",
    "grad_accum": "hyperparameters.batch_size",
}
_FILENAME_BAD = re.compile(r"[\x00-\x1f\x7f/\\]")


@dataclass(frozen=True)
class LoraParams:
    r: int | None = None
    alpha: int | None = None
    dropout: float | None = None
    target_modules: tuple[str, ...] | None = None


@dataclass(frozen=True)
class MethodParams:
    """Our `method` extension; every None means "the plan's (or the default) value"."""

    type: str | None = None  # full | lora | qlora (OpenAI's "supervised" = the default, lora)
    lora: LoraParams = field(default_factory=LoraParams)
    quantization: dict[str, Any] | None = None  # {bits: 4, quant_type: nf4, double_quant: bool}
    gradient_checkpointing: bool | None = None
    optimizer: str | None = None
    micro_batch_size: int | None = None
    num_gpus: int | None = None
    sharding: str | None = None
    seq_len: int | None = None
    packing: bool = True
    chat_format: str = "auto"
    checkpoint_every_steps: int | None = None
    warmup_ratio: float | None = None


@dataclass(frozen=True)
class JobRequest:
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None
    n_epochs: int | str = "auto"
    batch_size: int | str = "auto"
    learning_rate_multiplier: float | str = "auto"
    method: MethodParams = field(default_factory=MethodParams)
    plan_id: str | None = None
    plan: dict[str, Any] | None = None
    force: bool = False

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()


def _invalid(exc: InvalidInputError, default_field: str = "method") -> JobsError:
    f = PLAN_FIELDS.get(exc.field or "", exc.field or default_field)
    return JobsError(exc.message, field=f)


class JobService:
    def __init__(self, cfg: JobsConfig, store: S.Store, advisor: AdvisorService, manager: JobManager):
        self.cfg = cfg
        self.store = store
        self.advisor = advisor
        self.manager = manager

    def launch_target(self) -> LaunchTarget:
        """What this service's launcher can run: a local launcher's device slots bound the plan's GPUs; a Ray
        cluster queues a job until its GPUs are free (no bound here)."""
        launcher = self.manager.launcher
        slots = getattr(launcher, "slots", None)  # only the local launcher has fixed slots
        return LaunchTarget(launcher.name, len(slots) if slots is not None else None)

    # ---- files ----------------------------------------------------------------------------------------
    def upload(self, owner: str, filename: str, purpose: str, src: BinaryIO) -> dict[str, Any]:
        if purpose != FINE_TUNE:
            raise JobsError(f"purpose must be {FINE_TUNE!r}", field="purpose")
        name = _FILENAME_BAD.sub("_", Path(filename or "upload.jsonl").name)[:255] or "upload.jsonl"
        fid = new_id("file")
        dest = self.cfg.files_dir / f"{fid}.jsonl"
        stats = save_upload(src, dest, self.cfg.max_file_bytes, self.cfg.max_file_examples)
        try:
            return self.store.add_file(
                {
                    "id": fid,
                    "owner": owner,
                    "filename": name,
                    "purpose": purpose,
                    "bytes": stats.bytes,
                    "examples": stats.examples,
                    "format": stats.format,
                    "sha256": stats.sha256,
                    "path": str(dest),
                }
            )
        except Exception:
            dest.unlink(missing_ok=True)  # no row, no file
            raise

    def file(self, owner: str, file_id: str) -> dict[str, Any]:
        row = self.store.get_file(file_id, owner)
        if row is None:
            raise NotFoundError(f"no file {file_id!r}", field="file_id")
        return row

    def delete_file(self, owner: str, file_id: str) -> dict[str, Any]:
        self.file(owner, file_id)
        user = self.store.file_in_use(file_id)
        if user:
            raise ConflictError(f"file {file_id} is used by the active job {user}", field="file_id")
        # the data first: on a full disk that frees the space the database needs to record the delete (a
        # retried DELETE finds the row, the file already gone, and finishes)
        Path(self.file(owner, file_id)["path"]).unlink(missing_ok=True)
        row = self.store.delete_file(file_id, owner)
        if row is None:
            raise NotFoundError(f"no file {file_id!r}", field="file_id")
        return row

    # ---- jobs -------------------------------------------------------------------------------------------
    def job(self, owner: str, job_id: str) -> dict[str, Any]:
        row = self.store.get_job(job_id, owner)
        if row is None:
            raise NotFoundError(f"no fine-tuning job {job_id!r}", field="fine_tuning_job_id")
        return row

    def create(self, req: JobRequest, owner: str, idempotency_key: str | None = None) -> tuple[dict[str, Any], bool]:
        """(job row, created). The same Idempotency-Key with the same body returns the first job."""
        digest = req.digest()
        if idempotency_key:
            existing = self.store.job_by_idempotency_key(owner, idempotency_key)
            if existing is not None:
                if existing["request_hash"] != digest:
                    raise ConflictError(
                        "this Idempotency-Key was used with a different request body", field="Idempotency-Key"
                    )
                return existing, False
        train = self._training_file(owner, req.training_file, "training_file")
        valid = self._training_file(owner, req.validation_file, "validation_file") if req.validation_file else None
        source, model = self._model(req.model)
        gpu = self.cfg.gpu
        base, plan_id, notes = self._plan(req, model, gpu)
        if base.sharding == "fsdp" and base.num_gpus > 1 and gpu.gpu_class == "cpu":
            raise JobsError(
                "FSDP needs GPUs: accelerate gives a group of CPU processes DDP, so this job would not train what the "
                "plan says. To fix: method.sharding ddp",
                field="method.sharding",
            )
        devices = self.launch_target().devices
        if devices is not None and base.num_gpus > devices:
            raise JobsError(
                f"the plan needs {base.num_gpus} devices; this deployment has {devices} device"
                + ("s" if devices != 1 else ""),
                field="method.num_gpus",
            )
        try:
            hp = resolve_hyperparameters(
                base.method,
                int(train["examples"]),
                req.n_epochs,
                req.batch_size,
                req.learning_rate_multiplier,
                micro_batch=(req.method.micro_batch_size or (base.micro_batch if (req.plan_id or req.plan) else None)),
                world=base.num_gpus,
            )
            plan = replace(base, micro_batch=hp.micro_batch, grad_accum=hp.grad_accum)
        except InvalidInputError as exc:
            raise _invalid(exc, "hyperparameters") from exc
        estimate = self._estimate(model, gpu, plan, req.force)
        job_id = new_id("ftjob")
        m = req.method
        try:
            spec = JobSpec(
                job_id=job_id,
                model=req.model,
                source=source,
                plan=plan,
                training_file=train["path"],
                validation_file=valid["path"] if valid else None,
                n_epochs=hp.n_epochs,
                batch_size=hp.batch_size,
                learning_rate=hp.learning_rate,
                seed=req.seed if req.seed is not None else 42,
                device=self.cfg.device,
                packing=m.packing,
                chat_format=m.chat_format,
                checkpoint_every_steps=m.checkpoint_every_steps,
                warmup_ratio=m.warmup_ratio if m.warmup_ratio is not None else 0.03,
                allow_download=self.cfg.allow_download,
                suffix=req.suffix,
                notes=tuple(notes) + hp.chosen,
            )
        except InvalidInputError as exc:
            raise _invalid(exc) from exc
        row, created = self.store.add_job(
            {
                "id": job_id,
                "owner": owner,
                "status": S.VALIDATING,
                "model": req.model,
                "training_file": req.training_file,
                "validation_file": req.validation_file,
                "suffix": req.suffix,
                "seed": spec.seed,
                "metadata": req.metadata,
                "hyperparameters": {
                    "n_epochs": hp.n_epochs,
                    "batch_size": hp.batch_size,
                    "learning_rate_multiplier": hp.learning_rate_multiplier,
                },
                "method": _method_out(plan, spec),
                "plan_id": plan_id,
                "spec": spec.to_dict(),
                "estimate": estimate,
                "idempotency_key": idempotency_key,
                "request_hash": digest,
                "launcher": self.manager.launcher.name,
            }
        )
        if created:
            self.manager.event(job_id, f"Created fine-tuning job: {job_id}")
            for n in spec.notes:
                self.manager.event(job_id, n)
            if not estimate["fits"]:
                self.manager.event(
                    job_id,
                    f"Started with force: the estimator predicts {estimate['peak_memory_gib']:.2f} GiB per device "
                    f"on {gpu.name} ({estimate['device_memory_gib']:.2f} GiB)",
                    level="warn",
                )
            self.manager.wake()
        elif row["request_hash"] != digest:
            raise ConflictError("this Idempotency-Key was used with a different request body", field="Idempotency-Key")
        return row, created

    def cancel(self, owner: str, job_id: str) -> dict[str, Any]:
        job = self.job(owner, job_id)
        if job["status"] in S.TERMINAL:
            raise ConflictError(f"the job has already {job['status']}: nothing to cancel", field="fine_tuning_job_id")
        self.store.update_job(job_id, cancel_requested=True)
        error = {"code": "cancelled", "message": "cancelled by request"}
        if not self.manager.finish(job, S.CANCELLED, error, expect=(S.VALIDATING, S.QUEUED, PAUSED)) and (
            self.store.update_job(job_id, expect=[S.RUNNING], status=S.CANCELLING)
        ):
            self.manager.event(job_id, "Cancellation requested", level="warn")
        self.manager.wake()
        return self.job(owner, job_id)

    def pause(self, owner: str, job_id: str) -> dict[str, Any]:
        """OpenAI's pause: a waiting job is paused at once; a running one checkpoints, then its process
        stops (`running` until then, `paused` after). Returns the job row, like `cancel`."""
        job = self.job(owner, job_id)
        status = job["status"]
        if status == PAUSED:
            return job
        if status in (S.VALIDATING, S.QUEUED) and self.store.update_job(job_id, expect=[status], status=PAUSED):
            self.manager.event(job_id, "The job was paused before it started")
            return self.job(owner, job_id)
        handle = job.get("handle")
        if status != S.RUNNING or job["cancel_requested"] or not handle:
            raise ConflictError(
                f"a {status} job cannot be paused" + (" yet: it is being launched, retry" if not handle else ""),
                field="fine_tuning_job_id",
            )
        if not handle.get("pause_requested"):
            marker = self.cfg.jobs_dir / job_id / PAUSE
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()  # read by the training process when the SIGTERM comes: checkpoint, then stop
            self.store.update_job(job_id, expect=[S.RUNNING], handle={**handle, "pause_requested": True})
            self.manager.event(job_id, "Pause requested", level="warn")
            self.manager.wake()
        return self.job(owner, job_id)

    def resume(self, owner: str, job_id: str) -> dict[str, Any]:
        """OpenAI's resume: a paused job is queued again; its run resumes from its last checkpoint."""
        job = self.job(owner, job_id)
        if job["status"] != PAUSED:
            raise ConflictError(
                f"the job is {job['status']}, not paused: nothing to resume", field="fine_tuning_job_id"
            )
        (self.cfg.jobs_dir / job_id / PAUSE).unlink(missing_ok=True)
        # paused before it ever ran: its files are validated again (it may have been paused while validating)
        back = S.QUEUED if job.get("started_at") else S.VALIDATING
        if self.store.update_job(job_id, expect=[PAUSED], status=back, handle=None):
            self.manager.event(job_id, f"The job was resumed: {back}, to continue from its last checkpoint")
        self.manager.wake()
        return self.job(owner, job_id)

    # ---- pieces ---------------------------------------------------------------------------------------------
    def _training_file(self, owner: str, file_id: str, fld: str) -> dict[str, Any]:
        row = self.store.get_file(file_id, owner)
        if row is None:
            raise NotFoundError(f"no file {file_id!r}: upload it to /v1/files first", field=fld)
        if row["purpose"] != FINE_TUNE:
            raise JobsError(f"file {file_id} has purpose {row['purpose']!r}, not {FINE_TUNE!r}", field=fld)
        return row

    def _model(self, name: str) -> tuple[ModelSource, ModelSpec]:
        """A local directory under the allowed roots, or a catalog model with a Hugging Face id."""
        if "\x00" in name or ".." in name.split("/"):
            raise ModelSourceError(f"invalid model {name!r}", field="model")
        if name.startswith(("/", "~")):
            source = local_model_source(name, self.cfg.model_roots)
            try:
                cfg = json.loads((Path(source.ref) / "config.json").read_text())
            except (OSError, ValueError) as exc:
                raise ModelSourceError(f"cannot read {name}/config.json: {exc}", field="model") from exc
            if not isinstance(cfg, dict):
                raise ModelSourceError(f"{name}/config.json is not a JSON object", field="model")
            if cfg.get("auto_map") and not self.cfg.allow_trust_remote_code:
                raise ModelSourceError(
                    f"{name} needs custom code (config.json has auto_map); this deployment does not trust remote "
                    "code (ADVISOR_ALLOW_TRUST_REMOTE_CODE)",
                    field="model",
                )
            try:
                spec = model_from_config(cfg, name=Path(source.ref).name)
            except InvalidInputError as exc:
                raise ModelSourceError(exc.message, field="model") from exc
            return source, spec
        spec = self.advisor.model(name)  # unknown -> 404 with close matches
        if spec.assumed or not spec.hf_id or not HF_ID.match(spec.hf_id):
            raise ModelSourceError(
                f"{name!r} is not a model that can be loaded: name a catalog model with a Hugging Face id, "
                "or give the absolute path of a local model directory under ADVISOR_MODEL_ROOTS",
                field="model",
            )
        if not self.cfg.allow_download and not _in_hf_cache(spec.hf_id):
            raise ModelSourceError(
                f"{spec.hf_id} is not in this server's Hugging Face cache and model downloads are off "
                "(ADVISOR_ALLOW_MODEL_DOWNLOAD)",
                field="model",
            )
        return ModelSource("hf", spec.hf_id), spec

    def _plan(self, req: JobRequest, model: ModelSpec, gpu: GpuSpec) -> tuple[TrainingPlan, str | None, list[str]]:
        if req.plan is not None:
            return self._posted_plan(req.plan, gpu), req.plan.get("id"), ["plan: posted with the request"]
        if req.plan_id is not None:
            return self._plan_from_id(req, gpu), req.plan_id, [f"plan {req.plan_id} from /v1/recommend"]
        m = req.method
        method = {"supervised": "lora", None: "lora"}.get(m.type, m.type)
        try:
            spec = get_method(method)
        except InvalidInputError:
            raise JobsError(
                f"method.type {m.type!r} is not supported: use supervised (= lora) or one of {', '.join(METHOD_NAMES)}",
                field="method.type",
            ) from None
        q = m.quantization or {}
        if q and not spec.quantized:
            raise JobsError("quantization is for quantised methods (qlora) only", field="method.quantization")
        if q.get("bits", 4) != 4 or str(q.get("quant_type", "nf4")).lower() != "nf4":
            raise JobsError("only 4-bit NF4 quantisation is supported", field="method.quantization")
        optimizer = m.optimizer or ("paged-adamw-8bit" if spec.quantized and self.cfg.device == "cuda" else "adamw")
        try:
            plan = make_plan(
                method,
                gpu,
                micro_batch=m.micro_batch_size,
                seq_len=m.seq_len or min(2048, model.max_position_embeddings),
                grad_checkpointing=m.gradient_checkpointing,
                optimizer=optimizer,
                num_gpus=m.num_gpus,
                sharding=m.sharding,
                lora_r=m.lora.r,
                lora_alpha=m.lora.alpha,
                lora_dropout=m.lora.dropout,
                lora_targets=tuple(m.lora.target_modules) if m.lora.target_modules else None,
                double_quant=q.get("double_quant"),
            )
            if spec.adapter:
                resolve_targets(model, plan.lora_targets)
        except InvalidInputError as exc:
            raise _invalid(exc) from exc
        return plan, None, []

    def _plan_from_id(self, req: JobRequest, gpu: GpuSpec) -> TrainingPlan:
        """The plan a /v1/recommend plan id encodes (no search); method fields given too must agree with it."""
        try:
            plan = decode_plan_id(req.plan_id)
        except PlanIdError as exc:
            if exc.stale:
                raise NotFoundError(exc.message, field="plan_id") from None
            raise JobsError(exc.message, field="plan_id") from None
        if plan.gpu_id != gpu.id:
            raise JobsError(
                f"plan {req.plan_id} is for {plan.gpu_id}; this deployment trains on {gpu.id}: ask /v1/recommend "
                f"for {gpu.id}",
                field="plan_id",
            )
        m = req.method
        given = {"seq_len": m.seq_len, "micro_batch": m.micro_batch_size, "num_gpus": m.num_gpus}
        for name, value in given.items():
            if value is not None and value != getattr(plan, name):
                raise JobsError(
                    f"method {name} {value} contradicts plan_id ({name} {getattr(plan, name)}): leave it out or "
                    "post another plan",
                    field=PLAN_FIELDS[name],
                )
        return plan

    def _posted_plan(self, d: dict[str, Any], gpu: GpuSpec) -> TrainingPlan:
        keep = set(TrainingPlan.__dataclass_fields__)
        try:
            plan = TrainingPlan.from_dict({k: v for k, v in d.items() if k in keep})
        except (InvalidInputError, TypeError) as exc:
            raise JobsError(f"plan: {exc}", field="plan") from exc
        if d.get("id") and d["id"] != plan.id:
            raise JobsError(f"plan.id {d['id']!r} does not match the plan's fields ({plan.id})", field="plan.id")
        if plan.gpu_id != gpu.id:
            raise JobsError(
                f"the plan is for {plan.gpu_id}; this deployment trains on {gpu.id}: ask /v1/recommend for {gpu.id}",
                field="plan.gpu_id",
            )
        return plan

    def _estimate(self, model: ModelSpec, gpu: GpuSpec, plan: TrainingPlan, force: bool) -> dict[str, Any]:
        try:
            est = self.advisor.estimate(model, gpu, plan).estimate
        except InvalidInputError as exc:
            raise _invalid(exc) from exc
        fields = views.estimate_fields(est)
        summary = {k: fields[k] for k in JOB_ESTIMATE_FIELDS}
        summary["gpu"] = gpu.id
        mem = est.memory
        if not mem.fits and not force:
            parts = sorted(mem.components.items(), key=lambda kv: -kv[1])[:3]
            raise PlanDoesNotFitError(
                f"the plan does not fit {gpu.name}: the estimator predicts {mem.device_total_bytes / GIB:.2f} GiB per "
                f"device of {mem.device_bytes / GIB:.2f} GiB (largest: "
                + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in parts)
                + "). Choose a smaller plan (/v1/recommend), or post force: true to start anyway",
                field="method",
                extra={"estimate": summary},
            )
        return summary


#: the estimate fields a job keeps beside its measurement (named as in /v1/estimate)
JOB_ESTIMATE_FIELDS = (
    "source",
    "fits",
    "peak_memory_gib",
    "allocated_peak_gib",
    "reserved_peak_gib",
    "device_memory_gib",
    "headroom_gib",
    "breakdown_gib",
    "step_time_s",
    "tokens_per_s",
    "notes",
)


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    hit = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(hit, str)


def _method_out(plan: TrainingPlan, spec: JobSpec) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": plan.method,
        "gradient_checkpointing": plan.grad_checkpointing,
        "optimizer": plan.optimizer,
        "micro_batch_size": plan.micro_batch,
        "num_gpus": plan.num_gpus,
        "sharding": plan.sharding,
        "seq_len": plan.seq_len,
        "dtype": plan.dtype,
        "packing": spec.packing,
        "learning_rate": spec.learning_rate,
    }
    method = get_method(plan.method)
    if method.adapter:
        out["lora"] = {
            "r": plan.lora_r,
            "alpha": plan.lora_alpha,
            "dropout": plan.lora_dropout,
            "target_modules": list(plan.lora_targets),
        }
    if method.quantized:
        out["quantization"] = {
            "bits": 4,
            "quant_type": "nf4",
            "double_quant": plan.double_quant,
            "compute_dtype": plan.dtype,
        }
    return out
