"""GPT-NeoX: parallel residual, fused ``query_key_value``, two LayerNorms, biases (StableLM-alpha, Pythia)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from advisor.families.base import Config, Family, common_fields, hf_base
from advisor.families.layout import Linear

if TYPE_CHECKING:
    from advisor.specs import ModelSpec

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


class GptNeoxFamily(Family):
    def attention(self, spec: ModelSpec, prefix: str = "") -> list[Linear]:
        h, q, kv = spec.hidden_size, spec.q_dim, spec.kv_dim
        return [
            Linear("query_key_value", ("q", "k", "v"), h, q + 2 * kv, True),
            Linear("dense", ("o",), q, h, True),
        ]

    def mlp(self, spec: ModelSpec) -> list[Linear]:
        h, i = spec.hidden_size, spec.intermediate_size
        return [Linear("dense_h_to_4h", ("up",), h, i, True), Linear("dense_4h_to_h", ("down",), i, h, True)]

    def read_config(self, c: Config, model_type: str, core: dict[str, Any]) -> dict[str, Any]:
        return dict(
            common_fields(c, core),
            tie_word_embeddings=bool(c.raw("tie_word_embeddings")),
            attention_bias=bool(c.raw("attention_bias")),
        )

    def to_hf_config(self, spec: ModelSpec) -> dict[str, Any]:
        return dict(
            hf_base(spec),
            model_type="gpt_neox",
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_attention_heads,
            attention_bias=spec.attention_bias,
        )


FAMILY = GptNeoxFamily(
    name="gpt_neox",
    summary="parallel residual, fused query_key_value, two LayerNorms, biases (StableLM-alpha, Pythia)",
    config_defaults=CONFIG_DEFAULTS,
    parallel_residual=True,
    fused_qkv=True,
    sdpa_keeps_fused_qkv=True,
    norms_share_input=True,
    quirks=dict(gated_mlp=False, mlp_bias=True, norm="layernorm"),
)
