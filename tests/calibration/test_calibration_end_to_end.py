"""A tiny real calibration end to end: trials in subprocesses (two made to fail), JSONL, fit, profile, service."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from advisor.catalog import model_from_config
from advisor.plans import TrainingPlan
from advisor.profiles import ProfileStore, load_profile
from advisor.service import AdvisorService, RecommendRequest
from advisor.specs import Workload

pytestmark = [pytest.mark.needs_torch, pytest.mark.slow]


def test_every_trial_is_a_measurement_and_failures_do_not_stop_the_run(tiny_run):
    from calibration.runner import read_measurements

    rows = read_measurements(tiny_run.run_dir)
    by_id = {r["trial_id"]: r for r in rows}
    OOM_ID, ERROR_ID = tiny_run.oom_id, tiny_run.error_id
    assert len(rows) == len(tiny_run.trials), "one JSONL line per trial, written as it finished"
    assert by_id[OOM_ID]["status"] == "oom", by_id[OOM_ID]["error"]
    assert by_id[ERROR_ID]["status"] == "error"
    assert "index" in by_id[ERROR_ID]["error"].lower()
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == len(rows) - 2
    for r in ok:
        mem = r["memory"]
        assert mem["meter"] == "cpu:torch_dispatch_live_storage_bytes"
        assert 0 < mem["peak_bytes"] < mem["rss_peak_bytes"]
        assert r["step_time_s"] > 0 and len(r["step_times_s"]) >= 2
        assert r["trainable_params"] > 0
    # the trial after the failures still ran: order in the file is the order of the design
    assert rows[-1]["trial_id"] == ERROR_ID and rows[-2]["trial_id"] == OOM_ID


def test_memory_meter_sees_the_weights_and_the_trainable_state(tiny_run):
    from calibration.runner import read_measurements

    by_id = {r["trial_id"]: r for r in read_measurements(tiny_run.run_dir)}
    r = by_id["llama-h64-l3-v128/3-full"]
    model = model_from_config(dict(r["arch"]))
    # full fine-tuning in fp32: weights + grads + two AdamW states = 16 bytes per parameter at least
    assert r["memory"]["peak_bytes"] >= 16 * model.param_count
    assert r["trainable_params"] == model.param_count


def test_a_killed_run_resumes_where_it_stopped(tiny_run, tmp_path):
    from calibration.runner import MEASUREMENTS, run_design

    # copy the measurements but for the last two trials: a rerun measures exactly those
    lines = (tiny_run.run_dir / MEASUREMENTS).read_text().splitlines()
    (tmp_path / MEASUREMENTS).write_text("\n".join(lines[:-2]) + "\n" + '{"torn line')
    summary = run_design(
        tiny_run.trials, tmp_path, meta={"device": tiny_run.device.to_dict()}, progress=False, retry_disturbed=False
    )
    assert [r.trial_id for r in summary.results] == [tiny_run.oom_id, tiny_run.error_id]
    assert summary.skipped == len(tiny_run.trials) - 2
    # a trial measured again (a disturbed timing re-measured, a later timing pass): its latest line stands,
    # with the fastest undisturbed step time of all its lines (a shared machine only ever slows a step down)
    from calibration.fit import load_run

    first = json.loads(lines[0])
    slower = dict(first, step_time_s=first["step_time_s"] * 2, loss=1.0)
    disturbed = dict(first, step_time_s=first["step_time_s"] / 4, timing_spread=2.0)
    with (tmp_path / MEASUREMENTS).open("a") as f:
        f.write(json.dumps(slower) + "\n" + json.dumps(disturbed) + "\n")
    _, rows = load_run(tmp_path)
    assert len(rows) == len(tiny_run.trials)
    row = next(r for r in rows if r["trial_id"] == first["trial_id"])
    assert row["step_time_s"] == first["step_time_s"] and row["timing_passes"] == 2
    faster = dict(first, step_time_s=first["step_time_s"] / 2)
    with (tmp_path / MEASUREMENTS).open("a") as f:
        f.write(json.dumps(faster) + "\n")
    _, rows = load_run(tmp_path)
    assert next(r for r in rows if r["trial_id"] == first["trial_id"])["step_time_s"] == faster["step_time_s"]


def test_fit_gives_a_profile_with_every_documented_field(tiny_run):
    from calibration.fit import write_fit

    profile = write_fit(tiny_run.run_dir, command="pytest")
    doc = json.loads((tiny_run.run_dir / "profile.json").read_text())
    assert doc["device"]["name"] == tiny_run.device.name and doc["device"]["memory_gib"] > 0
    for k in ("torch", "cuda", "transformers", "peft", "bitsandbytes"):
        assert k in doc["software"]
    held = doc["held_out"]
    for k in (
        "memory_median_abs_pct_error",
        "memory_max_abs_pct_error",
        "step_time_median_abs_pct_error",
        "step_time_max_abs_pct_error",
        "n_trials",
    ):
        assert k in held
    assert held["n_trials"] == len(tiny_run.trials) - 2 and held["n_groups"] == 4
    assert held["analytical"]["memory_median_abs_pct_error"] is not None
    assert doc["meters"]["peak_memory"] == "cpu:torch_dispatch_live_storage_bytes"
    assert doc["provenance"]["trials"] == {"ok": len(tiny_run.trials) - 2, "oom": 1, "error": 1}
    rng = doc["fitted_range"]
    assert set(rng["families"]) == {"llama", "gpt2"} and set(rng["methods"]) == {"full", "lora", "qlora"}
    assert rng["numeric"]["seq_len"] == [32.0, 64.0]
    # every coefficient multiplies a physical quantity: none is negative; the GEMMs' is at least 1 (mfu <= 1)
    coef = doc["coefficients"]
    assert coef["speed"]["gemm"] >= 1.0
    mem = coef["memory"]
    assert set(mem["activation_scale"]) == {"llama", "gpt2"}  # the families with trials
    flat = [*mem["activation_scale"].values(), mem["logits_scale"], mem["fixed_bytes"]]
    assert all(x >= 0 for x in flat + list(coef["speed"].values()))
    assert load_profile(tiny_run.run_dir / "profile.json") == profile


def test_profile_loads_in_the_service_and_estimates_say_calibrated(tiny_run, tmp_path):
    from calibration.fit import fit_run

    profile, _ = fit_run(tiny_run.run_dir)
    store = ProfileStore(tmp_path / "profiles")
    store.save(profile)
    svc = AdvisorService(profiles=store)
    gpu = svc.gpu(tiny_run.device.id)  # the calibrated CPU joined the catalog
    spec = model_from_config(dict(tiny_run.trials[0].arch), name="tiny-llama")
    plan = TrainingPlan(method="lora", gpu_id=gpu.id, dtype="fp32", micro_batch=2, seq_len=48)
    out = svc.estimate(spec, gpu, plan).estimate
    assert out.source == f"calibrated:{profile.id}"
    assert any(n.startswith("calibrated on ") for n in out.notes)
    assert out.memory.device_total_bytes > 0 and out.speed.step_time_s > 0
    assert svc.estimate(spec, gpu, plan, source="analytical").estimate.source == "analytical"
    # a catalog GPU has no profile and a CPU profile never transfers to a GPU
    a100 = svc.gpu("a100-80gb")
    assert svc.estimate(spec, a100, replace(plan, dtype="bf16")).estimate.source == "analytical"
    # outside the fitted range the estimate says it extrapolates
    long = svc.estimate(spec, gpu, replace(plan, seq_len=4096)).estimate
    assert any("extrapolating" in n and "seq_len 4096" in n for n in long.notes)
    # the vectorised search ranks with the calibrated estimator too
    res = svc.recommend(
        RecommendRequest(model=dict(tiny_run.trials[0].arch), gpus=(gpu.id,), workload=Workload(1_000_000, seq_len=64))
    ).recommendation
    assert res.plans and all(p.candidate.estimate.source == f"calibrated:{profile.id}" for p in res.plans)


def test_calibrated_predictions_match_the_fitted_trials(tiny_run):
    """In-sample sanity: the estimator reproduces what the fit predicted for the trials it was fitted on."""
    from advisor.estimators.calibrated import CalibratedEstimator, speed_prediction
    from calibration.fit import build_trials, fit_run, predict_memory

    profile, _ = fit_run(tiny_run.run_dir)
    est = CalibratedEstimator(profile)
    from calibration.runner import read_measurements

    trials = build_trials(read_measurements(tiny_run.run_dir), tiny_run.device)
    for t in trials[:6]:
        e = est.estimate(t.model, tiny_run.device, t.plan)
        assert e.memory.allocated_peak_bytes == pytest.approx(predict_memory(profile.coefficients["memory"], t), abs=1)
        # on the CPU there is no allocator slack and no CUDA context
        assert e.memory.device_total_bytes == e.memory.allocated_peak_bytes
        # the estimator folds the fitted speed terms through the device layer without changing their sum
        assert e.speed.step_time_s == pytest.approx(speed_prediction(profile.coefficients, t.f), rel=1e-6)
