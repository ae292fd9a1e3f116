"""The feedback loop: finished jobs' measurements, read from a real SQLite job store, join the fit.

The fast tests refit a small run directory of trial rows (the tiny calibration's groups and plans,
with memory and step times made from the analytical model, so no torch is needed); the slow one
refits the real tiny calibration (tests/calibration/conftest.py) with a job row added.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from advisor.devices import host_cpu_spec
from advisor.estimators.analytical import DEFAULT_COEFFICIENTS, AnalyticalEstimator
from advisor.jobs import store as S
from advisor.jobs.spec import JobSpec, ModelSource
from advisor.jobs.store import Store
from advisor.plans import TrainingPlan
from calibration.feedback import (
    CPU_LIVE_METER,
    CPU_RSS_METER,
    CUDA_ALLOCATED_METER,
    job_records,
    job_store_url,
    read_job_feedback,
)
from calibration.runner import MEASUREMENTS, RUN_META

pytest.importorskip("sklearn")

from calibration.fit import JOB_MEASUREMENTS, fit_run, write_fit

GROUPS = {  # family, hidden, layers, vocab, head_dim (as tests/calibration/conftest.py)
    "llama-h32-l2-v256": ("llama", 32, 2, 256, 16),
    "qwen2-h48-l2-v320": ("qwen2", 48, 2, 320, 16),
    "gpt2-h32-l2-v256": ("gpt2", 32, 2, 256, 16),
}
PLANS = [
    dict(method="lora", micro_batch=2, seq_len=32, grad_checkpointing=False, lora_r=4, lora_targets=("q", "v")),
    dict(method="lora", micro_batch=1, seq_len=64, grad_checkpointing=True, lora_r=8),
    dict(method="full", micro_batch=2, seq_len=32, grad_checkpointing=True),
    dict(method="full", micro_batch=1, seq_len=64, grad_checkpointing=False),
]


def _device():
    return replace(host_cpu_spec(), id="cpu-test-1t", name="CPU test (1 threads)")


def _synthetic(model_arch: dict, group: str, plan: TrainingPlan, gpu, scale: float, tid: str) -> dict:
    from advisor.catalog import model_from_config

    est = AnalyticalEstimator(DEFAULT_COEFFICIENTS).estimate(model_from_config(dict(model_arch), name=group), gpu, plan)
    return {
        "trial_id": tid,
        "group": group,
        "status": "ok",
        "arch": model_arch,
        "plan": plan.to_dict(),
        "device": "cpu",
        "memory": {"meter": CPU_LIVE_METER, "peak_bytes": int(est.memory.allocated_peak_bytes * scale)},
        "step_time_s": est.speed.step_time_s * 1.3,
        "step_time_meter": "process_cpu_time",
        "timing_spread": 1.05,
        "cpu_contention": 0.0,
        "threads": 1,
    }


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    """A run directory of trial rows: 3 configuration groups x 4 plans on a 1-thread CPU device."""
    from calibration.design import scaled_config

    gpu = _device()
    d = tmp_path / "run"
    d.mkdir()
    (d / RUN_META).write_text(json.dumps({"device": gpu.to_dict(), "threads": 1, "budget": "test"}))
    rows = []
    for gi, (group, shape) in enumerate(GROUPS.items()):
        arch = scaled_config(*shape)
        for i, kw in enumerate(PLANS):
            plan = TrainingPlan(gpu_id=gpu.id, dtype="fp32", **kw)
            scale = 1.05 + 0.02 * ((gi * 7 + i * 3) % 5)  # a few percent of spread, deterministic
            rows.append(_synthetic(arch, group, plan, gpu, scale, f"{group}/{i}"))
    (d / MEASUREMENTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _job_arch() -> dict:
    from calibration.design import scaled_config

    return scaled_config("llama", 64, 3, 512, 16)  # a model no trial group has


def _add_finished_job(
    store: Store, data_dir: Path, n: int, measured: dict, *, device: str = "cpu", record: dict | None = None
) -> str:
    """A job as the service stores it (add_job), finished as the manager finishes it (update_job)."""
    job_id = f"ftjob-{n:024x}"
    plan = TrainingPlan(gpu_id="cpu", dtype="fp32", method="lora", micro_batch=2, seq_len=64, lora_r=8)
    spec = JobSpec(
        job_id=job_id,
        model=f"/models/tiny-llama-{n}",
        source=ModelSource("local", f"/models/tiny-llama-{n}"),
        plan=plan,
        training_file="/data/train.jsonl",
        n_epochs=1,
        batch_size=2,
        learning_rate=2e-4,
        device=device,
    )
    store.add_job(
        {
            "id": job_id,
            "owner": "key_a",
            "status": S.QUEUED,
            "model": spec.model,
            "training_file": "file-1",
            "seed": 0,
            "hyperparameters": {},
            "method": {"type": "supervised"},
            "spec": spec.to_dict(),
            "launcher": "local",
        }
    )
    assert store.update_job(job_id, expect=[S.QUEUED], status=S.RUNNING)
    assert store.update_job(job_id, expect=S.ACTIVE, status=S.SUCCEEDED, finished_at=1, measured=measured)
    if record is not None:  # advisor.jobs.train writes it into the job directory
        job_dir = data_dir / "jobs" / job_id
        job_dir.mkdir(parents=True)
        (job_dir / "measurement.json").write_text(json.dumps({"trial_id": job_id, **record}))
    return job_id


def _measured(peak_bytes: int, meter: str, **extra) -> dict:
    return {
        "steps": 5,
        "step_time_s": 0.05,
        "peak_memory_gib": peak_bytes / 2**30,
        "memory_meter": meter,
        "final_loss": 5.0,
        **extra,
    }


@pytest.fixture()
def jobs(tmp_path: Path, monkeypatch) -> tuple[Store, Path]:
    data_dir = tmp_path / "data"
    monkeypatch.delenv("ADVISOR_DATABASE_URL", raising=False)
    monkeypatch.setenv("ADVISOR_DATA_DIR", str(data_dir))
    store = Store(job_store_url())
    store.create()
    yield store, data_dir
    store.close()


def test_store_url_is_the_services(tmp_path, monkeypatch):
    monkeypatch.delenv("ADVISOR_DATABASE_URL", raising=False)
    monkeypatch.setenv("ADVISOR_DATA_DIR", str(tmp_path))
    assert job_store_url() == f"sqlite:///{tmp_path / 'advisor.db'}"
    assert job_store_url(tmp_path / "other") == f"sqlite:///{tmp_path / 'other' / 'advisor.db'}"
    monkeypatch.setenv("ADVISOR_DATABASE_URL", "sqlite:////elsewhere/x.db")
    assert job_store_url() == "sqlite:////elsewhere/x.db"
    monkeypatch.delenv("ADVISOR_DATABASE_URL")
    assert job_records() == []  # no database yet: no job ever ran, nothing to read


def test_job_measurements_join_the_fit_and_rss_rows_are_skipped(run_dir, jobs):
    store, data_dir = jobs
    gpu = _device()
    arch = _job_arch()
    plan = TrainingPlan(gpu_id="cpu", dtype="fp32", method="lora", micro_batch=2, seq_len=64, lora_r=8)
    truth = _synthetic(arch, "job", plan, gpu, 1.6, "x")["memory"]["peak_bytes"]  # the job's model needs 60% more
    # what advisor.jobs.train should record on a CPU: the process RSS and the trials' live-tensor meter
    comparable = _add_finished_job(
        store,
        data_dir,
        1,
        _measured(
            3 * 2**30,
            CPU_RSS_METER,
            memory_meters={CPU_RSS_METER: 3 * 2**30, CPU_LIVE_METER: truth},
            step_time_meter="process_cpu_time",
        ),
        record={"arch": arch, "threads": 1, "memory": {"meter": CPU_RSS_METER, "peak_bytes": 3 * 2**30}},
    )
    # what it records today: the RSS only -> not comparable, skipped with the reason
    rss_only = _add_finished_job(
        store,
        data_dir,
        2,
        _measured(3 * 2**30, CPU_RSS_METER),
        record={"arch": arch, "threads": 1, "memory": {"meter": CPU_RSS_METER, "peak_bytes": 3 * 2**30}},
    )
    # a GPU job: another device
    _add_finished_job(
        store, data_dir, 3, _measured(5 * 2**30, CUDA_ALLOCATED_METER), device="cuda", record={"arch": arch}
    )
    # a job with nothing to build the model from (no measurement.json, no local config.json)
    _add_finished_job(store, data_dir, 4, _measured(truth, CPU_LIVE_METER))

    feedback = read_job_feedback()
    assert [r["job_id"] for r in feedback.rows][:2] == [comparable, rss_only]
    assert len(feedback.rows) == 4 and feedback.source.endswith("advisor.db")

    before, _ = fit_run(run_dir)
    after, preds = fit_run(run_dir, jobs=feedback)

    prov = after.provenance["job_measurements"]
    assert prov["used"] == 1 and prov["job_ids"] == [comparable] and prov["skipped"] == 3
    assert prov["skipped_reasons"][f"meter {CPU_RSS_METER} != {CPU_LIVE_METER}"] == 1
    assert any(k.startswith("device cuda") for k in prov["skipped_reasons"])
    assert any(k.startswith("architecture unknown") for k in prov["skipped_reasons"])
    assert prov["summary"].startswith("1 job measurements used (1 with step time), 3 skipped: ")
    assert f"meter {CPU_RSS_METER} != {CPU_LIVE_METER} (1)" in prov["summary"]
    assert before.provenance["job_measurements"]["used"] == 0
    assert after.provenance["trials_fitted_memory"] == before.provenance["trials_fitted_memory"] == 12

    # the job row changed the fit: other coefficients, and the job's own peak is now predicted closer
    assert after.coefficients["memory"] != before.coefficients["memory"]
    job_pred = [p for p in preds if p.trial.id == "job:" + comparable]
    assert len(job_pred) == 1 and job_pred[0].trial.memory == truth  # the live-tensor figure, not the RSS
    from advisor.estimators.calibrated import memory_prediction

    f = job_pred[0].trial.f
    err_before = abs(memory_prediction(before.coefficients["memory"], f)[0] / truth - 1)
    err_after = abs(memory_prediction(after.coefficients["memory"], f)[0] / truth - 1)
    assert err_after < err_before
    assert after.held_out.n_groups == before.held_out.n_groups + 1  # the job's model is a group of its own


def test_refit_writes_the_job_rows_beside_the_trials(run_dir, jobs):
    store, data_dir = jobs
    arch = _job_arch()
    live = 40 * 2**20
    jid = _add_finished_job(
        store, data_dir, 7, _measured(live, CPU_RSS_METER, memory_meters={CPU_LIVE_METER: live}), record={"arch": arch}
    )
    profile = write_fit(run_dir, command="pytest", jobs=read_job_feedback())
    assert profile.provenance["job_measurements"]["used"] == 1
    lines = [json.loads(x) for x in (run_dir / JOB_MEASUREMENTS).read_text().splitlines()]
    assert [(x["job_id"], x["used"]) for x in lines] == [(jid, True)]
    assert lines[0]["memory"] == {
        "meter": CPU_LIVE_METER,
        "peak_bytes": live,
        "reserved_bytes": None,
        "device_total_bytes": None,
        "device_total_meter": None,
    }
    fit_doc = json.loads((run_dir / "fit.json").read_text())
    assert fit_doc["job_measurements"].startswith("1 job measurements used")
    assert any(t["trial_id"] == f"job:{jid}" for t in fit_doc["trials"])


def test_a_job_on_another_thread_count_joins_the_memory_fit_only(run_dir, jobs):
    store, data_dir = jobs
    _add_finished_job(
        store,
        data_dir,
        8,
        _measured(2**30, CPU_RSS_METER, memory_meters={CPU_LIVE_METER: 30 * 2**20}),
        record={"arch": _job_arch(), "threads": 2},
    )
    profile, _ = fit_run(run_dir, jobs=read_job_feedback())
    prov = profile.provenance["job_measurements"]
    assert prov["used"] == 1 and prov["used_step_time"] == 0  # the trials' 1-thread process CPU time vs wall


def test_the_cli_refits_with_jobs(run_dir, jobs, capsys):
    import argparse

    from advisor.calibrate_cli import add_parser, cmd_calibrate

    store, data_dir = jobs
    _add_finished_job(
        store,
        data_dir,
        9,
        _measured(2**30, CPU_RSS_METER, memory_meters={CPU_LIVE_METER: 30 * 2**20}, step_time_meter="process_cpu_time"),
        record={"arch": _job_arch(), "threads": 1},
    )
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["calibrate", "--fit", str(run_dir), "--with-jobs", "--no-install", "--data-dir", str(data_dir), "--json"]
    )
    assert cmd_calibrate(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["job_measurements"].startswith("1 job measurements used (1 with step time), 0 skipped")


@pytest.mark.needs_torch
@pytest.mark.slow
def test_a_job_row_joins_the_real_tiny_calibration(tiny_run, tmp_path, monkeypatch):
    """The real trial rows of the tiny calibration plus one job measured on the same meter."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run.run_dir, run)
    data_dir = tmp_path / "data"
    monkeypatch.setenv("ADVISOR_DATA_DIR", str(data_dir))
    monkeypatch.delenv("ADVISOR_DATABASE_URL", raising=False)
    store = Store(job_store_url())
    store.create()
    rows = [json.loads(x) for x in (run / MEASUREMENTS).read_text().splitlines()]
    ok = next(r for r in rows if r["status"] == "ok" and r["plan"]["method"] == "lora")
    live = int(ok["memory"]["peak_bytes"] * 1.5)
    jid = _add_finished_job(
        store,
        data_dir,
        11,
        _measured(2**30, CPU_RSS_METER, memory_meters={CPU_LIVE_METER: live}),
        record={"arch": _job_arch(), "threads": 1},
    )
    store.close()
    before, _ = fit_run(run)
    after, _ = fit_run(run, jobs=read_job_feedback())
    assert after.provenance["job_measurements"]["job_ids"] == [jid]
    assert after.coefficients["memory"] != before.coefficients["memory"]
