"""DoRA (peft ``use_dora=True``): LoRA with the weight decomposed into a trainable magnitude per output
feature and a direction (Liu et al. 2024, arXiv 2402.09353), unquantised base weights.

What peft 0.17-0.21 does per adapted linear in a training step (``DoraLinearVariant.forward`` and
``DoraLinearLayer.forward``), and what it costs beyond LoRA:

* the magnitude vector: ``out_features`` trainable fp32 parameters (+ gradient + AdamW states);
* ``lora_weight = lora_B(lora_A(eye(in)))``: an ``in x in`` identity, its ``in x r`` image and the
  ``out x in`` product, every forward (and again when checkpointing recomputes the block); the
  weight norm ``||W + s * lora_weight||`` adds the base weight cast to the adapter dtype (when it
  differs), the scaled product and the sum, all ``out x in``: short-lived, one layer at a time, in
  forward only (so at the backward peak only inside a block that checkpointing recomputes; without
  checkpointing they compete with the loss's peak at the end of forward);
* the weight norm is detached (paper, section 4.3): no gradient flows through it;
* the output ``(m/||.|| - 1) * base + m/||.|| * lora`` keeps ``base`` (``out`` per token) and the
  LoRA output (``out`` per token, adapter dtype) for the magnitude's gradient;
* with dropout in training, peft cannot reuse the base layer's output: it runs
  ``F.linear(dropout(x), W.to(x.dtype))`` once more (2 x in x out FLOPs per token forward, as many
  backward) and autograd keeps that cast weight (``out x in``, adapter dtype) until backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from advisor.methods.base import Method
from advisor.units import DTYPE_BYTES

if TYPE_CHECKING:
    from advisor.plans import TrainingPlan
    from advisor.specs import Linear, ModelSpec


#: families whose linears are transformers' Conv1D (weight stored in x out; peft sets fan_in_fan_out=True)
CONV1D_FAMILIES = ("gpt2",)


@dataclass(frozen=True)
class DoRA(Method):
    def adapter_params(self, lin: Linear, r: int) -> int:
        return r * (lin.in_features + lin.out_features) + lin.out_features

    def adapted_layer_saved_bytes(self, lin: Linear, plan: TrainingPlan, e: int, a: int) -> float:
        base = a if plan.lora_dropout > 0 else e
        return lin.out_features * (base + a)

    def adapted_head_backward_bytes(self, lin: Linear, plan: TrainingPlan, e: int, a: int) -> float:
        """DoRA on the output head peaks in the head's own backward, vocab wide: its saved base output (the
        adapter dtype on the dropout path), LoRA output and scaled LoRA output; the logits' gradient in the
        compute dtype and cast to the adapter dtype, and the two products with the magnitude scale."""
        base = a if plan.lora_dropout > 0 else e
        return lin.out_features * ((base + 2 * a) + (3 * a + e))

    def adapted_layer_saved_constant(self, lin: Linear, plan: TrainingPlan, e: int, a: int) -> float:
        """Bytes an adapted layer saves independent of the tokens: the cast weight of the dropout path."""
        if plan.lora_dropout > 0 and a != e:
            return lin.weight_params * a
        return 0.0

    def adapted_head_forward_bytes(
        self, lin: Linear, plan: TrainingPlan, e: int, a: int, tokens: int, cpu: bool = False
    ) -> float:
        """DoRA on the output head, at its output's last product (``DoraLinearLayer.forward``'s locals are alive until
        it returns): the identity, its image, ``lora_weight`` and the base weight cast to the input's dtype (the
        weight norm's, kept as locals; the cast also saved by ``F.linear`` on the dropout path), the norm and the
        scales (out wide); per token, vocab wide: peft's base output (compute dtype), and in the adapter dtype the
        dropout path's second base matmul (without dropout the base output itself is reused), the LoRA output and
        the three products of ``(m/||.|| - 1) * base + m/||.|| * lora * scaling``; in wide: the input cast to the
        adapter dtype, the dropout's output and mask. Trace: families referee row 145 (OLMo-3, DoRA on the head,
        10355 x 832, 720 tokens): 230.2 MiB at the step's peak, where only the weight norm (134 MiB) was counted.
        Or earlier, at the weight norm's sum (a vocabulary wide against few tokens), which comes after peft's base
        output and the input's cast and dropout: those are alive beside it (row 126, Ministral's 131072 x 4096 head
        over 944 tokens: 269 MiB of them beside the 8256 MiB norm)."""
        dropout = plan.lora_dropout > 0
        cast = a != e
        inputs = lin.in_features * ((a if cast else 0) + ((a if cpu else 1) + a if dropout else 0))
        norm_moment = self._weight_norm_bytes(lin, plan, a, cast) + tokens * (lin.out_features * e + inputs)
        const = (
            lin.in_features * (lin.in_features + plan.lora_r) * a
            + (2 if cast else 1) * lin.weight_params * a
            + 3 * lin.out_features * a
        )
        per_tok = lin.out_features * (e + (5 if dropout else 4) * a) + plan.lora_r * a + inputs
        return max(norm_moment, tokens * per_tok + const)

    @staticmethod
    def _weight_norm_bytes(lin: Linear, plan: TrainingPlan, a: int, cast: bool) -> float:
        """One layer's weight norm: identity, its image, lora_weight, the cast base weight, the scaled product, the sum."""
        return lin.in_features * (lin.in_features + plan.lora_r) * a + (3 + cast) * lin.weight_params * a

    def forward_temporaries(self, model: ModelSpec, plan: TrainingPlan, adapted: list[Linear], e: int) -> float:
        """The weight norm of the largest adapted layer: identity, its image, lora_weight, the cast base
        weight (when the dtypes differ), the scaled product and the sum."""
        a = self.state_bytes_per_param(plan, e)
        return max(
            (self._weight_norm_bytes(lin, plan, a, a != e) for lin in adapted if "embed_tokens" not in lin.roles),
            default=0.0,
        )

    def embedding_forward_temporaries(self, model: ModelSpec, plan: TrainingPlan, adapted: list[Linear]) -> float:
        """DoRA on the token embedding (peft DoraEmbeddingLayer): the weight norm of ``W + s * (A @ B)`` makes
        the vocab x hidden product, its scaled copy and the sum, in the adapter dtype (the sum promotes the
        half weight); no identity matrix, unlike a linear. At the start of forward, alone with the weights."""
        a = self.state_bytes_per_param(plan, DTYPE_BYTES[plan.dtype])
        return sum(3 * lin.weight_params * a for lin in adapted if "embed_tokens" in lin.roles)

    def retained_weight_gradients(self, model: ModelSpec, plan: TrainingPlan, adapted: list[Linear], e: int) -> float:
        """GPT-2's Conv1D layers (peft ``fan_in_fan_out=True``) on the dropout path: peft's ``transpose(weight,
        True)`` wraps the transposed base weight in a NEW ``nn.Parameter`` (requires_grad=True by default), and
        ``F.linear(dropout(x), that)`` then computes its ``out x in`` weight gradient in backward; AccumulateGrad
        stores it on that throw-away leaf, which the graph keeps until backward ends. Only when ``weight.to(x.dtype)``
        returns the Parameter itself: adapters in the weights' dtype (x is cast to the adapter dtype first); any
        cast makes a plain tensor without grad. (CPU truth truth10-047, GPT-2 DoRA with checkpointing: the two later
        blocks' c_attn / attn c_proj / mlp c_proj weight gradients, 20 MiB, alive in the first block's backward.)"""
        if model.family not in CONV1D_FAMILIES or plan.lora_dropout <= 0 or plan.framework != "hf":
            return 0.0
        a = self.state_bytes_per_param(plan, e)
        if a != e:
            return 0.0
        return sum(lin.weight_params * a for lin in adapted if not set(lin.roles) & {"embed_tokens", "lm_head"})

    def extra_flops_per_token(self, model: ModelSpec, plan: TrainingPlan, adapted: list[Linear]) -> float:
        per_token = super().extra_flops_per_token(model, plan, adapted)
        adapted = [lin for lin in adapted if "embed_tokens" not in lin.roles]  # an embedding has no base matmul
        if plan.lora_dropout > 0:  # the second base matmul: forward, and the input gradient in backward
            per_token += sum(4 * lin.weight_params for lin in adapted)
            if plan.grad_checkpointing:
                per_token += sum(2 * lin.weight_params for lin in adapted)
        return per_token

    def extra_flops_per_step(self, model: ModelSpec, plan: TrainingPlan, adapted: list[Linear]) -> float:
        """FLOPs per micro-step that do not scale with tokens: lora_weight from the identity and the norm (the
        embedding's from A @ B, no identity); blocks run it again when checkpointing recomputes them, the head
        and the embedding (outside the blocks) once."""
        total = 0.0
        for lin in adapted:
            outer = bool({"lm_head", "embed_tokens"} & set(lin.roles))
            forwards = 2 if plan.grad_checkpointing and not outer else 1
            identity = 0 if "embed_tokens" in lin.roles else 2 * lin.in_features * lin.in_features * plan.lora_r
            total += forwards * (
                identity + 2 * lin.in_features * plan.lora_r * lin.out_features + 3 * lin.weight_params
            )
        return total


METHOD = DoRA(
    name="dora",
    summary="LoRA with a trainable magnitude per output feature (peft use_dora), unquantised base",
    dora=True,
    # not in the default search: it costs more memory and time than LoRA for the same adapter, and the
    # convergence benefit is task-dependent; name it in constraints.methods to compare it
    searched_by_default=False,
    lighter="use qlora (4-bit base weights), or plain lora (no magnitude vectors or weight-norm temporaries)",
)
