"""Full fine-tuning: every weight trains; under AMP fp32 master weights and half copies for compute."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from advisor import prequant
from advisor.families.llama import HALF_INPUT_POST_NORMS
from advisor.methods.base import Method

if TYPE_CHECKING:
    from advisor.plans import TrainingPlan
    from advisor.specs import ModelSpec


@dataclass(frozen=True)
class FullFineTuning(Method):
    def validate(self, plan: TrainingPlan) -> list[tuple[str, str]]:
        errs = []
        if plan.optimizer.startswith("paged") and plan.sharding == "fsdp":
            errs.append(("optimizer", "paged optimisers do not combine with FSDP sharding"))
        if plan.modules_to_save:
            errs.append(("modules_to_save", "full fine-tuning trains every module already (adapter methods only)"))
        return errs

    def weight_bytes(self, model: ModelSpec, plan: TrainingPlan, e: int) -> tuple[float, float]:
        prequant.check_plan(model, plan)  # a pre-quantized checkpoint has no trainable weights: refused
        if plan.master_weights and e < 4:
            # fp32 master weights; autocast caches half copies of the linears in forward for backward, the output
            # head's too (vocab x hidden, tied or not: the head's matmul casts it; the embedding lookup does not)
            # (MoE experts excepted: grouped_mm is not an autocast op; they compute in fp32, with no cached copy)
            cast = model.linear_weight_params - sum(
                b.count * lin.weight_params for b in model.blocks for lin in b.linears if lin.kind == "experts"
            )
            return 4 * model.param_count, e * (cast + model.vocab_size * model.hidden_size)
        return e * model.param_count, 0.0

    def trainable_params(self, model: ModelSpec, adapter_params: int) -> int:
        return model.param_count

    def state_bytes_per_param(self, plan: TrainingPlan, e: int) -> int:
        return 4 if (plan.master_weights or e == 4) else e

    def block_saved_bytes(self, model: ModelSpec, plan: TrainingPlan, n_attn: int, e: int) -> float:
        # inputs of every linear are saved for the weight gradients (+ normalised outputs)
        h, q, i = model.hidden_size, model.q_dim, model.intermediate_size
        amp = plan.master_weights and e < 4
        # AMP and transformers' gelu_new (a Python composite): torch.pow autocasts to fp32 and the rest of the
        # composite follows by type promotion, so its three saved tensors are fp32, not the half dtype counted
        # per block (trace: GPT-2 exactly, Phi within 1 i per layer)
        gelu = 3 * (4 - e) * i if amp and plan.framework == "hf" and model.hidden_act == "gelu_new" else 0
        if amp and model.norm == "rmsnorm" and not model.is_encoder_decoder:
            # AMP (fp32 master weights under autocast) in an RMSNorm decoder: the residual stream is fp32, so
            # each norm's normalised output is fp32, kept for its trainable weight's gradient, and every linear
            # reading it casts it to the half dtype itself (autocast caches only the weights' casts): one
            # saved half copy per q/k/v/gate/up module (one per fused module)
            readers = {
                lin.name for b in model.blocks for lin in b.linears if set(lin.roles) & {"q", "k", "v", "gate", "up"}
            }
            # (post-norm layers whose norms cast before the weight, EXAONE-4: they normalise the half outputs of
            # o_proj / down_proj, so their saved normalised input is half, not fp32; trace: -2 e h per layer)
            norm_e = e if model.model_type in HALF_INPUT_POST_NORMS else 4
            return e * (n_attn * q + i) + model.norms_per_layer * norm_e * h + len(readers) * e * h + gelu
        # Gemma-2/3's sandwich norms (four per layer): the two beyond the pre-norms keep their normalised input for
        # their weights' gradients too (trace, families referee row 89, Gemma-3 fp32: -2.7% without them)
        sandwich = max(0, model.norms_per_layer - 2) * e * h if not model.is_encoder_decoder else 0
        return e * (n_attn * (h + q) + h + i + h) + gelu + sandwich

    def extra_optimizer_phase_bytes(self, model: ModelSpec, plan: TrainingPlan, grad_bytes: int) -> float:
        if model.tie_word_embeddings:
            # the tied matrix gets a dense gradient from the embedding lookup and one from the head,
            # summed last in backward, when every other gradient already exists
            return 2 * grad_bytes * model.vocab_size * model.hidden_size
        return 0.0

    def ddp_gradient_copies(self) -> int:
        return 2

    def flops_per_token(self, linear_flops: float, attn_flops: float, adapter_params: int, ckpt: bool) -> float:
        f = 3 * linear_flops + 3 * attn_flops
        if ckpt:
            f += linear_flops + attn_flops
        return f

    def notes(self, plan: TrainingPlan) -> list[str]:
        if plan.optimizer.startswith("paged"):
            return ["full fine-tuning with paged states pages them over PCIe when memory is short: slower"]
        return []


METHOD = FullFineTuning(
    name="full",
    summary="every weight trains (AdamW states for all of them)",
    adapter=False,
    learning_rate=2e-5,
    default_sharding="fsdp",
    search_optimizers=("adamw", "adamw-8bit", "paged-adamw-8bit"),
    search_shapes=((0, ()),),
    lighter="use lora or qlora (frozen base weights, no full optimiser states)",
)
