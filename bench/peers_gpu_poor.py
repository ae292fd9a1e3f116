"""gpu_poor's published training formulas, ported line by line (a peer for bench.peers).

gpu_poor ("Are you GPU poor?", https://github.com/RahulSChand/gpu_poor, a React web calculator) has no
library to call, so its arithmetic is ported here from the published source:

- ``src/App.js`` @ 05d18ab8f093659c1689d93a66d549032e87c5ae:
  ``getParseConfig`` (config keys and defaults), ``computeModelSize``, ``convertToMBModelSize``,
  ``getActivationMemory``, ``getExtraMemory``, ``getGradOptMemory``, the training branch of
  ``getAllComputedData`` (``trnType === "trn"``: model + grad/optimiser + activations x 0.15 under
  gradient checkpointing + 650 MB overhead, ``Math.ceil``) and ``token_per_second_logic_Train``
  ("ms per iteration (forward + backward)");
- ``src/gpu_config.json`` @ 663edd284b8c183b64e48ff588eaf3e802fc6eb6: the GPUs' ``compute`` (TFLOP/s).

What is ported: training memory (Full / LoRA / QLoRA; ADAM or SGD; quant None, bnb int8, bnb int4;
gradient checkpointing yes/no) and the training time per iteration. Not ported: the inference, vLLM
and GGML paths, the CPU paths, the model-size-only guess (``getDefault``; we always pass a config) and
the UI. The port keeps the calculator's quirks, because the point is to score what its users get:
``floatBytes`` is always 2 (``convertToBytes``), "MB" is MiB, the training hint tells the user to set
"tokens to generate" to 1 so the length used is prompt length + 1, the LoRA terms assume rank 8 on 4
projections, the time ignores the number of GPUs, and the bitsandbytes slowdown is keyed on the
"Quant?" dropdown, which the UI forces to None for QLoRA (so QLoRA gets no ``bnb_cost``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MIB = 1024 * 1024
TERA = 1e12
#: "cuda + other overhead" of a training estimate, in MB (MiB)
OVERHEAD_MB = 650
#: activations kept under gradient checkpointing (getAllComputedData: actFactorGradCheckPoint)
CKPT_ACTIVATION_FACTOR = 0.15
#: src/gpu_config.json: GPU key -> compute (TFLOP/s), the only field the training time reads
GPU_COMPUTE_TFLOPS = {
    "rtx-3090": 16.3,
    "rtx-4060": 22.06,
    "rtx-4090": 82.58,
    "rtx-4080": 63.9,
    "rtx-3060": 13.0,
    "rtx-2060": 13.0,
    "rtx-2070": 15.0,
    "A-6000": 38.71,
    "A-4000": 19.17,
    "P-100": 19.05,
    "P-40": 11.76,
    "A100-40GB": 19.5,
    "A100-80GB": 19.5,
    "H100-SXM5": 51.7,
    "H100-PCIe": 51.7,
}
TRAIN_TYPES = ("full_trn", "lora_trn", "qlora")
OPTIMIZERS = ("adam_opt", "sgd_opt")
QUANTS = ("no_quant", "bnb_int8", "bnb_q4")


@dataclass(frozen=True)
class ParsedConfig:
    """getParseConfig's five numbers (what every formula reads)."""

    vocab: int
    hidden_dim: int
    heads: int
    inter_dim: int
    num_layers: int


def _get_key(keys: tuple[str, ...], obj: Mapping[str, Any], default: Any) -> Any:
    """getKey: the first key present; a present-but-null value falls back to the default."""
    value = None
    for key in keys:
        if key in obj:
            value = obj[key]
            break
    return default if value is None else value


def parse_config(cfg: Mapping[str, Any]) -> ParsedConfig:
    """getParseConfig: Hugging Face config.json keys (and GPT-2 / T5 aliases) with the calculator's defaults."""
    hidden = _get_key(("hidden_size", "d_model", "n_embd"), cfg, 768)
    return ParsedConfig(
        vocab=_get_key(("vocab_size",), cfg, 32000),
        hidden_dim=hidden,
        heads=_get_key(("num_attention_heads", "num_heads", "n_head"), cfg, 12),
        inter_dim=_get_key(("intermediate_size", "n_inner", "d_ff"), cfg, hidden * 4),
        num_layers=_get_key(("num_layers", "num_hidden_layers", "n_layer"), cfg, 12),
    )


def model_size(c: ParsedConfig) -> float:
    """computeModelSize: parameters = 2 embeddings + 4 h^2 attention + 3 h x inter MLP per layer."""
    return (
        c.vocab * c.hidden_dim * 2 + c.num_layers * 4 * c.hidden_dim**2 + c.num_layers * 3 * c.inter_dim * c.hidden_dim
    )


