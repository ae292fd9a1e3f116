"""What every peer adapter of bench.peers shares: the "not expressible" answer and the plan readings.

A peer *expresses* a plan when it has an input for each of the plan's axes that the comparison is
about (method, quantisation, optimiser, gradient checkpointing, multi-GPU sharding; plus the dtype
and the model where the peer refuses some). Where a peer has no input for a detail that its formula
simply does not model (LoRA rank on gpu_poor, batch size on accelerate, the training framework), the
plan is still expressed and the peer answers with its own assumption: that is what its user gets.
"""

from __future__ import annotations

from dataclasses import dataclass

from advisor.methods import ALL_LINEAR
from advisor.plans import TrainingPlan
from advisor.specs import ROLES, GpuSpec, ModelSpec

GIB = 1024**3


class NotExpressible(Exception):
    """The peer has no input for this plan (the message says which axis)."""


@dataclass(frozen=True)
class PeerCase:
    """What a peer is asked: the model, the plan and the device it runs on."""

    model: ModelSpec
    plan: TrainingPlan
    gpu: GpuSpec


def lora_roles(model: ModelSpec, plan: TrainingPlan) -> tuple[str, ...]:
    """The generic roles (q, k, v, o, gate, up, down) the plan's LoRA targets cover, in ROLES order.

    LoRA on lm_head or the embeddings (an adapter of (hidden + vocab) x r parameters) is outside every
    peer's target list: it is dropped, the nearest plan the peer's user can ask for. Raises
    NotExpressible when nothing else is left, and for modules_to_save (whole modules trained in full,
    gigabytes of gradients and optimiser states no peer has an input for)."""
    if tuple(getattr(plan, "modules_to_save", ()) or ()):
        raise NotExpressible("modules_to_save (lm_head / embeddings trained in full) is not a peer input")
    by_name: dict[str, set[str]] = {}
    for block in model.blocks:
        for lin in block.linears:
            by_name.setdefault(lin.name.split(".")[-1], set()).update(lin.roles)
    roles: set[str] = set()
    for t in plan.lora_targets:
        if t == ALL_LINEAR:
            roles.update(ROLES)
        elif t in ROLES:
            roles.add(t)
        elif t in by_name:
            roles.update(by_name[t])
    if not roles:
        raise NotExpressible(f"LoRA targets {', '.join(plan.lora_targets)}: no transformer-block linear")
    return tuple(r for r in ROLES if r in roles)


def optimizer_family(plan: TrainingPlan) -> str:
    """adam32 (AdamW with 32-bit states, paged or not) or adam8 (bitsandbytes 8-bit AdamW, paged or not).

    Paging changes where the states live under memory pressure, not their size; no peer has a paging
    input, so a paged optimiser is expressed as its unpaged twin."""
    return "adam8" if "8bit" in plan.optimizer else "adam32"


def sharded(plan: TrainingPlan) -> bool:
    """FSDP over more than one GPU: per-GPU memory a single-GPU formula cannot express."""
    return plan.num_gpus > 1 and plan.sharding == "fsdp"
