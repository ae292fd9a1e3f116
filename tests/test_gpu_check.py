"""bench.gpu_check: refuses in one line without a GPU, and its stage plan fits in 10 minutes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def test_stage_plan_adds_up_under_ten_minutes():
    assert gpu_check.TOTAL_BUDGET_S <= 600
    assert gpu_check.plan_total_s() < gpu_check.TOTAL_BUDGET_S
    assert all(s.budget_s > 0 for s in gpu_check.STAGES)
    names = [s.name for s in gpu_check.STAGES]
    assert names == ["preflight", "calibrate", "calibrate_fit", "design_sample", "qlora_real_size", "report"]
    assert "--budget standard" in next(s.what for s in gpu_check.STAGES if s.name == "calibrate")


def test_refuses_in_one_line_without_cuda():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check would run")
    p = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == gpu_check.EXIT_NO_DEVICE != 0
    assert p.stdout == "" and len(p.stderr.strip().splitlines()) == 1 and "no CUDA device" in p.stderr
    assert not list((ROOT / "bench" / "results" / "gpu").glob("cpu*.json")), "nothing is written"


def test_a_stage_never_runs_past_its_deadline_or_the_whole_budget():
    clock = gpu_check.StageClock()
    clock.start("calibrate")
    assert 0 < clock.left() <= 240
    clock.t0 -= gpu_check.TOTAL_BUDGET_S - 10  # 10 s of the whole run left
    assert clock.left() <= 10
    clock.end()
    assert clock.timings["calibrate"]["budget_s"] == 240


def test_rows_carry_signed_errors_for_the_band_table():
    from advisor.catalog import default_catalog
    from advisor.estimators.analytical import AnalyticalEstimator
    from advisor.plans import TrainingPlan
    from calibration.design import scaled_config

    gpu = default_catalog().gpu("h200")
    arch = scaled_config("llama", 256, 2, 2048, 64)
    plan = TrainingPlan(method="lora", gpu_id="h200", micro_batch=2, seq_len=256)
    from advisor.catalog import model_from_config

    predicted = AnalyticalEstimator().estimate(model_from_config(dict(arch), name="t"), gpu, plan)
    measured_alloc = predicted.memory.allocated_peak_bytes / 1.25  # the model predicts 25% too much
    result = {
        "trial_id": "t",
        "status": "ok",
        "arch": arch,
        "plan": plan.to_dict(),
        "memory": {"peak_bytes": measured_alloc, "reserved_bytes": None, "device_total_bytes": None},
        "step_time_s": predicted.speed.step_time_s * 2,  # the step took twice as long
    }
    row = gpu_check.score(result, gpu, {"analytical": AnalyticalEstimator()})
    assert row["analytical_memory_error_pct"] == pytest.approx(25.0, abs=0.01)
    assert row["analytical_step_time_error_pct"] == pytest.approx(-50.0, abs=0.01)
    assert row["analytical_reserved_error_pct"] is None and row["method"] == "lora" and row["num_gpus"] == 1
    s = gpu_check.summary([row], ["analytical"])
    assert s["analytical memory"]["n"] == 1 and s["analytical step_time"]["median_pct"] == pytest.approx(50.0)


def test_a_stage_command_is_killed_with_its_children_at_the_deadline():
    import time

    t = time.monotonic()
    rc, _ = gpu_check._run(["sh", "-c", "sleep 30 & sleep 30; echo never"], timeout=1)
    assert rc is None and time.monotonic() - t < 10  # stopped, and the background child did not hold the pipe