def model_size_mb(params: float, quant: str, train_type: str) -> float:
    """convertToMBModelSize: 2 bytes a parameter; bnb int8 / int4 / QLoRA storage plus 6% "extra"."""
    extra = 0.0
    size = params * 2 / MIB
    if quant in ("bnb_int8", "bnb_q4") or train_type == "qlora":
        extra = 0.06 * size
    if quant == "bnb_int8":
        size = size / 2
    if quant == "bnb_q4":
        size = size / 4
    if train_type == "qlora":
        size = size / 4 - params * 2 / (64 * MIB)
    return size + extra


def extra_memory(c: ParsedConfig, quant: str, context_len: int) -> float:
    """getExtraMemory (bytes): bitsandbytes / QLoRA working memory, growing with sqrt(len / 50)."""
    common = (10 * c.hidden_dim + 5 * c.hidden_dim + 4 * c.inter_dim + 2 * c.inter_dim) * c.num_layers
    base_len = 50
    ratio = context_len / 50
    root = math.sqrt(ratio) if ratio > 1.0 else 1.0
    if quant == "bnb_int8":
        return 0.75 * common * base_len * root * 1.25
    if quant == "bnb_q4":
        return 1.0 * common * base_len * root * 1.0
    if quant == "qlora":
        return 0.75 * common * base_len * root * 1.0
    return 0.0


def grad_opt_memory(
    train_type: str, opt: str, quant: str, params: float, c: ParsedConfig, context_len: int, batch: int
) -> float:
    """getGradOptMemory (bytes): gradients + optimiser states, per (method, optimiser, quant) branch."""
    L, h, fb = c.num_layers, c.hidden_dim, 2.0
    if train_type == "qlora" and opt == "adam_opt":
        return L * 8 * h * 0.5 * 4 * 3 + extra_memory(c, "qlora", context_len) * batch
    if train_type == "qlora" and opt == "sgd_opt":
        return L * 8 * h * 0.5 * 4 * 1 + extra_memory(c, "qlora", context_len) * batch
    mult = {"adam_opt": 3, "sgd_opt": 1}[opt]
    if train_type == "full_trn":
        if quant == "no_quant":
            return params * mult * fb
        per = {"bnb_int8": 1, "bnb_q4": 0.5}[quant]
        return params * mult * per + extra_memory(c, quant, context_len) * batch
    if train_type == "lora_trn":
        if quant == "no_quant":
            return L * 8 * h * 2 * 4 * {"adam_opt": 3 * 2, "sgd_opt": 2}[opt]
        return L * 8 * h * 2 * 4 * mult + extra_memory(c, quant, context_len) * batch
    raise ValueError(f"Invalid combination of values: {train_type}, {opt}, {quant}")


def activation_memory(c: ParsedConfig, context_len: int, batch: int) -> float:
    """getActivationMemory (bytes, floatBytes = 2): attention, FFN and norm tensors of every layer."""
    fb, n, h, i, heads = 2.0, context_len, c.hidden_dim, c.inter_dim, c.heads
    attn = (
        n * h * 3 * fb
        + n * h * 2 * fb
        + n * n * heads * fb
        + n * n * heads * 4
        + n * n * heads * fb
        + n * h * fb
        + n * h * fb
        + n * h * fb
    )
    ffn = h * n * fb + h * n * fb + fb * 5 * n * i + i * n * fb
    norm = n * 4 * 2 + n * h * fb * 6
    return (attn + ffn + norm) * c.num_layers * batch


@dataclass(frozen=True)
class TrainingMemory:
    """getAllComputedData's training answer, in MB (MiB) as the calculator shows it."""

    total_mb: int
    model_mb: float
    grad_opt_mb: float
    activation_mb: float
    overhead_mb: float = OVERHEAD_MB


def training_memory(
    cfg: Mapping[str, Any],
    train_type: str,
    opt: str,
    quant: str,
    prompt_len: int,
    tokens_to_generate: int = 1,
    batch: int = 1,
    grad_checkpoint: bool = False,
) -> TrainingMemory:
    """The "Find Memory requirement" button with "Training (Huggingface)" selected."""
    if train_type not in TRAIN_TYPES or opt not in OPTIMIZERS or quant not in QUANTS:
        raise ValueError(f"not a gpu_poor training choice: {train_type}, {opt}, {quant}")
    if train_type == "qlora" and quant != "no_quant":
        raise ValueError("QLoRA is 4bit explicit: gpu_poor requires Quant = None")  # checkCombinationTrainInference
    c = parse_config(cfg)
    length = prompt_len + tokens_to_generate
    params = model_size(c)
    model_mb = model_size_mb(params, quant, train_type)
    act_mb = activation_memory(c, length, batch) / MIB
    if grad_checkpoint:
        act_mb *= CKPT_ACTIVATION_FACTOR
    go_mb = grad_opt_memory(train_type, opt, quant, params, c, length, batch) / MIB
    total = model_mb + go_mb + act_mb + OVERHEAD_MB
    return TrainingMemory(math.ceil(total), model_mb, go_mb, act_mb)


