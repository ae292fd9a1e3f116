"""GPU-independent speed counts of one training step: FLOPs per token, the host ops the step issues, the
narrow LoRA matmuls' traffic and the communication per micro-step by kind (``terms.SpeedCounts``).

The device layer (``advisor.estimators.device.evaluate``) turns them into time on a GPU or CPU; the
analytical estimator (``advisor.estimators.analytical``) computes them with the memory terms of the same
plan. Every count is a property of the plan and the architecture only, never of a GPU.
"""

from __future__ import annotations

import math

from advisor.estimators import device as dev
from advisor.estimators import moe
from advisor.estimators.terms import SpeedCounts
from advisor.families import get_family
from advisor.methods import get_method
from advisor.plans import TrainingPlan
from advisor.specs import Block, ModelSpec
from advisor.units import DTYPE_BYTES


def flops_per_token(model: ModelSpec, plan: TrainingPlan, adapter_params: int, adapted: list) -> float:
    """FLOPs per token of one micro-step: the linears (and the head) by method (full ~6N, LoRA ~4N +
    adapters, +2N recompute under checkpointing), attention growing with the sequence length (causal
    kernels skip half), the method's extras per token and per step."""
    m = get_method(plan.method)
    # a mixture of experts runs each token through its top-k experts only: FLOPs follow the active weights
    weights = moe.active_linear_weight_params(model) if model.is_moe else model.linear_weight_params
    lin = 2 * (weights + model.vocab_size * model.hidden_size)
    s = plan.seq_len
    attn = 0.0
    for blk in model.blocks:
        causal = 0.5 if (blk.kind in ("decoder", "dense_decoder") and plan.attention != "eager") else 1.0
        per_layer = 4 * s * model.q_dim * causal
        if blk.kind == "cross_decoder":
            per_layer += 4 * s * model.q_dim
        attn += blk.count * per_layer
    f = m.flops_per_token(lin, attn, adapter_params, plan.grad_checkpointing)
    f += m.extra_flops_per_token(model, plan, adapted)
    f += moe.expert_lora_flops_per_token(model, plan, adapted) if model.is_moe else 0.0
    return f + m.extra_flops_per_step(model, plan, adapted) / (plan.micro_batch * plan.seq_len)


def lora_matmul_traffic(plan: TrainingPlan, adapted: list, tokens: int, passes: int) -> float:
    """Bytes the narrow adapter matmuls move per micro-step. lora_A (in -> r) and lora_B (r -> out) do
    2*r*(in+out) FLOPs per token but read the full-width input and write the full-width output in the
    adapter dtype: far below the tensor cores' arithmetic intensity, so memory-bound. Backward reads
    them again for the input and weight gradients (twice the forward's bytes); checkpointing repeats
    the forward."""
    m = get_method(plan.method)
    if not m.adapter or not adapted:
        return 0.0
    a = m.state_bytes_per_param(plan, DTYPE_BYTES[plan.dtype])
    forwards = passes - 1
    # (adapted experts are folded into their weights instead: advisor/estimators/moe.py expert_lora_traffic_bytes)
    narrow = [lin for lin in adapted if lin.kind != "experts"]
    return float(tokens * a * (forwards + 2) * sum(lin.in_features + lin.out_features for lin in narrow))


