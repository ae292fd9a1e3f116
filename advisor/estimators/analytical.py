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
* QLoRA dequantisation temporaries; caching-allocator slack and the CUDA context as named constants
  (``Coefficients``) that calibration replaces with fitted values.

The peak is the larger of two phases: the start of backward (all activations and logits alive) and
the optimiser step (all gradients alive, activations freed).

Speed: FLOPs per token per method (full ~6N, LoRA ~4N + adapters, +2N recompute under
checkpointing, attention growing with sequence length) over the GPU's dense TFLOP/s times an
efficiency prior per GPU class; memory-bound work (NF4 dequantisation, element-wise ops, the
optimiser step) as bytes over bandwidth; multi-GPU communication over the peer link.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from advisor.estimators import device as dev
from advisor.estimators.base import Estimate, MemoryEstimate, SpeedEstimate, build_estimate
from advisor.estimators.device import DeviceCoefficients
from advisor.estimators.terms import PlanTerms
from advisor.families import get_family
from advisor.methods import get_method
from advisor.plans import TrainingPlan, resolve_targets
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
            # FSDP gathers one block's (and prefetches the next block's) full weights
            per_block = max((sum(lin.params for lin in b.linears) for b in model.blocks), default=0)
            weights += 2 * per_block * m.gathered_bytes_per_param(e)

        # trainable state --------------------------------------------------------------------------
        paged = 0.0
        trainable = m.trainable_params(model, adapter_params)
        param_bytes = m.state_bytes_per_param(plan, e)
        grad_bytes = param_bytes
        if plan.optimizer in ("adamw", "paged-adamw-32bit"):
            opt_per_param = 2 * param_bytes
        else:  # 8-bit: two uint8 states + an fp32 absmax per block of each
            opt_per_param = 2 + 2 * 4 / BNB8_BLOCK
        opt_bytes = trainable * opt_per_param / shard
        if plan.optimizer.startswith("paged"):
            paged, opt_bytes = opt_bytes, 0.0
            notes.append("paged optimiser states live in CUDA unified memory and can spill to host RAM under pressure")
        grads = trainable * grad_bytes / shard
        adapters = adapter_params * param_bytes / shard if m.adapter else 0
        if plan.sharding == "ddp":
            grads *= m.ddp_gradient_copies()  # DDP's reducer keeps flat bucket copies of full gradients

        # activations ------------------------------------------------------------------------------
        kept, recomputed = self.activation_parts(model, plan, groups, cpu)
        act = kept * k.activation_scale
        block = recomputed * k.activation_scale
        logits = self.logits_bytes(model, plan) * k.logits_scale
        adapted = [lin for _, lins in groups for lin in lins]
        quant_tmp = m.temporaries(model, plan, adapted, e)
        e_act = m.activation_bytes_per_element(plan, e)
        backward_transient = tokens * e_act * (2 * model.hidden_size + model.intermediate_size) * k.activation_scale
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
        fwd_tmp = m.forward_temporaries(model, plan, adapted, e)
        rec_tmp = max(backward_transient, fwd_tmp) if plan.grad_checkpointing else backward_transient
        heads = {"logits": logits, "block": block + rec_tmp}
        if not plan.grad_checkpointing:
            heads["forward_temporaries"] = fwd_tmp
        head = max(heads, key=heads.__getitem__)  # ties: the loss first
        backward_head = heads[head]
        rec_fwd = fwd_tmp if plan.grad_checkpointing and fwd_tmp > backward_transient else 0.0
        phase_a = static + autocast_copies + accumulated + act + backward_head + quant_tmp
        phase_b = static + grads
        phase_b += m.extra_optimizer_phase_bytes(model, plan, grad_bytes) / shard
        allocated = max(phase_a, phase_b)
        peak_phase = "forward/backward" if phase_a >= phase_b else "optimizer step"
        in_fb = peak_phase == "forward/backward"
        components = {
            "weights": int(weights + (autocast_copies if in_fb else 0)),
            "adapters": int(adapters),
            "gradients": int(grads if (not in_fb or plan.grad_accum > 1) else 0),
            "optimizer_states": int(opt_bytes),
            "activations": int(act + (heads["block"] - rec_fwd if head == "block" else 0) if in_fb else 0),
            "logits": int(logits if in_fb and head == "logits" else 0),
            "quant_temporaries": int(quant_tmp if in_fb else 0),
            "adapter_temporaries": int(rec_fwd if head == "block" else fwd_tmp if head == "forward_temporaries" else 0)
            if in_fb
            else 0,
        }
        if autocast_copies:
            notes.append(
                "weights include the half-precision copies autocast keeps for backward (AMP, fp32 master weights)"
            )
        notes.extend(n for n in m.notes(plan) if n not in notes)

        # speed counts (GPU-independent) -----------------------------------------------------------
        fpt = self.flops_per_token(model, plan, adapter_params, adapted)
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
        comm_bytes = 0.0
        if n > 1:
            frac = (n - 1) / n
            grad_b = trainable * grad_bytes / plan.grad_accum
            if plan.sharding == "ddp":
                comm_bytes = 2 * frac * grad_b
            else:
                comm_bytes = passes * frac * m.communicated_weight_bytes(model, e) + frac * grad_b
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
                "logits": logits,
                "quant_temporaries": quant_tmp,
                "forward_temporaries": fwd_tmp,
                "fixed_allocated": fixed,
                "flops_per_token": fpt,
                "quant_traffic_bytes": quant_traffic,
                "activation_traffic_bytes": full_act * k.elementwise_passes,
                "optimizer_traffic_bytes": optimizer_traffic,
                "lora_modules": sum(b.count * len(lins) for b, lins in groups),
                "trainable_params": trainable,
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
        kept += tokens * model.hidden_size * (4 + e)
        return kept, (largest_block if plan.grad_checkpointing else 0.0)

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
        eager = plan.attention == "eager" or (hf and not model.sdpa)  # Gemma-2 has no SDPA path in transformers
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
        if eager:
            attn += (4 + (e if e < 4 else 0)) * nh * s  # fp32 softmax + probabilities in the compute dtype
            if hf and model.softcapping:
                attn += e * nh * s  # tanh soft-capping keeps its output for backward
        if hf and fam.sdpa_keeps_fused_qkv:
            attn += e * (q + kv)  # SDPA keeps v, a view of the fused qkv output: all of it stays alive
        # T5 on SDPA: the position bias goes in as an additive mask, cloned per self-attention layer
        self_attn_bias = e * nh * s if fam.position_bias_mask else 0
        # gelu_new is a Python composite in transformers (x^3, tanh, sums, products): four saved tensors
        mlp_saved = (3 if model.gated_mlp else 1) + (3 if hf and model.hidden_act == "gelu_new" else 0)
        per_tok = norm_total + n_attn * attn + self_attn_bias + mlp_saved * e * i
        if model.dropout > 0:
            # 1-byte masks on each residual branch (and T5's inside the feed-forward)
            per_tok += (n_attn + 1) * h + (i if fam.mlp_dropout else 0)
        per_tok += m.block_saved_bytes(model, plan, n_attn, e)
        const = 0.0
        if m.adapter:
            a = m.state_bytes_per_param(plan, DTYPE_BYTES[plan.dtype])
            seen_inputs: set[tuple[str, int]] = set()
            for lin in lora_lins:
                per_tok += a * plan.lora_r  # lora_A output
                per_tok += m.adapted_layer_saved_bytes(lin, plan, e, a)
                const += m.adapted_layer_saved_constant(lin, plan, e, a)
                if plan.lora_dropout > 0:
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
        capped = 0
        if model.softcapping:
            # final-logit soft-capping keeps tanh's output (fp32 logits under QLoRA's kbit upcast)
            capped = get_method(plan.method).activation_bytes_per_element(plan, e)
        return tokens * model.vocab_size * (12 + capped)

    # ---- speed ------------------------------------------------------------------------------------
    def flops_per_token(
        self, model: ModelSpec, plan: TrainingPlan, adapter_params: int | None = None, adapted: list | None = None
    ) -> float:
        m = get_method(plan.method)
        if adapter_params is None or adapted is None:
            adapter_params, groups = self.adapters(model, plan)
            adapted = [lin for _, lins in groups for lin in lins]
        lin = 2 * (model.linear_weight_params + model.vocab_size * model.hidden_size)
        s = plan.seq_len
        attn = 0.0
        for blk in model.blocks:
            causal = 0.5 if (blk.kind == "decoder" and plan.attention != "eager") else 1.0
            per_layer = 4 * s * model.q_dim * causal
            if blk.kind == "cross_decoder":
                per_layer += 4 * s * model.q_dim
            attn += blk.count * per_layer
        f = m.flops_per_token(lin, attn, adapter_params, plan.grad_checkpointing)
        f += m.extra_flops_per_token(model, plan, adapted)
        return f + m.extra_flops_per_step(model, plan, adapted) / (plan.micro_batch * plan.seq_len)

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
