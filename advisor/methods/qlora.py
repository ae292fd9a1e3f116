"""QLoRA: bitsandbytes NF4 base weights (double quantisation), LoRA adapters on top.

Under transformers' ``prepare_model_for_kbit_training`` the non-quantised modules (embeddings,
lm_head, norms) are cast to fp32, so the residual stream and every activation of a block are fp32
(Linear4bit returns its input's dtype); each linear dequantises its weight to the compute dtype
for one matmul at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from advisor import prequant
from advisor.families import get_family
from advisor.methods.base import DQ_BLOCK, NF4_BLOCK, Method

if TYPE_CHECKING:
    from advisor.plans import TrainingPlan
    from advisor.specs import Linear, ModelSpec


def sharded(plan: TrainingPlan) -> bool:
    """FSDP shards the 4-bit base (FSDP-QLoRA): bitsandbytes stores the packed weights in the compute dtype."""
    return plan.sharding == "fsdp"


def upcast(plan: TrainingPlan) -> bool:
    """prepare_model_for_kbit_training casts non-quantised params to fp32 (hf stack only).

    Not under FSDP in half precision: FSDP flattens each wrapped block into one tensor of one dtype, and an fp32
    norm next to bf16-stored 4-bit weights cannot be flattened with them (``Must flatten tensors with uniform
    dtype``). There the runner skips the upcast, as trl does for sharded QLoRA, and the estimate follows what runs:
    norms, embeddings, head and activations stay in the compute dtype."""
    if sharded(plan) and plan.dtype != "fp32":
        return False
    return plan.kbit_upcast and plan.framework == "hf"


def nf4_bytes(model: ModelSpec, double_quant: bool) -> float:
    """NF4 packed weights plus their absmax constants (quantised again under double quantisation)."""
    n = model.quantized_weight_params
    absmax = n / NF4_BLOCK * (1 + 4 / DQ_BLOCK) if double_quant else n / NF4_BLOCK * 4
    return n * 0.5 + absmax


@dataclass(frozen=True)
class QLoRA(Method):
    def weight_bytes(self, model: ModelSpec, plan: TrainingPlan, e: int) -> tuple[float, float]:
        other = 4 if upcast(plan) else e
        if model.prequantized is not None:
            # a bitsandbytes 4-bit checkpoint: its own NF4/FP4 bytes (quant type and double quantisation as stored,
            # not the plan's); any other quantiser is refused (bitsandbytes cannot quantise packed weights again)
            return prequant.frozen_weight_bytes(model, plan, other), 0.0
        return nf4_bytes(model, plan.double_quant) + (model.param_count - model.quantized_weight_params) * other, 0.0

    def gathered_bytes_per_param(self, e: int) -> float:
        return 0.5

    def saved_module_bytes_per_param(self, plan: TrainingPlan, e: int) -> int:
        """prepare_model_for_kbit_training made the head and the embedding fp32 before peft copies them."""
        return 4 if upcast(plan) else e

    def activation_bytes_per_element(self, plan: TrainingPlan, e: int) -> int:
        return 4 if upcast(plan) else e

    def block_saved_bytes(self, model: ModelSpec, plan: TrainingPlan, n_attn: int, e: int) -> float:
        if plan.framework != "litgpt":
            return 0.0
        # bitsandbytes' 2023 MatMul4Bit saved its input A, cast to bnb's default fp32 compute dtype
        h, q, i = model.hidden_size, model.q_dim, model.intermediate_size
        parallel = get_family(model.family).parallel_residual
        return 4 * (n_attn * (h + q) + (0 if parallel else h) + i)

    def temporaries(self, model: ModelSpec, plan: TrainingPlan, adapted: list[Linear], e: int) -> float:
        largest = max(lin.weight_params for b in model.blocks for lin in b.linears)
        return largest * e  # one dequantised weight at a time (forward or backward)

    def dequant_traffic_bytes(self, model: ModelSpec, plan: TrainingPlan, passes: int, e: int) -> float:
        if model.prequantized is not None:  # the checkpoint's stored bytes, every pass
            return prequant.dequant_traffic_bytes(model, plan, passes, e)
        # read NF4, write and re-read the dequantised weight
        return passes * model.quantized_weight_params * (0.5 + 2 * e)

    def communicated_weight_bytes(self, model: ModelSpec, e: int) -> float:
        return model.quantized_weight_params * 0.5

    def quantization(self, plan: TrainingPlan) -> dict[str, Any] | None:
        """bitsandbytes' settings (dtype names: the builder turns them into torch dtypes).

        Under FSDP the packed weights are stored in the compute dtype (``bnb_4bit_quant_storage``), so FSDP can
        flatten and shard them with the block's other parameters (it shards floating-point tensors of one dtype).
        The bytes are the same as uint8 storage: two 4-bit values a byte, in a container of a wider dtype."""
        q: dict[str, Any] = {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": plan.double_quant,
            "bnb_4bit_compute_dtype": plan.dtype,
        }
        if sharded(plan):
            q["bnb_4bit_quant_storage"] = plan.dtype
        return q

    def notes(self, plan: TrainingPlan) -> list[str]:
        if upcast(plan):
            return ["QLoRA: embeddings, lm_head and norms are fp32 after prepare_model_for_kbit_training"]
        if sharded(plan) and plan.kbit_upcast and plan.framework == "hf":
            return [
                f"FSDP-QLoRA: 4-bit weights stored as {plan.dtype} (bnb_4bit_quant_storage); no fp32 upcast of "
                "embeddings, lm_head and norms (FSDP flattens one dtype per wrapped block)"
            ]
        return []


METHOD = QLoRA(
    name="qlora",
    summary="NF4 4-bit base weights (bitsandbytes, double quantisation), LoRA adapters",
    quantized=True,
    # "may require 20-30% more training steps" (the LoRA vs QLoRA study, "Convergence Analysis"): the midpoint
    convergence=1.25,
)
