"""The referee's random design: seeded draws of (architecture, plan) pairs across every family, method,
dtype, sequence length, micro-batch, checkpointing, optimiser and LoRA target set, tiny to 70B.

Why a random design: a fixed grid of 12 models x 4 plans only tests what its author thought of; seeded
draws over every field a user can set find the corners (fp16 full fine-tuning with pure half states,
eager attention at 16k tokens, QLoRA on an fp32 model, DoRA on T5's feed-forward...). The design is
reproducible from (n, seed) and written next to the results, so a re-run compares the same rows.

Architectures come from the catalog (real configs of every family) in three sizes:

* ``real``: the catalog model as published (tiny 0.1B to 72B; big ones are a minority because a 70B
  trace costs 12-35 CPU seconds);
* ``shallow``: the real widths, vocabulary and head layout with 1-4 layers (the big matrices and
  the logits of a 70B at the cost of a small trace);
* ``tiny``: widths 64-1024, 1-4 layers, vocabularies 1k-256k (cheap: the bulk of the design).

Pure data (no torch): each design row is a dict the bench turns into a ``ModelSpec`` and a ``TrainingPlan``.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

from advisor.catalog import default_catalog
from advisor.families import hf_config
from advisor.specs import ModelSpec

#: model_type -> catalog members (filled from the catalog at first use)
SIZES = (("real", 0.3), ("shallow", 0.25), ("tiny", 0.45))
METHODS = ("full", "lora", "qlora", "dora")
DTYPES = (("bf16", 0.55), ("fp16", 0.25), ("fp32", 0.2))
OPTIMIZERS = (("adamw", 0.55), ("adamw-8bit", 0.15), ("paged-adamw-8bit", 0.15), ("paged-adamw-32bit", 0.15))
MICRO_BATCHES = ((1, 0.35), (2, 0.25), (4, 0.2), (8, 0.12), (16, 0.08))
GRAD_ACCUM = ((1, 0.7), (2, 0.15), (4, 0.15))
#: LoRA target sets users pick (roles, all-linear, the embedding and the head)
TARGET_SETS = (
    (("all-linear",), 0.3),
    (("q", "v"), 0.2),
    (("q", "k", "v", "o"), 0.15),
    (("gate", "up", "down"), 0.1),
    (("o", "down"), 0.05),
    (("all-linear", "lm_head"), 0.08),
    (("q", "v", "embed_tokens"), 0.06),
    (("all-linear",), 0.06),  # + modules_to_save below
)
LORA_RANKS = (4, 8, 16, 32, 64, 128)
SEQ_MIN, SEQ_MAX = 64, 32768


def _pick(rng: random.Random, weighted):
    values, weights = zip(*weighted, strict=True)
    return rng.choices(values, weights=weights)[0]


def draw_method_knobs(rng: random.Random, plan: dict[str, Any], method: str, dropouts: tuple[float, ...]) -> None:
    """The method's own knobs, drawn into `plan`: master weights for full fine-tuning; for the adapters a target
    set (the last one with a modules_to_save copy), the rank, alpha = 2r and a dropout from `dropouts`."""
    if method == "full":
        plan["master_weights"] = rng.random() < 0.8
        return
    k = rng.choices(range(len(TARGET_SETS)), weights=[w for _, w in TARGET_SETS])[0]
    plan["lora_targets"] = list(TARGET_SETS[k][0])
    if k == len(TARGET_SETS) - 1:
        plan["modules_to_save"] = [rng.choice(("lm_head", "embed_tokens"))]
    plan["lora_r"] = rng.choice(LORA_RANKS)
    plan["lora_alpha"] = 2 * plan["lora_r"]
    plan["lora_dropout"] = rng.choice(dropouts)


def _by_type() -> dict[str, list[ModelSpec]]:
    out: dict[str, list[ModelSpec]] = {}
    for m in default_catalog().models:
        out.setdefault(str(hf_config(m).get("model_type")), []).append(m)
    return out


def _tiny_arch(rng: random.Random, base: ModelSpec, mtype: str) -> dict[str, Any]:
    """Widths 64-1024, 1-4 layers, 1k-256k vocabulary, the base's head layout rules."""
    head = rng.choice((32, 64)) if mtype not in ("gemma", "gemma2") else rng.choice((64, 128, 256))
    heads = rng.choice((1, 2, 4, 8, 16))
    while heads * head > 2048 and heads > 1:
        heads //= 2
    hidden = heads * head if mtype not in ("gemma", "gemma2", "t5") else rng.choice((64, 128, 256, 512, 768, 1024))
    gqa = base.num_key_value_heads is not None and base.num_key_value_heads < base.num_attention_heads
    kv = rng.choice([d for d in (1, 2, 4, 8, 16) if heads % d == 0]) if gqa else None
    inter = 64 * max(1, round(hidden * rng.uniform(2.0, 4.0) / 64))
    vocab = base.vocab_size if rng.random() < 0.3 else round(10 ** rng.uniform(3, 5.4))
    arch = {
        "num_layers": rng.randint(1, 4),
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv if gqa else (heads if base.num_key_value_heads is not None else None),
        "head_dim": head if (base.head_dim is not None) else None,
        "vocab_size": vocab,
    }
    return arch


