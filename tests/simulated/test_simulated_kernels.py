"""The CPU fake trace runs the kernel CUDA runs where what backward keeps differs (advisor.simulated.kernels)."""

import pytest

from advisor.plans import TrainingPlan
from advisor.simulated.cache import cache_key

torch = pytest.importorskip("torch")


def _sdpa_with_trained_bias(s: int):
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    from advisor.simulated.kernels import cuda_kernel_choices

    with cuda_kernel_choices(), FakeTensorMode():
        q, k, v = (torch.randn(2, 4, s, 32, requires_grad=True) for _ in range(3))
        bias = torch.randn(1, 4, s, s, requires_grad=True)  # T5's trained position bias
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        saved = [t for t in (getattr(out.grad_fn, n) for n in dir(out.grad_fn) if n.startswith("_saved_"))]
        kept = [t for t in saved if isinstance(t, torch.Tensor)]
        out.sum().backward()
        return out, kept, bias.grad


@pytest.mark.parametrize("s", [64, 50])
def test_sdpa_with_a_bias_that_needs_grad_keeps_what_cudas_efficient_kernel_keeps(s):
    # CPU would take the math path and keep b x heads x s x s fp32 scores/probabilities for backward;
    # CUDA's memory-efficient kernel keeps the output and a (b, heads, s rounded up to 32) logsumexp.
    out, kept, grad_bias = _sdpa_with_trained_bias(s)
    assert type(out.grad_fn).__name__ == "ScaledDotProductEfficientAttentionBackward0"
    b, h = out.shape[:2]
    scores = [t for t in kept if t.dim() == 4 and t.shape[-2:] == (s, s)]
    # the only s x s tensor kept is the bias itself, broadcast over the batch (no new storage)
    assert len(scores) == 1 and scores[0].stride(0) == 0
    lse = [t for t in kept if t.dim() == 3]
    assert lse and lse[0].shape == (b, h, -(-s // 32) * 32) and lse[0].dtype == torch.float32
    assert grad_bias is not None and grad_bias.shape == (1, h, s, s)


def test_sdpa_without_a_bias_gradient_is_untouched():
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode

    from advisor.simulated.kernels import cuda_kernel_choices

    with cuda_kernel_choices(), FakeTensorMode():
        q, k, v = (torch.randn(2, 4, 64, 32, requires_grad=True) for _ in range(3))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(1, 4, 64, 64))
        assert type(out.grad_fn).__name__ != "ScaledDotProductEfficientAttentionBackward0"


def test_cache_key_changes_for_t5_sdpa_plans_only():
    plan = TrainingPlan(method="full", gpu_id="a100-80gb-sxm")
    versions = {"simulator": "3"}
    t5 = {"model_type": "t5"}
    llama = {"model_type": "llama"}
    import advisor.simulated.cache as cache

    keys = {}
    for v in (1, 2):
        cache.BIAS_SDPA_VERSION, old = v, cache.BIAS_SDPA_VERSION
        try:
            keys[v] = (cache_key(t5, plan, versions), cache_key(llama, plan, versions))
        finally:
            cache.BIAS_SDPA_VERSION = old
    assert keys[1][0] != keys[2][0] and keys[1][1] == keys[2][1]
