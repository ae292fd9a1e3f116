"""T5 (and mT5, UMT5): encoder-decoder, relative position buckets, RMS-style LayerNorm, no biases.

Quirks: "gated-gelu" runs as gelu_new; dropout stays on in training (``dropout_rate``); the
feed-forward output ``wo`` stays fp32 under bitsandbytes (``_keep_in_fp32_modules``); the head is
always tied to the shared embedding: transformers 5 forces ``T5Config.tie_word_embeddings = True``
whatever config.json says ("we tie weights always and force it to be `True`",
``transformers/models/t5/configuration_t5.py``; the old flag only decides ``scale_decoder_outputs``),
so the model we train (and the trace referees) holds one vocab x hidden matrix, not two: T5 v1.1 /
Flan-T5 checkpoints' own lm_head is dropped at load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from advisor.families.base import Config, Family, mlp_rows, separate_qkv
from advisor.families.layout import Block

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
            super().read_config(c, model_type, core),
            # transformers maps "gated-gelu" to gelu_new (T5 v1.1, Flan-T5)
            hidden_act="gelu_new" if ff == "gated-gelu" else ff.split("-")[-1],
            gated_mlp=ff.startswith("gated"),
            num_decoder_layers=int(c.first("num_decoder_layers") or core["num_layers"]),
            relative_attention_num_buckets=int(c.first("relative_attention_num_buckets")),
            head_dim=int(c.first("d_kv")),
            # transformers 5 ties T5's head whatever config.json says (module docstring)
            tie_word_embeddings=True,
        )


def _decoder_layers(spec: ModelSpec) -> int:
    return spec.num_decoder_layers or spec.num_layers


def _feed_forward_proj(spec: ModelSpec) -> str:
    return "gated-gelu" if spec.gated_mlp else "relu"


FAMILY = T5Family(
    name="t5",
    summary="encoder-decoder with relative position buckets, RMS-style LayerNorm, no biases",
    config_defaults=CONFIG_DEFAULTS,
    encoder_decoder=True,
    position_bias_mask=True,
    mlp_dropout=True,
    quirks=dict(keep_fp32_modules=("wo",)),
    # k and v are as wide as q (T5 has no grouped key/value heads)
    attention_layout=(*separate_qkv("q", "k", "v", False, kv="q"), ("o", ("o",), "q", "h", False)),
    mlp_layout=mlp_rows("wi", "wo", False),
    gated_mlp_layout=mlp_rows("wi_1", "wo", False, gate="wi_0"),
    dropout_key="dropout_rate",
    embedding_module="shared",
    hf_keys=dict(
        d_model="hidden_size",
        d_ff="intermediate_size",
        d_kv="head_size",
        num_layers="num_layers",
        num_decoder_layers=_decoder_layers,
        num_heads="num_attention_heads",
        relative_attention_num_buckets="relative_attention_num_buckets",
        feed_forward_proj=_feed_forward_proj,
    ),
    hf_constants=dict(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
)
