"""Mixture-of-experts decoders with Llama-format attention: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss.

How transformers 5.x builds them (models/<type>/modeling_<type>.py): attention is Llama's q/k/v/o
(Qwen2-MoE biases q/k/v; gpt-oss biases all four and adds one learned sink logit per head; Qwen3-MoE
normalises q and k per head, OLMoE over the whole projections). The MLP of a sparse layer is

* a router: a bare ``weight`` parameter (``mlp.gate``; gpt-oss ``mlp.router`` with a bias), not an
  nn.Linear, so bitsandbytes leaves it alone and peft's ``all-linear`` does not wrap it;
* the experts: ONE module holding fused 3-D parameters, ``gate_up_proj`` (E, 2 m, h) and ``down_proj``
  (E, h, m) (gpt-oss transposed, with per-expert biases). Every expert is resident; each token runs
  ``experts_per_token`` of them. bitsandbytes' 4-bit loader replaces nn.Linear only, so under QLoRA the
  experts stay unquantised (and prepare_model_for_kbit_training upcasts them to fp32 with the rest of the
  non-quantised parameters);
* Qwen2-MoE only: an always-on shared expert (a gated MLP ``shared_expert.{gate,up,down}_proj`` of width
  ``shared_expert_intermediate_size``) behind a sigmoid ``shared_expert_gate`` (an nn.Linear h -> 1).

gpt-oss checkpoints store the experts in MXFP4; for training transformers dequantises them to bf16
(``Mxfp4Config(dequantize=True)``, the fine-tuning recipe's path): the spec counts them in the compute dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from advisor.families.base import LLAMA_FORMAT_KEYS, Config, Family, LinearRow, linears, mlp_rows, separate_qkv
from advisor.families.layout import Block, Linear

if TYPE_CHECKING:
    from advisor.specs import ModelSpec

_MIXTRAL = dict(
    intermediate_size=14336,
    num_key_value_heads=8,
    head_dim=None,
    max_position_embeddings=131072,
    hidden_act="silu",
    tie_word_embeddings=False,
    num_local_experts=8,
    num_experts_per_tok=2,
    sliding_window=None,
)
_QWEN2_MOE = dict(
    intermediate_size=5632,
    num_key_value_heads=16,
    max_position_embeddings=32768,
    hidden_act="silu",
    tie_word_embeddings=False,
    num_experts=60,
    num_experts_per_tok=4,
    moe_intermediate_size=1408,
    shared_expert_intermediate_size=5632,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    qkv_bias=True,
    norm_topk_prob=False,
)
#: transformers' config class defaults (5.24) for the keys read below; tests/test_moe.py checks them against the classes
CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": _MIXTRAL,
    "qwen2_moe": _QWEN2_MOE,
    "qwen3_moe": dict(
        intermediate_size=6144,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        hidden_act="silu",
        tie_word_embeddings=False,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        attention_bias=False,
        norm_topk_prob=False,
    ),
    "olmoe": dict(
        intermediate_size=2048,
        num_key_value_heads=None,  # None: as many as the attention heads
        max_position_embeddings=4096,
        hidden_act="silu",
        tie_word_embeddings=False,
        num_experts=64,
        num_experts_per_tok=8,
        attention_bias=False,
        norm_topk_prob=False,
    ),
    "gpt_oss": dict(
        intermediate_size=2880,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        hidden_act="silu",
        tie_word_embeddings=False,
        num_local_experts=128,
        num_experts_per_tok=4,
        attention_bias=True,
        sliding_window=128,
    ),
}
_DEEPSEEK = dict(  # (num_key_value_heads is not read: MLA expands k and v to every head)
    hidden_act="silu",
    tie_word_embeddings=False,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    attention_bias=False,
)
CONFIG_DEFAULTS["deepseek_v2"] = dict(
    _DEEPSEEK,
    intermediate_size=11008,
    max_position_embeddings=2048,
    n_routed_experts=64,
    num_experts_per_tok=None,  # no default: a config.json must give it
    moe_intermediate_size=1407,
    n_shared_experts=2,
    first_k_dense_replace=0,
    mlp_bias=False,
    norm_topk_prob=False,
)
CONFIG_DEFAULTS["deepseek_v3"] = dict(
    _DEEPSEEK,
    intermediate_size=18432,
    max_position_embeddings=4096,
    n_routed_experts=256,
    num_experts_per_tok=8,
    moe_intermediate_size=2048,
    n_shared_experts=1,
    first_k_dense_replace=3,
    norm_topk_prob=True,
)
#: DeepSeek-V2/V3: multi-head latent attention, shared experts, first dense layers
_DEEPSEEK_TYPES = frozenset({"deepseek_v2", "deepseek_v3"})
#: model_types whose experts' width is the config's ``moe_intermediate_size`` (the rest: ``intermediate_size``)
_MOE_WIDTH_KEY = frozenset({"qwen2_moe", "qwen3_moe", *_DEEPSEEK_TYPES})
#: how transformers runs each type beyond its config (fixed ModelSpec fields)
VARIANTS: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(qk_norm=True),
    "olmoe": dict(qk_norm=True),
    # gpt-oss: attention sinks have no SDPA path in transformers (eager attention over s + 1 columns)
    "gpt_oss": dict(router_bias=True, expert_bias=True, attention_sinks=True, attention_bias=True, sdpa=False),
}
#: the router's module name in the sparse block
_ROUTER = {"gpt_oss": "router"}


def moe_type(spec: ModelSpec) -> str:
    return spec.model_type or "mixtral"


def sparse_layers(spec: ModelSpec) -> int:
    """Layers with a routed MLP: after DeepSeek's first dense layers, every `moe_layer_step`-th one."""
    step = max(spec.moe_layer_step, 1)
    return sum(1 for i in range(spec.first_dense_layers, spec.num_layers) if (i + 1) % step == 0)


