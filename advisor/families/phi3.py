"""Phi-3: the Llama layout with fused ``qkv_proj`` and ``gate_up_proj``."""

from __future__ import annotations

from typing import Any

from advisor.families import phi
from advisor.families.base import LLAMA_FORMAT_KEYS, Family

#: transformers' Phi3Config defaults for the keys read below: PhiConfig's, but for the context and activation
CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "phi3": dict(phi.CONFIG_DEFAULTS["phi"], max_position_embeddings=4096, hidden_act="silu"),
}

FAMILY = Family(
    name="phi3",
    summary="the Llama layout with fused qkv_proj / gate_up_proj (Phi-3)",
    config_defaults=CONFIG_DEFAULTS,
    sdpa_keeps_fused_qkv=True,
    attention_layout=(
        ("qkv_proj", ("q", "k", "v"), "h", "q+2kv", "attention_bias"),
        ("o_proj", ("o",), "q", "h", False),
    ),
    mlp_layout=(
        ("gate_up_proj", ("gate", "up"), "h", "2i", "mlp_bias"),
        ("down_proj", ("down",), "i", "h", "mlp_bias"),
    ),
    hf_keys=dict(LLAMA_FORMAT_KEYS, num_key_value_heads="kv_heads"),
    hf_constants=dict(pad_token_id=None),
)
