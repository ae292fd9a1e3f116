"""GPT-NeoX: parallel residual, fused ``query_key_value``, two LayerNorms, biases (StableLM-alpha, Pythia)."""

from __future__ import annotations

from typing import Any

from advisor.families.base import GPT_STYLE, LLAMA_FORMAT_KEYS, Family, mlp_rows

#: transformers' GPTNeoXConfig defaults for the keys read below
CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt_neox": dict(
        intermediate_size=24576,
        max_position_embeddings=2048,
        hidden_act="gelu",
        tie_word_embeddings=False,
        attention_bias=True,
    ),
}

FAMILY = Family(
    name="gpt_neox",
    summary="parallel residual, fused query_key_value, two LayerNorms, biases (StableLM-alpha, Pythia)",
    config_defaults=CONFIG_DEFAULTS,
    parallel_residual=True,
    sdpa_keeps_fused_qkv=True,
    norms_share_input=True,
    quirks=dict(GPT_STYLE),  # attention_bias: as the config says (config_flags)
    attention_layout=(
        ("query_key_value", ("q", "k", "v"), "h", "q+2kv", True),
        ("dense", ("o",), "q", "h", True),
    ),
    mlp_layout=mlp_rows("dense_h_to_4h", "dense_4h_to_h", True),
    config_flags=("tie_word_embeddings", "attention_bias"),
    hf_keys=dict(LLAMA_FORMAT_KEYS, attention_bias="attention_bias"),
    embedding_module="embed_in",  # the head is lm_head in transformers 5 (embed_out in older checkpoints)
)