def training_ms_per_iteration(
    cfg: Mapping[str, Any],
    gpu: str,
    train_type: str,
    opt: str,
    quant: str,
    prompt_len: int,
    tokens_to_generate: int = 1,
    batch: int = 1,
    grad_checkpoint: bool = False,
) -> float:
    """token_per_second_logic_Train: "ms per iteration (forward + backward)", always compute bound."""
    compute = GPU_COMPUTE_TFLOPS[gpu]
    bnb_cost = {"bnb_int8": 3.0, "bnb_q4": 2.75, "qlora": 1.75}.get(quant, 1.0)
    c = parse_config(cfg)
    total_len = prompt_len + tokens_to_generate
    params = model_size(c)
    flops = 2 * batch * total_len * params + total_len * c.hidden_dim * 2 * c.num_layers * batch
    flops *= 2  # backward pass
    flops *= 1.15 if opt == "adam_opt" else 1.0
    flops *= bnb_cost
    if train_type == "full_trn":
        flops *= 3  # "move the weights back to GPU for update ... Total 3x"
    ms = flops * 1000 / (TERA * compute * 0.85)
    if grad_checkpoint:
        ms *= 1.65
    return ms


# ---- adapter: a TrainingPlan as the calculator's dropdowns -------------------------------------------
#: our catalog GPU id -> gpu_poor's GPU dropdown key (the time needs its `compute`; memory needs no GPU)
GPU_KEYS = {
    "rtx-3060-12gb": "rtx-3060",
    "rtx-3090": "rtx-3090",
    "rtx-4090": "rtx-4090",
    "rtx-a6000": "A-6000",
    "a100-40gb": "A100-40GB",
    "a100-80gb": "A100-80GB",
    "h100-sxm": "H100-SXM5",
    "h100-pcie": "H100-PCIe",
}


def _choices(case) -> tuple[dict, str, str, str]:
    """(config.json, Train method, Optimizer, Quant) for a plan, or NotExpressible."""
    from advisor.families import hf_config
    from bench.peers_base import NotExpressible, lora_roles, optimizer_family, sharded

    p = case.plan
    train_type = {"full": "full_trn", "lora": "lora_trn", "qlora": "qlora"}.get(p.method)
    if train_type is None:
        raise NotExpressible(f"method {p.method} (gpu_poor: Full, LoRA, QLoRA)")
    if p.method != "full":
        lora_roles(case.model, p)  # modules_to_save is not expressible (LoRA rank and targets are no input)
    if p.dtype == "fp32":
        raise NotExpressible("fp32 training (gpu_poor computes with 2-byte floats only)")
    if optimizer_family(p) != "adam32":
        raise NotExpressible(f"optimiser {p.optimizer} (gpu_poor: ADAM or SGD)")
    if sharded(p):
        raise NotExpressible("FSDP sharding over several GPUs (gpu_poor's training memory is one GPU's)")
    return hf_config(case.model), train_type, "adam_opt", "no_quant"


def memory_gib(case) -> float:
    """ "Total" of a training estimate (MB = MiB), in GiB; prompt len = seq_len, tokens to generate = 1."""
    cfg, train_type, opt, quant = _choices(case)
    p = case.plan
    mem = training_memory(cfg, train_type, opt, quant, p.seq_len, 1, p.micro_batch, p.grad_checkpointing)
    return mem.total_mb / 1024


def tokens_per_s(case) -> float:
    """Tokens per second per GPU: micro_batch x seq_len over "ms per iteration (forward + backward)"."""
    from bench.peers_base import NotExpressible

    cfg, train_type, opt, quant = _choices(case)
    p = case.plan
    key = GPU_KEYS.get(case.gpu.id)
    if key is None:
        raise NotExpressible(f"GPU {case.gpu.id} is not in gpu_poor's GPU list")
    if p.num_gpus > 1:
        raise NotExpressible("several GPUs (gpu_poor's training time has no GPU count)")
    ms = training_ms_per_iteration(cfg, key, train_type, opt, quant, p.seq_len, 1, p.micro_batch, p.grad_checkpointing)
    return p.micro_batch * p.seq_len / (ms / 1000)
