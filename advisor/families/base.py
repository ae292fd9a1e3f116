"""The `Family` base every family module instantiates, and the config.json reading helpers they share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from advisor.errors import InvalidInputError
from advisor.families.layout import Block, Linear

if TYPE_CHECKING:
    from advisor.specs import ModelSpec


class Config:
    """A config.json dict read against the transformers config class's own defaults.

    ``first(*keys)`` is the first key set (not null) in the file, else the class default of
    the first of them the class has; ``raw(key)`` keeps an explicit null (the config class then derives the value, e.g.
    ``num_key_value_heads: null`` means as many as the attention heads)."""

    def __init__(self, cfg: Mapping[str, Any], defaults: Mapping[str, Any]):
        self.cfg = cfg
        self.defaults = defaults

    def first(self, *keys: str, default: Any = None) -> Any:
        for k in keys:
            if self.cfg.get(k) is not None:
                return self.cfg[k]
        for k in keys:
            if k in self.defaults:
                return self.defaults[k]
        return default

    def raw(self, key: str) -> Any:
        return self.cfg[key] if key in self.cfg else self.defaults.get(key)

    def core(self) -> dict[str, int]:
        """The four numbers every family needs; a config.json without them is refused (not defaulted)."""
        found = {
            "hidden_size": self.first("hidden_size", "n_embd", "d_model"),
            "num_hidden_layers": self.first("num_hidden_layers", "n_layer", "num_layers"),
            "num_attention_heads": self.first("num_attention_heads", "n_head", "num_heads"),
            "vocab_size": self.first("vocab_size"),
        }
        missing = [k for k, v in found.items() if v is None]
        if missing:
            raise InvalidInputError(f"config.json lacks {', '.join(missing)}", field="model")
        return {
            "num_layers": int(found["num_hidden_layers"]),
            "hidden_size": int(found["hidden_size"]),
            "num_attention_heads": int(found["num_attention_heads"]),
            "vocab_size": int(found["vocab_size"]),
        }


def common_fields(c: Config, core: dict[str, Any]) -> dict[str, Any]:
    """The fields most families read the same way (names of Llama-format, GPT-2 and T5 configs)."""
    return dict(
        intermediate_size=int(c.first("intermediate_size", "n_inner", "d_ff") or 4 * core["hidden_size"]),
        num_key_value_heads=c.raw("num_key_value_heads"),
        head_dim=c.first("head_dim", "d_kv"),
        max_position_embeddings=int(c.first("max_position_embeddings", "n_positions", "n_ctx", default=2048)),
        hidden_act=str(c.first("hidden_act", "activation_function", default="silu")),
    )


def optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class Family:
    """One architecture family: its block layout, its config.json mapping both ways, its quirks.

    A family module subclasses this, overrides `attention`, `mlp`, `read_config` and `to_hf_config`
    (and `blocks` where a model is not one decoder stack), and instantiates it as ``FAMILY``."""

    name: str
    summary: str
    #: HF ``model_type`` -> the transformers config class's defaults for the keys this family reads
    #: (what a config.json that leaves a key out gets). The first entry is the family's own type.
    config_defaults: Mapping[str, Mapping[str, Any]]
    encoder_decoder: bool = False
    #: attention and MLP read the same normalised input and add to one residual (phi, gpt_neox)
    parallel_residual: bool = False
    #: one projection makes q, k and v
    fused_qkv: bool = False
    #: transformers' SDPA path keeps v as a view of the fused qkv output, so all of it stays saved for
    #: backward (phi3, gpt_neox; GPT-2's split heads are copied)
    sdpa_keeps_fused_qkv: bool = False
    #: the block's norms read the same input, saved once (gpt_neox's parallel residual, two LayerNorms)
    norms_share_input: bool = False
    #: the relative position bias goes into SDPA as an additive mask, cloned per self-attention layer (T5)
    position_bias_mask: bool = False
    #: dropout inside the feed-forward too, not only on the residual branches (T5)
    mlp_dropout: bool = False
    #: ModelSpec fields every model of the family gets (how transformers runs it), e.g. gelu_new,
    #: keep-fp32 modules; per-model_type quirks live in the family module's own table
    quirks: Mapping[str, Any] = field(default_factory=dict)

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(self.config_defaults)

    def defaults(self, model_type: str) -> Mapping[str, Any]:
        """The config class defaults of `model_type` (the family's first type for unknown ones)."""
        return self.config_defaults.get(model_type) or next(iter(self.config_defaults.values()))

    # ---- layout --------------------------------------------------------------------------------
    def attention(self, spec: ModelSpec, prefix: str = "") -> list[Linear]:
        raise NotImplementedError

    def mlp(self, spec: ModelSpec) -> list[Linear]:
        raise NotImplementedError

    def blocks(self, spec: ModelSpec) -> tuple[Block, ...]:
        linears = tuple(self.attention(spec) + self.mlp(spec))
        return (Block("decoder", spec.num_layers, linears, spec.norm_params(spec.norms_per_layer)),)

    # ---- config.json -> ModelSpec -------------------------------------------------------------
    def spec_fields(self, cfg: Mapping[str, Any], model_type: str) -> dict[str, Any]:
        """ModelSpec keyword arguments (all but name, source and note) from a config.json dict."""
        c = Config(cfg, self.defaults(model_type))
        kw: dict[str, Any] = {"family": self.name, **c.core(), **self.quirks}
        kw.update(self.read_config(c, model_type, kw))
        kw["num_key_value_heads"] = optional_int(kw.get("num_key_value_heads"))
        kw["head_dim"] = optional_int(kw.get("head_dim"))
        return kw

    def read_config(self, c: Config, model_type: str, core: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    # ---- ModelSpec -> config.json -------------------------------------------------------------
    def to_hf_config(self, spec: ModelSpec) -> dict[str, Any]:
        raise NotImplementedError


def hf_base(spec: ModelSpec) -> dict[str, Any]:
    """The keys every rebuilt config starts with."""
    return dict(
        vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
    )
