"""TrainingPlan (one concrete way to run the fine-tune) and the enumeration of candidates."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

from advisor.errors import InvalidInputError
from advisor.specs import ROLES, GpuSpec, ModelSpec
from advisor.units import DTYPES

METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw-8bit", "paged-adamw-32bit")
ATTENTIONS = ("sdpa", "flash", "eager")
SHARDINGS = ("none", "ddp", "fsdp")
#: The training stack the plan runs in. hf = transformers + peft + bitsandbytes (what our jobs run):
#: fp32 adapters (peft's autocast_adapter_dtype), fp32 non-quantised modules under QLoRA
#: (prepare_model_for_kbit_training). litgpt / torchtune keep adapters and non-quantised modules in the
#: model dtype; litgpt's bitsandbytes layers compute in bnb's default fp32 and (bitsandbytes of 2023)
#: keep each quantised layer's fp32 input for backward.
FRAMEWORKS = ("hf", "litgpt", "torchtune")
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class TrainingPlan:
    method: str
    gpu_id: str
    dtype: str = "bf16"  # compute dtype (and storage dtype of unquantised base weights)
    micro_batch: int = 1
    seq_len: int = 2048
    grad_checkpointing: bool = True
    optimizer: str = "adamw"
    num_gpus: int = 1
    sharding: str = "none"
    attention: str = "sdpa"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = (ALL_LINEAR,)
    # full fine-tuning under mixed precision keeps fp32 master weights (AMP, the HF Trainer default);
    # False = "pure" half-precision training (params, grads and AdamW states in the half dtype).
    master_weights: bool = True
    # QLoRA: bitsandbytes NF4 with double quantisation (quantised absmax); the unquantised modules
    # (embeddings, lm_head, norms) are cast to fp32 by peft's prepare_model_for_kbit_training.
    double_quant: bool = True
    kbit_upcast: bool = True
    grad_accum: int = 1
    framework: str = "hf"
    # loss over vocabulary chunks (litgpt, torchtune CEWithChunkedOutputLoss): no full fp32 logits copy
    chunked_loss: bool = False
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        errs: list[tuple[str, str]] = []
        if self.method not in METHODS:
            errs.append(("method", f"must be one of {', '.join(METHODS)}"))
        if self.dtype not in DTYPES:
            errs.append(("dtype", f"must be one of {', '.join(DTYPES)}"))
        if self.optimizer not in OPTIMIZERS:
            errs.append(("optimizer", f"must be one of {', '.join(OPTIMIZERS)}"))
        if self.attention not in ATTENTIONS:
            errs.append(("attention", f"must be one of {', '.join(ATTENTIONS)}"))
        if self.framework not in FRAMEWORKS:
            errs.append(("framework", f"must be one of {', '.join(FRAMEWORKS)}"))
        if self.sharding not in SHARDINGS:
            errs.append(("sharding", f"must be one of {', '.join(SHARDINGS)}"))
        if not 1 <= self.micro_batch <= 4096:
            errs.append(("micro_batch", "must be between 1 and 4096"))
        if not 1 <= self.seq_len <= 1_048_576:
            errs.append(("seq_len", "must be between 1 and 1048576"))
        if not 1 <= self.num_gpus <= 1024:
            errs.append(("num_gpus", "must be between 1 and 1024"))
        if self.num_gpus == 1 and self.sharding != "none":
            errs.append(("sharding", "needs num_gpus > 1"))
        if self.num_gpus > 1 and self.sharding == "none":
            errs.append(("sharding", "num_gpus > 1 needs ddp or fsdp"))
        if self.method != "full" and not 1 <= self.lora_r <= 4096:
            errs.append(("lora_r", "must be between 1 and 4096"))
        if not 0 <= self.lora_dropout < 1:
            errs.append(("lora_dropout", "must be in [0, 1)"))
        if not 1 <= self.grad_accum <= 65536:
            errs.append(("grad_accum", "must be between 1 and 65536"))
        if self.method == "full" and self.optimizer.startswith("paged") and self.sharding == "fsdp":
            errs.append(("optimizer", "paged optimisers do not combine with FSDP sharding"))
        if errs:
            field_, _msg = errs[0]
            raise InvalidInputError("; ".join(f"{f}: {m}" for f, m in errs), field=field_)

    @property
    def shape_key(self) -> tuple:
        """Every field but the GPU: what the GPU-independent part of an estimate depends on."""
        return (
            self.method,
            self.dtype,
            self.micro_batch,
            self.seq_len,
            self.grad_checkpointing,
            self.optimizer,
            self.num_gpus,
            self.sharding,
            self.attention,
            self.lora_r,
            self.lora_alpha,
            self.lora_dropout,
            self.lora_targets,
            self.master_weights,
            self.double_quant,
            self.kbit_upcast,
            self.grad_accum,
        )

    @property
    def id(self) -> str:
        """Stable id: the same plan always gets the same id (posted back later to launch a job)."""
        d = asdict(self)
        d.pop("notes")
        blob = json.dumps(d, sort_keys=True, default=list)
        return "plan_" + hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def tokens_per_micro_step(self) -> int:
        return self.micro_batch * self.seq_len

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        d["notes"] = list(self.notes)
        d["id"] = self.id
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainingPlan:
        d = {k: v for k, v in d.items() if k != "id"}
        if "lora_targets" in d:
            d["lora_targets"] = tuple(d["lora_targets"])
        if "notes" in d:
            d["notes"] = tuple(d["notes"])
        return cls(**d)


def resolve_targets(model: ModelSpec, targets: Iterable[str]) -> frozenset[str]:
    """LoRA targets as the model's real module names.

    Accepts ``all-linear``, generic roles (q, k, v, o, gate, up, down) and the model's own peft
    module names (q_proj, c_attn, wi_0, ...). A fused module (c_attn, qkv_proj) is targeted when any
    role it serves is asked for, as peft can only wrap the whole module.
    """
    names: set[str] = set()
    module_roles: dict[str, set[str]] = {}
    for b in model.blocks:
        for lin in b.linears:
            module_roles.setdefault(lin.name, set()).update(lin.roles)
    bare = {n.split(".")[-1] for n in module_roles}
    for t in targets:
        t = t.strip()
        if not t:
            continue
        if t == ALL_LINEAR:
            return frozenset(module_roles)
        if t in ROLES:
            names.update(n for n, roles in module_roles.items() if t in roles)
        elif t in bare:
            names.update(n for n in module_roles if n.split(".")[-1] == t)
        else:
            raise InvalidInputError(
                f"unknown LoRA target {t!r} for {model.name}: use all-linear, roles "
                f"({', '.join(ROLES)}) or module names ({', '.join(sorted(bare))})",
                field="lora_targets",
            )
    if not names:
        raise InvalidInputError("lora_targets is empty", field="lora_targets")
    return frozenset(names)


# ---- enumeration -----------------------------------------------------------------------------------
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)
GPU_COUNTS = (1, 2, 4, 8)
#: (rank, targets): the adapter shapes users pick most; rank barely moves memory, targets do.
LORA_SHAPES = ((8, ("q", "v")), (16, (ALL_LINEAR,)), (64, (ALL_LINEAR,)))


@dataclass(frozen=True)
class SearchSpace:
    methods: tuple[str, ...] = METHODS
    micro_batches: tuple[int, ...] = MICRO_BATCHES
    gpu_counts: tuple[int, ...] = GPU_COUNTS
    lora_shapes: tuple[tuple[int, tuple[str, ...]], ...] = LORA_SHAPES
    checkpointing: tuple[bool, ...] = (True, False)
    full_optimizers: tuple[str, ...] = ("adamw", "adamw-8bit", "paged-adamw-8bit")
    adapter_optimizers: tuple[str, ...] = ("adamw", "paged-adamw-8bit")


def enumerate_plans(
    gpus: Iterable[GpuSpec], seq_len: int, space: SearchSpace = SearchSpace(), dtype: str | None = None
) -> Iterator[TrainingPlan]:
    """Every candidate plan: method x adapter shape x micro-batch x checkpointing x optimiser x GPUs."""
    for gpu in gpus:
        dt = dtype or gpu.default_dtype()
        for n in space.gpu_counts:
            shardings = ("none",) if n == 1 else ("ddp", "fsdp")
            for method in space.methods:
                if method == "full":
                    shapes = ((0, ()),)
                    opts = space.full_optimizers
                else:
                    shapes = space.lora_shapes
                    opts = space.adapter_optimizers
                for sharding in shardings:
                    for r, targets in shapes:
                        for opt in opts:
                            if sharding == "fsdp" and opt.startswith("paged"):
                                continue
                            for ckpt in space.checkpointing:
                                for mb in space.micro_batches:
                                    yield TrainingPlan(
                                        method=method,
                                        gpu_id=gpu.id,
                                        dtype=dt,
                                        micro_batch=mb,
                                        seq_len=seq_len,
                                        grad_checkpointing=ckpt,
                                        optimizer=opt,
                                        num_gpus=n,
                                        sharding=sharding,
                                        lora_r=r or 16,
                                        lora_alpha=2 * (r or 16),
                                        lora_targets=targets or (ALL_LINEAR,),
                                    )
