"""GPT-2: learned positions, fused ``c_attn`` (Conv1D), plain GELU MLP, biases everywhere, LayerNorm."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from advisor.families.base import Config, Family, common_fields, hf_base
from advisor.families.layout import Linear

if TYPE_CHECKING:
    from advisor.specs import ModelSpec

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


class Gpt2Family(Family):
    def attention(self, spec: ModelSpec, prefix: str = "") -> list[Linear]:
        h = spec.hidden_size
        return [Linear("c_attn", ("q", "k", "v"), h, 3 * h, True), Linear("c_proj", ("o",), h, h, True)]

    def mlp(self, spec: ModelSpec) -> list[Linear]:
        h, i = spec.hidden_size, spec.intermediate_size
        return [Linear("c_fc", ("up",), h, i, True), Linear("c_proj", ("down",), i, h, True)]

    def read_config(self, c: Config, model_type: str, core: dict[str, Any]) -> dict[str, Any]:
        return dict(
            common_fields(c, core),
            tie_word_embeddings=bool(c.raw("tie_word_embeddings")),
            dropout=float(c.first("resid_pdrop")),
        )

    def to_hf_config(self, spec: ModelSpec) -> dict[str, Any]:
        return dict(
            hf_base(spec),
            model_type="gpt2",
            n_embd=spec.hidden_size,
            n_inner=spec.intermediate_size,
            n_layer=spec.num_layers,
            n_head=spec.num_attention_heads,
            n_positions=spec.max_position_embeddings,
        )


FAMILY = Gpt2Family(
    name="gpt2",
    summary="learned positions, fused c_attn, plain GELU MLP, biases everywhere, LayerNorm",
    config_defaults=CONFIG_DEFAULTS,
    fused_qkv=True,
    quirks=dict(
        gated_mlp=False,
        attention_bias=True,
        mlp_bias=True,
        norm="layernorm",
        learned_positions=True,
    ),
)