def draw(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` design rows from `seed`: {"id", "base", "size", "arch" (overrides of the base spec), "plan"}."""
    rng = random.Random(seed)
    types = _by_type()
    names = sorted(types)
    rows = []
    for i in range(n):
        mtype = names[i % len(names)] if i < len(names) * 3 else rng.choice(names)  # every type early
        base = rng.choice(types[mtype])
        size = _pick(rng, SIZES)
        arch: dict[str, Any] = {}
        if size == "shallow":
            arch = {"num_layers": rng.randint(1, 4)}
        elif size == "tiny":
            arch = _tiny_arch(rng, base, mtype)
        if mtype == "t5" and "num_layers" in arch:
            arch["num_decoder_layers"] = arch["num_layers"]
        method = rng.choice(METHODS)
        seq = round(10 ** rng.uniform(2, 4.2) / 8) * 8  # ~100 to 16k tokens, log-uniform
        seq = max(SEQ_MIN, min(SEQ_MAX, seq if rng.random() > 0.1 else rng.choice((SEQ_MIN, SEQ_MAX))))
        context = base.max_position_embeddings
        if size == "tiny":
            arch["max_position_embeddings"] = max(context, seq)
        else:
            seq = min(seq, context)
        plan: dict[str, Any] = {
            "method": method,
            "dtype": _pick(rng, DTYPES),
            "micro_batch": _pick(rng, MICRO_BATCHES),
            "seq_len": seq,
            "grad_checkpointing": rng.random() < 0.5,
            "optimizer": _pick(rng, OPTIMIZERS),
            "attention": "eager" if rng.random() < 0.15 else "sdpa",
            "grad_accum": _pick(rng, GRAD_ACCUM),
        }
        draw_method_knobs(rng, plan, method, dropouts=(0.0, 0.05, 0.05, 0.1))
        if method != "full" and mtype == "t5":  # T5's shared embedding cannot go through peft: its head instead
            plan["lora_targets"] = [t if t != "embed_tokens" else "lm_head" for t in plan["lora_targets"]]
            if plan.get("modules_to_save") == ["embed_tokens"]:
                plan["modules_to_save"] = ["lm_head"]
        rows.append({"id": i, "base": base.name, "model_type": mtype, "size": size, "arch": arch, "plan": plan})
    return rows


def model_of(row: dict[str, Any]) -> ModelSpec:
    """The design row's architecture: its catalog base with the row's overrides."""
    base = default_catalog().model(row["base"])
    if not row["arch"]:
        return base
    tag = "x".join(f"{row['arch'].get(k, '')}" for k in ("num_layers", "hidden_size", "vocab_size"))
    return replace(base, name=f"{base.name}~{row['size']}{tag}", published_params=None, **row["arch"])
