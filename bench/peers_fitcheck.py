"""fitcheck-llm (PyPI, `pip install fitcheck-llm`) as a peer of bench.peers, through its own Python API.

fitcheck's public entry is ``fitcheck.estimate(ModelConfig, TrainingConfig, GpuSpec) -> MemoryReport``;
its ``total_mib`` is the number its CLI prints. The ModelConfig normally comes from
``fitcheck.fetch_model_config(hf_id)``, which downloads config.json from the Hub, asks the Hub for the
safetensors parameter total, and then runs fitcheck's own checks (``_reject_unsupported``: MoE and
multimodal configs; ``_parse_fields``; ``_reconcile_param_count``: refuses a model whose config-derived
parameter count is more than 2% off the Hub's). This machine reaches no Hub, so ``model_config`` runs
exactly those fitcheck functions on our catalog's config.json (``advisor.families.hf_config``) with our
catalog's parameter count standing in for the Hub's total. No fitcheck formula is re-typed or patched;
tests/test_peers.py serves the same config.json and total from a local server speaking the Hub's
endpoints (HF_ENDPOINT) and checks that ``fetch_model_config`` itself returns the same ModelConfig.

Mapping from a TrainingPlan (the nearest choice a fitcheck user has):
- method full -> lora_rank None; lora -> lora_rank r; qlora -> quantization nf4 (+ double_quant); dora:
  not expressible.
- optimiser: AdamW (paged or not) -> "adamw"; 8-bit AdamW (paged or not) -> "adam8bit". Pure
  half-precision full training (master_weights False) -> optimizer_dtype "bf16" (fitcheck still adds
  its fp32 master copy: it has no input for pure half precision).
- attention: sdpa and flash -> flash_attn True (neither materialises the score matrix); eager -> False.
- LoRA targets: roles -> q_proj ... down_proj; lm_head / embeddings / modules_to_save: not expressible.
- FSDP over several GPUs: not expressible (fitcheck is single-GPU); DDP keeps one full replica per GPU,
  which is the single-GPU answer.
- GPU: fitcheck's GPU_DB entry where it has our card (only its overhead profile depends on it; the
  measured profiles are T4 only), else ``get_gpu(vram_mib=...)``.
fitcheck estimates memory only: every throughput row is "not expressible".
"""

from __future__ import annotations

import re
from functools import cache

import fitcheck
from fitcheck.config_parser import (
    ModelConfig,
    UnsupportedModelError,
    _count_params,
    _parse_fields,
    _reconcile_param_count,
    _reject_unsupported,
)

from advisor.families import hf_config
from advisor.specs import GpuSpec, ModelSpec
from bench.peers_base import NotExpressible, PeerCase, lora_roles, optimizer_family, sharded

VERSION = fitcheck.__version__

#: our catalog GPU id -> fitcheck GPU_DB key (same card and memory)
GPU_KEYS = {
    "t4": "t4",
    "l4": "l4",
    "a10g": "a10",
    "v100-16gb": "v100-16",
    "a100-40gb": "a100-40",
    "a100-80gb": "a100-80",
    "h100-sxm": "h100",
    "h100-pcie": "h100-80",
    "h200": "h200",
    "l40s": "l40s",
    "rtx-3060-12gb": "3060-12",
    "rtx-3090": "3090",
    "rtx-4090": "4090",
    "rtx-a6000": "a6000",
}
TARGET_NAMES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}


@cache
def _model_config(model: ModelSpec) -> ModelConfig | str:
    """fetch_model_config's body after its two Hub calls; a string is fitcheck's refusal."""
    raw = hf_config(model)
    try:
        _reject_unsupported(raw, model.name)
        fields = _parse_fields(raw)
        num_params = _reconcile_param_count(model.name, model.param_count, _count_params(fields))
    except (UnsupportedModelError, ValueError) as exc:
        text = str(exc).splitlines()[0]
        if re.search(r"disagreement of [+-][\d.]+%", text):
            return "fitcheck refuses the model: its config-derived parameter count is over 2% off the published one"
        return f"fitcheck refuses the model: {text[:100]}"
    return ModelConfig(
        name=model.name,
        num_params=num_params,
        hidden_size=fields.hidden_size,
        num_layers=fields.num_layers,
        num_attention_heads=fields.num_attention_heads,
        num_kv_heads=fields.num_kv_heads,
        intermediate_size=fields.intermediate_size,
        vocab_size=fields.vocab_size,
        head_dim=fields.head_dim,
        tie_word_embeddings=fields.tie_word_embeddings,
    )


def model_config(model: ModelSpec) -> ModelConfig:
    cfg = _model_config(model)
    if isinstance(cfg, str):
        raise NotExpressible(cfg)
    return cfg


def gpu_spec(gpu: GpuSpec) -> fitcheck.GpuSpec:
    key = GPU_KEYS.get(gpu.id)
    if key is not None:
        return fitcheck.get_gpu(key)
    return fitcheck.get_gpu(gpu.name, vram_mib=max(1, int(gpu.memory_gib * 1024)))


def training_config(case: PeerCase) -> fitcheck.TrainingConfig:
    p = case.plan
    if p.method not in ("full", "lora", "qlora"):
        raise NotExpressible(f"method {p.method} (fitcheck: full, LoRA, QLoRA)")
    if sharded(p):
        raise NotExpressible("FSDP sharding over several GPUs (fitcheck is single-GPU)")
    full = p.method == "full"
    pure_half = full and not p.master_weights and p.dtype != "fp32"
    return fitcheck.TrainingConfig(
        precision=p.dtype,
        quantization="nf4" if p.method == "qlora" else "none",
        double_quant=p.method == "qlora" and p.double_quant,
        optimizer="adam8bit" if optimizer_family(p) == "adam8" else "adamw",
        optimizer_dtype="bf16" if pure_half else "fp32",
        batch_size=p.micro_batch,
        seq_len=p.seq_len,
        lora_rank=None if full else p.lora_r,
        lora_targets=[] if full else [TARGET_NAMES[r] for r in lora_roles(case.model, p)],
        grad_checkpoint=p.grad_checkpointing,
        flash_attn=p.attention in ("sdpa", "flash"),
        grad_accum_steps=p.grad_accum,
    )


def memory_gib(case: PeerCase) -> float:
    """fitcheck's total (its CLI's "total"), in GiB."""
    report = fitcheck.estimate(model_config(case.model), training_config(case), gpu_spec(case.gpu))
    return report.total_mib / 1024
