"""Llama-format decoders: pre-norm, RoPE, separate q/k/v/o, gated (SwiGLU/GeGLU) or plain MLP, RMSNorm.

Llama, Mistral, Qwen2/3, Gemma, Gemma-2/3, OLMo, Granite, Cohere (and any unknown model_type, read as
Llama with a note). Per-model_type differences are data: `CONFIG_DEFAULTS` (the transformers config
class defaults) and `VARIANTS` (how the model runs in transformers).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from advisor.errors import InvalidInputError
from advisor.families.base import Config, Family, common_fields, hf_base
from advisor.families.layout import Linear

if TYPE_CHECKING:
    from advisor.specs import ModelSpec

_LLAMA = dict(
    intermediate_size=11008,
    num_key_value_heads=None,  # None: as many as the attention heads
    head_dim=None,  # None: hidden_size / num_attention_heads
    max_position_embeddings=2048,
    hidden_act="silu",
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
)
_OLMO = dict(
    intermediate_size=11008,
    num_key_value_heads=None,
    max_position_embeddings=2048,
    hidden_act="silu",
    tie_word_embeddings=False,
    attention_bias=False,
)

#: transformers' config class defaults (5.x) for the keys read below; tests/test_families.py checks them.
CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": _LLAMA,
    "mistral": dict(
        intermediate_size=14336,
        num_key_value_heads=8,
        head_dim=None,
        max_position_embeddings=131072,
        hidden_act="silu",
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        intermediate_size=22016,
        num_key_value_heads=32,
        max_position_embeddings=32768,
        hidden_act="silu",
        tie_word_embeddings=False,
    ),
    "qwen3": dict(
        intermediate_size=22016,
        num_key_value_heads=32,
        head_dim=128,
        max_position_embeddings=32768,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
    ),
    "gemma": dict(
        intermediate_size=24576,
        num_key_value_heads=16,
        head_dim=256,
        max_position_embeddings=8192,
        hidden_act="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        attention_bias=False,
    ),
    "gemma2": dict(
        intermediate_size=9216,
        num_key_value_heads=4,
        head_dim=256,
        max_position_embeddings=8192,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        attention_bias=False,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
    "gemma3_text": dict(
        intermediate_size=9216,
        num_key_value_heads=4,
        head_dim=256,
        max_position_embeddings=131072,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        attention_bias=False,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
    ),
    "olmo": _OLMO,
    "olmo2": _OLMO,
    "granite": dict(_OLMO, mlp_bias=False),
    "cohere": dict(
        intermediate_size=22528,
        num_key_value_heads=None,
        max_position_embeddings=8192,
        hidden_act="silu",
        tie_word_embeddings=True,
        attention_bias=False,
    ),
    # remote-code types (no transformers config class): Llama's defaults
    "yi": _LLAMA,
    "internlm2": _LLAMA,
}

#: How transformers runs a model_type, beyond its config: fixed ModelSpec fields, and where the
#: activation is read from.
VARIANTS: dict[str, dict[str, Any]] = {
    # Qwen2Attention hard-codes bias=True on q/k/v (the config has no attention_bias key)
    "qwen2": dict(attention_bias=True),
    # Gemma-2: soft-capped attention has no SDPA path; norms before and after attention and MLP
    "gemma2": dict(sdpa=False, norms_per_layer=4),
    "gemma3_text": dict(norms_per_layer=4),
}
#: model_types whose MLP reads `hidden_activation` (GemmaMLP of Gemma-2/3); the rest read `hidden_act`
ACTIVATION_KEYS: dict[str, tuple[str, ...]] = {
    "gemma2": ("hidden_activation",),
    "gemma3_text": ("hidden_activation",),
}


def llama_type(spec: ModelSpec) -> str:
    """The model_type a Llama-family spec is rebuilt as (from its layout quirks and names)."""
    text = f"{spec.name} {spec.hf_id or ''} {' '.join(spec.aliases)}".lower()
    if spec.norms_per_layer == 4 or re.search(r"gemma-?2-", text):
        return "gemma2"
    if "gemma" in text:
        return "gemma"
    if "qwen" in text:
        return "qwen2"
    if "mistral" in text:
        return "mistral"
    return "llama"


class LlamaFamily(Family):
    def attention(self, spec: ModelSpec, prefix: str = "") -> list[Linear]:
        h, q, kv, ab = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.attention_bias
        return [
            Linear("q_proj", ("q",), h, q, ab),
            Linear("k_proj", ("k",), h, kv, ab),
            Linear("v_proj", ("v",), h, kv, ab),
            Linear("o_proj", ("o",), q, h, False),
        ]

    def mlp(self, spec: ModelSpec) -> list[Linear]:
        h, i, mb = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        if spec.gated_mlp:
            return [
                Linear("gate_proj", ("gate",), h, i, mb),
                Linear("up_proj", ("up",), h, i, mb),
                Linear("down_proj", ("down",), i, h, mb),
            ]
        return [Linear("up_proj", ("up",), h, i, mb), Linear("down_proj", ("down",), i, h, mb)]

    def read_config(self, c: Config, model_type: str, core: dict[str, Any]) -> dict[str, Any]:
        kw = common_fields(c, core)
        if model_type in ACTIVATION_KEYS:
            kw["hidden_act"] = str(c.first(*ACTIVATION_KEYS[model_type]))
        kw.update(
            softcapping=bool(c.raw("attn_logit_softcapping") or c.raw("final_logit_softcapping")),
            tie_word_embeddings=bool(c.raw("tie_word_embeddings")),
            attention_bias=bool(c.raw("attention_bias")),
            mlp_bias=bool(c.raw("mlp_bias")),
        )
        kw.update(VARIANTS.get(model_type, {}))
        if kw["head_dim"] is None and core["hidden_size"] % core["num_attention_heads"]:
            raise InvalidInputError(
                "hidden_size is not a multiple of num_attention_heads and no head_dim given", field="model"
            )
        return kw

    def to_hf_config(self, spec: ModelSpec) -> dict[str, Any]:
        mt = llama_type(spec)
        if not spec.gated_mlp:
            raise InvalidInputError(
                f"{spec.name}: a Llama-format model without a gated MLP cannot be built", field="model"
            )
        cfg = dict(
            hf_base(spec),
            model_type=mt,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_attention_heads,
            num_key_value_heads=spec.kv_heads,
            head_dim=spec.head_size,
        )
        if mt == "llama":
            cfg.update(attention_bias=spec.attention_bias, mlp_bias=spec.mlp_bias)
        if mt in ("gemma", "gemma2"):
            cfg.update(hidden_activation="gelu_pytorch_tanh", hidden_act="gelu_pytorch_tanh")
        if mt == "gemma2":
            cfg.update(query_pre_attn_scalar=spec.head_size, sliding_window=4096)
        if mt == "mistral":
            cfg.update(sliding_window=None)
        return cfg


FAMILY = LlamaFamily(
    name="llama",
    summary="pre-norm decoder, RoPE, separate q/k/v/o, gated (SwiGLU/GeGLU) or plain MLP "
    '(Llama, Mistral, Qwen2, Gemma, ... any "Llama-format" config)',
    config_defaults=CONFIG_DEFAULTS,
)
