"""peft target_modules for a plan: the one LoRA target resolver the builders use (no torch).

``advisor.plans.resolve_targets`` maps the plan's targets (``all-linear``, roles q/k/v/o/gate/up/down,
or the model's own module names) to qualified module names; peft matches the last name component.
"""

from __future__ import annotations

from advisor.plans import TrainingPlan, resolve_modules_to_save, resolve_targets
from advisor.specs import ModelSpec


def _expert_names(spec: ModelSpec) -> set[str]:
    return {lin.name for b in spec.blocks for lin in b.linears if lin.kind == "experts"}


def lora_target_modules(spec: ModelSpec, plan: TrainingPlan) -> tuple[str, ...]:
    """The bare module names (sorted) the plan's targets resolve to: peft's ``target_modules`` (the fused expert
    parameters are not modules: ``lora_target_parameters``)."""
    names = resolve_targets(spec, plan.lora_targets) - _expert_names(spec)
    return tuple(sorted({n.split(".")[-1] for n in names}))


def lora_target_parameters(spec: ModelSpec, plan: TrainingPlan) -> tuple[str, ...]:
    """peft's ``target_parameters`` (sorted): the fused expert parameters the plan adapts, as ``experts.<param>``,
    which peft matches as a suffix of every sparse layer's ``mlp.experts.gate_up_proj`` / ``.down_proj`` (one
    lora.ParamWrapper each, the second nested in the first). Empty without expert targets."""
    return tuple(sorted(resolve_targets(spec, plan.lora_targets) & _expert_names(spec)))


def modules_to_save_names(spec: ModelSpec, plan: TrainingPlan) -> tuple[str, ...]:
    """peft modules_to_save: the real names of the modules the plan trains whole next to its adapters."""
    return resolve_modules_to_save(spec, plan)
