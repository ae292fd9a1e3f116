"""GPT-2: learned positions, fused ``c_attn`` (Conv1D), plain GELU MLP, biases everywhere, LayerNorm."""

from __future__ import annotations

from typing import Any

from advisor.families.base import GPT_STYLE, Family, mlp_rows

#: transformers' GPT2Config defaults for the keys read below (n_inner None: 4 x n_embd)
CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(
        n_inner=None,
        n_positions=1024,
        activation_function="gelu_new",
        tie_word_embeddings=True,
        resid_pdrop=0.1,
    ),
}

FAMILY = Family(
    name="gpt2",
    summary="learned positions, fused c_attn, plain GELU MLP, biases everywhere, LayerNorm",
    config_defaults=CONFIG_DEFAULTS,
    quirks=dict(GPT_STYLE, learned_positions=True),
    attention_layout=(("c_attn", ("q", "k", "v"), "h", "3h", True), ("c_proj", ("o",), "h", "h", True)),
    mlp_layout=mlp_rows("c_fc", "c_proj", True),
    dropout_key="resid_pdrop",
    embedding_module="wte",
    hf_keys=dict(
        n_embd="hidden_size",
        n_inner="intermediate_size",
        n_layer="num_layers",
        n_head="num_attention_heads",
        n_positions="max_position_embeddings",
    ),
)
