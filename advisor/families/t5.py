"""T5 (and mT5, UMT5): encoder-decoder, relative position buckets, RMS-style LayerNorm, no biases.

Quirks: "gated-gelu" runs as gelu_new; dropout stays on in training (``dropout_rate``); the
feed-forward output ``wo`` stays fp32 under bitsandbytes (``_keep_in_fp32_modules``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from advisor.families.base import Config, Family, common_fields, hf_base
from advisor.families.layout import Block, Linear

if TYPE_CHECKING:
    from advisor.specs import ModelSpec

_T5 = dict(
    d_ff=2048,
    d_kv=64,
    feed_forward_proj="relu",
    tie_word_embeddings=True,
    dropout_rate=0.1,
    relative_attention_num_buckets=32,
    num_decoder_layers=None,  # None: as many as the encoder's
)
#: transformers' T5Config / MT5Config / UMT5Config defaults for the keys read below
CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "t5": _T5,
    "mt5": dict(_T5, d_ff=1024, feed_forward_proj="gated-gelu"),
    "umt5": dict(_T5, d_ff=1024, feed_forward_proj="gated-gelu"),
}


class T5Family(Family):
    def attention(self, spec: ModelSpec, prefix: str = "") -> list[Linear]:
        h, q = spec.hidden_size, spec.q_dim
        return [
            Linear(prefix + "q", ("q",), h, q, False),
            Linear(prefix + "k", ("k",), h, q, False),
            Linear(prefix + "v", ("v",), h, q, False),
            Linear(prefix + "o", ("o",), q, h, False),
        ]

    def mlp(self, spec: ModelSpec) -> list[Linear]:
        h, i = spec.hidden_size, spec.intermediate_size
        if spec.gated_mlp:
            return [
                Linear("wi_0", ("gate",), h, i, False),
                Linear("wi_1", ("up",), h, i, False),
                Linear("wo", ("down",), i, h, False),
            ]
        return [Linear("wi", ("up",), h, i, False), Linear("wo", ("down",), i, h, False)]

    def blocks(self, spec: ModelSpec) -> tuple[Block, ...]:
        rel = spec.relative_attention_num_buckets * spec.num_attention_heads  # once per stack
        enc = Block("encoder", spec.num_layers, tuple(self.attention(spec) + self.mlp(spec)), spec.norm_params(2), rel)
        dec = Block(
            "cross_decoder",
            spec.num_decoder_layers or spec.num_layers,
            tuple(self.attention(spec) + self.attention(spec, "cross.") + self.mlp(spec)),
            spec.norm_params(3),
            rel,
        )
        return (enc, dec)

    def read_config(self, c: Config, model_type: str, core: dict[str, Any]) -> dict[str, Any]:
        ff = str(c.first("feed_forward_proj"))
        return dict(
            common_fields(c, core),
            # transformers maps "gated-gelu" to gelu_new (T5 v1.1, Flan-T5)
            hidden_act="gelu_new" if ff == "gated-gelu" else ff.split("-")[-1],
            dropout=float(c.first("dropout_rate")),
            gated_mlp=ff.startswith("gated"),
            tie_word_embeddings=bool(c.raw("tie_word_embeddings")),
            num_decoder_layers=int(c.first("num_decoder_layers") or core["num_layers"]),
            relative_attention_num_buckets=int(c.first("relative_attention_num_buckets")),
            head_dim=int(c.first("d_kv")),
        )

    def to_hf_config(self, spec: ModelSpec) -> dict[str, Any]:
        return dict(
            hf_base(spec),
            model_type="t5",
            d_model=spec.hidden_size,
            d_ff=spec.intermediate_size,
            d_kv=spec.head_size,
            num_layers=spec.num_layers,
            num_decoder_layers=spec.num_decoder_layers or spec.num_layers,
            num_heads=spec.num_attention_heads,
            relative_attention_num_buckets=spec.relative_attention_num_buckets,
            feed_forward_proj="gated-gelu" if spec.gated_mlp else "relu",
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )


FAMILY = T5Family(
    name="t5",
    summary="encoder-decoder with relative position buckets, RMS-style LayerNorm, no biases",
    config_defaults=CONFIG_DEFAULTS,
    encoder_decoder=True,
    position_bias_mask=True,
    mlp_dropout=True,
    quirks=dict(keep_fp32_modules=("wo",)),
)
