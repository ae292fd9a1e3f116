"""Llama-format decoders: pre-norm, RoPE, separate q/k/v/o, gated (SwiGLU/GeGLU) or plain MLP, RMSNorm.

Llama (3.x), Mistral (Small), Ministral, Qwen2/3, Gemma, Gemma-2/3, OLMo, OLMo-2/3, Granite, SmolLM3, EXAONE-4,
Seed-OSS, Cohere (and any unknown model_type, read as Llama with a note). Per-model_type differences are data:
`CONFIG_DEFAULTS` (the transformers config class defaults), `VARIANTS` (how the model runs in transformers: qk-norm,
four norms), `SLIDING_PATTERNS` (which layers attend through a window), `QK_NORM_OVER_PROJECTION`, `POST_NORM`,
`NORM_WEIGHT_IN_FP32`. Types new since the 2024 catalog keep their model_type on the spec and are rebuilt as
themselves (`REBUILT_AS_THEMSELVES`): tests/test_dense_families.py builds each on the meta device and compares.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from advisor.errors import InvalidInputError
from advisor.families.base import LLAMA_FORMAT_KEYS, SEPARATE_QKV, Config, Family, mlp_rows
from advisor.families.layout import Block

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
        sliding_window=4096,
    ),
    "qwen2": _QWEN2,
    "qwen3": dict(_QWEN2, head_dim=128, attention_bias=False, use_sliding_window=False),
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
        _GEMMA2,
        max_position_embeddings=131072,
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        sliding_window=4096,
    ),
    "olmo": _OLMO,
    "olmo2": _OLMO,
    "olmo3": dict(_OLMO, sliding_window=4096),
    "granite": dict(_OLMO, mlp_bias=False),
    "smollm3": dict(
        intermediate_size=11008,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        hidden_act="silu",
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        use_sliding_window=False,
    ),
    "exaone4": dict(
        intermediate_size=16384,
        num_key_value_heads=32,
        max_position_embeddings=2048,
        hidden_act="silu",
        tie_word_embeddings=False,
        sliding_window=4096,
    ),
    "ministral": dict(
        intermediate_size=14336,
        num_key_value_heads=8,
        head_dim=None,
        max_position_embeddings=131072,
        hidden_act="silu",
        tie_word_embeddings=False,
        sliding_window=4096,
    ),
    "seed_oss": dict(
        intermediate_size=27648,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=524288,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=True,
        mlp_bias=False,
    ),
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
    # Gemma-3: Gemma-2's four norms per layer, RMSNorm on q and k per head (soft-capping gone, SDPA back)
    "gemma3_text": dict(norms_per_layer=4, qk_norm=True),
    "qwen3": dict(qk_norm=True),
    # OLMo-2/3: q_norm / k_norm over the whole q and k projections; two norms per layer after attention and MLP
    "olmo2": dict(qk_norm=True),
    "olmo3": dict(qk_norm=True),
    # EXAONE-4: OLMo-2's post-norm layout with Qwen3's per-head q/k norms; no bias anywhere
    "exaone4": dict(qk_norm=True, attention_bias=False, mlp_bias=False),
}
#: model_types whose RMSNorm multiplies its weight in fp32 (Gemma's ``x * (1 + w.float())``, OLMo-2's
#: ``(w * x).to(dtype)``): a trainable weight keeps the fp32 normalised input for its gradient, not a half copy
NORM_WEIGHT_IN_FP32 = frozenset({"gemma", "gemma2", "gemma3_text", "olmo2", "olmo3"})
#: post-norm layers (OLMo-2/3, EXAONE-4): the norms read the attention / MLP outputs, the projections the residual
POST_NORM = frozenset({"olmo2", "olmo3", "exaone4"})
#: post-norm types whose norms cast to the input dtype before the weight: under AMP they keep a half copy
HALF_INPUT_POST_NORMS = POST_NORM - NORM_WEIGHT_IN_FP32
#: model_types whose q_norm / k_norm normalise the whole projection (q_dim and kv_dim weights), not each head
QK_NORM_OVER_PROJECTION = frozenset({"olmo2", "olmo3"})
#: model_types with local (sliding-window) attention layers -> the config class's layer rule when the config.json
#: gives no ``layer_types``: 0 = every layer slides, N = layer i is global when (i + 1) % N == 0
SLIDING_PATTERNS: dict[str, int] = {"mistral": 0, "ministral": 0, "gemma3_text": 6, "olmo3": 4, "exaone4": 4}
#: model_types new since the 2024 catalog: rebuilt as themselves from the spec (model_type kept)
REBUILT_AS_THEMSELVES = frozenset(
    {"qwen3", "gemma3_text", "olmo2", "olmo3", "smollm3", "granite", "exaone4", "ministral", "seed_oss"}
)
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


def sliding_layout(c: Config, model_type: str, num_layers: int) -> tuple[int | None, int]:
    """(window, pattern) of a config.json, as its config class derives ``layer_types``: the file's
    ``layer_types`` when given, else its ``sliding_window_pattern`` (an int, or EXAONE-4's "LLLG" string),
    else the class's own rule (`SLIDING_PATTERNS`). (None, 0) where no layer slides; pattern 0 where every
    layer of the model slides (whatever rule made them)."""
    if model_type not in SLIDING_PATTERNS or c.raw("use_sliding_window") is False:
        return None, 0
    window = c.raw("sliding_window")
    types = c.cfg.get("layer_types")
    if window is None or (types is not None and "sliding_attention" not in types):
        return None, 0
    if types is not None:
        full = [i for i, t in enumerate(types) if t != "sliding_attention"]
        return int(window), (full[0] + 1 if full else 0)
    pattern = c.cfg.get("sliding_window_pattern")
    if isinstance(pattern, str):
        pattern = pattern.upper().find("G") + 1  # "LLLG": every 4th layer global
    pattern = int(SLIDING_PATTERNS[model_type] if pattern is None else pattern)
    return int(window), (0 if pattern > num_layers else pattern)


def layer_types(spec: ModelSpec) -> list[str]:
    """transformers' ``layer_types`` for the spec's sliding-window layout."""
    n = spec.sliding_window_pattern
    slides = [spec.sliding_window is not None and (n <= 0 or bool((i + 1) % n)) for i in range(spec.num_layers)]
    return ["sliding_attention" if s else "full_attention" for s in slides]


def qk_norm_params(spec: ModelSpec) -> int:
    """Weights of one layer's q_norm and k_norm: per head (head_dim each), or over the whole projections."""
    if not spec.qk_norm:
        return 0
    return spec.q_dim + spec.kv_dim if spec.model_type in QK_NORM_OVER_PROJECTION else 2 * spec.head_size


class LlamaFamily(Family):
    def blocks(self, spec: ModelSpec) -> tuple[Block, ...]:
        return tuple(replace(b, norm_params=b.norm_params + qk_norm_params(spec)) for b in super().blocks(spec))

    def read_config(self, c: Config, model_type: str, core: dict[str, Any]) -> dict[str, Any]:
        kw = super().read_config(c, model_type, core)
        if model_type in ACTIVATION_KEYS:
            kw["hidden_act"] = str(c.first(*ACTIVATION_KEYS[model_type]))
        kw["softcapping"] = bool(c.raw("attn_logit_softcapping") or c.raw("final_logit_softcapping"))
        if model_type in self.config_defaults:
            kw["model_type"] = model_type
        kw["sliding_window"], kw["sliding_window_pattern"] = sliding_layout(c, model_type, core["num_layers"])
        kw.update(VARIANTS.get(model_type, {}))
        if kw["head_dim"] is None and core["hidden_size"] % core["num_attention_heads"]:
            raise InvalidInputError(
                "hidden_size is not a multiple of num_attention_heads and no head_dim given", field="model"
            )
        return kw

    def to_hf_config(self, spec: ModelSpec, model_type: str | None = None) -> dict[str, Any]:
        mt = model_type or spec.model_type or llama_type(spec)
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
            cfg.update(sliding_window=spec.sliding_window)
        if mt in REBUILT_AS_THEMSELVES:
            cfg.update(self._new_type_keys(spec, mt))
        return cfg

    @staticmethod
    def _new_type_keys(spec: ModelSpec, mt: str) -> dict[str, Any]:
        """The keys a 2025-2026 type's config class needs to build exactly the spec's model."""
        keys: dict[str, Any] = {"pad_token_id": None}  # the class's pad id may lie outside a shrunk vocabulary
        if "attention_bias" in CONFIG_DEFAULTS[mt]:
            keys["attention_bias"] = spec.attention_bias
        if "mlp_bias" in CONFIG_DEFAULTS[mt]:
            keys["mlp_bias"] = spec.mlp_bias
        if mt in SLIDING_PATTERNS:
            keys.update(sliding_window=spec.sliding_window, layer_types=layer_types(spec))
        if mt == "gemma3_text":
            keys.update(hidden_activation=spec.hidden_act, query_pre_attn_scalar=spec.head_size)
        return keys


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
