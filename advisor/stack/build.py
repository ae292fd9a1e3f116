"""The one model builder: a trainable model and optimiser for one `TrainingPlan`, real or on the meta device.

Why one builder: calibration trials, real fine-tuning jobs and the simulated trace must run the *same*
code (transformers model, peft LoRA / DoRA on the plan's targets, bitsandbytes NF4 with double
quantisation and ``prepare_model_for_kbit_training`` for QLoRA, transformers' activation
checkpointing, the optimiser the HF Trainer builds), or what is measured or traced is not what a job
trains.

    built = build(config_or_dir, plan, device="cuda")      # a HF config / dict, or a local model dir
    loss = built.train_step(input_ids)                      # forward + backward (+ optimiser step)

    meta = build_meta(config_dict, plan, targets)           # the same model on the meta device
    materialize(meta.model, real_init=False)                # ... on fake (or real CPU) tensors

A config (dict or ``PretrainedConfig``) gives a randomly initialised model: nothing is downloaded.
A local directory with weights is loaded with ``from_pretrained``. On the meta device QLoRA swaps
``nn.Linear`` for bitsandbytes ``Linear4bit`` the way transformers' loader does and ``materialize``
quantises with bitsandbytes' own ``quantize_4bit`` (a real build quantises while loading).
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig

from advisor.catalog import model_from_config
from advisor.errors import InvalidInputError
from advisor.methods import get_method
from advisor.methods.qlora import upcast as qlora_upcast
from advisor.plans import TrainingPlan
from advisor.specs import ModelSpec
from advisor.stack.targets import lora_target_modules, lora_target_parameters, modules_to_save_names

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "TORCH_DTYPES",
    "BuiltModel",
    "MetaModel",
    "build",
    "build_meta",
    "load_config",
    "lora_target_modules",
    "make_optimizer",
    "materialize",
    "save_random_model",
    "save_sharded_adapter",
    "spec_of",
]

TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTN_IMPLEMENTATIONS = {"sdpa": "sdpa", "eager": "eager", "flash": "flash_attention_2"}
CKPT_KWARGS = {"use_reentrant": False}


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


@dataclass
class MetaModel:
    """The plan's model on the meta device (see ``build_meta``)."""

    model: torch.nn.Module
    config: PretrainedConfig
    param_count: int  # parameters as built, before quantisation packs them
    notes: list[str] = field(default_factory=list)


# ---- what the plan asks for -----------------------------------------------------------------------
def _master_weights(plan: TrainingPlan) -> bool:
    """Mixed-precision full fine-tuning: fp32 parameters, the compute dtype under autocast."""
    return not get_method(plan.method).adapter and plan.master_weights and plan.dtype != "fp32"


def _hf_stack(plan: TrainingPlan) -> bool:
    return getattr(plan, "framework", "hf") == "hf"


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


