"""JobSpec: everything one training process needs, validated once, serialised to the job's directory.

Why a spec of its own: the server decides (model source, plan, resolved hyperparameters, paths) and
the training process only executes. Every string in it is checked against a strict pattern and every
path is absolute and normalised, so the launchers can build argv lists from it and no value can ever
act as a shell fragment or point outside the directories the deployment allows.
"""

from __future__ import annotations

import math
import os
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from advisor.errors import InvalidInputError
from advisor.jobs.errors import ModelSourceError
from advisor.methods import METHODS
from advisor.plans import TrainingPlan

JOB_ID = re.compile(r"^ftjob-[a-z0-9]{8,40}$")
FILE_ID = re.compile(r"^file-[a-z0-9]{8,40}$")
#: a Hugging Face repo id: "name" or "owner/name", letters, digits, '-', '_', '.'; no "..", no leading '-'
HF_ID = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,127}$")
SUFFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
DEVICES = ("cpu", "cuda")
CHAT_FORMATS = ("auto", "template", "plain")
SOURCE_KINDS = ("local", "hf")

#: base learning rates the multiplier scales (the usual starting points for each method)
BASE_LEARNING_RATE = {name: m.learning_rate for name, m in METHODS.items()}
AUTO_EPOCHS = 3
MAX_AUTO_BATCH = 256


def new_id(prefix: str) -> str:
    """`ftjob-` / `file-` / `ftevent-` ... plus 24 random hex digits (unguessable, URL-safe)."""
    return f"{prefix}-{secrets.token_hex(12)}"


