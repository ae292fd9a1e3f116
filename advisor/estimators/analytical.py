"""Closed-form memory and speed model of one training step in the transformers + peft + bitsandbytes stack.

Memory is counted the way the CUDA caching allocator is asked for it:

* weights in their real storage (half, fp32, or NF4 packed + absmax [+ double-quant constants]);
* adapters (fp32: peft upcasts adapter weights), their gradients and optimiser states;
* full fine-tuning: gradients, AdamW states (fp32 / 8-bit / paged), fp32 master weights under AMP
  plus the half copies autocast keeps for backward;
* activations autograd saves, per token per block, from a structural count that reproduces what
  ``calibration/activation_probe.py`` measures in the real transformers code (see
  ``bench/results/activation_probe.json``): frozen base + extras of full fine-tuning + extras per
  LoRA-targeted module, and the s^2 term only for eager attention;
* logits and loss (the fp32 upcast, log-softmax and its gradient): the peak for big vocabularies;
* QLoRA dequantisation temporaries;
* the caching allocator's slack (``allocator_slack``: segment rounding of the live tensors, segment tails,
  one block's cached temporaries) counted from the tensor sizes the plan allocates; the CUDA context as a
  named constant (``DeviceCoefficients``); neither on a CPU.

The peak is the larger of two phases: the start of backward (all activations and logits alive) and
the optimiser step (all gradients alive, activations freed).

Speed: the GPU-independent counts (FLOPs per token, host ops, narrow LoRA matmul traffic, communication
per micro-step by kind) are computed in ``advisor.estimators.speed_counts``; memory-bound bytes (NF4
dequantisation, element-wise ops, the optimiser step amortised over gradient accumulation) here; the
device layer (``advisor.estimators.device.evaluate``) turns them into time.

Other stacks (``plan.framework``: litgpt, torchtune) keep other tensors; where their physics differs
(litgpt's untied / NF4 head, its attention saves, chunked losses) it is counted here, per stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from advisor.estimators import device as dev
from advisor.estimators import speed_counts as sc
from advisor.estimators.base import Estimate, MemoryEstimate, SpeedEstimate, build_estimate
from advisor.estimators.device import DeviceCoefficients
from advisor.estimators.terms import PlanTerms
from advisor.families import get_family
from advisor.methods import get_method
from advisor.plans import TrainingPlan, outer_linears, resolve_targets
from advisor.specs import Block, GpuSpec, ModelSpec
from advisor.units import DTYPE_BYTES, MIB

BNB8_BLOCK = 256  # bitsandbytes' blockwise 8-bit optimiser states (optim/optimizer.py)


@dataclass(frozen=True)
class Coefficients:
    """The constants of the model. Defaults are documented priors; calibration fits them per device.

    The term-level ones scale what ``plan_terms`` counts; ``device`` holds the device layer's."""

    activation_scale: float = 1.0  # multiplies the structural activation count
    logits_scale: float = 1.0
    fixed_allocated_bytes: int = 64 * MIB  # cuBLAS workspaces, RNG state, small buffers (CUDA devices only)
    elementwise_passes: float = 3.0  # saved-activation bytes moved this many times by unfused ops
    # caching allocator: blocks' worth of forward temporaries still cached (reserved, not allocated) at the peak
    allocator_cached_blocks: float = 1.0
    device: DeviceCoefficients = field(default_factory=DeviceCoefficients)


DEFAULT_COEFFICIENTS = Coefficients()