def moe_linears(spec: ModelSpec) -> list[Linear]:
    """The sparse MLP: router, fused experts, and the shared expert (+ its gate) where the model has one."""
    h, m, n_exp = spec.hidden_size, spec.moe_intermediate_size, spec.num_experts
    router = _ROUTER.get(moe_type(spec), "gate")
    rows = [
        Linear(router, (), h, n_exp, spec.router_bias, kind="router"),
        Linear("experts.gate_up_proj", (), h, 2 * m, spec.expert_bias, kind="experts", experts=n_exp),
        Linear("experts.down_proj", (), m, h, spec.expert_bias, kind="experts", experts=n_exp),
    ]
    s = spec.shared_expert_intermediate_size
    if s:
        bias = spec.mlp_bias  # DeepSeek-V2's shared experts follow mlp_bias; the others have none
        rows += [
            _mlp_linear(spec, "gate_proj", ("gate",), h, s, bias),
            _mlp_linear(spec, "up_proj", ("up",), h, s, bias),
            _mlp_linear(spec, "down_proj", ("down",), s, h, bias),
        ]
        if spec.shared_expert_gate:
            rows.append(Linear("shared_expert_gate", (), h, 1, False))
    return rows


#: model_types whose ``gate_proj`` / ``up_proj`` / ``down_proj`` LoRA targets peft 0.21 remaps, on transformers 5, onto
#: the fused experts (peft/utils/transformers_weight_conversion.py: _MODEL_TO_CONVERSION_PATTERN -> "qwen2_moe",
#: _MOE_TARGET_MODULE_MAPPING): it drops them from target_modules and adds LoRA on ``experts.gate_up_proj`` (rank 2r)
#: and ``experts.down_proj`` through target_parameters (ParamWrapper, which refuses lora_dropout). A dense or shared
#: MLP of those names (DeepSeek) is therefore never wrapped; LoRA on the experts is not modelled yet, so the
#: advisor's targets leave those names out (all-linear reaches the attention projections).
#: How the sparse MLP runs, beyond the config, per model_type (the estimator's MoE terms read these):
#: routing weights kept fp32 where they weight the routed rows' saved outputs (Mixtral's softmax is not cast back)
FP32_SAVED_ROUTING_WEIGHTS = frozenset({"mixtral"})
#: routing weights fp32 at the backward moments of the weighted rows (Mixtral; DeepSeek's fp32 router: the trace of
#: a DeepSeek-V3 step with LoRA on the experts holds these rows in fp32 at its peak)
FP32_BACKWARD_ROUTING_WEIGHTS = frozenset({"mixtral", *_DEEPSEEK_TYPES})
#: m-wide tensors the expert activation saves per routed row: SwiGLU's gate, up and product (3); gpt-oss's clamped,
#: biased SwiGLU keeps three more (its clamp masks and the sigmoid's input)
EXPERT_ACTIVATION_SAVES = {"gpt_oss": 6}
#: routers that softmax only their top-k logits (gpt-oss): k scores saved, not a softmax over every expert
TOPK_SOFTMAX_ROUTER_TYPES = frozenset({"gpt_oss"})

PEFT_REMAPPED_TYPES = frozenset({"qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"})


def _mlp_linear(spec: ModelSpec, name: str, roles: tuple[str, ...], n_in: int, n_out: int, bias: bool) -> Linear:
    if spec.model_type in PEFT_REMAPPED_TYPES:
        return Linear(name, (), n_in, n_out, bias, kind="linear-peft-remapped")
    return Linear(name, roles, n_in, n_out, bias)


