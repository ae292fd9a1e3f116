"""Builds a trainable model and optimiser for one `TrainingPlan` with the real training stack.

Why one builder: the calibration trials and the real fine-tuning jobs must run the *same* code
(transformers model, peft LoRA on the plan's targets, bitsandbytes NF4 with double quantisation and
``prepare_model_for_kbit_training`` for QLoRA, transformers' activation checkpointing, the plan's
optimiser), or what calibration measures is not what a job will use.

    built = build(config_or_dir, plan, device="cuda")      # a HF config / dict, or a local model dir
    loss = built.train_step(input_ids)                      # forward + backward (+ optimiser step)

A config (dict or ``PretrainedConfig``) gives a randomly initialised model: nothing is downloaded.
A local directory with weights is loaded with ``from_pretrained``. torch is imported here: this is
an edge module, never imported by the pure core.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig

from advisor.catalog import model_from_config
from advisor.errors import InvalidInputError
from advisor.plans import TrainingPlan, resolve_targets
from advisor.specs import ModelSpec

TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTN_IMPLEMENTATIONS = {"sdpa": "sdpa", "eager": "eager", "flash": "flash_attention_2"}


@dataclass
class BuiltModel:
    """A model ready to train under `plan`, with its optimiser and what was resolved on the way."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    spec: ModelSpec
    plan: TrainingPlan
    device: torch.device
    autocast_dtype: torch.dtype | None  # set for mixed-precision full fine-tuning (fp32 master weights)
    trainable_params: int
    lora_modules: tuple[str, ...]  # peft target module names (empty for full fine-tuning)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.spec.is_encoder_decoder

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def forward_backward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """One micro-step: forward and backward, the loss scaled for gradient accumulation."""
        labels = input_ids if labels is None else labels
        with self._autocast():
            # keep only the loss (as the HF Trainer does): holding the outputs would keep the logits alive
            loss = self.model(input_ids=input_ids, labels=labels).loss / self.plan.grad_accum
        loss.backward()
        return loss.detach()

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train_step(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> float:
        """plan.grad_accum micro-steps over `input_ids` split along the batch, then one optimiser step."""
        labels = input_ids if labels is None else labels
        total = torch.zeros((), device=self.device)
        for ids, lab in zip(input_ids.chunk(self.plan.grad_accum), labels.chunk(self.plan.grad_accum), strict=True):
            total += self.forward_backward(ids, lab)
        self.optimizer_step()
        return float(total)

    def random_batch(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Token ids of one micro-batch (packed sequences of plan.seq_len) drawn uniformly from the vocabulary."""
        shape = (self.plan.micro_batch * self.plan.grad_accum, self.plan.seq_len)
        return torch.randint(0, self.spec.vocab_size, shape, generator=generator).to(self.device)


# ---- configs --------------------------------------------------------------------------------------
def load_config(source: PretrainedConfig | dict[str, Any] | str | Path) -> PretrainedConfig:
    """A HF config from a config object, a config.json-style dict (with model_type), or a local dir."""
    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, dict):
        d = dict(source)
        mtype = d.pop("model_type", None)
        if not mtype:
            raise InvalidInputError("config dict needs a model_type", field="model")
        return AutoConfig.for_model(mtype, **d)
    path = Path(source).expanduser()
    if not path.exists():
        raise InvalidInputError(f"model directory {str(path)!r} does not exist", field="model")
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def spec_of(config: PretrainedConfig, name: str | None = None) -> ModelSpec:
    """The advisor's ModelSpec of a HF config (what the estimators see for this model)."""
    return model_from_config(config.to_dict(), name=name or getattr(config, "name_or_path", "") or config.model_type)


def _auto_class(config: PretrainedConfig):
    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


def save_random_model(
    config: PretrainedConfig,
    path: str | Path,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Path:
    """Write a randomly initialised model (safetensors + config) to `path`, for loading like a checkpoint.

    Initialised on `device` (a GPU initialises a billion parameters in a blink, a CPU takes minutes)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = _auto_class(config).from_config(config, dtype=dtype)
    path = Path(path)
    model.save_pretrained(str(path))
    del model
    return path


def _has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


# ---- the builder ----------------------------------------------------------------------------------
def build(
    source: PretrainedConfig | dict[str, Any] | str | Path,
    plan: TrainingPlan,
    device: str | torch.device = "cpu",
    *,
    seed: int = 0,
    learning_rate: float = 2e-4,
    weight_decay: float = 0.0,
) -> BuiltModel:
    """Model + optimiser for `plan` on `device` (one GPU / the CPU; sharded plans are the launcher's job)."""
    if plan.num_gpus != 1:
        raise InvalidInputError("build() makes one device's replica: use num_gpus=1", field="num_gpus")
    device = torch.device(device)
    config = load_config(source)
    config._attn_implementation = ATTN_IMPLEMENTATIONS[plan.attention]
    spec = spec_of(config)
    dtype = TORCH_DTYPES[plan.dtype]
    torch.manual_seed(seed)
    with _weights_dir(source, config, seed, plan.method == "qlora", dtype, device) as weights_dir:
        model = _load(config, weights_dir, plan, device, dtype)
    lora_modules: tuple[str, ...] = ()
    if plan.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=plan.grad_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif plan.grad_checkpointing:
        _enable_checkpointing(model)
    if plan.method in ("lora", "qlora"):
        model, lora_modules = _add_lora(model, spec, plan)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(plan.optimizer, params, learning_rate, weight_decay)
    autocast = dtype if (plan.method == "full" and plan.master_weights and dtype != torch.float32) else None
    return BuiltModel(
        model=model,
        optimizer=optimizer,
        spec=spec,
        plan=plan,
        device=device,
        autocast_dtype=autocast,
        trainable_params=sum(p.numel() for p in params),
        lora_modules=lora_modules,
    )


@contextlib.contextmanager
def _weights_dir(
    source, config: PretrainedConfig, seed: int, need_files: bool, dtype: torch.dtype, device: torch.device
) -> Iterator[Path | None]:
    """The directory to load weights from: the given one, a temporary random checkpoint (QLoRA needs
    the from_pretrained path to quantise), or None (random init in memory)."""
    if isinstance(source, (str, Path)) and _has_weights(Path(source).expanduser()):
        yield Path(source).expanduser()
        return
    if not need_files:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="tuneadvisor-random-") as tmp:
        yield save_random_model(config, tmp, seed, dtype, device)


def _load(
    config: PretrainedConfig, weights_dir: Path | None, plan: TrainingPlan, device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    auto = _auto_class(config)
    # mixed-precision full fine-tuning keeps fp32 master weights; everything else stores the compute dtype
    store = torch.float32 if (plan.method == "full" and plan.master_weights) else dtype
    if plan.method == "qlora":
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=plan.double_quant,
            bnb_4bit_compute_dtype=dtype,
        )
        assert weights_dir is not None
        return auto.from_pretrained(
            str(weights_dir),
            config=config,
            quantization_config=bnb,
            dtype=dtype,
            device_map={"": device.index if device.type == "cuda" and device.index is not None else device.type},
            local_files_only=True,
        )
    if weights_dir is not None:
        model = auto.from_pretrained(str(weights_dir), config=config, dtype=store, local_files_only=True)
    else:
        with torch.device(device):  # initialise where it will train
            model = auto.from_config(config, dtype=store)
    return model.to(device)


def _enable_checkpointing(model: torch.nn.Module) -> None:
    """transformers' own activation checkpointing (non-reentrant), whatever the version calls it."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def lora_target_modules(spec: ModelSpec, plan: TrainingPlan) -> tuple[str, ...]:
    """peft target_modules for the plan: the real module names (peft matches the last name component)."""
    return tuple(sorted({n.split(".")[-1] for n in resolve_targets(spec, plan.lora_targets)}))


def _add_lora(model: torch.nn.Module, spec: ModelSpec, plan: TrainingPlan) -> tuple[torch.nn.Module, tuple[str, ...]]:
    from peft import LoraConfig, TaskType, get_peft_model

    targets = lora_target_modules(spec, plan)
    cfg = LoraConfig(
        r=plan.lora_r,
        lora_alpha=plan.lora_alpha,
        lora_dropout=plan.lora_dropout,
        target_modules=list(targets),
        task_type=TaskType.SEQ_2_SEQ_LM if spec.is_encoder_decoder else TaskType.CAUSAL_LM,
    )
    return get_peft_model(model, cfg), targets


def make_optimizer(
    name: str, params: list[torch.nn.Parameter], lr: float = 2e-4, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The plan's optimiser: torch AdamW, or bitsandbytes 8-bit / paged AdamW."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    classes = {
        "adamw-8bit": bnb.optim.AdamW8bit,
        "paged-adamw-8bit": bnb.optim.PagedAdamW8bit,
        "paged-adamw-32bit": bnb.optim.PagedAdamW32bit,
    }
    if name not in classes:
        raise InvalidInputError(f"unknown optimizer {name!r}", field="optimizer")
    return classes[name](params, lr=lr, weight_decay=weight_decay)
