"""The pieces: the live-tensor meter, the shared model builder, the trial design, trial failure handling."""

from __future__ import annotations

import pytest

from advisor.catalog import default_catalog, model_from_config
from advisor.estimators.analytical import AnalyticalEstimator
from advisor.plans import TrainingPlan

pytestmark = [pytest.mark.needs_torch, pytest.mark.slow]


def test_meter_counts_each_storage_once_and_frees_it():
    import torch

    from advisor.stack.meters import LiveTensorMeter

    m = LiveTensorMeter()
    with m:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes
        view = a.view(10, 100)  # the same storage: not counted again
        b = a * 2  # 4000 more
        assert m.current_bytes == 8000
        del b
        assert m.current_bytes == 4000
        m.reset_peak()
        c = torch.empty(250, dtype=torch.float64)  # 2000
        del c
    assert m.peak_bytes == 6000
    assert view.untyped_storage().nbytes() == 4000
    del a, view
    assert m.current_bytes == 0
    outside = torch.empty(10)
    m.track(outside, outside[2:])
    assert m.current_bytes == 40


def tiny(model_type: str = "llama") -> dict:
    from calibration.design import scaled_config

    return scaled_config(model_type, 32, 2, 128, 16)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_builder_wraps_the_plans_targets_with_lora(model_type):
    from advisor.stack.build import build

    plan = TrainingPlan(method="lora", gpu_id="cpu", dtype="fp32", lora_r=4, lora_targets=("q", "v"), seq_len=16)
    built = build(tiny(model_type), plan)
    spec = model_from_config(tiny(model_type))
    adapters, _ = AnalyticalEstimator().adapters(spec, plan)
    assert built.trainable_params == adapters  # exactly the LoRA parameters the estimator counts
    assert built.lora_modules == (("c_attn",) if model_type == "gpt2" else ("q_proj", "v_proj"))
    loss = built.train_step(built.random_batch())
    assert loss == loss and loss > 0


def test_builder_qlora_is_nf4_double_quant_with_fp32_upcast_and_checkpointing():
    import bitsandbytes as bnb
    import torch

    from advisor.stack.build import build

    plan = TrainingPlan(method="qlora", gpu_id="cpu", dtype="fp32", lora_r=4, seq_len=16, grad_checkpointing=True)
    built = build(tiny(), plan)
    quantised = [m for m in built.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantised) == 2 * 7  # every linear of both blocks
    qs = quantised[0].weight.quant_state
    assert qs.quant_type == "nf4" and qs.nested  # double quantisation: the absmax is quantised too
    emb = built.model.get_input_embeddings().weight
    assert emb.dtype == torch.float32 and not emb.requires_grad
    assert built.model.base_model.model.model.gradient_checkpointing
    assert built.train_step(built.random_batch()) > 0


def test_builder_full_fine_tuning_and_optimizers():
    import bitsandbytes as bnb
    import torch

    from advisor.stack.build import build

    plan = TrainingPlan(method="full", gpu_id="cpu", dtype="fp32", optimizer="adamw-8bit", seq_len=16)
    built = build(tiny(), plan)
    assert isinstance(built.optimizer, bnb.optim.AdamW8bit)
    assert built.trainable_params == sum(p.numel() for p in built.model.parameters())
    built.train_step(built.random_batch())
    state = built.optimizer.state[built.model.get_input_embeddings().weight]
    assert state["state1"].dtype == torch.uint8


def test_builder_rejects_sharded_plans():
    from advisor.errors import InvalidInputError
    from advisor.stack.build import build

    plan = TrainingPlan(method="lora", gpu_id="cpu", dtype="fp32", num_gpus=2, sharding="ddp")
    with pytest.raises(InvalidInputError) as err:
        build(tiny(), plan)
    assert err.value.field == "num_gpus"


def test_cpu_design_spans_the_terms_and_keeps_groups_for_validation():
    from calibration.design import design

    cpu = (
        default_catalog()
        .gpu("a100-80gb")
        .__class__(
            id="cpu-test-2t",
            name="CPU test",
            memory_gib=24,
            memory_gb=25,
            bf16_tflops=None,
            fp16_tflops=0.15,
            fp32_tflops=0.15,
            memory_bandwidth_gbps=13,
            bf16_supported=False,
            price_usd_per_hour=None,
            gpu_class="cpu",
        )
    )
    trials = design(cpu, "quick")
    groups = {t.group for t in trials}
    assert len(groups) >= 8
    families = {t.arch["model_type"] for t in trials}
    assert families == {"llama", "qwen2", "gpt2"}
    for g in groups:
        plans = [TrainingPlan.from_dict(t.plan) for t in trials if t.group == g]
        assert {p.method for p in plans} >= {"lora", "qlora"}
        assert {p.grad_checkpointing for p in plans} == {True, False}
        assert all(p.dtype == "fp32" for p in plans)
    assert len({t.id for t in trials}) == len(trials)
    assert design(cpu, "quick") == trials  # deterministic


def test_gpu_design_reaches_a_real_fraction_of_the_card():
    from calibration.design import design

    h100 = default_catalog().gpu("h100-sxm")
    est = AnalyticalEstimator()
    trials = design(h100, "standard", device_str="cuda:0")
    fractions = []
    for t in trials:
        spec = model_from_config(dict(t.arch))
        plan = TrainingPlan.from_dict(t.plan)
        assert plan.dtype == "bf16"
        fractions.append(est.estimate(spec, h100, plan).memory.device_total_bytes / h100.memory_bytes)
    assert max(fractions) > 0.6 and max(fractions) <= 0.85
    assert {TrainingPlan.from_dict(t.plan).method for t in trials} == {"full", "lora", "qlora", "dora"}


def test_trial_failures_are_classified():
    from advisor.stack.outcomes import ERROR, OOM, classify

    assert classify(MemoryError()) == OOM
    assert classify(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) == OOM
    assert classify(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes")) == OOM
    assert classify(IndexError("index out of range in self")) == ERROR


def test_a_trial_that_hangs_is_killed_and_recorded(tmp_path):
    from calibration.design import scaled_config
    from calibration.runner import run_isolated
    from calibration.trial import TrialSpec

    plan = TrainingPlan(method="lora", gpu_id="cpu", dtype="fp32", seq_len=16)
    spec = TrialSpec(
        id="slow/timeout", group="slow", arch=scaled_config("llama", 32, 2, 128, 16), plan=plan.to_dict(), timeout_s=0.2
    )
    res = run_isolated(spec, tmp_path)
    assert res.status == "error" and res.error.startswith("timeout")
