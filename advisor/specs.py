"""Frozen specs: the architecture numbers, the GPU and the job, from which every estimate is derived.

A ModelSpec stores names and numbers only (no classes), so it serialises to JSON; derived quantities
(parameter counts, the list of linear modules LoRA and NF4 act on) are computed from them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import cached_property

from advisor.errors import InvalidInputError
from advisor.families import FAMILIES as _FAMILY_REGISTRY
from advisor.families import Family, get_family
from advisor.families.layout import ROLES, Block, Linear
from advisor.prequant import Prequantized

__all__ = ["FAMILIES", "ROLES", "Block", "GpuSpec", "Linear", "ModelSpec", "Workload"]

#: Registered family names (advisor.families holds each family's layout, config mapping and quirks).
FAMILIES = tuple(_FAMILY_REGISTRY)


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
    # the Hugging Face model_type the spec was read from and is rebuilt as ("": the family decides from the names)
    model_type: str = ""
    # RMSNorm on the queries and keys before RoPE (Qwen3, Gemma-3, OLMo-2, EXAONE-4): per head (head_dim weights
    # each) or, for OLMo-2/3, over the whole projection (the family counts its weights)
    qk_norm: bool = False
    # local attention: the window (None: every layer attends to the whole sequence) and which layers are global:
    # 0 = every layer slides (Mistral v0.1, Ministral); N = layer i is global when (i + 1) % N == 0 (Gemma-3 6,
    # Gemma-2 2, Cohere2 / OLMo-3 / EXAONE-4 4), as transformers' config classes derive ``layer_types``
    sliding_window: int | None = None
    sliding_window_pattern: int = 0
    # mixture-of-experts (0 / False: a dense model). Experts are transformers' fused 3-D parameters (all resident);
    # each token runs `experts_per_token` of `num_experts` experts of width `moe_intermediate_size`, plus an
    # always-on shared MLP of width `shared_expert_intermediate_size` (DeepSeek: n_shared_experts x its width;
    # Qwen2-MoE: its own key, behind a sigmoid `shared_expert_gate`)
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    first_dense_layers: int = 0  # DeepSeek's first_k_dense_replace: the first layers keep a dense MLP
    moe_layer_step: int = 1  # Qwen2/3-MoE decoder_sparse_step: layer i is sparse when (i + 1) % step == 0
    router_bias: bool = False  # gpt-oss: the router has a bias
    expert_bias: bool = False  # gpt-oss: biased expert projections
    attention_sinks: bool = False  # gpt-oss: one learned sink logit per head
    # the router renormalises its top-k probabilities (Mixtral always; Qwen-MoE, OLMoE, DeepSeek by config)
    norm_topk_prob: bool = False
    # DeepSeek multi-head latent attention (kv_lora_rank 0: not MLA)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # from the Hugging Face Hub (advisor.hub): the exact parameter count and per-dtype counts the checkpoint's
    # safetensors metadata states (None / (): not read), and the commit the config was read at. Estimates keep
    # the architecture's count (param_count); a difference over 0.5% is said in `note`
    checkpoint_params: int | None = None
    checkpoint_dtypes: tuple[tuple[str, int], ...] = ()
    revision: str | None = None
    # a checkpoint published already quantised (config.json quantization_config: GPTQ, AWQ, FP8, bitsandbytes):
    # its method, bits, group size and stored bytes (advisor.prequant), None for a float checkpoint. The
    # parameter count stays the architecture's (unpacked); the frozen weights of an adapter plan take these bytes
    prequantized: Prequantized | None = None

    def __post_init__(self) -> None:
        errors = []
        fam = _FAMILY_REGISTRY.get(self.family)
        if fam is None:
            errors.append(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
            if int(getattr(self, name)) <= 0:
                errors.append(f"{name} must be positive")
        kv = self.num_key_value_heads
        if kv is not None and (kv <= 0 or self.num_attention_heads % kv):
            errors.append("num_key_value_heads must divide num_attention_heads")
        if self.norm not in ("rmsnorm", "layernorm"):
            errors.append("norm must be rmsnorm or layernorm")
        if self.sliding_window is not None and self.sliding_window <= 0:
            errors.append("sliding_window must be positive (or null: no local attention)")
        if self.sliding_window_pattern < 0:
            errors.append("sliding_window_pattern must be >= 0 (0: every layer slides)")
        if (
            fam is not None
            and not fam.encoder_decoder
            and self.head_dim is None
            and self.hidden_size % self.num_attention_heads
        ):
            errors.append("hidden_size must be a multiple of num_attention_heads (or give head_dim)")
        if self.prequantized is not None and not isinstance(self.prequantized, Prequantized):
            errors.append("prequantized must be a Prequantized (advisor.prequant) or null")
        if errors:
            raise InvalidInputError(f"invalid model spec {self.name!r}: " + "; ".join(errors), field="model")

    # ---- derived architecture numbers -------------------------------------------------------
    def check_seq_len(self, seq_len: int, field: str = "seq_len") -> str | None:
        """A sequence longer than the model's context: an error where it cannot run (a learned position
        table ends there: the embedding lookup fails), else a note (rotary or relative positions extend
        past the trained length, with quality the model was not trained for)."""
        if seq_len <= self.max_position_embeddings:
            return None
        if self.learned_positions:
            raise InvalidInputError(
                f"seq_len {seq_len} is longer than {self.name}'s learned position table "
                f"({self.max_position_embeddings} positions): such a step cannot run. "
                f"To fix: seq_len <= {self.max_position_embeddings}",
                field=field,
            )
        return (
            f"seq_len {seq_len} is beyond {self.name}'s context window ({self.max_position_embeddings}): it runs, "
            "but past the length the model was trained on"
        )

    @property
    def family_spec(self) -> Family:
        """The registered family: layout, config mapping and quirks."""
        return get_family(self.family)

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

    @cached_property
    def sliding_layers(self) -> int:
        """How many layers attend through a sliding window (the rest attend to the whole sequence)."""
        if self.sliding_window is None:
            return 0
        n = self.sliding_window_pattern
        return self.num_layers if n <= 0 else sum(1 for i in range(self.num_layers) if (i + 1) % n)

    @property
    def is_encoder_decoder(self) -> bool:
        return self.family_spec.encoder_decoder

    @cached_property
    def total_layers(self) -> int:
        return self.num_layers + (self.num_decoder_layers or self.num_layers if self.is_encoder_decoder else 0)

    def norm_params(self, count: int) -> int:
        """Parameters of `count` norms (weight, plus bias for LayerNorm)."""
        return count * self.hidden_size * (2 if self.norm == "layernorm" else 1)

    @cached_property
    def blocks(self) -> tuple[Block, ...]:
        """The block stacks and their linears, as the family lays them out."""
        return self.family_spec.blocks(self)

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
        return self.norm_params(stacks)

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
            b.count
            * sum(lin.weight_params for lin in b.linears if lin.is_linear and lin.name.split(".")[-1] not in keep)
            for b in self.blocks
        )

    @cached_property
    def param_count(self) -> int:
        blocks = sum(
            b.count * (sum(lin.params for lin in b.linears) + b.norm_params) + b.extra_params for b in self.blocks
        )
        return self.embedding_params + blocks + self.final_norm_params + self.lm_head_params

    @property
    def is_moe(self) -> bool:
        """A mixture-of-experts model (its blocks hold fused expert parameters)."""
        return self.num_experts > 0

    @cached_property
    def expert_params(self) -> int:
        """Parameters of all routed experts (every MoE layer's fused expert tensors, biases included)."""
        return sum(b.count * sum(lin.params for lin in b.linears if lin.kind == "experts") for b in self.blocks)

    @cached_property
    def active_param_count(self) -> int:
        """Parameters one token runs through: the total less the routed experts it is not sent to (each token
        runs `experts_per_token` of `num_experts`; embeddings, attention, router and shared experts always)."""
        if not self.is_moe:
            return self.param_count
        idle = self.expert_params * (self.num_experts - self.experts_per_token) / self.num_experts
        return self.param_count - round(idle)

    @cached_property
    def module_names(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for b in self.blocks:
            for lin in b.linears:
                if lin.lora_target:  # peft's target_modules wrap modules, not MoE experts' bare parameters
                    seen.setdefault(lin.name.split(".")[-1], None)
        return tuple(seen)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["aliases"] = list(self.aliases)
        d["keep_fp32_modules"] = list(self.keep_fp32_modules)
        d["checkpoint_dtypes"] = dict(self.checkpoint_dtypes)
        d["prequantized"] = self.prequantized.to_dict() if self.prequantized is not None else None
        return d


GPU_CLASSES = ("datacenter", "consumer", "cpu")
#: The software platform PyTorch runs on: CUDA (NVIDIA), ROCm (AMD), or the CPU.
GPU_PLATFORMS = ("cuda", "rocm", "cpu")
#: How GPUs of one machine reach each other: nvlink (NVLink / NVSwitch / Infinity Fabric boards), pcie (PCIe
#: with peer-to-peer DMA), pcie-host (no peer-to-peer: every transfer is staged through host memory, as on
#: GeForce cards, whose drivers do not enable P2P).
PEER_LINKS = ("nvlink", "pcie", "pcie-host")
#: Default network between nodes (Gbit/s per node, source) by board: NVLink (SXM / HGX) boards ship with one
#: 400 Gb/s InfiniBand NIC per GPU (compute-fabric rails), plain PCIe servers with one 100 Gb/s Ethernet NIC.
NODE_NETWORK = {
    "nvlink": (
        3200.0,
        "default: 8 x 400 Gb/s InfiniBand per node, one NIC per GPU (NVIDIA DGX H100 user guide: eight "
        "single-port ConnectX-7 400 Gb/s for the compute fabric)",
    ),
    "pcie": (
        100.0,
        "default: one 100 Gb/s Ethernet NIC per node (common on cloud GPU instances, e.g. AWS g5.48xlarge / "
        "GCP a2 without GPUDirect networking)",
    ),
}


def _positive(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


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
    # streaming multiprocessors (AMD: compute units): how many matmul tiles run in one wave; None = unknown
    # (no wave quantisation is modelled)
    sm_count: int | None = None
    peer_link: str = "pcie"  # one of PEER_LINKS
    link_source: str = ""  # where sm_count and peer_link come from
    # sustained dense half-precision matmul TFLOP/s MEASURED on the card (torch.mm at large shapes: bf16, or fp16
    # where the card has no bf16 tensor cores), None = no published measurement. Datasheet peaks assume the boost
    # clock; a power-limited card (the 72 W L4) or a slower library runs below them. The speed model's GEMM
    # efficiency is relative to this rate (advisor.estimators.device.matmul_flops)
    matmul_tflops_measured: float | None = None
    matmul_source: str = ""  # where matmul_tflops_measured comes from (repository / page, date, software)
    # the software platform PyTorch runs on for this card: cuda | rocm | cpu; a non-CUDA card carries a caveat
    # (what differs there, with its source) that every plan on it shows (advisor.platforms)
    platform: str = "cuda"
    caveat: str = ""
    # where price_usd_per_hour comes from: the provider, its region and the basis (on-demand | spot | user)
    price_provider: str = ""
    price_region: str = ""
    price_basis: str = ""
    # the network between nodes (a plan past gpus_per_node): the node's total bandwidth to other nodes, Gbit/s,
    # and where it comes from; 0 = the default for the board (NODE_NETWORK: InfiniBand rails on NVLink boards,
    # one Ethernet NIC otherwise)
    node_network_gbit_s: float = 0.0
    node_network_source: str = ""

    @property
    def node_network(self) -> tuple[float, str]:
        """(Gbit/s between this GPU's node and the others, source): the catalog's figure, else the default."""
        if self.node_network_gbit_s > 0:
            return self.node_network_gbit_s, self.node_network_source or "catalog"
        return NODE_NETWORK["nvlink" if self.peer_link == "nvlink" else "pcie"]

    def __post_init__(self) -> None:
        """Every number the estimators divide by or multiply with is a positive finite number (a GPU file
        with `interconnect_gbps: 0` or a null rate is refused here, naming the field, not deep in a
        division); bf16 may be absent (no bf16 tensor cores), a price may be absent or zero."""
        errors = []
        for name in (
            "memory_gib",
            "memory_gb",
            "fp16_tflops",
            "fp32_tflops",
            "memory_bandwidth_gbps",
            "interconnect_gbps",
        ):
            if not _positive(getattr(self, name)):
                errors.append(f"{name} must be a positive number, got {getattr(self, name)!r}")
        if self.bf16_tflops is not None and not _positive(self.bf16_tflops):
            errors.append(f"bf16_tflops must be a positive number or null, got {self.bf16_tflops!r}")
        price = self.price_usd_per_hour
        if price is not None and not (_positive(price) or price == 0):
            errors.append(f"price_usd_per_hour must be a number >= 0 or null, got {price!r}")
        measured = self.matmul_tflops_measured
        if measured is not None and not _positive(measured):
            errors.append(f"matmul_tflops_measured must be a positive number or null, got {measured!r}")
        if self.sm_count is not None and not (
            isinstance(self.sm_count, int) and not isinstance(self.sm_count, bool) and self.sm_count > 0
        ):
            errors.append(f"sm_count must be a positive integer or null, got {self.sm_count!r}")
        if self.peer_link not in PEER_LINKS:
            errors.append(f"peer_link must be one of {', '.join(PEER_LINKS)}, got {self.peer_link!r}")
        if self.gpu_class not in GPU_CLASSES:
            errors.append(f"gpu_class must be one of {', '.join(GPU_CLASSES)}, got {self.gpu_class!r}")
        if self.platform not in GPU_PLATFORMS:
            errors.append(f"platform must be one of {', '.join(GPU_PLATFORMS)}, got {self.platform!r}")
        if not isinstance(self.bf16_supported, bool):
            errors.append(f"bf16_supported must be true or false, got {self.bf16_supported!r}")
        if errors:
            raise InvalidInputError(f"invalid GPU spec {self.id!r}: " + "; ".join(errors), field="gpu")

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


DEFAULT_DATASET_TOKENS = 10_000_000
DEFAULT_SEQ_LEN = 2048
DEFAULT_EPOCHS = 1.0


@dataclass(frozen=True)
class Workload:
    """The job: how many tokens to see, at which sequence length, how often."""

    dataset_tokens: int = DEFAULT_DATASET_TOKENS
    seq_len: int = DEFAULT_SEQ_LEN
    epochs: float = DEFAULT_EPOCHS
    global_batch_tokens: int | None = None  # if set, the optimiser step spans this many tokens
    packed: bool = True  # sequences packed to seq_len (no padding waste)
    stated_defaults: tuple[str, ...] = field(default=())

    @classmethod
    def given(
        cls, dataset_tokens: int | None = None, seq_len: int | None = None, epochs: float | None = None
    ) -> Workload:
        """The workload from what a request or command line gave (None = not given); each default it
        assumes is stated, so the answer can say so."""
        stated = []
        if dataset_tokens is None:
            stated.append(f"dataset_tokens not given: assumed {DEFAULT_DATASET_TOKENS:,} tokens")
        if seq_len is None:
            stated.append(f"seq_len not given: assumed {DEFAULT_SEQ_LEN}")
        if epochs is None:
            stated.append(f"epochs not given: assumed {DEFAULT_EPOCHS:g}")
        return cls(
            dataset_tokens=DEFAULT_DATASET_TOKENS if dataset_tokens is None else dataset_tokens,
            seq_len=DEFAULT_SEQ_LEN if seq_len is None else seq_len,
            epochs=DEFAULT_EPOCHS if epochs is None else epochs,
            stated_defaults=tuple(stated),
        )

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
