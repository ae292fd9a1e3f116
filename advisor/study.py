"""The source study's use-case rules and hardware claims, checked against physics.

The LoRA vs QLoRA benchmarking study (vendored as reference/lora-vs-qlora-study.txt; it has no title
line, so answers cite it by what it is, never by a path) is what users expect the advisor to say. Its rules are
reproduced where the memory model agrees; its numbers are each checked, and the impossible ones
are reported with the breakdown that refutes them.
"""

from __future__ import annotations

from dataclasses import dataclass

from advisor.methods import get_method
from advisor.specs import ModelSpec
from advisor.units import GIB

#: How answers cite the study: by name, not by where a copy of it lives.
STUDY = "LoRA vs QLoRA benchmarking study"


@dataclass(frozen=True)
class StudyClaim:
    """`params_b` model size, `method`, and either a memory figure or a GPU it supposedly fits on."""

    text: str
    params_b: float
    method: str
    claimed_gib: float | None = None
    gpu_id: str | None = None
    num_gpus: int = 1


CLAIMS = (
    StudyClaim("Peak GPU memory LLaMA 65B, full fine-tuning: 780GB", 65, "full", claimed_gib=780 * 1e9 / GIB),
    StudyClaim("Peak GPU memory LLaMA 65B, standard LoRA: 48GB", 65, "lora", claimed_gib=48 * 1e9 / GIB),
    StudyClaim("Peak GPU memory LLaMA 65B, QLoRA: 12GB", 65, "qlora", claimed_gib=12 * 1e9 / GIB),
    StudyClaim("LoRA 7B models: RTX 3090/4090", 7, "lora", gpu_id="rtx-4090"),
    StudyClaim("LoRA 13B models: A100 40GB", 13, "lora", gpu_id="a100-40gb"),
    StudyClaim("QLoRA 7B models: RTX 3060", 7, "qlora", gpu_id="rtx-3060-12gb"),
    StudyClaim("QLoRA 13B models: RTX 3090", 13, "qlora", gpu_id="rtx-3090"),
    StudyClaim("QLoRA 65B models: single A100", 65, "qlora", gpu_id="a100-80gb"),
)

RULES = {
    "lora": "Choose LoRA when training speed is critical, you have high-end GPUs, and the model is under 30B.",
    "qlora": "Choose QLoRA when memory is the limit, for 30B+ models, on consumer hardware, or when cost matters more than speed.",
}


def claims_for(model: ModelSpec) -> list[StudyClaim]:
    """The study's claims about a model of this size (within 15%)."""
    size_b = model.param_count / 1e9
    return [c for c in CLAIMS if abs(size_b - c.params_b) / c.params_b < 0.15]


def weights_floor_bytes(model: ModelSpec, method: str, dtype_bytes: int = 2) -> float:
    """Bytes the base weights alone occupy: a floor no training run can go under on one GPU."""
    if get_method(method).quantized:
        n_lin = model.linear_weight_params
        return n_lin * 0.5 + n_lin / 64 + (model.param_count - n_lin) * dtype_bytes
    return model.param_count * dtype_bytes


@dataclass(frozen=True)
class ClaimCheck:
    """Whether a published peak-memory claim is physically possible: the base weights alone are a floor."""

    claimed_gib: float
    possible: bool
    weights_floor_bytes: float
    reason: str


def check_memory_claim(model: ModelSpec, method: str, claimed_gib: float, dtype_bytes: int = 2) -> ClaimCheck:
    """Is a claimed peak memory physically possible for this model and method on one GPU?"""
    floor = weights_floor_bytes(model, method, dtype_bytes)
    possible = claimed_gib * GIB >= floor
    what = "4-bit weights" if get_method(method).quantized else f"{dtype_bytes * 8}-bit weights"
    reason = f"the {what} alone take {floor / GIB:.1f} GiB ({floor / 1e9:.1f} GB)" + (
        f", more than the claimed {claimed_gib:.1f} GiB"
        if not possible
        else f", under the claimed {claimed_gib:.1f} GiB"
    )
    return ClaimCheck(claimed_gib=claimed_gib, possible=possible, weights_floor_bytes=floor, reason=reason)
