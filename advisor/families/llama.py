"""Llama-format decoders: pre-norm, RoPE, separate q/k/v/o, gated (SwiGLU/GeGLU) or plain MLP, RMSNorm.

Llama, Mistral, Qwen2/3, Gemma, Gemma-2/3, OLMo, Granite, Cohere (and any unknown model_type, read as
Llama with a note). Per-model_type differences are data: `CONFIG_DEFAULTS` (the transformers config
class defaults) and `VARIANTS` (how the model runs in transformers).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from advisor.errors import InvalidInputError
from advisor.families.base import LLAMA_FORMAT_KEYS, SEPARATE_QKV, Config, Family, mlp_rows

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
_QWEN2 = dict(
    intermediate_size=22016,
    num_key_value_heads=32,
    max_position_embeddings=32768,
    hidden_act="silu",
    tie_word_embeddings=False,
)
_GEMMA2 = dict(
    intermediate_size=9216,
    num_key_value_heads=4,
    head_dim=256,
    max_position_embeddings=8192,
    hidden_activation="gelu_pytorch_tanh",
    tie_word_embeddings=True,
    attention_bias=False,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
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
    "qwen2": _QWEN2,
    "qwen3": dict(_QWEN2, head_dim=128, attention_bias=False),
    "gemma": dict(
        intermediate_size=24576,
        num_key_value_heads=16,
        head_dim=256,
        max_position_embeddings=8192,
        hidden_act="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        attention_bias=False,
    ),
    "gemma2": _GEMMA2,
    "gemma3_text": dict(
        _GEMMA2, max_position_embeddings=131072, attn_logit_softcapping=None, final_logit_softcapping=None
    ),
    "olmo": _OLMO,
    "olmo2": _OLMO,
    "granite": dict(_OLMO, mlp_bias=False),
    "cohere": dict(_OLMO, intermediate_size=22528, max_position_embeddings=8192, tie_word_embeddings=True),
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
    def read_config(self, c: Config, model_type: str, core: dict[str, Any]) -> dict[str, Any]:
        kw = super().read_config(c, model_type, core)
        if model_type in ACTIVATION_KEYS:
            kw["hidden_act"] = str(c.first(*ACTIVATION_KEYS[model_type]))
        kw["softcapping"] = bool(c.raw("attn_logit_softcapping") or c.raw("final_logit_softcapping"))
        kw.update(VARIANTS.get(model_type, {}))
        if kw["head_dim"] is None and core["hidden_size"] % core["num_attention_heads"]:
            raise InvalidInputError(
                "hidden_size is not a multiple of num_attention_heads and no head_dim given", field="model"
            )
        return kw

    def to_hf_config(self, spec: ModelSpec, model_type: str | None = None) -> dict[str, Any]:
        mt = model_type or llama_type(spec)
        if not spec.gated_mlp:
            raise InvalidInputError(
                f"{spec.name}: a Llama-format model without a gated MLP cannot be built", field="model"
            )
        cfg = super().to_hf_config(spec, mt)
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
    attention_layout=(*SEPARATE_QKV, ("o_proj", ("o",), "q", "h", False)),
    mlp_layout=mlp_rows("up_proj", "down_proj", "mlp_bias"),
    gated_mlp_layout=mlp_rows("up_proj", "down_proj", "mlp_bias", gate="gate_proj"),
    config_flags=("tie_word_embeddings", "attention_bias", "mlp_bias"),
    hf_keys=dict(LLAMA_FORMAT_KEYS, num_key_value_heads="kv_heads", head_dim="head_size"),
)
