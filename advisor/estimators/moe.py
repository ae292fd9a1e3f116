"""Mixture-of-experts terms: what a sparse block saves for backward, and the weights a token runs through.

transformers 5.x runs the experts through ``grouped_mm`` (integrations/moe.py: its default
``experts_implementation``, on CUDA SM80+ and on the CPU with torch >= 2.9): the (token, chosen expert) pairs
are sorted by expert, the tokens gathered (S = tokens x k rows), multiplied by the fused ``gate_up_proj``, gated,
multiplied by ``down_proj``, weighted by the router's top-k scores and summed back per token. What autograd
keeps of it was read off the real code with ``torch.autograd.graph.saved_tensors_hooks`` on fake tensors (one
sparse block of Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss; bf16; frozen and trained experts) and is counted here
tensor by tensor:

* per routed row: the up projection's 2m output (the gate's input and ``up`` are views of it), the gate's
  m-wide output (gpt-oss's clamped SwiGLU keeps four m-wide tensors more), the down projection's h-wide output
  (kept for the multiplication by the routing weight), the routing weight, and three int64 index vectors
  (the gather index, the sort permutation, its inverse);
* per token: the router's fp32 softmax over all experts (gpt-oss: a softmax over the top k only, in the
  activation dtype), the top-k indices, and with renormalised top-k probabilities (Mixtral, ``norm_topk_prob``)
  the fp32 top-k values and their sum;
* trained experts (full fine-tuning) add the grouped matmuls' inputs for the weight gradients: the gathered
  h-wide rows and the m-wide down input per row (the router's input is the block's MLP input, which the
  method's count already holds);
* the experts compute in their weights' dtype (grouped_mm is not autocast: ``input.to(weight.dtype)``): fp32
  under AMP's master weights and under QLoRA, whose k-bit preparation upcasts the unquantised experts.

Nothing of it scales with the expert count but the router's softmax: all experts are resident as weights
(`advisor.specs.ModelSpec.param_count`), never as activations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from advisor.families import moe as moe_family
from advisor.methods import get_method
from advisor.methods.qlora import upcast as kbit_upcast

if TYPE_CHECKING:
    from advisor.families.layout import Block
    from advisor.plans import TrainingPlan
    from advisor.specs import ModelSpec

INDEX_BYTES = 8  # int64


def is_sparse(blk: Block) -> bool:
    """A block whose MLP is routed (it holds fused expert parameters)."""
    return any(lin.kind == "experts" for lin in blk.linears)


def routed_bytes_per_element(model: ModelSpec, plan: TrainingPlan, e: int) -> int:
    """The dtype the experts compute in: their weights' (fp32 under AMP master weights and after QLoRA's upcast)."""
    m = get_method(plan.method)
    amp = not m.adapter and plan.master_weights and plan.dtype != "fp32"
    upcast = m.quantized and kbit_upcast(plan)  # not under FSDP in half precision (advisor.methods.qlora.upcast)
    return 4 if (amp or upcast) else e


def sparse_mlp_saved_bytes(model: ModelSpec, plan: TrainingPlan, e: int, cpu: bool = False) -> float:
    """Bytes per token one sparse MLP keeps for backward (router, routed experts, shared expert); it replaces the
    dense MLP's count of the block (and, for full fine-tuning, the method's dense down-projection input)."""
    h, mw, k, n_exp = model.hidden_size, model.moe_intermediate_size, model.experts_per_token, model.num_experts
    er = routed_bytes_per_element(model, plan, e)
    weight_bytes = 4 if model.model_type in moe_family.FP32_SAVED_ROUTING_WEIGHTS else e
    gate_m = moe_family.EXPERT_ACTIVATION_SAVES.get(model.model_type, 3)
    rows = k * (er * (gate_m * mw + h) + 3 * INDEX_BYTES + weight_bytes)
    if model.model_type in moe_family.TOPK_SOFTMAX_ROUTER_TYPES:
        router = k * (INDEX_BYTES + e)
    else:
        router = 4 * n_exp + k * INDEX_BYTES + ((4 * k + 4) if model.norm_topk_prob else 0)
    s = model.shared_expert_intermediate_size
    shared = 3 * e * s + (e * h + e if model.shared_expert_gate else 0) if s else 0
    total = rows + router + shared
    trained = not get_method(plan.method).adapter
    if trained or not (bf16_experts(plan, er) or cpu):
        # the grouped matmuls' inputs: kept for the weight gradients, and always by the non-bf16 path (below)
        total += k * er * (h + mw)
    if trained:
        total += k * INDEX_BYTES if model.expert_bias else 0
        total += e * s - e * model.intermediate_size  # the shared down input; the dense down input is not there
    return total


def bf16_experts(plan: TrainingPlan, er: int) -> bool:
    """Whether the experts compute in bf16, the one dtype torch's grouped_mm kernel takes ("inputs are currently
    expected to be torch.bfloat16", torch.nn.functional.grouped_mm). Its autograd keeps the input only for a
    trained weight. Other dtypes (fp32 experts under AMP and after QLoRA's upcast, fp16, fp32 plans) go through
    transformers' fallback op (``transformers::grouped_mm_fallback``), whose autograd keeps input and weight
    always: the simulated trace takes that path (advisor/simulated/kernels.py moe_kernel_choices). Whether a
    CUDA build of torch runs fp32 through its own fallback instead is not verified here (no GPU run yet). On a CPU
    (``cpu``: a real CPU run) transformers calls torch's grouped_mm for every dtype (torch >= 2.9), whose autograd
    keeps the input only for a trained weight."""
    return er == 2 and plan.dtype == "bf16"


def active_linear_weight_params(model: ModelSpec) -> int:
    """Weights of the blocks' matmuls one token runs through: every linear, the router, and `experts_per_token`
    of each sparse layer's experts (what its FLOPs scale with)."""
    total = 0.0
    for b in model.blocks:
        for lin in b.linears:
            share = model.experts_per_token / model.num_experts if lin.kind == "experts" else 1.0
            total += b.count * lin.weight_params * share
    return int(total)


def backward_transient_bytes(model: ModelSpec, plan: TrainingPlan, e: int, cpu: bool = False) -> float:
    """Bytes per token a sparse MLP's backward allocates on top of what the block saved: the gradient of the
    weighted rows, S = tokens x k of them, h wide, in the dtype of the weighted rows (the routed rows' dtype
    promoted with the routing weights': fp32 for Mixtral's weights): the gradient expanded over the k rows and
    cloned, the zeros the un-permuting index's backward allocates and its index_put result (read off the trace's
    live tensors at the peak of a tiny Mixtral LoRA step). Through torch's grouped_mm (bf16 experts, or any dtype
    on a CPU) the down projection's saved output is already released at that moment: two rows' worth on top;
    transformers' fallback op (other dtypes on CUDA) still holds it: three (real fp32 CPU steps and the simulated
    referee, bench/simulated_referee_moe.py)."""
    er = routed_bytes_per_element(model, plan, e)
    weight_bytes = 4 if model.model_type in moe_family.FP32_BACKWARD_ROUTING_WEIGHTS else e
    rows = 2 if (bf16_experts(plan, er) or cpu) else 3
    return rows * model.experts_per_token * model.hidden_size * max(er, weight_bytes)


def gradients_before_first_block(model: ModelSpec, grads: float) -> float:
    """Gradient bytes alive while the first sparse block back-propagates (full fine-tuning, checkpointing; the
    peak: its experts' backward on the largest recomputed block): all but that block's, the dense first layers'
    (DeepSeek) and the token embedding's, which all come after it. `grads`: the bytes of all gradients."""
    earlier = 0
    for b in model.blocks:
        per_layer = sum(lin.params for lin in b.linears) + b.norm_params
        earlier += per_layer * (1 if is_sparse(b) else b.count)
    later = model.param_count - earlier - model.embedding_params
    return grads * max(later, 0) / model.param_count


def mla_attention_saved_bytes(model: ModelSpec, plan: TrainingPlan, e: int) -> float:
    """Bytes per token DeepSeek's multi-head latent attention keeps for backward (it replaces the generic q/k/v
    count), read off one DeepseekV3Attention with saved_tensors_hooks on fake tensors, SDPA taking CUDA's
    memory-efficient kernel (q / k heads wider than v heads rule out flash): q and k per head (nope + rope; k
    expanded to every head), kv_b_proj's whole output (v is a view of it), the attention output, the fp32
    logsumexp, the two rope halves of the shared key, and the latent RMSNorms' fp32 upcasts (+ their fp32 rsqrt).
    Full fine-tuning adds the inputs of the latent projections and the latent norms' outputs for the weight
    gradients (two per latent), and the o_proj input is the v-wide output, not q-wide (corrected here against the
    method's generic count)."""
    nh, rope, nope, v = model.num_attention_heads, model.qk_rope_head_dim, model.qk_nope_head_dim, model.v_head_dim
    qk = nope + rope
    latents = model.q_lora_rank + model.kv_lora_rank
    saved = e * nh * (2 * qk + (nope + v) + v) + 4 * nh + 2 * e * rope + 4 * latents + 8
    if not get_method(plan.method).adapter:
        saved += e * 2 * latents + e * nh * v - e * model.q_dim
    return saved


def routing_traffic_bytes(model: ModelSpec, plan: TrainingPlan, e: int, passes: int) -> float:
    """Memory traffic per token of a step's expert dispatch, beyond the matmuls (memory-bound, no FLOPs): each
    sparse layer gathers the k rows of every token (read + write, h wide), weights them and scatters them back
    (read + write twice: the weighting and the per-token sum), once per forward pass (``passes``: forward,
    recompute, backward) and so again in backward for the gradients; plus the router's softmax / top-k over the
    expert scores. What a step costs beyond its active parameters' FLOPs; expert imbalance is not modelled
    (grouped_mm runs every expert's rows in one kernel, so the FLOPs are the same however the tokens spread)."""
    k, h = model.experts_per_token, model.hidden_size
    er = routed_bytes_per_element(model, plan, e)
    layers = sum(b.count for b in model.blocks if is_sparse(b))
    per_pass = 6 * k * h * er + 3 * 4 * model.num_experts
    return layers * per_pass * passes


# ---- LoRA on the experts (peft target_parameters: lora.ParamWrapper) -------------------------------------------
# peft 0.21 adapts a fused 3-D expert parameter W (E, in, out) with lora_A (in -> r E) and lora_B (r E -> out) in
# the adapter dtype: r (in + out) parameters per expert. It cannot add B A x to the output (the parameter is read
# inside the experts' own forward), so on every forward it registers a parametrization that folds the update into
# a new weight, ``baddbmm(W, B_e, A_e, alpha=scale)`` (_LoraFactorsProxy): an (E, in, out) tensor in W's dtype, the
# size of the whole expert stack. The grouped matmul keeps it for backward (the input gradient needs it), and as the
# folded weight requires grad it keeps the gathered input rows too. In backward the grouped matmul writes the full
# (E, in, out) gradient of the folded weight, which baddbmm's backward turns into the factors' gradients.
# Everything was read off real fp32 CPU steps and bf16 / QLoRA traces (tests/test_moe.py,
# bench/simulated_referee_moe.py).


def adapted_experts(lins: list) -> list:
    """The fused expert parameters among a block's LoRA targets."""
    return [lin for lin in lins if lin.kind == "experts"]


def expert_lora_saved_bytes(model: ModelSpec, plan: TrainingPlan, e: int, lins: list, cpu: bool = False) -> float:
    """Bytes per token a sparse MLP with adapted experts saves beyond its frozen count (``sparse_mlp_saved_bytes``):
    the grouped matmuls' inputs for the folded weights' gradients (gate_up: the gathered h-wide rows; down: its
    m-wide input), where the frozen count has not already kept them (torch's grouped_mm: bf16 experts or a CPU)."""
    experts = adapted_experts(lins)
    er = routed_bytes_per_element(model, plan, e)
    if not experts or not (bf16_experts(plan, er) or cpu):
        return 0.0
    return model.experts_per_token * er * sum(lin.in_features for lin in experts)


def expert_lora_saved_constant(model: ModelSpec, plan: TrainingPlan, e: int, lins: list) -> float:
    """Bytes per sparse layer its adapted experts keep for backward whatever the tokens: each folded weight
    (E x in x out in the experts' dtype), and where that dtype is not the adapters' the factors' casts baddbmm keeps
    (lhs / rhs ``.to(W.dtype)``: r E (in + out) each)."""
    experts = adapted_experts(lins)
    if not experts:
        return 0.0
    er = routed_bytes_per_element(model, plan, e)
    a = get_method(plan.method).state_bytes_per_param(plan, e)
    folded = er * sum(lin.weight_params for lin in experts)
    casts = (
        er * plan.lora_r * sum((lin.in_features + lin.out_features) * lin.experts for lin in experts) if a != er else 0
    )
    return folded + casts


def expert_lora_backward_bytes(model: ModelSpec, plan: TrainingPlan, e: int, lins: list, tokens: int) -> float:
    """Bytes a sparse layer's backward allocates on top of its saved tensors when its experts are adapted: the
    gradient of a folded weight (E x in x out), next to the gradient of the routed rows it is computed from (tokens
    x k rows, h wide, in the weighted rows' dtype). down_proj back-propagates first, with both folded weights saved;
    gate_up_proj then, down's folded weight released: the larger of the two moments."""
    experts = adapted_experts(lins)
    if not experts:
        return 0.0
    er = routed_bytes_per_element(model, plan, e)
    weight_bytes = 4 if model.model_type in moe_family.FP32_BACKWARD_ROUTING_WEIGHTS else e
    rows = tokens * model.experts_per_token * model.hidden_size * max(er, weight_bytes)
    down = [lin.weight_params for lin in experts if lin.name.endswith("down_proj")]
    up = [lin.weight_params for lin in experts if not lin.name.endswith("down_proj")]
    d, u = sum(down), sum(up)
    return er * max(d, u - d) + rows


def expert_lora_rows_transient_bytes(model: ModelSpec, plan: TrainingPlan, e: int, cpu: bool = False) -> float:
    """Bytes per token the weighted rows' backward moment holds beyond ``backward_transient_bytes`` when the experts
    are adapted and run through torch's bf16 grouped_mm on CUDA: the down projection's output is still alive there
    (three rows, as on transformers' fallback path; bf16 traces of Qwen3-MoE, OLMoE, gpt-oss and DeepSeek-V3 with
    LoRA on the experts and checkpointing: clone, zeros and index_put of the rows next to the down output)."""
    er = routed_bytes_per_element(model, plan, e)
    if cpu or not bf16_experts(plan, er):
        return 0.0
    return backward_transient_bytes(model, plan, e, cpu) / 2


def adapter_gradients_before_first_block(model: ModelSpec, grads: float, experts_peak: bool = True) -> float:
    """Adapter gradient bytes alive at the recomputed blocks' peak (LoRA with the experts adapted: their adapters,
    r per expert, are most of the trainable parameters), the layers taken alike. Where the experts' backward is the
    block's largest moment, the first layer's (the last run) comes with every later layer's; otherwise the trace
    peaks in the first recomputed block, with that block's own experts' gradients only."""
    layers = sum(b.count for b in model.blocks)
    if not layers:
        return 0.0
    return grads * ((layers - 1) if experts_peak else 1) / layers


def only_experts_train(model: ModelSpec, plan: TrainingPlan, groups) -> bool:
    """LoRA whose only targets are fused experts (no linear, no head or embedding adapter, nothing trained whole):
    the residual stream needs no gradient before the first sparse layer's experts."""
    if not model.is_moe or not get_method(plan.method).adapter or plan.modules_to_save:
        return False
    lins = [lin for _, ls in groups for lin in ls]
    return bool(lins) and all(lin.kind == "experts" for lin in lins)


def unsaved_before_first_experts(
    model: ModelSpec, plan: TrainingPlan, blk: Block, lins: list, e: int, block_bytes: float, tokens: int, cpu: bool
) -> float:
    """What the generic count of `blk` (``block_bytes``: all its layers' saved bytes) holds that autograd does not
    save when only the experts train (``only_experts_train``, no checkpointing): a dense block (DeepSeek's first
    layers) saves nothing; of the first sparse layer only the experts' part remains (its attention, norms and router
    see no tensor that needs a gradient, and through torch's grouped_mm gate_up's folded weight is not kept: its input
    needs none). Read off a real fp32 CPU step of a tiny Qwen3-MoE with experts-only LoRA and bf16 / QLoRA traces."""
    if not is_sparse(blk):
        return block_bytes
    k, h, mw = model.experts_per_token, model.hidden_size, model.moe_intermediate_size
    er = routed_bytes_per_element(model, plan, e)
    gate_m = moe_family.EXPERT_ACTIVATION_SAVES.get(model.model_type, 3)
    weight_bytes = 4 if model.model_type in moe_family.FP32_SAVED_ROUTING_WEIGHTS else e
    # (the down projection's output is not kept either: it is kept for the routing weights' gradient, and the router
    # needs none here)
    rows = k * (er * gate_m * mw + 3 * INDEX_BYTES + weight_bytes)
    experts_part = tokens * (rows + expert_lora_saved_bytes(model, plan, e, lins, cpu))
    if not (bf16_experts(plan, er) or cpu):
        experts_part += tokens * k * er * (h + mw)
    folded = expert_lora_saved_constant(model, plan, e, lins)
    # torch's grouped_mm keeps a weight only for the input's gradient; transformers' fallback op (other dtypes on
    # CUDA: QLoRA's fp32 experts) keeps input and weight always (the QLoRA trace holds every layer's folded gate_up)
    torch_path = bf16_experts(plan, er) or cpu
    gate_up = sum(lin.weight_params for lin in adapted_experts(lins) if not lin.name.endswith("down_proj"))
    return max(block_bytes - experts_part - folded + (er * gate_up if torch_path else 0), 0.0)


def expert_lora_flops_per_token(model: ModelSpec, plan: TrainingPlan, adapted: list) -> float:
    """FLOPs per token of LoRA on the experts beyond the method's generic count, which gives every adapter parameter
    6 FLOPs per token (+2 recomputed) although these adapters never touch a token (they are folded into the weight):

    * minus that generic count for the expert adapters;
    * the grouped matmuls' weight gradients, now that the folded weights require grad: 2 FLOPs per routed weight per
      token (``experts_per_token`` of each layer's experts);
    * per forward pass (forward, and the recompute under checkpointing) the fold ``baddbmm(W, B, A)``: 2 r FLOPs per
      expert weight; in backward the factors' gradients from the folded weight's gradient: 4 r per expert weight;
      per micro-step, spread over its tokens."""
    experts = {lin.name: lin for lin in adapted_experts(adapted)}.values()
    if not experts:
        return 0.0
    r, tokens = plan.lora_r, plan.micro_batch * plan.seq_len
    forwards = 2 if plan.grad_checkpointing else 1
    layers = sum(b.count for b in model.blocks if is_sparse(b))
    generic = (
        (6 + 2 * (forwards - 1))
        * layers
        * sum(r * (lin.in_features + lin.out_features) * lin.experts for lin in experts)
    )
    weights = layers * sum(lin.weight_params for lin in experts)
    routed = weights * model.experts_per_token / model.num_experts
    fold = (2 * forwards + 4) * r * weights / tokens
    return 2 * routed + fold - generic


def expert_lora_traffic_bytes(model: ModelSpec, plan: TrainingPlan, e: int, adapted: list) -> float:
    """Memory traffic per micro-step of folding the expert adapters (rank r: far below the arithmetic intensity of
    the tensor cores, so memory-bound): each forward pass reads W and writes the folded weight; backward writes the
    folded weight's gradient and reads it twice (one matmul per factor). In the experts' dtype."""
    experts = {lin.name: lin for lin in adapted_experts(adapted)}.values()
    if not experts:
        return 0.0
    er = routed_bytes_per_element(model, plan, e)
    forwards = 2 if plan.grad_checkpointing else 1
    layers = sum(b.count for b in model.blocks if is_sparse(b))
    return float((2 * forwards + 3) * er * layers * sum(lin.weight_params for lin in experts))