class AnalyticalEstimator:
    """Plan terms from the architecture (cached per model and plan shape) and the device layer with the
    prior coefficients. Implements the ``advisor.estimators.base.Estimator`` seam."""

    name = "analytical"

    def __init__(self, coefficients: Coefficients = DEFAULT_COEFFICIENTS, source: str = "analytical"):
        self.k = coefficients
        self.source = source
        self._cache: dict[tuple, tuple[ModelSpec, PlanTerms]] = {}

    # ---- the Estimator seam -----------------------------------------------------------------
    def device(self, gpu: GpuSpec, dtype: str) -> dev.DeviceColumns:
        return dev.DeviceColumns.of(gpu, dtype, self.k.device)

    def notes(self, model: ModelSpec, gpu: GpuSpec, plan: TrainingPlan) -> list[str]:
        return []

    def estimate(self, model: ModelSpec, gpu: GpuSpec, plan: TrainingPlan) -> Estimate:
        return build_estimate(self, model, gpu, plan)

    def memory(self, model: ModelSpec, gpu: GpuSpec, plan: TrainingPlan) -> MemoryEstimate:
        return self.estimate(model, gpu, plan).memory

    def speed(self, model: ModelSpec, gpu: GpuSpec, plan: TrainingPlan) -> SpeedEstimate:
        return self.estimate(model, gpu, plan).speed

    # ---- adapters ---------------------------------------------------------------------------
    def adapters(self, model: ModelSpec, plan: TrainingPlan) -> tuple[int, list[tuple[Block, list]]]:
        """Adapter parameter count and, per block group, the adapted linears (the method counts each)."""
        m = get_method(plan.method)
        if not m.adapter:
            return 0, []
        names = resolve_targets(model, plan.lora_targets)
        total = 0
        groups = []
        for b in model.blocks:
            lins = [lin for lin in b.linears if lin.name in names]
            total += b.count * sum(m.adapter_params(lin, plan.lora_r) for lin in lins)
            groups.append((b, lins))
        # LoRA on the output head / the token embedding (outside the blocks): one "outer" group
        outer = [lin for lin in outer_linears(model).values() if lin.name in names]
        if outer:
            total += sum(m.adapter_params(lin, plan.lora_r) for lin in outer)
            groups.append((Block("outer", 1, tuple(outer), 0), outer))
        return total, groups

    # ---- terms ------------------------------------------------------------------------------
    def plan_terms(self, model: ModelSpec, plan: TrainingPlan, cpu: bool = False) -> PlanTerms:
        """Everything about a plan that does not depend on which GPU runs it (cached)."""
        key = (id(model), plan.shape_key, cpu)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is model:
            return hit[1]
        counts = self._compute_terms(model, plan, cpu)
        if len(self._cache) > 50_000:
            self._cache.clear()
        self._cache[key] = (model, counts)
        return counts

    def _compute_terms(self, model: ModelSpec, plan: TrainingPlan, cpu: bool = False) -> PlanTerms:
        notes: list[str] = []
        k = self.k
        m = get_method(plan.method)
        e = DTYPE_BYTES[plan.dtype]
        n = plan.num_gpus
        shard = n if plan.sharding == "fsdp" else 1
        adapter_params, groups = self.adapters(model, plan)
        tokens = plan.micro_batch * plan.seq_len

        # weights ------------------------------------------------------------------------------
        # (autocast_copies: the half copies autocast caches in forward under AMP; backward keeps them)
        weights, autocast_copies = m.weight_bytes(model, plan, e)
        weights = weights / shard
        if plan.sharding == "fsdp":
            # FSDP's mixed precision keeps the half-precision copy of each GPU's own shard only (the full
            # half weights exist one gathered block at a time, counted next)
            autocast_copies = autocast_copies / shard
            # FSDP gathers one block's (and prefetches the next block's) full weights
            per_block = max((sum(lin.params for lin in b.linears) for b in model.blocks), default=0)
            weights += 2 * per_block * m.gathered_bytes_per_param(e)

        # trainable state --------------------------------------------------------------------------
        paged = 0.0
        # modules_to_save: trainable copies of the head / embedding in the module's dtype (not the adapters')
        saved_params = m.saved_module_params(model, plan)
        saved_e = m.saved_module_bytes_per_param(plan, e)
        trainable = m.trainable_params(model, adapter_params) + saved_params
        param_bytes = m.state_bytes_per_param(plan, e)
        grad_bytes = param_bytes
        if plan.optimizer in ("adamw", "paged-adamw-32bit"):
            opt_per_param = 2 * param_bytes
            saved_opt_per_param = 2 * saved_e  # torch AdamW: states in the parameter's dtype
        else:  # 8-bit: two uint8 states + an fp32 absmax per block of each
            opt_per_param = saved_opt_per_param = 2 + 2 * 4 / BNB8_BLOCK
        opt_bytes = ((trainable - saved_params) * opt_per_param + saved_params * saved_opt_per_param) / shard
        if plan.optimizer.startswith("paged"):
            paged, opt_bytes = opt_bytes, 0.0
            notes.append("paged optimiser states live in CUDA unified memory and can spill to host RAM under pressure")
        saved_copies = saved_params * saved_e / shard
        grads = ((trainable - saved_params) * grad_bytes + saved_copies * shard) / shard
        adapters = (adapter_params * param_bytes / shard if m.adapter else 0) + saved_copies
        if saved_params:
            notes.append(
                "modules_to_save: peft keeps each original frozen and trains a full copy (its weights, gradient and "
                "optimiser states in the module's dtype)"
            )
        if plan.sharding == "ddp":
            grads *= m.ddp_gradient_copies()  # DDP's reducer keeps flat bucket copies of full gradients

        # activations ------------------------------------------------------------------------------
        kept, recomputed = self.activation_parts(model, plan, groups, cpu)
        act = kept * k.activation_scale
        block = recomputed * k.activation_scale
        logits = self.logits_bytes(model, plan) * k.logits_scale
        adapted = [lin for _, lins in groups for lin in lins]
        quant_tmp = m.temporaries(model, plan, adapted, e)
        # litgpt's own GPT: its lm_head is a separate nn.Linear (see litgpt_head_bytes); under QLoRA it is NF4 too,
        # and its dequantised copy (vocab x hidden) is then the largest temporary of a step
        head_copy = self.litgpt_head_bytes(model, plan, e) / shard
        weights += head_copy
        if plan.framework == "litgpt" and m.quantized:
            quant_tmp = max(quant_tmp, model.vocab_size * model.hidden_size * e)
        e_act = m.activation_bytes_per_element(plan, e)
        backward_transient = tokens * e_act * (2 * model.hidden_size + model.intermediate_size) * k.activation_scale
        # eager attention's own backward moment (s x s per head), when larger than the MLP's (see the method)
        backward_transient = max(
            backward_transient, self.eager_attention_backward_bytes(model, plan) * k.activation_scale
        )
        # cuBLAS workspaces and small CUDA buffers: none on a CPU device
        fixed = 0 if cpu else k.fixed_allocated_bytes
        static = weights + adapters + opt_bytes + fixed
        # gradient accumulation keeps the previous micro-steps' gradients alive through backward
        accumulated = grads if plan.grad_accum > 1 else 0
        # the loss backward (logits' gradients) is over before the last block is recomputed and
        # back-propagated: the two are not alive together
        # forward-only temporaries of the method (DoRA's weight norms): under checkpointing they come back with
        # the recomputed block's forward (before its backward temporaries); without it they compete with the
        # loss's peak at the end of forward
        # (an adapted head is outside the blocks: never recomputed, its temporaries come once, at the end of forward)
        in_blocks = [lin for b, lins in groups if b.kind != "outer" for lin in lins]
        # under checkpointing, q/k/v (the attention's input projections, the block's first matmuls) run their
        # weight norm when the recomputed block holds only its input and its norm's output: their temporaries are
        # a moment of their own, not stacked on the recomputed block's tensors (random referee DoRA q+v rows
        # 185, 282, 76: +2..+6% while stacked; the trace shows no recomputed tensor of the block at that moment)
        attn_in = [lin for lin in in_blocks if plan.grad_checkpointing and set(lin.roles) <= {"q", "k", "v"}]
        fwd_in = m.forward_temporaries(model, plan, attn_in, e)
        fwd_tmp = max(
            m.forward_temporaries(model, plan, [lin for lin in in_blocks if lin not in attn_in], e),
            m.input_cast_temporaries(model, plan, in_blocks, e),
        )
        head_fwd_tmp = m.forward_temporaries(model, plan, [lin for lin in adapted if lin not in in_blocks], e)
        if not head_fwd_tmp and m.adapter and plan.framework == "hf":
            # peft's LoRA on the head: result = base(x) + lora_B(lora_A(x)) * scaling, cast back to the base's
            # dtype: at the product the base output (activation dtype) and lora_B's output and its scaled copy
            # (adapter dtype) are alive, vocab wide (random referee row 105, T5 whose loss needs less: 2 fp32 and
            # 1 bf16 tokens x vocab tensors at the forward peak)
            ea = m.activation_bytes_per_element(plan, DTYPE_BYTES[plan.dtype])
            a_head = m.state_bytes_per_param(plan, DTYPE_BYTES[plan.dtype])
            tokens = plan.micro_batch * plan.seq_len
            head_lins = [lin for b_, lins in groups if b_.kind == "outer" for lin in lins if "lm_head" in lin.roles]
            head_fwd_tmp = sum(tokens * lin.out_features * (ea + 2 * a_head) for lin in head_lins)
        rec_tmp = max(backward_transient, fwd_tmp) if plan.grad_checkpointing else backward_transient
        # LoRA on the head / the embedding saves per-token tensors outside the blocks: the head's until its
        # backward, right after the loss's peak; the embedding's until the end of backward
        head_saved, emb_saved, head_bwd = self.outer_adapter_bytes(model, plan, groups, cpu)
        act += emb_saved * k.activation_scale
        loss_head = max(logits + head_saved * k.activation_scale, head_bwd * k.activation_scale)
        # transformers' eager mask(s), alive all step: at the loss's moment on top of the rest (the blocks' eager
        # backward moment, eager_attention_backward_bytes, was checked against traces that hold it already).
        # Counted for Gemma-2 only so far: the GPT-2 fp32 eager referee trace at the loss's moment
        # (tests/simulated/test_simulated_estimator.py config2) already matches without its one mask (+3.9% with
        # it), so another term of that moment over-counts by about as much: open, to be looked at trace-level
        eager_mask = self.eager_mask_bytes(model, plan) if model.softcapping else 0.0
        loss_head += eager_mask
        # a dequantised weight (QLoRA) lives inside a block's forward or backward, never at the loss: it joins
        # the block's moment only (the random referee: QLoRA rows +4% to +8% while it was added to the loss's)
        # a trained head copy (modules_to_save) has its gradient from the head's backward on: alive with the blocks'
        # backward (not at the loss's peak, which comes before it)
        head_copy_grad = (
            model.vocab_size * model.hidden_size * saved_e / shard if "lm_head" in plan.modules_to_save else 0
        )
        heads = {"logits": loss_head, "block": block + rec_tmp + quant_tmp + head_copy_grad}
        if not plan.grad_checkpointing or head_fwd_tmp or fwd_in:
            heads["forward_temporaries"] = max(head_fwd_tmp, fwd_in if plan.grad_checkpointing else fwd_tmp)
        # without checkpointing the last block's weight norms run before that block has saved its tensors (and
        # before the final norm's): only q/k/v-type layers are guaranteed first, so only for them is the last
        # block taken off (random referee row 174, mistral 2 layers q+v: +10% while stacked on every block)
        if (
            not plan.grad_checkpointing
            and fwd_tmp > head_fwd_tmp
            and all(set(lin.roles) <= {"q", "k", "v"} for lin in in_blocks)
        ):
            last_block = self.activation_parts(model, replace(plan, grad_checkpointing=True), groups, cpu)[1]
            heads["forward_temporaries"] = fwd_tmp - min(last_block * k.activation_scale, act)
        # gradients of throw-away weight leaves (DoRA on Conv1D, methods/dora.py): each block's appear in its backward
        # and stay to the end of backward: the first block's backward (last) runs with the later blocks' held; at the
        # end all are held, the blocks' saved activations freed
        per_block = [(b.count, m.retained_weight_gradients(model, plan, lins, e)) for b, lins in groups]
        retained = sum(n * g for n, g in per_block)
        retained_blk = retained - max(g for _, g in per_block) if retained else 0.0
        if retained:
            heads["block"] += retained_blk
            heads["retained_weight_gradients"] = max(0.0, retained - (act - emb_saved * k.activation_scale))
        head = max(heads, key=heads.__getitem__)  # ties: the loss first
        backward_head = heads[head]
        rec_fwd = fwd_tmp if plan.grad_checkpointing and fwd_tmp > backward_transient else 0.0
        phase_a = static + autocast_copies + accumulated + act + backward_head
        # DoRA on the token embedding: its weight-norm temporaries come at the start of forward, when only the
        # static state (and accumulated gradients) are alive: a candidate of its own (methods/dora.py)
        emb_tmp = m.embedding_forward_temporaries(model, plan, adapted)
        at_start = static + accumulated + emb_tmp > phase_a
        phase_a = max(phase_a, static + accumulated + emb_tmp)
        phase_b = static + grads
        phase_b += m.extra_optimizer_phase_bytes(model, plan, grad_bytes) / shard
        allocated = max(phase_a, phase_b)
        peak_phase = "forward/backward" if phase_a >= phase_b else "optimizer step"
        # caching-allocator slack (CUDA only): reserved - allocated at the peak, from the tensors' sizes
        slack = 0.0 if cpu else self.allocator_slack(model, plan, groups, weights, backward_transient)
        in_fb = peak_phase == "forward/backward"
        components = {
            "weights": int(weights + (autocast_copies if in_fb else 0)),
            "adapters": int(adapters),
            "gradients": int(
                grads
                if (not in_fb or plan.grad_accum > 1)
                else head_copy_grad + retained_blk
                if head == "block"
                else retained
                if head == "retained_weight_gradients"
                else 0
            ),
            "optimizer_states": int(opt_bytes),
            "activations": int(
                (emb_saved * k.activation_scale if head == "retained_weight_gradients" else act)
                + (eager_mask if head == "logits" else 0)
                + (heads["block"] - rec_fwd - quant_tmp - head_copy_grad - retained_blk if head == "block" else 0)
                if in_fb
                else 0
            ),
            "logits": int(logits if in_fb and head == "logits" else 0),
            "quant_temporaries": int(quant_tmp if in_fb and head == "block" else 0),
            "adapter_temporaries": int(
                rec_fwd if head == "block" else heads["forward_temporaries"] if head == "forward_temporaries" else 0
            )
            if in_fb
            else 0,
        }
        if at_start and in_fb:
            components.update(weights=int(weights), activations=0, logits=0, quant_temporaries=0)
            components["adapter_temporaries"] = int(emb_tmp)
        if autocast_copies:
            notes.append(
                "weights include the half-precision copies autocast keeps for backward (AMP, fp32 master weights)"
            )
        notes.extend(n for n in m.notes(plan) if n not in notes)

        # speed counts (GPU-independent) -----------------------------------------------------------
        fpt = sc.flops_per_token(model, plan, adapter_params, adapted)
        passes = 3 if plan.grad_checkpointing else 2
        quant_traffic = m.dequant_traffic_bytes(model, plan, passes, e)
        full_act = (
            act
            if not plan.grad_checkpointing
            else self.activation_bytes(model, replace(plan, grad_checkpointing=False), groups, cpu) * k.activation_scale
        )
        opt_traffic = 28 if plan.optimizer in ("adamw", "paged-adamw-32bit") else 16
        optimizer_traffic = trainable * opt_traffic / shard / plan.grad_accum
        mem_bytes = quant_traffic + full_act * k.elementwise_passes + optimizer_traffic
        # narrow LoRA matmuls (rank r): memory-bound, they move their full-width input and output
        lora_traffic = sc.lora_matmul_traffic(plan, adapted, tokens, passes)
        mem_bytes += lora_traffic
        speed = sc.speed_counts(model, plan, groups, adapted, fpt, trainable, grad_bytes, passes, e)
        comm_bytes = speed.gather_bytes + speed.grad_comm_bytes
        return PlanTerms(
            components=components,
            allocated=allocated,
            static=static,
            paged=paged,
            peak_phase=peak_phase,
            flops_per_token=fpt,
            memory_traffic_bytes=mem_bytes,
            comm_bytes=comm_bytes,
            passes=passes,
            notes=tuple(notes),
            speed=speed,
            allocator_slack=slack,
            terms={
                "weights": weights,
                "adapters": adapters,
                "optimizer_states": opt_bytes,
                "gradients": grads,
                "accumulated_gradients": accumulated,
                "activations": act,
                "recomputed_block": block,
                "backward_transient": backward_transient,
                "autocast_copies": autocast_copies,
                "litgpt_head": head_copy,
                "allocator_slack": slack,
                "logits": logits,
                "quant_temporaries": quant_tmp,
                "forward_temporaries": max(fwd_tmp, fwd_in),
                "embedding_forward_temporaries": emb_tmp,
                "retained_weight_gradients": retained,
                "fixed_allocated": fixed,
                "flops_per_token": fpt,
                "quant_traffic_bytes": quant_traffic,
                "activation_traffic_bytes": full_act * k.elementwise_passes,
                "optimizer_traffic_bytes": optimizer_traffic,
                "lora_modules": sum(b.count * len(lins) for b, lins in groups),
                "trainable_params": trainable,
                "modules_to_save": saved_copies,
            },
        )

    def terms(self, model: ModelSpec, plan: TrainingPlan, cpu: bool = False) -> dict[str, float]:
        """The model's terms for one plan, by name (bytes, FLOPs per token, traffic bytes per micro-step,
        LoRA-wrapped module count), scaled by this estimator's coefficients: calibration's features."""
        return dict(self.plan_terms(model, plan, cpu).terms)

    def activation_bytes(self, model: ModelSpec, plan: TrainingPlan, groups=None, cpu: bool = False) -> float:
        """Bytes autograd keeps between forward and backward, for one GPU's micro-batch (with
        checkpointing: the blocks' inputs plus the one block recomputed during backward)."""
        kept, recomputed = self.activation_parts(model, plan, groups, cpu)
        return kept + recomputed

    def activation_parts(
        self, model: ModelSpec, plan: TrainingPlan, groups=None, cpu: bool = False
    ) -> tuple[float, float]:
        """(kept through backward, recomputed block): checkpointing keeps each block's input and rebuilds
        one block at a time; without it every block's saved tensors are kept and nothing is rebuilt."""
        if groups is None:
            _, groups = self.adapters(model, plan)
        # QLoRA: fp32 embeddings make the residual stream fp32 and Linear4bit returns its input's dtype:
        # every activation of the block is fp32
        e = get_method(plan.method).activation_bytes_per_element(plan, DTYPE_BYTES[plan.dtype])
        b, s = plan.micro_batch, plan.seq_len
        tokens = b * s
        targeted = {b_.kind: lins for b_, lins in groups}
        kept = 0.0
        largest_block = 0.0
        for blk in model.blocks:
            per_tok, const = self._block_bytes(model, blk, plan, targeted.get(blk.kind, []), e, s, cpu)
            largest_block = max(largest_block, per_tok * tokens + const)
            if plan.grad_checkpointing:
                kept += blk.count * e * model.hidden_size * tokens
            else:
                kept += blk.count * (per_tok * tokens + const)
        # final norm (fp32 upcast + output) and the embedding output when it requires grad
        if plan.framework == "litgpt":
            # litgpt: frozen embedding and head save neither; the final norm keeps its input (RMSNorm: fp32 upcast)
            kept += tokens * model.hidden_size * (4 if model.norm == "rmsnorm" else e)
        else:
            kept += tokens * model.hidden_size * (4 + e)
        return kept, (largest_block if plan.grad_checkpointing else 0.0)

    @staticmethod
    def eager_mask_bytes(model: ModelSpec, plan: TrainingPlan) -> float:
        """transformers' eager attention mask (masking_utils.eager_mask): a float (b, 1, s, s) tensor of 0 / min in
        the embeddings' dtype, made once per forward and held by every layer (and checkpointing's saved inputs)
        until backward ends; Gemma-2 makes two, the full-attention and the sliding-window layers' (CPU truth
        truth10-024, Gemma-2 QLoRA s=1000: both, 7.6 MiB, alive at the loss's peak; -9.7% without them). SDPA
        without padding passes no mask (is_causal); T5 adds its own position bias instead (not counted here)."""
        fam = get_family(model.family)
        eager = plan.attention == "eager" or not model.sdpa
        if plan.framework != "hf" or not eager or model.is_encoder_decoder or fam.position_bias_mask:
            return 0.0
        m = get_method(plan.method)
        # under AMP (fp32 master weights, no adapters) the embedding output, and so the mask, stays fp32
        amp = not m.adapter and plan.master_weights and plan.dtype != "fp32"
        e = 4 if amp else m.activation_bytes_per_element(plan, DTYPE_BYTES[plan.dtype])
        masks = 2 if model.softcapping else 1  # Gemma-2: sliding-window and full-attention layers alternate
        return masks * plan.micro_batch * plan.seq_len**2 * e

    def _block_bytes(
        self, model: ModelSpec, blk: Block, plan: TrainingPlan, lora_lins, e: int, s: int, cpu: bool = False
    ) -> tuple[float, float]:
        """(bytes per token, bytes independent of the tokens) one block saves for backward."""
        m = get_method(plan.method)
        fam = get_family(model.family)
        h, i = model.hidden_size, model.intermediate_size
        q, kv, nh = model.q_dim, model.kv_dim, model.num_attention_heads
        n_attn = 2 if blk.kind == "cross_decoder" else 1
        n_norms = {"encoder": 2, "cross_decoder": 3}.get(blk.kind, model.norms_per_layer)
        # transformers' implementation details (other stacks run their own model code)
        hf = plan.framework == "hf"
        litgpt = plan.framework == "litgpt"
        # Gemma-2 has no SDPA path in transformers; litgpt computes soft-capped attention scores in eager code
        eager = plan.attention == "eager" or (hf and not model.sdpa) or (litgpt and model.softcapping)
        # frozen base: norms, attention tensors for backward, MLP activation inputs
        if model.norm == "rmsnorm":
            norm_bytes = 4 * h  # fp32 upcast of the input is saved
        else:
            norm_bytes = e * h + 8  # input + fp32 mean/rstd
        if fam.norms_share_input:
            # parallel residual: both LayerNorms read the same input, saved once
            norm_total = norm_bytes + (n_norms - 1) * 8
        else:
            norm_total = n_norms * norm_bytes
        kv_saved = q if (eager and kv < q) else kv  # eager repeats k/v to all heads
        attn = 2 * e * q + 2 * e * kv_saved
        if litgpt:
            attn = self._litgpt_attention_bytes(model, e)
        if eager:
            attn += (4 + (e if e < 4 else 0)) * nh * s  # fp32 softmax + probabilities in the compute dtype
            if (hf or litgpt) and model.softcapping:
                attn += e * nh * s  # tanh soft-capping keeps its output for backward
            if hf and model.dropout > 0:
                # attention dropout on the probabilities in training (GPT-2, T5): the dropped probabilities and
                # their 1-byte mask (checked against the trace: bench/simulated_referee.py)
                attn += (e + 1) * nh * s
        elif cpu and hf and model.dropout > 0:
            # CPU only: PyTorch's CPU flash-attention kernel refuses dropout, so SDPA with attention dropout in
            # training (GPT-2, T5) runs its math path, which saves the softmax output, the dropout's noise
            # tensor (a float tensor on the CPU, not a bool mask) and the dropped probabilities: 3 per score
            attn += 3 * e * nh * s
        if hf and fam.sdpa_keeps_fused_qkv:
            attn += e * (q + kv)  # SDPA keeps v, a view of the fused qkv output: all of it stays alive
        # T5 on SDPA: the position bias goes in as an additive mask, cloned per self-attention layer
        self_attn_bias = e * nh * s if fam.position_bias_mask else 0
        if cpu and hf and model.dropout > 0 and not eager:
            self_attn_bias = 0  # the CPU math path adds the bias into new scores: no clone is saved
        bias_const = 0.0
        if self_attn_bias and hf and not cpu and not eager:
            # GPU SDPA: transformers' create_position_bias_mask clones the
            # (1, heads, s, s) bias: one per sequence, not per token (the trace lists one 1 x nh x s x s clone per
            # self-attention layer at any micro-batch). Full fine-tuning trains the bias: CUDA's memory-efficient
            # kernel keeps that same (1, heads, s, s) mask, broadcast over the batch (the trace runs that kernel:
            # advisor/simulated/kernels.py), plus only its output and logsumexp
            bias_const = e * nh * s * s
            self_attn_bias = 0
        # gelu_new is a Python composite in transformers (x^3, tanh, sums, products): four saved tensors
        mlp_saved = (3 if model.gated_mlp else 1) + (3 if hf and model.hidden_act == "gelu_new" else 0)
        per_tok = norm_total + n_attn * attn + self_attn_bias + mlp_saved * e * i
        if model.dropout > 0:
            # 1-byte masks on each residual branch (and T5's inside the feed-forward)
            per_tok += (n_attn + 1) * h + (i if fam.mlp_dropout else 0)
        per_tok += m.block_saved_bytes(model, plan, n_attn, e)
        const = bias_const
        if m.adapter:
            a = m.state_bytes_per_param(plan, DTYPE_BYTES[plan.dtype])
            seen_inputs: set[tuple[str, int]] = set()
            qkv = [lin for lin in lora_lins if set(lin.roles) & {"q", "k", "v"}]
            if litgpt and qkv and len({r for lin in qkv for r in lin.roles} & {"q", "k", "v"}) < 3:
                # litgpt's LoRAQKVLinear.zero_pad scatters the enabled parts' lora_B output into the fused width
                # with index_copy_, which saves that source (all three enabled: no scatter)
                per_tok += a * sum(lin.out_features for lin in qkv)
            for lin in lora_lins:
                per_tok += a * plan.lora_r  # lora_A output
                per_tok += m.adapted_layer_saved_bytes(lin, plan, e, a)
                const += m.adapted_layer_saved_constant(lin, plan, e, a)
                if plan.lora_dropout > 0:
                    if litgpt and set(lin.roles) & {"q", "k", "v"}:
                        # litgpt's LoRAQKVLinear: one dropout of the input for the fused qkv's stacked lora_A
                        if ("litgpt_qkv", 0) in seen_inputs:
                            continue
                        seen_inputs.add(("litgpt_qkv", 0))
                    # dropout mask (bool on CUDA; a float noise tensor in torch's CPU path) + dropout output
                    per_tok += ((a if cpu else 1) + a) * lin.in_features
                elif a > e:
                    per_tok += a * lin.in_features  # each module casts its input to the fp32 adapter dtype
                else:
                    key = _input_group(lin.name, lin.roles)
                    if key not in seen_inputs and "o" not in lin.roles:
                        seen_inputs.add(key)
                        per_tok += 4 * lin.in_features
        return per_tok, const

    def allocator_slack(
        self, model: ModelSpec, plan: TrainingPlan, groups, weights: float, block_temporaries: float
    ) -> float:
        """What ``max_memory_reserved`` holds beyond ``max_memory_allocated`` at the peak, from the sizes of the
        tensors the plan allocates, under PyTorch's CUDACachingAllocator (c10/cuda/CUDACachingAllocator.cpp):

        * segment rounding: a request over 10 MiB (kMinLargeAlloc) that no cached block can hold gets a segment
          of its own, rounded up to 2 MiB (kRoundLarge); the tail is reserved but holds no tensor of that size:
          1 MiB on average per live large tensor (weights, saved activations, the loss's vocabulary-wide tensors);
        * segment tails: requests of 1-10 MiB are carved from 20 MiB segments (kLargeBuffer) and those of at most
          1 MiB from 2 MiB segments (kSmallBuffer): half of one of each is free on average;
        * cached temporaries: each block's temporaries (projections before rotary embedding, the MLP product,
          residual sums) are freed at the end of the block and stay cached; at the peak the allocator is asked for
          tensors of other sizes (the logits, a recomputed block's gradients), so about one block's temporaries
          are reserved but not allocated (``Coefficients.allocator_cached_blocks`` of them);
        * the logits hole: the head's half-precision output is freed once the loss has made its fp32 copy, and
          the loss backward then asks for fp32 tensors twice its size, so its segment stays cached through the
          peak (not with a chunked loss, nor with logits already in fp32, which ``.float()`` does not copy);
        * full fine-tuning: the largest parameter gradient (the embedding's) is allocated while activations of
          other sizes are freed, and its size stays cached as a hole.

        Checked against a replay of the allocator over traced steps: ``python -m bench.allocator_referee``.
        Not modelled: fragmentation by interleaved lifetimes beyond these (expandable segments and
        garbage-collection thresholds change it), the NCCL and cuBLAS buffers outside the allocator."""
        m = get_method(plan.method)
        big = 10 * MIB  # kMinLargeAlloc
        tail = 1 * MIB  # half of kRoundLarge
        e = DTYPE_BYTES[plan.dtype]
        e_act = m.activation_bytes_per_element(plan, e)
        tokens = plan.micro_batch * plan.seq_len
        shard = plan.num_gpus if plan.sharding == "fsdp" else 1
        # weights: one tensor per linear (FSDP: one flat parameter per block), the embedding and the head;
        # NF4 linears store half a byte per weight, the rest its share of the weights' bytes
        nq = model.quantized_weight_params if m.quantized else 0
        other = (weights * shard - 0.5 * nq) / max(model.param_count - nq, 1)
        per_param = 0.5 if m.quantized else other
        large = 0.0
        for blk in model.blocks:
            if shard > 1:
                large += blk.count * (sum(lin.weight_params for lin in blk.linears) * per_param / shard > big)
            else:
                large += blk.count * sum(lin.weight_params * per_param > big for lin in blk.linears)
        large += (model.embedding_params * other > big) + (model.lm_head_params * other > big)
        if not m.adapter and plan.optimizer in ("adamw", "adamw-8bit"):
            large *= 3  # full fine-tuning: each weight's two optimiser states are tensors of the same shape
        # saved activations: per block its norms' inputs, q/k/v/output, the MLP's saved tensors, LoRA's inputs
        targeted = {b.kind: lins for b, lins in groups}
        act_large = tokens * model.hidden_size * e_act > big
        for blk in model.blocks:
            saved = model.norms_per_layer + 4 + (3 if model.gated_mlp else 1) + 2 * len(targeted.get(blk.kind, []))
            large += act_large * (blk.count if plan.grad_checkpointing else blk.count * saved)
        large += 3 * (tokens * model.vocab_size * 2 > big)  # the loss's vocabulary-wide tensors
        segments = 10 * MIB + 1 * MIB  # half a 20 MiB and half a 2 MiB segment
        # one block's temporaries: freed at the end of each block, cached, and not what the peak's requests fit
        cached = self.k.allocator_cached_blocks * block_temporaries
        # the model's half-precision logits are freed once the loss has its fp32 copy; the loss backward then asks
        # for fp32 gradients twice their size: the hole stays cached. Logits already in fp32 (QLoRA's upcast head,
        # fp32 training) are not copied (.float() is a no-op), and a chunked loss frees chunk-sized pieces
        logits_hole = 0.0 if (plan.chunked_loss or e_act >= 4) else tokens * model.vocab_size * e_act
        # full fine-tuning: each parameter's gradient is allocated as backward reaches it while activations of
        # other sizes are freed; the largest (the embedding's, dense) leaves the largest hole
        grad_hole = 0.0
        if not m.adapter:
            grad_hole = m.state_bytes_per_param(plan, e) * model.vocab_size * model.hidden_size / shard
        return large * tail + segments + cached + logits_hole + grad_hole

    @staticmethod
    def _litgpt_attention_bytes(model: ModelSpec, e: int) -> float:
        """Bytes per token litgpt's CausalSelfAttention saves for backward (litgpt/model.py, 0.4.x).

        The fused qkv output is viewed as (B, groups, q_per_kv + 2, T, hs); k and v are expanded to every query
        head. Rotary embedding builds new q and k tensors (so k is saved at the full query width), and the
        attention output is saved by SDPA. v is a reshape of the expanded view: a copy at the full query width
        under grouped-query attention (several groups of several heads), but a view of the fused qkv output with
        multi-head (one head per group) or multi-query (one group) attention, which then keeps all of it alive."""
        q, kv, nh = model.q_dim, model.kv_dim, model.num_attention_heads
        head_dim = q // max(nh, 1)
        kv_heads = max(kv // max(head_dim, 1), 1)
        grouped = 1 < kv_heads < nh
        v_bytes = e * q if grouped else e * (q + 2 * kv)
        return 3 * e * q + v_bytes  # q, k (full width), output; v (or the whole fused qkv it is a view of)

    def litgpt_head_bytes(self, model: ModelSpec, plan: TrainingPlan, e: int) -> float:
        """What litgpt's weights differ by from the transformers layout the method counted (0 for other stacks).

        litgpt's GPT never ties lm_head to the embedding: ``convert_hf_checkpoint`` copies ``wte`` into
        ``lm_head.weight`` and ``load_state_dict`` fills two parameters, so a tied model holds the matrix twice.
        Under ``--quantize bnb.*`` Lightning's BitsandbytesPrecision converts every ``nn.Linear``, lm_head
        included (no ``ignore_modules``), to NF4, where transformers keeps it in the compute dtype."""
        if plan.framework != "litgpt":
            return 0.0
        n = model.vocab_size * model.hidden_size
        quantized = get_method(plan.method).quantized
        nf4 = 0.5 + ((1 + 4 / 256) / 64 if plan.double_quant else 4 / 64)  # packed + absmax per weight
        per = nf4 if quantized else e
        if model.tie_word_embeddings:
            return n * per  # the separate lm_head copy
        return -n * (e - per) if quantized else 0.0  # the untied head in NF4, not in the compute dtype

    def outer_adapter_bytes(
        self, model: ModelSpec, plan: TrainingPlan, groups, cpu: bool = False
    ) -> tuple[float, float, float]:
        """(head, embedding) bytes the adapters outside the blocks save for backward, as a block's adapted
        linear does (lora_A's output, the dropout mask and output or the input cast to the adapter dtype, the
        method's extras such as DoRA's base and LoRA outputs, vocab wide on the head). peft applies no
        dropout on an embedding: its adapter saves the r-wide lookup (and DoRA's outputs). Third: the bytes
        alive in an adapted head's own backward, after the loss's tensors are freed (DoRA's, vocab wide)."""
        m = get_method(plan.method)
        outer = [lin for b, lins in groups if b.kind == "outer" for lin in lins]
        if not outer:
            return 0.0, 0.0, 0.0
        e = m.activation_bytes_per_element(plan, DTYPE_BYTES[plan.dtype])
        a = m.state_bytes_per_param(plan, DTYPE_BYTES[plan.dtype])
        tokens = plan.micro_batch * plan.seq_len
        head = emb = head_bwd = 0.0
        for lin in outer:
            if "embed_tokens" in lin.roles:
                no_dropout = replace(plan, lora_dropout=0.0)
                emb += tokens * (a * plan.lora_r + m.adapted_layer_saved_bytes(lin, no_dropout, e, a))
                continue
            per_tok = a * plan.lora_r + m.adapted_layer_saved_bytes(lin, plan, e, a)
            if plan.lora_dropout > 0:
                per_tok += ((a if cpu else 1) + a) * lin.in_features
            elif a > e:
                per_tok += a * lin.in_features
            const = m.adapted_layer_saved_constant(lin, plan, e, a)
            head += tokens * per_tok + const
            bwd = m.adapted_head_backward_bytes(lin, plan, e, a)
            head_bwd += tokens * bwd + const if bwd else 0.0
        return head, emb, head_bwd

    def eager_attention_backward_bytes(self, model: ModelSpec, plan: TrainingPlan) -> float:
        """Bytes eager attention adds while it back-propagates its softmax (transformers' eager_attention_forward:
        fp32 softmax, probabilities cast to the compute dtype): the probabilities' gradient cast to fp32 and the
        softmax backward's output, s x s per head, next to the saved fp32 softmax, while the layer's half
        probabilities (used by the value matmul's backward just before) are freed (fp32: nothing to free).
        By then the block's MLP tensors and the final norm's are freed too: what is left of the transient
        beyond the block's saved bytes. With attention dropout (GPT-2, T5) the peak is earlier: the gradient of
        the dropped probabilities (compute dtype) next to everything the layer saved. Checked against the trace
        (bench/simulated_referee.py)."""
        if not (plan.attention == "eager" or (plan.framework == "hf" and not model.sdpa)):
            return 0.0
        e = get_method(plan.method).activation_bytes_per_element(plan, DTYPE_BYTES[plan.dtype])
        tokens, h, i = plan.micro_batch * plan.seq_len, model.hidden_size, model.intermediate_size
        per_score = e if (plan.framework == "hf" and model.dropout > 0) else (8 - e if e < 4 else 8)
        s2 = tokens * model.num_attention_heads * plan.seq_len * per_score
        gelu_new = plan.framework == "hf" and model.hidden_act == "gelu_new"
        mlp_saved = (3 if model.gated_mlp else 1) + (3 if gelu_new else 0)
        freed = tokens * (mlp_saved * e * i + 4 * h + (4 + e) * h)
        return max(0.0, s2 - freed)

    def logits_bytes(self, model: ModelSpec, plan: TrainingPlan) -> float:
        """The loss's share of the backward peak. The Trainer drops the model output after the loss, so at
        the loss backward what is alive is the fp32 log-softmax output, its gradient and the logits'
        gradient: 12 bytes per token per vocabulary entry, whatever the compute dtype."""
        e = DTYPE_BYTES[plan.dtype]
        tokens = plan.micro_batch * plan.seq_len
        if plan.chunked_loss:
            # chunked cross-entropy: logits and their gradient in the compute dtype; every chunk's
            # log-softmax stays saved for backward (fp32 where the chunk is upcast, as in torchtune)
            saved = e if plan.framework == "litgpt" else 4
            return tokens * model.vocab_size * (2 * e + saved)
        if model.is_encoder_decoder and plan.framework == "hf":
            # T5ForConditionalGeneration runs CrossEntropyLoss on the head's output as it is (no ``.float()``
            # copy, unlike transformers' causal-LM loss): log-softmax output, its gradient and the logits'
            # gradient, 3 tensors in the logits' dtype (checked against the trace: bench/simulated_referee.py).
            # Under autocast (full fine-tuning with master weights) cross_entropy runs in fp32: the 12 below.
            m = get_method(plan.method)
            autocast = not m.adapter and plan.master_weights and e < 4
            if not autocast:
                return tokens * model.vocab_size * 3 * m.activation_bytes_per_element(plan, e)
        capped = 0
        if model.softcapping:
            # final-logit soft-capping keeps tanh's output (fp32 logits under QLoRA's kbit upcast)
            capped = get_method(plan.method).activation_bytes_per_element(plan, e)
        return tokens * model.vocab_size * (12 + capped)

    # ---- speed ------------------------------------------------------------------------------------
    def flops_per_token(self, model: ModelSpec, plan: TrainingPlan) -> float:
        """FLOPs per token of one micro-step (``speed_counts.flops_per_token`` with this plan's adapters)."""
        adapter_params, groups = self.adapters(model, plan)
        return sc.flops_per_token(model, plan, adapter_params, [lin for _, lins in groups for lin in lins])

    def memory_totals(self, gpu: GpuSpec, allocated, static):
        """(reserved, device total) for an allocated peak on `gpu` (the device layer's, with these coefficients)."""
        return dev.memory_totals(self.device(gpu, "fp32"), allocated, static)


def _input_group(name: str, roles: tuple[str, ...]) -> tuple[str, int]:
    """Modules that read the same tensor (q/k/v read the attention input; gate/up the MLP input)."""
    prefix = name.rsplit(".", 1)[0] if "." in name else ""
    if set(roles) & {"q", "k", "v"}:
        return (prefix + "attn_in", 0)
    if set(roles) & {"gate", "up"}:
        return (prefix + "mlp_in", 0)
    return (prefix + name, 1)
