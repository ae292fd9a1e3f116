"""Phi-3: the Llama layout with fused ``qkv_proj`` and ``gate_up_proj``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from advisor.families.base import Config, Family, common_fields, hf_base
from advisor.families.layout import Linear

if TYPE_CHECKING:
    from advisor.specs import ModelSpec

#: transformers' Phi3Config defaults for the keys read below
CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "phi3": dict(
        intermediate_size=8192,
        num_key_value_heads=None,
        max_position_embeddings=4096,
        hidden_act="silu",
        tie_word_embeddings=False,
    ),
}


class Phi3Family(Family):
    def attention(self, spec: ModelSpec, prefix: str = "") -> list[Linear]:
        h, q, kv = spec.hidden_size, spec.q_dim, spec.kv_dim
        return [
            Linear("qkv_proj", ("q", "k", "v"), h, q + 2 * kv, spec.attention_bias),
            Linear("o_proj", ("o",), q, h, False),
        ]

    def mlp(self, spec: ModelSpec) -> list[Linear]:
        h, i, mb = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        return [Linear("gate_up_proj", ("gate", "up"), h, 2 * i, mb), Linear("down_proj", ("down",), i, h, mb)]

    def read_config(self, c: Config, model_type: str, core: dict[str, Any]) -> dict[str, Any]:
        return dict(common_fields(c, core), tie_word_embeddings=bool(c.raw("tie_word_embeddings")))

    def to_hf_config(self, spec: ModelSpec) -> dict[str, Any]:
        return dict(
            hf_base(spec),
            model_type="phi3",
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.kv_heads,
            pad_token_id=None,
        )


FAMILY = Phi3Family(
    name="phi3",
    summary="the Llama layout with fused qkv_proj / gate_up_proj (Phi-3)",
    config_defaults=CONFIG_DEFAULTS,
    fused_qkv=True,
    sdpa_keeps_fused_qkv=True,
)