def mla_linears(spec: ModelSpec) -> list[Linear]:
    """DeepSeek's multi-head latent attention: q through a low-rank bottleneck (q_a_proj -> q_b_proj, or one
    q_proj without q_lora_rank), k and v from one compressed latent (kv_a_proj_with_mqa: kv_lora_rank + the
    shared rope key) expanded per head by kv_b_proj, o_proj from the heads' values."""
    h, nh, b = spec.hidden_size, spec.num_attention_heads, spec.attention_bias
    qk = spec.qk_nope_head_dim + spec.qk_rope_head_dim
    if spec.q_lora_rank:
        rows = [
            Linear("q_a_proj", ("q",), h, spec.q_lora_rank, b),
            Linear("q_b_proj", ("q",), spec.q_lora_rank, nh * qk, False),
        ]
    else:
        rows = [Linear("q_proj", ("q",), h, nh * qk, False)]
    return [
        *rows,
        Linear("kv_a_proj_with_mqa", ("k", "v"), h, spec.kv_lora_rank + spec.qk_rope_head_dim, b),
        Linear("kv_b_proj", ("k", "v"), spec.kv_lora_rank, nh * (spec.qk_nope_head_dim + spec.v_head_dim), False),
        Linear("o_proj", ("o",), nh * spec.v_head_dim, h, b),
    ]


def qk_norm_weights(spec: ModelSpec) -> int:
    if spec.kv_lora_rank:  # MLA: RMSNorms on the q and kv latents
        return spec.q_lora_rank + spec.kv_lora_rank
    if not spec.qk_norm:
        return 0
    return spec.q_dim + spec.kv_dim if moe_type(spec) == "olmoe" else 2 * spec.head_size