def host_ops(model: ModelSpec, plan: TrainingPlan, groups, passes: int, trainable: int) -> float:
    """Operations the host issues per micro-step (eager PyTorch: each a Python/dispatcher call and
    usually one kernel launch); see ``HOST_OPS``. Blocks x (forward passes + backward) x ops per block by
    method, plus the embedding/loss ops and the optimiser step's ops spread over its micro-steps."""
    m = get_method(plan.method)
    hf = plan.framework == "hf"
    forwards = passes - 1  # checkpointing recomputes each block's forward in backward
    total = 0.0
    for blk, lins in groups or [(b, []) for b in model.blocks]:
        fwd = _block_forward_ops(model, blk, plan)
        bwd = HOST_OPS["backward_per_forward"] * fwd + (len(blk.linears) if not m.adapter else 0)
        lora_f, lora_b = HOST_OPS["lora_forward"], HOST_OPS["lora_backward"]
        if m.dora:
            lora_f, lora_b = lora_f + HOST_OPS["dora_extra"], lora_b + HOST_OPS["dora_extra"]
        fwd += len(lins) * lora_f
        bwd += len(lins) * lora_b
        if m.name == "qlora":
            quantised = len(blk.linears)
            fwd += quantised * HOST_OPS["dequant_forward"]
            bwd += quantised * HOST_OPS["dequant_backward"]
        total += blk.count * (forwards * fwd + bwd)
    total += HOST_OPS["step_fixed"] + (HOST_OPS["hf_loss"] if hf else HOST_OPS["loss"])
    # optimiser step (once per optimiser step): foreach kernels per chunk of tensors, clipping, zero_grad
    tensors = (
        2 * sum(blk.count * len(lins) for blk, lins in groups)
        if m.adapter
        else sum(b.count * (len(b.linears) + 2) for b in model.blocks) + 3
    )
    optimiser = HOST_OPS["optimizer_per_chunk"] * math.ceil(max(tensors, 1) / HOST_OPS["optimizer_chunk"])
    optimiser += HOST_OPS["per_parameter"] * tensors
    return total + optimiser / plan.grad_accum


def speed_counts(
    model: ModelSpec,
    plan: TrainingPlan,
    groups,
    adapted,
    fpt: float,
    trainable: int,
    grad_bytes: int,
    passes: int,
    e: int,
) -> SpeedCounts:
    """The plan's GPU-independent speed counts (``terms.SpeedCounts``): host ops, the attention share of
    the FLOPs, the widest GEMM, and the communication per micro-step by kind."""
    m = get_method(plan.method)
    n = plan.num_gpus
    gather = grad = collectives = 0.0
    net_gather = net_grad = 0.0
    # hierarchical collectives across nodes (NCCL: rings / trees per rail): the payload moves (g-1)/g inside a
    # node over its GPU link and (N-1)/N between nodes over the node's network; one node: (n-1)/n over the link
    nodes = plan.nodes
    g = min(plan.gpus_per_node, n)
    inter = (nodes - 1) / nodes
    if n > 1:
        frac = (g - 1) / g if nodes > 1 else (n - 1) / n
        # DDP all-reduces the gradients as they are stored (fp32 master / fp32 adapters); FSDP's mixed
        # precision reduces them in the compute dtype (accelerate's MixedPrecision reduce_dtype)
        grad_total = trainable * (min(grad_bytes, e) if plan.sharding == "fsdp" else grad_bytes)
        # the HF Trainer (accelerate) skips gradient synchronisation on all but the last micro-step of an
        # optimiser step (no_sync, DDP and FSDP); torchtune / litgpt FSDP reduce-scatter every micro-step
        sync_every = plan.framework != "hf" and plan.sharding == "fsdp"
        syncs = 1.0 if sync_every else 1.0 / plan.grad_accum
        if plan.sharding == "ddp":
            # ring all-reduce of the trainable gradients: 2 (n-1)/n x bytes, in 25 MiB buckets
            grad = 2 * frac * grad_total * syncs
            net_grad = 2 * inter * grad_total * syncs
            collectives = math.ceil(grad_total / dev.DDP_BUCKET_BYTES) * syncs
        else:
            # FSDP: every block's weights all-gathered for forward, backward and (with checkpointing) the
            # recompute, resharded after each; gradients reduce-scattered, (n-1)/n x bytes each
            weights = m.communicated_weight_bytes(model, e)
            gather = passes * frac * weights
            grad = frac * grad_total * syncs
            net_gather = passes * inter * weights
            net_grad = inter * grad_total * syncs
            collectives = model.total_layers * (passes + syncs)
    attention = attention_flops_per_token(model, plan)
    return SpeedCounts(
        host_ops=host_ops(model, plan, groups, passes, trainable),
        attention_flops_per_token=min(attention, fpt),
        seq_len=float(plan.seq_len),
        gemm_n=float(max((lin.out_features for b in model.blocks for lin in b.linears), default=0)),
        gather_bytes=gather,
        grad_comm_bytes=grad,
        collectives=collectives,
        internode_gather_bytes=net_gather,
        internode_grad_bytes=net_grad,
    )


