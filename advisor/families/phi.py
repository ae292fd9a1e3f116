"""Phi-1.5 / Phi-2: attention and MLP in parallel after one LayerNorm, biases everywhere, biased head."""

from __future__ import annotations

from typing import Any

from advisor.families.base import GPT_STYLE, SEPARATE_QKV, Family, mlp_rows

#: transformers' PhiConfig defaults for the keys read below
CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "phi": dict(
        intermediate_size=8192,
        num_key_value_heads=None,
        max_position_embeddings=2048,
        hidden_act="gelu_new",
        tie_word_embeddings=False,
    ),
}

FAMILY = Family(
    name="phi",
    summary="parallel attention+MLP with one LayerNorm (phi-1.5, phi-2), biases",
    config_defaults=CONFIG_DEFAULTS,
    parallel_residual=True,
    quirks=dict(GPT_STYLE, norms_per_layer=1, lm_head_bias=True),
    attention_layout=(*SEPARATE_QKV, ("dense", ("o",), "q", "h", True)),
    mlp_layout=mlp_rows("fc1", "fc2", True),
)
