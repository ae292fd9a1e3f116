"""Whether this service's job runner can launch a plan, and if not, why: one pure function over the plan and the
configured launcher, so /v1/recommend never offers a plan that ``POST /v1/fine_tuning/jobs`` would then fail.

Why a rule table here and not "try it": recommend ranks thousands of plans per request, and the answer must be
the same wherever it is asked (API, CLI, tests) without torch. Each rule reads the facts it depends on from the
code that decides them (the method's own bitsandbytes settings, the plan's framework), so a runner that learns
to run a plan makes it launchable without touching this module.

What the job runner runs (advisor/jobs): the transformers + peft + bitsandbytes stack (framework ``hf``);
several GPUs as one process per GPU under accelerate (DDP, or FSDP with the wrapping flags in
``advisor.jobs.launchers``), locally through ``accelerate launch`` or on a Ray cluster as a Ray Train
``TorchTrainer`` (the same accelerate settings as environment variables).
"""

from __future__ import annotations

from dataclasses import dataclass

from advisor.methods import get_method
from advisor.plans import TrainingPlan

LAUNCHERS = ("local", "ray")


@dataclass(frozen=True)
class LaunchTarget:
    """The configured job runner: its kind and, for the local launcher, how many devices it has (None: any,
    as on a Ray cluster, which queues a job until its GPUs are free)."""

    launcher: str = "local"
    devices: int | None = None


@dataclass(frozen=True)
class Launchability:
    launchable: bool
    reason: str | None = None


def launchability(plan: TrainingPlan, target: LaunchTarget = LaunchTarget()) -> Launchability:
    """Whether `target` can run `plan` as a job; the first reason it cannot (with what to do) otherwise."""
    if plan.framework != "hf":
        return Launchability(
            False,
            f"the job runner trains with transformers + peft (framework hf); a {plan.framework} plan is an estimate "
            "of that stack only. To launch: ask for framework hf",
        )
    if plan.chunked_loss:
        return Launchability(
            False, "the job runner computes the loss over the full logits (transformers); chunked_loss is not run"
        )
    m = get_method(plan.method)
    if plan.sharding == "fsdp" and m.quantization(plan):
        storage = (m.quantization(plan) or {}).get("bnb_4bit_quant_storage")
        if storage != plan.dtype:
            # FSDP flattens parameters of one dtype: 4-bit weights stored as uint8 next to bf16/fp16 modules
            # cannot be sharded together unless bitsandbytes stores the packed weights in the compute dtype
            # (QLoRA sets it for fsdp plans: tests/stack/test_fsdp_qlora.py runs them; a method that does not
            # is refused here)
            return Launchability(
                False,
                f"FSDP with {plan.method} needs bitsandbytes' bnb_4bit_quant_storage = the compute dtype "
                f"({plan.dtype}), which this method's quantization settings do not set. To launch: ddp (each GPU "
                "holds the 4-bit model), or LoRA with fsdp",
            )
    if target.launcher == "local" and target.devices is not None and plan.num_gpus > target.devices:
        return Launchability(
            False,
            f"needs {plan.num_gpus} devices; this deployment's local launcher has {target.devices}. To launch: "
            "a Ray cluster (ADVISOR_JOB_LAUNCHER=ray) or a plan with fewer GPUs",
        )
    return Launchability(True)
