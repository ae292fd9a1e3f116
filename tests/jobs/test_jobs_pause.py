"""Pause and resume, the OpenAI way: POST .../pause checkpoints a running job and stops its process
(`paused`); POST .../resume queues it again and the run continues from that checkpoint: same step count,
no step trained twice, the job ends `succeeded` with every step of the plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from jobs_helpers import AUTH, events, tiny_job, upload, wait_for, wait_job

pytestmark = [pytest.mark.slow, pytest.mark.needs_torch]
JOBS = "/v1/fine_tuning/jobs"


def _steps(evs: list[dict[str, Any]]) -> list[int]:
    return [e["data"]["step"] for e in evs if e["type"] == "metrics"]


def test_pause_checkpoints_and_resume_continues_from_the_checkpoint_step(client, tiny_root: Path) -> None:
    f = upload(client, tiny_root / "train.jsonl")
    # long enough (72 steps) that the pause lands mid-run, even when the steps are quick
    body = tiny_job(tiny_root / "model", f["id"], hyperparameters={"n_epochs": 8})
    job = client.post(JOBS, headers=AUTH, json=body).json()
    wait_for(lambda: {"e": events(client, job["id"])}, lambda d: len(_steps(d["e"])) >= 3, timeout=120)
    handle = client.app.state.jobs.get().store.get_job(job["id"])["handle"]

    r = client.post(f"{JOBS}/{job['id']}/pause", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] in ("running", "paused"), r.text
    paused = wait_job(client, job["id"], statuses=("paused", "succeeded", "failed", "cancelled"), timeout=60)
    assert paused["status"] == "paused", paused["error"]
    at = _steps(events(client, job["id"]))[-1]
    total = paused["progress"]["total_steps"]
    assert 3 <= at < total
    ckpts = client.get(f"{JOBS}/{job['id']}/checkpoints", headers=AUTH).json()["data"]
    assert max(c["step_number"] for c in ckpts) == at  # the pause wrote the checkpoint it resumes from
    from advisor.jobs.launchers import proc_start_ticks

    assert proc_start_ticks(int(handle["pid"])) != handle["start_ticks"]  # no process while paused
    assert client.post(f"{JOBS}/{job['id']}/pause", headers=AUTH).json()["status"] == "paused"  # idempotent

    r = client.post(f"{JOBS}/{job['id']}/resume", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] in ("queued", "running", "succeeded"), r.text
    done = wait_job(client, job["id"], timeout=120)
    evs = events(client, job["id"])
    assert done["status"] == "succeeded", (done["error"], [e["message"] for e in evs][-5:])
    assert _steps(evs) == list(range(1, total + 1))  # resumed at at + 1: none trained twice, none skipped
    msgs = [e["message"] for e in evs]
    assert f"Resumed from the checkpoint at step {at}" in msgs
    assert done["measured"]["steps"] == total
    assert client.post(f"{JOBS}/{job['id']}/resume", headers=AUTH).status_code == 409


def test_a_waiting_job_pauses_at_once_and_a_paused_job_can_be_cancelled(client, tiny_root: Path) -> None:
    f = upload(client, tiny_root / "train.jsonl")
    body = tiny_job(tiny_root / "model", f["id"], hyperparameters={"n_epochs": 100})
    first = client.post(JOBS, headers=AUTH, json=body).json()  # holds the only slot
    waiting = client.post(JOBS, headers=AUTH, json=body).json()
    r = client.post(f"{JOBS}/{waiting['id']}/pause", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "paused"
    client.post(f"{JOBS}/{first['id']}/cancel", headers=AUTH)
    assert wait_job(client, first["id"], timeout=60)["status"] == "cancelled"
    # a paused job still needs its training file: it cannot be deleted from under it
    assert client.delete(f"/v1/files/{f['id']}", headers=AUTH).status_code == 409
    r = client.post(f"{JOBS}/{waiting['id']}/cancel", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert client.post(f"{JOBS}/{waiting['id']}/pause", headers=AUTH).status_code == 409
    assert client.post(f"{JOBS}/nope/pause", headers=AUTH).status_code == 404
    assert client.delete(f"/v1/files/{f['id']}", headers=AUTH).status_code == 200