# ---- the builder: real device ---------------------------------------------------------------------
def build(
    source: PretrainedConfig | dict[str, Any] | str | Path,
    plan: TrainingPlan,
    device: str | torch.device = "cpu",
    *,
    seed: int = 0,
    learning_rate: float = 2e-4,
    weight_decay: float = 0.0,
    group_replica: bool = False,
) -> BuiltModel:
    """Model + optimiser for `plan` on `device` (one GPU / the CPU; sharded plans are the launcher's job).

    `group_replica`: this process is one of a multi-GPU plan's group (under ``accelerate launch`` or Ray Train):
    build its replica with what the plan's sharding needs (under FSDP, QLoRA's 4-bit weights stored in the compute
    dtype and no fp32 upcast), for accelerate to replicate or shard. Without it a multi-GPU plan is refused (one
    device measured as if it were several would be wrong)."""
    if plan.num_gpus != 1 and not group_replica:
        raise InvalidInputError(
            "build() makes one device's replica: use num_gpus=1, or group_replica=True in a process of the "
            "plan's group",
            field="num_gpus",
        )
    method = get_method(plan.method)
    device = torch.device(device)
    config = load_config(source)
    config._attn_implementation = ATTN_IMPLEMENTATIONS[plan.attention]
    spec = spec_of(config)
    dtype = TORCH_DTYPES[plan.dtype]
    torch.manual_seed(seed)
    with _weights_dir(source, config, seed, method.quantized, dtype, device) as weights_dir:
        model = _load(config, weights_dir, plan, device, dtype)
    lora_modules = lora_target_modules(spec, plan) if method.adapter else ()
    saved = modules_to_save_names(spec, plan) if method.adapter else ()
    params = lora_target_parameters(spec, plan) if method.adapter else ()
    model = _prepare_for_training(
        model, plan, list(lora_modules), spec.is_encoder_decoder, dtype, meta=False, saved=saved, parameters=params
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(plan.optimizer, params, learning_rate, weight_decay)
    return BuiltModel(
        model=model,
        optimizer=optimizer,
        spec=spec,
        plan=plan,
        device=device,
        autocast_dtype=dtype if _master_weights(plan) else None,
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
    method = get_method(plan.method)
    # mixed-precision full fine-tuning keeps fp32 master weights; everything else stores the compute dtype
    store = torch.float32 if (not method.adapter and plan.master_weights) else dtype
    if method.quantized:
        assert weights_dir is not None
        return auto.from_pretrained(
            str(weights_dir),
            config=config,
            quantization_config=_bnb_config(plan, dtype),
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


def _bnb_config(plan: TrainingPlan, compute_dtype: torch.dtype):
    """bitsandbytes' 4-bit settings from the plan's method (its dtype names replaced by torch dtypes: the compute
    dtype, and under FSDP the storage dtype of the packed weights, ``bnb_4bit_quant_storage``)."""
    from transformers import BitsAndBytesConfig

    kwargs = dict(get_method(plan.method).quantization(plan) or {})
    kwargs["bnb_4bit_compute_dtype"] = compute_dtype
    storage = kwargs.get("bnb_4bit_quant_storage")
    if isinstance(storage, str):
        kwargs["bnb_4bit_quant_storage"] = TORCH_DTYPES[storage]
    return BitsAndBytesConfig(**kwargs)


#: the module name FSDP1 gives the module it wraps (every FSDP unit: the root, each decoder layer, each LoRA leaf)
FSDP_WRAPPED = "_fsdp_wrapped_module."


def sharded_adapter_state_dict(peft_model: torch.nn.Module, full_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The adapter's tensors, under the names peft's ``save_pretrained`` writes, from the full state dict FSDP
    gathered (``accelerator.get_state_dict``: clean names) of a peft model wrapped in FSDP units.

    Why not ``save_pretrained(state_dict=full_state)``: peft (0.21) picks the adapter's entries by the module names
    of its layers and strips only a *leading* ``_fsdp_wrapped_module.``; inside nested units (each decoder layer)
    the segment sits mid-name, nothing matches and an empty adapter is written. Here each entry of an adapter layer
    is keyed under that layer's wrapped name (what peft matches), peft selects the entries and drops the adapter
    name, and the FSDP segments are then dropped from the names it returns.
    `peft_model`: the unwrapped model (``accelerator.unwrap_model``), its FSDP units inside."""
    from peft import get_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = {  # an adapter layer's clean name -> its name inside the FSDP units
        name.replace(FSDP_WRAPPED, ""): name
        for name, module in peft_model.named_modules()
        if isinstance(module, BaseTunerLayer) and FSDP_WRAPPED in name
    }
    keyed: dict[str, Any] = {}
    for key, value in full_state.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # the innermost adapter layer holding the entry
            owner = ".".join(parts[:cut])
            if owner in wrapped:
                key = wrapped[owner] + key[len(owner) :]
                break
        keyed[key] = value
    adapter = get_peft_model_state_dict(peft_model, state_dict=keyed)
    return {k.replace(FSDP_WRAPPED, ""): v for k, v in adapter.items()}


def save_sharded_adapter(peft_model: torch.nn.Module, full_state: dict[str, Any], path: str | Path) -> Path:
    """Write the adapter of an FSDP-wrapped peft model as ``save_pretrained`` would (adapter_model.safetensors +
    adapter_config.json), from FSDP's gathered full state dict (see ``sharded_adapter_state_dict``). Rank 0 only;
    gathering the state dict is a collective every rank joins first."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in sharded_adapter_state_dict(peft_model, full_state).items()}
    if not tensors:
        raise RuntimeError("no adapter tensors in the gathered state dict (FSDP without use_orig_params?)")
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = peft_model.peft_config["default"]
    inference_mode = config.inference_mode
    config.inference_mode = True  # as peft's save_pretrained writes it
    try:
        config.save_pretrained(str(path))
    finally:
        config.inference_mode = inference_mode
    return path


# ---- shared by both: quantised-base preparation, checkpointing, adapters --------------------------
def _enable_checkpointing(model: torch.nn.Module) -> None:
    """transformers' own activation checkpointing (non-reentrant), whatever the version calls it."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=CKPT_KWARGS)
    else:  # transformers < 5
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CKPT_KWARGS)


def _prepare_for_training(
    model: torch.nn.Module,
    plan: TrainingPlan,
    targets: list[str],
    encoder_decoder: bool,
    half: torch.dtype,
    *,
    meta: bool,
    saved: tuple[str, ...] = (),
    parameters: tuple[str, ...] = (),
) -> torch.nn.Module:
    """QLoRA's k-bit preparation, activation checkpointing and LoRA / DoRA adapters, as the plan says.

    `saved`: peft modules_to_save (a frozen original and a trainable copy of each, in the module's dtype).
    `parameters`: peft target_parameters (a mixture of experts' fused expert parameters, ``experts.gate_up_proj``:
    lora.ParamWrapper folds ``W + scale * B A`` per expert into a new weight on every forward).
    Other stacks (litgpt, torchtune) keep adapters in the model dtype and skip peft's fp32 upcast."""
    method = get_method(plan.method)
    hf_stack = _hf_stack(plan)
    if method.quantized:
        from peft import prepare_model_for_kbit_training

        # not under FSDP in half precision (qlora.upcast): fp32 norms cannot be flattened with bf16-stored 4-bit
        # weights; trl skips prepare_model_for_kbit_training for sharded QLoRA the same way
        if qlora_upcast(plan):
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=plan.grad_checkpointing, gradient_checkpointing_kwargs=CKPT_KWARGS
            )
        else:
            model.requires_grad_(False)
            if plan.grad_checkpointing:
                _enable_checkpointing(model)
    elif plan.grad_checkpointing:
        _enable_checkpointing(model)
    if not method.adapter:
        if not meta:
            model.requires_grad_(True)
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    present = {name.split(".")[-1] for name, _ in model.named_modules()}
    missing = [n for n in (*targets, *saved) if n not in present]
    if missing:  # peft would silently leave them out: the run would train less than the plan says
        raise InvalidInputError(
            f"{type(model).__name__} has no module named {', '.join(missing)}",
            field="modules_to_save" if set(missing) <= set(saved) else "lora_targets",
        )
    param_names = {n for n, _ in model.named_parameters()}
    absent = [p for p in parameters if not any(n.endswith("." + p) for n in param_names)]
    if absent:
        raise InvalidInputError(
            f"{type(model).__name__} has no parameter named {', '.join(absent)}", field="lora_targets"
        )
    kwargs = method.peft_config(plan, targets)  # the method's own settings (use_dora for DoRA)
    kwargs["task_type"] = TaskType.SEQ_2_SEQ_LM if encoder_decoder else TaskType.CAUSAL_LM
    if parameters:
        # the experts: peft's lora.ParamWrapper (target_modules [] rather than None: peft would otherwise fill in its
        # own default targets for the model type)
        kwargs["target_parameters"] = list(parameters)
    if saved:
        kwargs["modules_to_save"] = list(saved)
    cfg = LoraConfig(**kwargs)
    # peft upcasts adapters to fp32; litgpt / torchtune keep them in the model dtype. On the meta
    # device the adapters are created there too (low_cpu_mem_usage) and materialised with the rest.
    model = get_peft_model(model, cfg, low_cpu_mem_usage=meta, autocast_adapter_dtype=hf_stack)
    if not hf_stack:
        for name, p in model.named_parameters():
            if "lora_" in name and p.dtype != half:
                p.data = p.data.to(half)
    return model


# ---- the builder: meta device (the simulated trace) -----------------------------------------------
def build_meta(config: dict[str, Any], plan: TrainingPlan, targets: list[str] | tuple[str, ...] = ()) -> MetaModel:
    """The plan's model on the meta device, with quantisation, adapters and checkpointing applied.

    `targets`: peft target module names (``lora_target_modules``), ignored for full fine-tuning.
    Attention is traced as SDPA (flash: the same saved tensors), eager where the model has no SDPA path.
    """
    half = TORCH_DTYPES[plan.dtype]
    param_dtype = torch.float32 if _master_weights(plan) else half
    cfg_d = dict(config)
    model_type = cfg_d.pop("model_type", "llama")
    cfg = AutoConfig.for_model(model_type, **cfg_d)
    cfg.use_cache = False
    attn = "eager" if plan.attention == "eager" else "sdpa"
    notes: list[str] = []
    if plan.attention == "flash":
        notes.append("flash attention traced as SDPA's flash kernel (the same saved tensors: output and logsumexp)")
    auto = _auto_class(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                model = auto.from_config(cfg, dtype=param_dtype, attn_implementation=attn)
        except ValueError as exc:
            if attn != "sdpa" or "scaled_dot_product_attention" not in str(exc):
                raise
            with torch.device("meta"):
                model = auto.from_config(cfg, dtype=param_dtype, attn_implementation="eager")
            notes.append(
                f"transformers has no SDPA path for {model_type}: traced with eager attention (its default); "
                "flash-attention-2 would save less"
            )
        _keep_fp32(model, param_dtype)
        param_count = sum(p.numel() for p in model.parameters())
        if get_method(plan.method).quantized:
            _quantize_linears(model, plan, half)
        adapter = get_method(plan.method).adapter
        saved = modules_to_save_names(spec_of(cfg), plan) if adapter else ()
        params = lora_target_parameters(spec_of(cfg), plan) if adapter else ()
        model = _prepare_for_training(
            model, plan, list(targets), bool(cfg.is_encoder_decoder), half, meta=True, saved=saved, parameters=params
        )
    model.train()
    return MetaModel(model=model, config=cfg, param_count=param_count, notes=notes)


def _keep_fp32(model, dtype) -> None:
    """transformers' dtype plan: modules it keeps in fp32 for this dtype (T5's `wo` under fp16)."""
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return
    pats = list(plan)
    for name, mod in model.named_modules():
        if any(re.search(rf"(^|\.){re.escape(p)}($|\.)", name) for p in pats):
            mod.to(torch.float32)


def _quantize_linears(model, plan: TrainingPlan, half) -> None:
    """Swap nn.Linear for bitsandbytes Linear4bit exactly where transformers' bnb loader does."""
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    qc = _bnb_config(plan, half)
    skip = HfQuantizer.get_modules_to_not_convert(
        model, qc.llm_int8_skip_modules, list(getattr(model, "_keep_in_fp32_modules", None) or [])
    )
    # the checkpoint's dtype of every module before quantisation (what loading reads)
    dtypes = {name: mod.weight.dtype for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=qc)
    from bitsandbytes.nn import Linear4bit

    for name, mod in model.named_modules():
        if isinstance(mod, Linear4bit):
            mod._sim_weight_dtype = dtypes.get(name, half)
            if mod.bias is not None:
                mod.bias = torch.nn.Parameter(mod.bias.to(dtypes.get(name, half)), requires_grad=False)
    model.is_loaded_in_4bit = True


def _new_tensor(shape, dtype, real_init: bool):
    t = torch.empty(shape, dtype=dtype)
    if real_init:
        t.normal_(0.0, 0.02) if dtype.is_floating_point else t.zero_()
    return t


def materialize(model, real_init: bool) -> None:
    """Replace every meta parameter and buffer by a tensor on the (fake or real) CPU; quantise
    bitsandbytes 4-bit weights with bitsandbytes' own quantize_4bit, as loading does."""
    try:
        from bitsandbytes.nn import Linear4bit, Params4bit
    except ImportError:  # pragma: no cover - bitsandbytes is part of the train extra
        Linear4bit = Params4bit = None
    memo: dict[int, Any] = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) in memo:
                mod._parameters[name] = memo[id(p)]
                continue
            if not p.is_meta:
                memo[id(p)] = p
                continue
            if Params4bit is not None and isinstance(p, Params4bit) and isinstance(mod, Linear4bit):
                new = _quantized_weight(mod, p, real_init)
            else:
                new = torch.nn.Parameter(_new_tensor(p.shape, p.dtype, real_init), requires_grad=p.requires_grad)
            memo[id(p)] = new
            mod._parameters[name] = new
        for name, b in list(mod._buffers.items()):
            if b is not None and b.is_meta:
                mod._buffers[name] = _new_tensor(b.shape, b.dtype, real_init and b.is_floating_point())


def _quantized_weight(mod, p, real_init: bool):
    """What bitsandbytes' Params4bit holds after loading: the packed uint8 NF4 weight, with its
    QuantState (absmax, or uint8 absmax + fp32 second-level constants) made by quantize_4bit.

    A Params4bit cannot wrap a FakeTensor, so the packed tensor is a Parameter carrying the same
    attributes Linear4bit and MatMul4Bit read (quant_state, blocksize, quant_type, ...); the storage
    and the code path through bitsandbytes are the same. Real runs use the same representation.
    """
    import bitsandbytes.functional as F

    data = _new_tensor(tuple(p.shape), mod._sim_weight_dtype, real_init)
    packed, qs = F.quantize_4bit(
        data,
        blocksize=p.blocksize,
        compress_statistics=p.compress_statistics,
        quant_type=p.quant_type,
        quant_storage=p.quant_storage,
    )
    del data
    new = torch.nn.Parameter(packed, requires_grad=False)
    for attr in ("blocksize", "compress_statistics", "quant_type", "quant_storage"):
        setattr(new, attr, getattr(p, attr))
    new.quant_state = qs
    new.bnb_quantized = True
    new.module = mod
    mod.quant_state = qs
    return new


# ---- the optimiser --------------------------------------------------------------------------------
FUSED_DEVICES = ("cuda", "cpu", "xpu", "mps")


def make_optimizer(
    name: str, params: list[torch.nn.Parameter], lr: float = 2e-4, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The optimiser the HF Trainer builds for the plan's optimiser name.

    ``adamw``: torch AdamW with ``fused=True`` (the Trainer's default ``adamw_torch_fused``: one kernel
    per parameter group, no foreach temporaries); bitsandbytes 8-bit / paged AdamW otherwise."""
    if name == "adamw":
        fused = bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    import bitsandbytes as bnb

    classes = {
        "adamw-8bit": bnb.optim.AdamW8bit,
        "paged-adamw-8bit": bnb.optim.PagedAdamW8bit,
        "paged-adamw-32bit": bnb.optim.PagedAdamW32bit,
    }
    if name not in classes:
        raise InvalidInputError(f"unknown optimizer {name!r}", field="optimizer")
    return classes[name](params, lr=lr, weight_decay=weight_decay)