def attention_flops_per_token(model: ModelSpec, plan: TrainingPlan) -> float:
    """FLOPs per token of the attention kernels (scores and weighted sum; forward, backward at twice the
    forward, and the recompute), the part of ``flops_per_token`` that does not run as a GEMM."""
    if plan.attention == "eager":
        return 0.0  # eager attention runs as batched GEMMs
    s = plan.seq_len
    attn = 0.0
    for blk in model.blocks:
        per_layer = 4 * s * model.q_dim * (0.5 if blk.kind == "decoder" else 1.0)
        if blk.kind == "cross_decoder":
            per_layer += 4 * s * model.q_dim
        attn += blk.count * per_layer
    return attn * (4 if plan.grad_checkpointing else 3)


#: Host op counts (priors, from the operations transformers' and peft's eager code issues; each costs the
#: host ``device.HOST_OP_S``):
#: * per block forward: RMSNorm 8 ops (fp32 upcast, pow, mean, add, rsqrt, mul, cast back, weight) or
#:   LayerNorm 1; one per linear; rotary 10 (index cos/sin, 2x rotate_half = 2 slices + neg + cat, 2 mul,
#:   add); 4 reshape/transpose calls and 1 SDPA call (eager: 6: matmul, scale, mask, softmax, cast, matmul);
#:   the MLP activation (gated: act + mul; gelu_new: 8-op Python composite); 2 residual adds; dropouts;
#: * backward: about two autograd ops per forward op (plus the weight-gradient GEMM of a trained linear);
#: * LoRA per adapted module: peft's Linear.forward (input cast to the adapter dtype, dropout, lora_A,
#:   lora_B, scaling, add, Python dispatch over the active adapters): ~8 forward, 8 backward; DoRA's weight
#:   norm +6 each way; QLoRA per quantised linear: bitsandbytes' dequantisation (absmax, then weights) and
#:   MatMul4Bit's Python: 3 forward, 2 backward;
#: * per micro-step: the Trainer's step (moving the batch, loss scaling, detach/sync): ~50; the loss (HF:
#:   logits.float(), shift, contiguous, cross-entropy forward and backward): ~12, other stacks ~6;
#: * optimiser step: ~20 foreach ops per chunk of 100 tensors (AdamW, gradient clipping), 0.1 op per
#:   parameter tensor (zero_grad's Python loop).
HOST_OPS = {
    "backward_per_forward": 2.0,
    "lora_forward": 8.0,
    "lora_backward": 8.0,
    "dora_extra": 6.0,
    "dequant_forward": 3.0,
    "dequant_backward": 2.0,
    "step_fixed": 50.0,
    "hf_loss": 12.0,
    "loss": 6.0,
    "optimizer_per_chunk": 20.0,
    "optimizer_chunk": 100.0,
    "per_parameter": 0.1,
}


def _block_forward_ops(model: ModelSpec, blk: Block, plan: TrainingPlan) -> float:
    """Host ops of one block's forward, frozen or trained (see ``HOST_OPS``)."""
    fam = get_family(model.family)
    n_attn = 2 if blk.kind == "cross_decoder" else 1
    n_norms = {"encoder": 2, "cross_decoder": 3}.get(blk.kind, model.norms_per_layer)
    norm_ops = 8 if model.norm == "rmsnorm" else 1
    rotary = not (model.learned_positions or fam.position_bias_mask or fam.encoder_decoder)
    eager = plan.attention == "eager" or (plan.framework == "hf" and not model.sdpa)
    attn = n_attn * (4 + (6 if eager else 1) + (10 if rotary else 0))
    act = 8 if (plan.framework == "hf" and model.hidden_act == "gelu_new") else (2 if model.gated_mlp else 1)
    dropouts = (n_attn + 1) if model.dropout > 0 else 0
    return n_norms * norm_ops + len(blk.linears) + attn + act + 2 + dropouts
