"""DoRA as a calibration trial: the trial runner measures a real DoRA step like any other plan, and the
analytical DoRA terms (magnitudes, saved scaled outputs, weight-norm temporaries) land within the
tolerance the LoRA trial of the same shape does."""

from __future__ import annotations

import pytest

from advisor.catalog import model_from_config
from advisor.estimators.analytical import AnalyticalEstimator, Coefficients
from advisor.plans import TrainingPlan

pytestmark = [pytest.mark.needs_torch, pytest.mark.slow]


def _trial(method: str, ckpt: bool):
    from advisor.stack.device import describe
    from calibration.design import scaled_config
    from calibration.trial import TrialSpec, run_trial

    device, _ = describe("cpu", threads=1)
    arch = scaled_config("llama", 128, 2, 512, 32)
    plan = TrainingPlan(
        method=method,
        gpu_id=device.id,
        dtype="fp32",
        micro_batch=2,
        seq_len=64,
        grad_checkpointing=ckpt,
        lora_r=8,
        lora_dropout=0.0,
    )
    spec = TrialSpec(
        id=f"dora-check/{method}-{ckpt}",
        group="dora-check",
        arch=arch,
        plan=plan.to_dict(),
        threads=1,
        timed_steps=1,
        max_timing_s=1.0,
        timeout_s=120,
    )
    res = run_trial(spec)
    assert res.status == "ok", res.error
    est = AnalyticalEstimator(Coefficients(fixed_allocated_bytes=0))  # no CUDA workspace on a CPU
    predicted = est.estimate(model_from_config(arch, name="dora-check"), device, plan).memory.allocated_peak_bytes
    return res, predicted


@pytest.mark.parametrize("ckpt", [False, True], ids=["no-checkpointing", "checkpointing"])
def test_a_dora_trial_measures_and_the_terms_follow_it(ckpt):
    dora, dora_pred = _trial("dora", ckpt)
    lora, lora_pred = _trial("lora", ckpt)
    assert dora.trainable_params > lora.trainable_params  # the magnitudes
    measured_extra = dora.memory["peak_bytes"] - lora.memory["peak_bytes"]
    assert measured_extra > 0
    for res, pred in ((dora, dora_pred), (lora, lora_pred)):
        assert pred == pytest.approx(res.memory["peak_bytes"], rel=0.05), (res.trial_id, pred, res.memory)
