"""Frozen specs: the architecture numbers, the GPU and the job, from which every estimate is derived.

A ModelSpec stores names and numbers only (no classes), so it serialises to JSON; derived quantities
(parameter counts, the list of linear modules LoRA and NF4 act on) are computed from them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property

from advisor.errors import InvalidInputError

#: Families and what they mean for the module layout.
#: llama: pre-norm decoder, RoPE, separate q/k/v/o, gated (SwiGLU/GeGLU) or plain MLP (Llama, Mistral,
#:        Qwen2, Gemma, ... any "Llama-format" config); phi3: the same with fused qkv_proj/gate_up_proj;
#: gpt2: learned positions, fused c_attn, plain GELU MLP, biases everywhere, LayerNorm;
#: phi:  parallel attention+MLP with one LayerNorm (phi-1.5, phi-2), biases;
#: gpt_neox: parallel residual, fused query_key_value, two LayerNorms, biases (StableLM-alpha, Pythia);
#: t5:   encoder-decoder with relative position buckets, RMS-style LayerNorm, no biases.
FAMILIES = ("llama", "phi3", "gpt2", "phi", "gpt_neox", "t5")

#: Generic LoRA target roles; each family maps them to its real module names.
ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Linear:
    """One nn.Linear (or Conv1D) inside a block: peft target name, roles it serves, shape."""

    name: str
    roles: tuple[str, ...]
    in_features: int
    out_features: int
    bias: bool

    @property
    def weight_params(self) -> int:
        return self.in_features * self.out_features

    @property
    def params(self) -> int:
        return self.weight_params + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Block:
    """`count` identical transformer blocks (a decoder stack, or T5's encoder / decoder stacks)."""

    kind: str  # "decoder", "encoder", "cross_decoder"
    count: int
    linears: tuple[Linear, ...]
    norm_params: int  # per block
    extra_params: int = 0  # per stack (e.g. T5 relative attention bias, once per stack)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    gated_mlp: bool = True
    attention_bias: bool = False  # bias on q/k/v (Qwen2) or on all attention projections (gpt2/phi/neox)
    mlp_bias: bool = False
    norm: str = "rmsnorm"  # rmsnorm (weight only) | layernorm (weight + bias)
    norms_per_layer: int = 2
    max_position_embeddings: int = 4096
    learned_positions: bool = False
    lm_head_bias: bool = False
    num_decoder_layers: int | None = None  # t5 only
    # how transformers runs it: gelu_new is a Python composite that saves four tensors; Gemma-2 has no
    # SDPA path (logit soft-capping); GPT-2/T5 keep dropout on in training; T5's `wo` stays fp32 under bnb
    hidden_act: str = "silu"
    sdpa: bool = True
    dropout: float = 0.0
    keep_fp32_modules: tuple[str, ...] = ()
    softcapping: bool = False  # Gemma-2: tanh soft-capping of attention scores and of the final logits
    relative_attention_num_buckets: int = 32  # t5 only
    hf_id: str | None = None
    aliases: tuple[str, ...] = ()
    published_params: int | None = None
    source: str = ""
    assumed: bool = False  # True when the architecture was guessed (e.g. from a bare size like "13B")
    note: str = ""

    def __post_init__(self) -> None:
        errors = []
        if self.family not in FAMILIES:
            errors.append(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
            if int(getattr(self, name)) <= 0:
                errors.append(f"{name} must be positive")
        kv = self.num_key_value_heads
        if kv is not None and (kv <= 0 or self.num_attention_heads % kv):
            errors.append("num_key_value_heads must divide num_attention_heads")
        if self.norm not in ("rmsnorm", "layernorm"):
            errors.append("norm must be rmsnorm or layernorm")
        if self.family != "t5" and self.head_dim is None and self.hidden_size % self.num_attention_heads:
            errors.append("hidden_size must be a multiple of num_attention_heads (or give head_dim)")
        if errors:
            raise InvalidInputError(f"invalid model spec {self.name!r}: " + "; ".join(errors), field="model")

    # ---- derived architecture numbers -------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @cached_property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_size

    @cached_property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_size

    @property
    def is_encoder_decoder(self) -> bool:
        return self.family == "t5"

    @cached_property
    def total_layers(self) -> int:
        return self.num_layers + (self.num_decoder_layers or self.num_layers if self.is_encoder_decoder else 0)

    def _norm_params(self, count: int) -> int:
        return count * self.hidden_size * (2 if self.norm == "layernorm" else 1)

    def _attention(self, prefix: str = "") -> list[Linear]:
        h, q, kv, ab = self.hidden_size, self.q_dim, self.kv_dim, self.attention_bias
        f = self.family
        if f == "gpt2":
            return [Linear("c_attn", ("q", "k", "v"), h, 3 * h, True), Linear("c_proj", ("o",), h, h, True)]
        if f == "gpt_neox":
            return [
                Linear("query_key_value", ("q", "k", "v"), h, q + 2 * kv, True),
                Linear("dense", ("o",), q, h, True),
            ]
        if f == "phi3":
            return [Linear("qkv_proj", ("q", "k", "v"), h, q + 2 * kv, ab), Linear("o_proj", ("o",), q, h, False)]
        if f == "t5":
            return [
                Linear(prefix + "q", ("q",), h, q, False),
                Linear(prefix + "k", ("k",), h, q, False),
                Linear(prefix + "v", ("v",), h, q, False),
                Linear(prefix + "o", ("o",), q, h, False),
            ]
        out_name, out_bias = ("dense", True) if f == "phi" else ("o_proj", False)
        return [
            Linear("q_proj", ("q",), h, q, ab),
            Linear("k_proj", ("k",), h, kv, ab),
            Linear("v_proj", ("v",), h, kv, ab),
            Linear(out_name, ("o",), q, h, out_bias),
        ]

    def _mlp(self) -> list[Linear]:
        h, i, mb = self.hidden_size, self.intermediate_size, self.mlp_bias
        f = self.family
        if f == "gpt2":
            return [Linear("c_fc", ("up",), h, i, True), Linear("c_proj", ("down",), i, h, True)]
        if f == "phi":
            return [Linear("fc1", ("up",), h, i, True), Linear("fc2", ("down",), i, h, True)]
        if f == "gpt_neox":
            return [Linear("dense_h_to_4h", ("up",), h, i, True), Linear("dense_4h_to_h", ("down",), i, h, True)]
        if f == "phi3":
            return [Linear("gate_up_proj", ("gate", "up"), h, 2 * i, mb), Linear("down_proj", ("down",), i, h, mb)]
        if f == "t5":
            if self.gated_mlp:
                return [
                    Linear("wi_0", ("gate",), h, i, False),
                    Linear("wi_1", ("up",), h, i, False),
                    Linear("wo", ("down",), i, h, False),
                ]
            return [Linear("wi", ("up",), h, i, False), Linear("wo", ("down",), i, h, False)]
        if self.gated_mlp:
            return [
                Linear("gate_proj", ("gate",), h, i, mb),
                Linear("up_proj", ("up",), h, i, mb),
                Linear("down_proj", ("down",), i, h, mb),
            ]
        return [Linear("up_proj", ("up",), h, i, mb), Linear("down_proj", ("down",), i, h, mb)]

    @cached_property
    def blocks(self) -> tuple[Block, ...]:
        if self.is_encoder_decoder:
            rel = self.relative_attention_num_buckets * self.num_attention_heads
            enc = Block("encoder", self.num_layers, tuple(self._attention() + self._mlp()), self._norm_params(2), rel)
            dec = Block(
                "cross_decoder",
                self.num_decoder_layers or self.num_layers,
                tuple(self._attention() + self._attention("cross.") + self._mlp()),
                self._norm_params(3),
                rel,
            )
            return (enc, dec)
        return (
            Block(
                "decoder",
                self.num_layers,
                tuple(self._attention() + self._mlp()),
                self._norm_params(self.norms_per_layer),
            ),
        )

    @cached_property
    def embedding_params(self) -> int:
        pos = self.max_position_embeddings * self.hidden_size if self.learned_positions else 0
        return self.vocab_size * self.hidden_size + pos

    @cached_property
    def lm_head_params(self) -> int:
        if self.tie_word_embeddings:
            return 0
        return self.vocab_size * self.hidden_size + (self.vocab_size if self.lm_head_bias else 0)

    @cached_property
    def final_norm_params(self) -> int:
        stacks = 2 if self.is_encoder_decoder else 1
        return self._norm_params(stacks)

    @cached_property
    def linear_params(self) -> int:
        """Parameters inside the blocks' linear layers (what NF4 quantises and LoRA wraps)."""
        return sum(b.count * sum(lin.params for lin in b.linears) for b in self.blocks)

    @cached_property
    def linear_weight_params(self) -> int:
        return sum(b.count * sum(lin.weight_params for lin in b.linears) for b in self.blocks)

    @cached_property
    def quantized_weight_params(self) -> int:
        """Linear weights bitsandbytes quantises (transformers skips `_keep_in_fp32_modules`)."""
        keep = set(self.keep_fp32_modules)
        return sum(
            b.count * sum(lin.weight_params for lin in b.linears if lin.name.split(".")[-1] not in keep)
            for b in self.blocks
        )

    @cached_property
    def param_count(self) -> int:
        blocks = sum(
            b.count * (sum(lin.params for lin in b.linears) + b.norm_params) + b.extra_params for b in self.blocks
        )
        return self.embedding_params + blocks + self.final_norm_params + self.lm_head_params

    @cached_property
    def module_names(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for b in self.blocks:
            for lin in b.linears:
                seen.setdefault(lin.name.split(".")[-1], None)
        return tuple(seen)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["aliases"] = list(self.aliases)
        d["keep_fp32_modules"] = list(self.keep_fp32_modules)
        return d


@dataclass(frozen=True)
class GpuSpec:
    id: str
    name: str
    memory_gib: float  # usable memory as the driver reports it, GiB
    memory_gb: float  # marketing figure, GB
    bf16_tflops: float | None  # dense, tensor cores
    fp16_tflops: float
    fp32_tflops: float
    memory_bandwidth_gbps: float
    bf16_supported: bool
    price_usd_per_hour: float | None
    price_date: str = ""
    price_source: str = ""
    spec_source: str = ""
    vendor: str = "nvidia"
    aliases: tuple[str, ...] = ()
    interconnect_gbps: float = 64.0  # per-GPU bandwidth to peers (PCIe 4 x16 ~ 32 GB/s each way)
    gpu_class: str = "datacenter"  # datacenter | consumer | cpu
    note: str = ""

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 1024**3)

    def tflops(self, dtype: str) -> float:
        if dtype == "bf16":
            return self.bf16_tflops or 0.0
        if dtype == "fp16":
            return self.fp16_tflops
        return self.fp32_tflops

    def default_dtype(self) -> str:
        """The training dtype a sensible user picks on this device."""
        if self.gpu_class == "cpu":
            return "fp32"
        return "bf16" if self.bf16_supported else "fp16"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["aliases"] = list(self.aliases)
        return d


@dataclass(frozen=True)
class Workload:
    """The job: how many tokens to see, at which sequence length, how often."""

    dataset_tokens: int = 10_000_000
    seq_len: int = 2048
    epochs: float = 1.0
    global_batch_tokens: int | None = None  # if set, the optimiser step spans this many tokens
    packed: bool = True  # sequences packed to seq_len (no padding waste)
    stated_defaults: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.dataset_tokens <= 0:
            raise InvalidInputError("dataset_tokens must be positive", field="dataset_tokens")
        if not 1 <= self.seq_len <= 1_048_576:
            raise InvalidInputError("seq_len must be between 1 and 1048576", field="seq_len")
        if not 0 < self.epochs <= 1000:
            raise InvalidInputError("epochs must be in (0, 1000]", field="epochs")

    @property
    def total_tokens(self) -> float:
        return self.dataset_tokens * self.epochs
