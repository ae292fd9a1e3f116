"""Phi-1.5 / Phi-2: attention and MLP in parallel after one LayerNorm, biases everywhere, biased head."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from advisor.families.base import Config, Family, common_fields, hf_base
from advisor.families.layout import Linear

if TYPE_CHECKING:
    from advisor.specs import ModelSpec

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


class PhiFamily(Family):
    def attention(self, spec: ModelSpec, prefix: str = "") -> list[Linear]:
        h, q, kv, ab = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.attention_bias
        return [
            Linear("q_proj", ("q",), h, q, ab),
            Linear("k_proj", ("k",), h, kv, ab),
            Linear("v_proj", ("v",), h, kv, ab),
            Linear("dense", ("o",), q, h, True),
        ]

    def mlp(self, spec: ModelSpec) -> list[Linear]:
        h, i = spec.hidden_size, spec.intermediate_size
        return [Linear("fc1", ("up",), h, i, True), Linear("fc2", ("down",), i, h, True)]

    def read_config(self, c: Config, model_type: str, core: dict[str, Any]) -> dict[str, Any]:
        return dict(common_fields(c, core), tie_word_embeddings=bool(c.raw("tie_word_embeddings")))

    def to_hf_config(self, spec: ModelSpec) -> dict[str, Any]:
        return dict(
            hf_base(spec),
            model_type="phi",
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_attention_heads,
        )


FAMILY = PhiFamily(
    name="phi",
    summary="parallel attention+MLP with one LayerNorm (phi-1.5, phi-2), biases",
    config_defaults=CONFIG_DEFAULTS,
    parallel_residual=True,
    quirks=dict(
        gated_mlp=False,
        attention_bias=True,
        mlp_bias=True,
        norm="layernorm",
        norms_per_layer=1,
        lm_head_bias=True,
    ),
)