def _check_path(text: str, field_: str) -> None:
    if not text or "\x00" in text:
        raise InvalidInputError(f"{field_} is empty or contains a NUL byte", field=field_)
    if not os.path.isabs(text) or os.path.normpath(text) != text:
        raise InvalidInputError(f"{field_} must be an absolute, normalised path: {text!r}", field=field_)


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: a local directory (absolute) or a Hugging Face repo id."""

    kind: str  # local | hf
    ref: str
    revision: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise InvalidInputError(f"model source kind must be one of {SOURCE_KINDS}", field="model")
        if self.kind == "local":
            _check_path(self.ref, "model")
        elif not HF_ID.match(self.ref):
            raise InvalidInputError(f"not a Hugging Face repo id: {self.ref!r}", field="model")
        if self.revision is not None and not REVISION.match(self.revision):
            raise InvalidInputError(f"invalid revision {self.revision!r}", field="model")


def within(path: Path, roots: list[Path]) -> bool:
    """True when `path` (symlinks resolved) lies inside one of `roots` (symlinks resolved)."""
    real = path.resolve()
    return any(real == r.resolve() or real.is_relative_to(r.resolve()) for r in roots)


def local_model_source(text: str, roots: list[Path]) -> ModelSource:
    """A local model directory: absolute, under an allowed root once symlinks are resolved, with a config.json."""
    if "\x00" in text:
        raise ModelSourceError("model path contains a NUL byte", field="model")
    path = Path(text).expanduser()
    if not path.is_absolute():
        raise ModelSourceError(f"a local model must be an absolute path, got {text!r}", field="model")
    if not roots:
        raise ModelSourceError(
            "this deployment allows no local model directories (set ADVISOR_MODEL_ROOTS)", field="model"
        )
    if not within(path, roots):
        raise ModelSourceError(
            f"{text!r} is outside the allowed model roots ({', '.join(str(r) for r in roots)})", field="model"
        )
    real = path.resolve()
    if not (real / "config.json").is_file():
        raise ModelSourceError(f"{text!r} is not a model directory (no config.json)", field="model")
    return ModelSource("local", str(real))


@dataclass(frozen=True)
class Hyperparameters:
    """Resolved values (never "auto") and which of them were chosen for the user."""

    n_epochs: int
    batch_size: int  # sequences per optimiser step, over all processes
    learning_rate_multiplier: float
    learning_rate: float
    micro_batch: int
    grad_accum: int
    chosen: tuple[str, ...] = ()


def resolve_hyperparameters(
    method: str,
    n_examples: int,
    n_epochs: int | str = "auto",
    batch_size: int | str = "auto",
    learning_rate_multiplier: float | str = "auto",
    micro_batch: int | None = None,
    world: int = 1,
) -> Hyperparameters:
    """OpenAI's "auto" rules made explicit: batch ~0.2% of the examples (at most 256), 3 epochs,
    multiplier 1 on the method's base learning rate (full 2e-5, LoRA/QLoRA 2e-4).

    The batch must split into micro-batches on every process: an explicit one that does not is
    refused, an auto one is rounded up to the next multiple.
    """
    chosen: list[str] = []
    if n_examples < 1:
        raise InvalidInputError("the training file has no examples", field="training_file")
    if micro_batch is not None and not 1 <= micro_batch <= 4096:
        raise InvalidInputError("micro_batch_size must be between 1 and 4096", field="method.micro_batch_size")
    unit = (micro_batch or 1) * world
    if batch_size == "auto":
        bs = max(1, min(MAX_AUTO_BATCH, round(0.002 * n_examples)))
        bs = max(unit, math.ceil(bs / unit) * unit)
        chosen.append(f"batch_size auto: {bs} (about 0.2% of {n_examples} examples, a multiple of {unit})")
    else:
        bs = int(batch_size)
        if not 1 <= bs <= 4096:
            raise InvalidInputError("batch_size must be between 1 and 4096", field="hyperparameters.batch_size")
        if bs % unit:
            raise InvalidInputError(
                f"batch_size {bs} does not split into micro-batches of {micro_batch or 1} on {world} process(es)",
                field="hyperparameters.batch_size",
            )
    per_rank = bs // world
    mb = micro_batch or math.gcd(per_rank, 8)
    if n_epochs == "auto":
        epochs = AUTO_EPOCHS
        chosen.append(f"n_epochs auto: {epochs}")
    else:
        epochs = int(n_epochs)
        if not 1 <= epochs <= 100:
            raise InvalidInputError("n_epochs must be between 1 and 100", field="hyperparameters.n_epochs")
    if learning_rate_multiplier == "auto":
        mult = 1.0
        chosen.append(f"learning_rate_multiplier auto: 1 (base {BASE_LEARNING_RATE[method]:g} for {method})")
    else:
        mult = float(learning_rate_multiplier)
        if not (0 < mult <= 1000) or not math.isfinite(mult):
            raise InvalidInputError(
                "learning_rate_multiplier must be in (0, 1000]", field="hyperparameters.learning_rate_multiplier"
            )
    return Hyperparameters(
        n_epochs=epochs,
        batch_size=bs,
        learning_rate_multiplier=mult,
        learning_rate=BASE_LEARNING_RATE[method] * mult,
        micro_batch=mb,
        grad_accum=per_rank // mb,
        chosen=tuple(chosen),
    )


@dataclass(frozen=True)
class JobSpec:
    """One training run, fully decided. `plan` is the TrainingPlan the estimator checked."""

    job_id: str
    model: str  # the name the user asked for (shown back; fine_tuned_model is derived from it)
    source: ModelSource
    plan: TrainingPlan
    training_file: str  # absolute path of the validated JSONL
    n_epochs: int
    batch_size: int
    learning_rate: float
    seed: int = 0
    validation_file: str | None = None
    device: str = "cpu"  # cpu | cuda (which GPUs: the launcher's CUDA_VISIBLE_DEVICES)
    packing: bool = True
    chat_format: str = "auto"  # auto: the tokenizer's chat template when it has one, else plain
    checkpoint_every_steps: int | None = None  # None: at the end of every epoch
    keep_checkpoints: int = 3
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    allow_download: bool = False  # Hugging Face ids are fetched only when the deployment allows it
    suffix: str | None = None
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not JOB_ID.match(self.job_id):
            raise InvalidInputError(f"invalid job id {self.job_id!r}", field="job_id")
        if not isinstance(self.plan, TrainingPlan):
            raise InvalidInputError("plan must be a TrainingPlan", field="plan")
        _check_path(self.training_file, "training_file")
        if self.validation_file is not None:
            _check_path(self.validation_file, "validation_file")
        if self.device not in DEVICES:
            raise InvalidInputError(f"device must be one of {DEVICES}", field="device")
        if self.chat_format not in CHAT_FORMATS:
            raise InvalidInputError(f"chat_format must be one of {CHAT_FORMATS}", field="method.chat_format")
        if not 1 <= self.n_epochs <= 100:
            raise InvalidInputError("n_epochs must be between 1 and 100", field="hyperparameters.n_epochs")
        if not 1 <= self.batch_size <= 4096:
            raise InvalidInputError("batch_size must be between 1 and 4096", field="hyperparameters.batch_size")
        if self.batch_size != self.plan.micro_batch * self.plan.grad_accum * self.plan.num_gpus:
            raise InvalidInputError("batch_size must equal micro_batch x grad_accum x num_gpus", field="batch_size")
        if not (0 < self.learning_rate < 1) or not math.isfinite(self.learning_rate):
            raise InvalidInputError("learning rate must be in (0, 1)", field="hyperparameters.learning_rate_multiplier")
        if not 0 <= self.seed < 2**31:
            raise InvalidInputError("seed must be in [0, 2^31)", field="seed")
        if self.checkpoint_every_steps is not None and not 1 <= self.checkpoint_every_steps <= 10**7:
            raise InvalidInputError("checkpoint_every_steps must be positive", field="method.checkpoint_every_steps")
        if not 1 <= self.keep_checkpoints <= 100:
            raise InvalidInputError("keep_checkpoints must be between 1 and 100", field="keep_checkpoints")
        if not 0 <= self.warmup_ratio < 1:
            raise InvalidInputError("warmup_ratio must be in [0, 1)", field="method.warmup_ratio")
        if self.suffix is not None and not SUFFIX.match(self.suffix):
            raise InvalidInputError("suffix: letters, digits, '-' and '_', at most 64", field="suffix")

    @property
    def fine_tuned_model(self) -> str:
        """OpenAI's naming: ft:<base>:<suffix>:<job id>, with the base's path components dropped."""
        base = self.model.rstrip("/").split("/")[-1]
        return f"ft:{base}:{self.suffix or ''}:{self.job_id}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["plan"] = self.plan.to_dict()
        d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobSpec:
        d = dict(d)
        d["source"] = ModelSource(**d["source"])
        d["plan"] = TrainingPlan.from_dict(d["plan"])
        d["notes"] = tuple(d.get("notes", ()))
        return cls(**d)
