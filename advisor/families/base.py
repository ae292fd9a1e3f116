"""The `Family` base every family module instantiates, and the config.json reading helpers they share."""

from __future__ import annotations

from collections.abc import Callable, Mapping
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


#: One linear layer as data: (name, roles, in, out, bias). ``in`` / ``out`` name a dimension of the
#: spec (see `_dims`); ``bias`` is a bool, or the ModelSpec field that decides it ("attention_bias", "mlp_bias").
LinearRow = tuple[str, tuple[str, ...], str, str, bool | str]


def separate_qkv(q: str, k: str, v: str, bias: bool | str, kv: str = "kv") -> tuple[LinearRow, ...]:
    """Separate q / k / v projections from the hidden state (k and v `kv` wide)."""
    return ((q, ("q",), "h", "q", bias), (k, ("k",), "h", kv, bias), (v, ("v",), "h", kv, bias))


def mlp_rows(up: str, down: str, bias: bool | str, gate: str | None = None) -> tuple[LinearRow, ...]:
    """An MLP: `up` (and `gate`, when gated) from hidden to intermediate, `down` back."""
    gated: tuple[LinearRow, ...] = ((gate, ("gate",), "h", "i", bias),) if gate else ()
    return (*gated, (up, ("up",), "h", "i", bias), (down, ("down",), "i", "h", bias))


#: Llama format's q_proj / k_proj / v_proj, biased as the spec's ``attention_bias`` says
SEPARATE_QKV = separate_qkv("q_proj", "k_proj", "v_proj", "attention_bias")

#: GPT-style quirks: plain (ungated) MLP, biases everywhere, LayerNorm (gpt2, phi, gpt_neox)
GPT_STYLE: Mapping[str, Any] = dict(gated_mlp=False, attention_bias=True, mlp_bias=True, norm="layernorm")


def _dims(spec: ModelSpec) -> dict[str, int]:
    h, q, kv, i = spec.hidden_size, spec.q_dim, spec.kv_dim, spec.intermediate_size
    return {"h": h, "q": q, "kv": kv, "i": i, "3h": 3 * h, "2i": 2 * i, "q+2kv": q + 2 * kv}


def linears(spec: ModelSpec, rows: tuple[LinearRow, ...], prefix: str = "") -> list[Linear]:
    """The `Linear` layers `rows` describe, sized for `spec` (names prefixed with `prefix`)."""
    d = _dims(spec)
    return [
        Linear(prefix + name, roles, d[n_in], d[n_out], getattr(spec, bias) if isinstance(bias, str) else bias)
        for name, roles, n_in, n_out, bias in rows
    ]


#: the ModelSpec -> config.json keys of a Llama-format config (hf key -> ModelSpec field)
LLAMA_FORMAT_KEYS: Mapping[str, str] = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_attention_heads",
}

#: an hf config key's value: the ModelSpec field of that name, or computed from the spec
HfValue = str | Callable[["ModelSpec"], Any]


@dataclass(frozen=True)
class Family:
    """One architecture family: its block layout, its config.json mapping both ways, its quirks.

    A family module instantiates this (or a subclass) as ``FAMILY``. The layout and the config.json
    mapping are data (`attention_layout`, `mlp_layout`, `config_flags`, `hf_keys`, ...); a family
    whose rules are not data overrides `attention`, `mlp`, `read_config` or `to_hf_config` (and
    `blocks` where a model is not one decoder stack)."""

    name: str
    summary: str
    #: HF ``model_type`` -> the transformers config class's defaults for the keys this family reads
    #: (what a config.json that leaves a key out gets). The first entry is the family's own type.
    config_defaults: Mapping[str, Mapping[str, Any]]
    encoder_decoder: bool = False
    #: attention and MLP read the same normalised input and add to one residual (phi, gpt_neox)
    parallel_residual: bool = False
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
    #: the attention block's linears (`LinearRow`s)
    attention_layout: tuple[LinearRow, ...] = ()
    #: the MLP's linears
    mlp_layout: tuple[LinearRow, ...] = ()
    #: the MLP's linears when the spec's MLP is gated, where they differ from `mlp_layout`
    gated_mlp_layout: tuple[LinearRow, ...] = ()
    #: config.json keys read as booleans into the ModelSpec field of the same name
    config_flags: tuple[str, ...] = ("tie_word_embeddings",)
    #: the config.json key read as the spec's dropout (None: the ModelSpec default)
    dropout_key: str | None = None
    #: the rebuilt config.json's keys after `hf_base` and model_type, in order
    hf_keys: Mapping[str, HfValue] = field(default_factory=lambda: dict(LLAMA_FORMAT_KEYS))
    #: fixed keys the rebuilt config.json ends with
    hf_constants: Mapping[str, Any] = field(default_factory=dict)
    #: transformers' module names of the token embedding and of the output head: what the generic LoRA /
    #: modules_to_save names ``embed_tokens`` and ``lm_head`` resolve to (peft matches the last name component)
    embedding_module: str = "embed_tokens"
    head_module: str = "lm_head"

    @property
    def fused_qkv(self) -> bool:
        """One projection of the attention layout makes q, k and v."""
        return any({"q", "k", "v"} <= set(roles) for _, roles, *_ in self.attention_layout)

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(self.config_defaults)

    def defaults(self, model_type: str) -> Mapping[str, Any]:
        """The config class defaults of `model_type` (the family's first type for unknown ones)."""
        return self.config_defaults.get(model_type) or next(iter(self.config_defaults.values()))

    # ---- layout --------------------------------------------------------------------------------
    def attention(self, spec: ModelSpec, prefix: str = "") -> list[Linear]:
        return linears(spec, self.attention_layout, prefix)

    def mlp(self, spec: ModelSpec) -> list[Linear]:
        gated = spec.gated_mlp and self.gated_mlp_layout
        return linears(spec, self.gated_mlp_layout if gated else self.mlp_layout)

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
        """The family's ModelSpec fields: `common_fields`, the `config_flags`, the dropout."""
        kw = dict(common_fields(c, core), **{k: bool(c.raw(k)) for k in self.config_flags})
        if self.dropout_key is not None:
            kw["dropout"] = float(c.first(self.dropout_key))
        return kw

    # ---- ModelSpec -> config.json -------------------------------------------------------------
    def to_hf_config(self, spec: ModelSpec, model_type: str | None = None) -> dict[str, Any]:
        """`hf_base`, model_type (the family's name unless given), `hf_keys`, `hf_constants`."""
        keys = {k: getattr(spec, v) if isinstance(v, str) else v(spec) for k, v in self.hf_keys.items()}
        return dict(hf_base(spec), model_type=model_type or self.name, **keys, **self.hf_constants)


def hf_base(spec: ModelSpec) -> dict[str, Any]:
    """The keys every rebuilt config starts with."""
    return dict(
        vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
    )
