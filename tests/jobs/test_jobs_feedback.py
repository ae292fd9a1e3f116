"""A real CPU job's measurement joins a calibration fit (the feedback loop, closed on the CPU).

A CPU profile is fitted on live tensor bytes (``cpu:torch_dispatch_live_storage_bytes``); a job that
recorded only the process RSS could never join it. The job runs its steady-state step under the same
meter the trials use, records both meters, and ``calibration.feedback`` takes it for this CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jobs_helpers import AUTH, events, tiny_job, upload, wait_job

pytestmark = [pytest.mark.slow, pytest.mark.needs_torch]


def test_a_cpu_job_records_the_live_tensor_meter_and_joins_a_cpu_fit(client, tiny_root: Path) -> None:
    from advisor.devices import host_cpu_spec
    from advisor.stack.outcomes import CPU_LIVE_METER, CPU_RSS_METER
    from calibration.feedback import fitted_meter, read_job_feedback, select_job_rows
    from calibration.fit import build_trials
    from calibration.trial import TrialSpec, run_trial

    train = upload(client, tiny_root / "train.jsonl")
    r = client.post("/v1/fine_tuning/jobs", headers=AUTH, json=tiny_job(tiny_root / "model", train["id"], "lora"))
    assert r.status_code == 200, r.text
    job = wait_job(client, r.json()["id"], timeout=300)
    assert job["status"] == "succeeded", (job["error"], [e["message"] for e in events(client, job["id"])][-5:])

    # the job store's measurement: both meters, the trials' step-time meter, the thread count
    m = job["measured"]
    meters = m["memory_meters"]
    live, rss = meters[CPU_LIVE_METER], meters[CPU_RSS_METER]
    assert 0 < live < rss, meters  # tensors only vs the whole process (interpreter, libraries)
    assert m["step_time_meter"] == "process_cpu_time" and m["threads"] == 1  # the fixtures' one thread
    assert m["memory_meter"] == CPU_RSS_METER and m["step_time_s"] > 0  # what the API reported before

    # measurement.json: the live reading is the record's meter (as in a trial), RSS alongside
    settings = client.app.state.settings
    data_dir = Path(settings.data_dir)
    rec = json.loads((data_dir / "jobs" / job["id"] / "measurement.json").read_text())
    assert rec["memory"]["meter"] == CPU_LIVE_METER and rec["memory"]["peak_bytes"] == live
    assert rec["memory"]["rss_peak_bytes"] > live
    assert rec["step_time_meter"] == "process_cpu_time" and len(rec["step_wall_times_s"]) == m["steps"]

    # the feedback reader takes it for a profile of this CPU, fitted on the live meter
    fb = read_job_feedback(data_dir=data_dir, store=str(settings.resolved_database_url), jobs_dir=data_dir / "jobs")
    (row,) = fb.rows
    assert row["job_id"] == job["id"] and row["skip"] is None and row["memory_meters"] == meters
    gpu = host_cpu_spec()
    assert fitted_meter(gpu.gpu_class) == CPU_LIVE_METER
    used, skipped = select_job_rows(fb.rows, gpu.to_dict(), threads=1, step_time_meter="process_cpu_time")
    assert skipped == [] and len(used) == 1, [s["skip"] for s in skipped]
    assert used[0]["memory"]["meter"] == CPU_LIVE_METER and used[0]["memory"]["peak_bytes"] == live
    assert used[0]["step_time_s"] == m["step_time_s"] and "step_time_skip" not in used[0]  # joins the speed fit too
    (trial,) = build_trials(used, gpu)  # the fit's own row builder takes it
    assert trial.memory == live and trial.step_time == m["step_time_s"]

    # ... and it reads what a calibration trial of the same architecture and plan reads
    import torch

    threads = torch.get_num_threads()
    try:  # in this process, on one thread like the job (put back after)
        res = run_trial(TrialSpec(id="same-plan", group="tiny", arch=rec["arch"], plan=rec["plan"], threads=1))
    finally:
        torch.set_num_threads(threads)
    assert res.status == "ok", res.error
    assert res.memory["meter"] == CPU_LIVE_METER
    # the job's packed blocks carry per-example block masks (no attention across examples), which SDPA
    # keeps for backward along with the attention weights; the trial's random blocks have none: the job
    # reads a little more (~5% on this tiny model), never less
    assert 0 <= live / res.memory["peak_bytes"] - 1 < 0.08, (live, res.memory["peak_bytes"])
