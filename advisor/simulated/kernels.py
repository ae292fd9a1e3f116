"""What a CPU trace on fake tensors must be told to take the path a CUDA run takes (no storage, no
data-dependent answers, other kernels): the decisions transformers makes from real data, CUDA's
fused kernels where they keep other tensors for backward, and bitsandbytes' cached quantisation map."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def real_run_decisions():
    """Give transformers, on fake tensors, the answers it computes from real data in a real run.

    transformers checks position_ids for several sequences packed in one row (a data-dependent test);
    on fake tensors it cannot look and builds an explicit block mask, which moves SDPA off its causal
    kernel. Our inputs are one sequence per row (no position_ids passed), for which the real check
    returns None: the same ops run here, then the answer the real data gives is returned.
    """
    from torch._subclasses.fake_tensor import is_fake

    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover
        yield
        return
    orig = getattr(masking_utils, "find_packed_sequence_indices", None)
    if orig is None:
        yield
        return

    def find_packed_sequence_indices(position_ids):
        out = orig(position_ids)
        return None if out is not None and is_fake(out) else out

    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = orig


@contextlib.contextmanager
def cuda_kernel_choices():
    """Make the CPU trace take the kernels CUDA takes where they differ in what backward keeps.

    * dropout: CUDA's fused kernel (native_dropout) keeps a 1-byte mask; the CPU path keeps a scaled
      noise tensor in the input dtype. Traced as native_dropout.
    * SDPA with dropout: CUDA's flash / memory-efficient kernels draw the mask from a Philox seed
      inside the kernel (nothing saved); the CPU falls back to the math path and keeps the s x s
      probabilities. Traced without the dropout: the tensors the fused kernel keeps.
    * SDPA with an additive bias that requires grad (T5's trained position bias, or the zero bias
      T5 creates with requires_grad under checkpointing): the CPU takes the math path and keeps the
      fp32 b x heads x s x s scores and probabilities; CUDA runs the memory-efficient kernel, which
      keeps only the output and the logsumexp and materialises the bias gradient in backward. On
      fake tensors such calls go to that kernel's own fake implementation (real CPU tensors cannot).

    * autocast: CUDA's autocast runs pow, exp, log, rsqrt, reciprocal, logsumexp, layer_norm and
      softplus in fp32 (aten/src/ATen/autocast_mode.cpp); CPU autocast leaves them in the half dtype.
      Under autocast, their functional forms (torch.pow(x, 3), as transformers' gelu_new calls it) get
      half inputs cast to fp32, as on CUDA; the method forms (x.pow(3)) are not reached.

    The functions are swapped on torch / torch.nn.functional for the duration of the trace (a function
    mode would not reach the recomputation that checkpointing runs inside backward).
    """
    import torch
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import is_fake

    dropout, sdpa = F.dropout, F.scaled_dot_product_attention
    halves = (torch.float16, torch.bfloat16)

    def fp32_under_autocast(fn):
        def run(*args, **kwargs):
            if torch.is_autocast_enabled("cpu"):
                args = tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype in halves else a for a in args)
            return fn(*args, **kwargs)

        return run

    fp32_ops = [(torch, n) for n in ("pow", "exp", "log", "rsqrt", "reciprocal", "logsumexp")]
    fp32_ops += [(F, n) for n in ("layer_norm", "softplus")]
    originals = [(mod, name, getattr(mod, name)) for mod, name in fp32_ops]

    def fused_dropout(input, p=0.5, training=True, inplace=False):
        if training and 0 < p < 1 and not inplace:
            return torch.native_dropout(input, p, True)[0]
        return dropout(input, p, training, inplace)

    def flash_sdpa(*args, **kwargs):
        if len(args) > 4:
            args = (*args[:4], 0.0, *args[5:])
        elif kwargs.get("dropout_p"):
            kwargs = {**kwargs, "dropout_p": 0.0}
        bias = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        if isinstance(bias, torch.Tensor) and bias.requires_grad and torch.is_grad_enabled() and is_fake(args[0]):
            return efficient_sdpa(*args, **kwargs)
        return sdpa(*args, **kwargs)

    def efficient_sdpa(query, key, value, attn_mask, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        # CUDA's aten::scaled_dot_product_attention, memory-efficient branch (attention.cpp): the
        # bias is cast to the query dtype (autocast casts it there on CUDA); a bias whose strides are
        # not multiples of 8 is padded to a multiple of 8 along its last dim and sliced back
        # (preprocess_mask / pad_bias); then the kernel keeps out + logsumexp, and backward
        # materialises grad_q/k/v and grad_bias.
        if attn_mask.dtype != query.dtype:
            attn_mask = attn_mask.to(query.dtype)
        strides, last = attn_mask.stride(), attn_mask.shape[-1]
        if strides[-1] != 1 or any(st % 8 for st in strides[:-1]):
            attn_mask = F.pad(attn_mask, (0, 8 - last % 8))[..., :last]
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            rep = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
        attn_mask = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, True, 0.0, is_causal, scale=scale
        )
        return out[0]

    F.dropout, F.scaled_dot_product_attention = fused_dropout, flash_sdpa
    for mod, name, fn in originals:
        setattr(mod, name, fp32_under_autocast(fn))
    try:
        yield
    finally:
        F.dropout, F.scaled_dot_product_attention = dropout, sdpa
        for mod, name, fn in originals:
            setattr(mod, name, fn)


def prime_bitsandbytes() -> None:
    """bitsandbytes caches its 8-bit quantisation map in a module dict on first use; create it with
    real tensors, outside any fake mode, so a trace never leaves a fake tensor in that cache."""
    import logging

    quiet = logging.getLogger("bitsandbytes")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its CPU backend warns at import about an optional kernels package
    try:
        import bitsandbytes.functional as F
    except ImportError:  # pragma: no cover
        return
    finally:
        quiet.setLevel(level)
    if "dynamic" not in F.name2qmap:
        F.name2qmap["dynamic"] = F.create_dynamic_map()


@contextlib.contextmanager
def moe_kernel_choices():
    """Mixture-of-experts dispatch on fake tensors: transformers' default ``experts_implementation`` is
    ``grouped_mm`` (integrations/moe.py), and torch's fake (meta) kernel of ``aten._grouped_mm`` accepts
    bf16 only, as CUDA's does. For other dtypes transformers' own fallback op
    (``transformers::grouped_mm_fallback``, a per-expert loop with a fake implementation and an autograd
    formula) is taken instead: it saves the same tensors for backward (the grouped input and the expert
    weight, plus the int32 offsets), so what the trace counts is what grouped_mm keeps."""
    from torch._subclasses.fake_tensor import is_fake

    try:
        from transformers.integrations import moe
    except ImportError:  # pragma: no cover
        yield
        return
    import torch
    import torch.nn.functional as F

    orig = moe._can_use_grouped_mm
    sdpa = F.scaled_dot_product_attention

    def can_use(input, weight, offs):
        if is_fake(weight) and weight.dtype != torch.bfloat16:
            return False
        return orig(input, weight, offs)

    def latent_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        # DeepSeek's multi-head latent attention: q / k heads (nope + rope) wider than v heads. CUDA's flash kernel
        # needs one head size and is skipped; its memory-efficient kernel takes a narrower v (sdp_utils:
        # check_head_dim_size_mem_efficient) and keeps only the output and the logsumexp. The CPU has no such
        # kernel and falls back to the math path (s x s probabilities kept): on fake tensors, CUDA's is taken.
        if (
            is_fake(query)
            and attn_mask is None
            and not enable_gqa
            and query.shape[-1] != value.shape[-1]
            and torch.is_grad_enabled()
        ):
            out = torch.ops.aten._scaled_dot_product_efficient_attention(
                query, key, value, None, True, dropout_p, is_causal, scale=scale
            )
            return out[0]
        return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)

    moe._can_use_grouped_mm = can_use
    F.scaled_dot_product_attention = latent_sdpa
    try:
        yield
    finally:
        moe._can_use_grouped_mm = orig
        F.scaled_dot_product_attention = sdpa
