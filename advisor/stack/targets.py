"""peft target_modules for a plan: the one LoRA target resolver the builders use (no torch).

``advisor.plans.resolve_targets`` maps the plan's targets (``all-linear``, roles q/k/v/o/gate/up/down,
or the model's own module names) to qualified module names; peft matches the last name component.
"""

from __future__ import annotations

from advisor.plans import TrainingPlan, resolve_modules_to_save, resolve_targets
from advisor.specs import ModelSpec


def lora_target_modules(spec: ModelSpec, plan: TrainingPlan) -> tuple[str, ...]:
    """The bare module names (sorted) the plan's targets resolve to."""
    return tuple(sorted({n.split(".")[-1] for n in resolve_targets(spec, plan.lora_targets)}))


def modules_to_save_names(spec: ModelSpec, plan: TrainingPlan) -> tuple[str, ...]:
    """peft modules_to_save: the real names of the modules the plan trains whole next to its adapters."""
    return resolve_modules_to_save(spec, plan)