class MoeFamily(Family):
    def blocks(self, spec: ModelSpec) -> tuple[Block, ...]:
        attn = self.attention(spec)
        per_layer = spec.norm_params(spec.norms_per_layer) + qk_norm_weights(spec)
        per_layer += spec.num_attention_heads if spec.attention_sinks else 0
        n_sparse = sparse_layers(spec)
        out = [Block("decoder", n_sparse, tuple(attn + moe_linears(spec)), per_layer)]
        if spec.num_layers - n_sparse:
            dense = [
                _mlp_linear(spec, lin.name, lin.roles, lin.in_features, lin.out_features, lin.bias)
                for lin in linears(spec, mlp_rows("up_proj", "down_proj", "mlp_bias", gate="gate_proj"))
            ]
            out.append(Block("dense_decoder", spec.num_layers - n_sparse, tuple(attn + dense), per_layer))
        return tuple(out)

    def read_config(self, c: Config, model_type: str, core: dict[str, Any]) -> dict[str, Any]:
        kw = super().read_config(c, model_type, core)
        n_exp = c.first("n_routed_experts", "num_experts", "num_local_experts")
        if c.first("num_experts_per_tok") is None:
            from advisor.errors import InvalidInputError

            raise InvalidInputError(
                f"{model_type} config.json lacks num_experts_per_tok (its config class has no default). "
                "To fix: give num_experts_per_tok, the experts each token is routed to",
                field="model",
            )
        width_key = "moe_intermediate_size" if model_type in _MOE_WIDTH_KEY else "intermediate_size"
        kw.update(
            model_type=model_type,
            num_experts=int(n_exp),
            experts_per_token=int(c.first("num_experts_per_tok")),
            moe_intermediate_size=int(c.first(width_key)),
            norm_topk_prob=True if model_type == "mixtral" else bool(c.first("norm_topk_prob", default=False)),
        )
        if model_type == "qwen2_moe":
            kw.update(
                attention_bias=bool(c.first("qkv_bias")),
                shared_expert_intermediate_size=int(c.first("shared_expert_intermediate_size")),
                shared_expert_gate=True,
            )
        if model_type in ("qwen2_moe", "qwen3_moe"):
            kw["moe_layer_step"] = int(c.first("decoder_sparse_step"))
            if c.first("mlp_only_layers"):
                raise_unsupported(model_type, "mlp_only_layers")
        if model_type in _DEEPSEEK_TYPES:
            nh = core["num_attention_heads"]
            kw.update(
                shared_expert_intermediate_size=kw["moe_intermediate_size"] * int(c.first("n_shared_experts") or 0),
                first_dense_layers=int(c.first("first_k_dense_replace")),
                q_lora_rank=int(c.first("q_lora_rank") or 0),
                kv_lora_rank=int(c.first("kv_lora_rank")),
                qk_nope_head_dim=int(c.first("qk_nope_head_dim")),
                qk_rope_head_dim=int(c.first("qk_rope_head_dim")),
                v_head_dim=int(c.first("v_head_dim")),
                mlp_bias=bool(c.first("mlp_bias", default=False)) if model_type == "deepseek_v2" else False,
                # MLA expands k and v to every head; a q head is nope + rope wide
                num_key_value_heads=nh,
                head_dim=int(c.first("qk_nope_head_dim")) + int(c.first("qk_rope_head_dim")),
            )
        kw.update(VARIANTS.get(model_type, {}))
        if not kw.get("first_dense_layers") and kw.get("moe_layer_step", 1) == 1:
            # every layer is sparse: the config's dense width builds nothing; the spec's MLP width is the experts'
            kw["intermediate_size"] = kw["moe_intermediate_size"]
        if model_type == "gpt_oss":
            kw["sliding_window"] = optional(c.raw("sliding_window"))
            kw["sliding_window_pattern"] = 2 if kw["sliding_window"] else 0
        return kw

    def attention(self, spec: ModelSpec, prefix: str = "") -> list[Linear]:
        if spec.kv_lora_rank:
            return mla_linears(spec)
        o_bias: bool | str = "attention_bias" if moe_type(spec) == "gpt_oss" else False
        rows: tuple[LinearRow, ...] = (
            *separate_qkv("q_proj", "k_proj", "v_proj", "attention_bias"),
            ("o_proj", ("o",), "q", "h", o_bias),
        )
        return linears(spec, rows, prefix)

    def to_hf_config(self, spec: ModelSpec, model_type: str | None = None) -> dict[str, Any]:
        mt = model_type or moe_type(spec)
        cfg = super().to_hf_config(spec, mt)
        cfg.update(
            num_key_value_heads=spec.kv_heads,
            head_dim=spec.head_size,
            num_experts_per_tok=spec.experts_per_token,
            hidden_act=spec.hidden_act,
            pad_token_id=None,
        )
        if mt in ("mixtral", "gpt_oss"):
            cfg["num_local_experts"] = spec.num_experts
        else:
            cfg["num_experts"] = spec.num_experts
        if mt in ("qwen2_moe", "qwen3_moe", "olmoe", *_DEEPSEEK_TYPES):
            cfg["norm_topk_prob"] = spec.norm_topk_prob
        if mt in _DEEPSEEK_TYPES:
            cfg.pop("num_experts", None)
            cfg.pop("head_dim", None)
            cfg.update(
                n_routed_experts=spec.num_experts,
                n_shared_experts=spec.shared_expert_intermediate_size // spec.moe_intermediate_size,
                first_k_dense_replace=spec.first_dense_layers,
                q_lora_rank=spec.q_lora_rank or None,
                kv_lora_rank=spec.kv_lora_rank,
                qk_nope_head_dim=spec.qk_nope_head_dim,
                qk_rope_head_dim=spec.qk_rope_head_dim,
                v_head_dim=spec.v_head_dim,
                attention_bias=spec.attention_bias,
                n_group=1,  # grouped routing changes which experts, not what is kept
                topk_group=1,
            )
            if mt == "deepseek_v2":
                cfg["mlp_bias"] = spec.mlp_bias
        if mt in _MOE_WIDTH_KEY:
            cfg["moe_intermediate_size"] = spec.moe_intermediate_size
            cfg["decoder_sparse_step"] = spec.moe_layer_step
            cfg["mlp_only_layers"] = []
        else:
            cfg["intermediate_size"] = spec.moe_intermediate_size
        if mt == "qwen2_moe":
            cfg.update(
                qkv_bias=spec.attention_bias, shared_expert_intermediate_size=spec.shared_expert_intermediate_size
            )
        elif mt in ("qwen3_moe", "olmoe", "gpt_oss"):
            cfg["attention_bias"] = spec.attention_bias
        if mt == "gpt_oss":
            window = spec.sliding_window
            cfg.update(
                sliding_window=window or 128,
                layer_types=[
                    "sliding_attention" if window and i % 2 == 0 else "full_attention" for i in range(spec.num_layers)
                ],
            )
        return cfg


def optional(v: Any) -> int | None:
    return None if v is None else int(v)


def raise_unsupported(model_type: str, key: str) -> None:
    from advisor.errors import InvalidInputError

    raise InvalidInputError(
        f"{model_type} config with {key} (dense layers at listed positions) is not modelled. "
        f"To fix: give a config.json without {key}",
        field="model",
    )


FAMILY = MoeFamily(
    name="moe",
    summary="mixture-of-experts decoder with Llama-format attention: router, fused resident experts, top-k per token "
    "(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss, DeepSeek-V2/V3 with multi-head latent attention)",
    config_defaults=CONFIG_DEFAULTS,
    hf_keys=dict(LLAMA_FORMAT_KEYS),
)
