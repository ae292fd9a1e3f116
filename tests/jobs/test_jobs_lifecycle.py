"""Cancel mid-training; kill the server mid-job and restart it: nothing lost."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jobs_helpers import (
    AUTH,
    KEY,
    TERMINAL,
    events,
    kill_job_processes,
    serve_subprocess,
    tiny_job,
    upload,
    wait_for,
    wait_job,
)

from advisor.jobs.launchers import proc_start_ticks
from advisor.jobs.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.needs_torch]
JOBS = "/v1/fine_tuning/jobs"


def _alive(handle: dict[str, Any]) -> bool:
    return proc_start_ticks(int(handle["pid"])) == handle["start_ticks"]


def _handle(data_dir: Path, job_id: str) -> dict[str, Any]:
    store = Store(f"sqlite:///{data_dir / 'advisor.db'}")
    try:
        return (store.get_job(job_id) or {}).get("handle") or {}
    finally:
        store.close()


def _steps(evs: list[dict[str, Any]]) -> list[int]:
    return [e["data"]["step"] for e in evs if e["type"] == "metrics"]


def test_cancel_mid_training_stops_the_process(client, tiny_root: Path) -> None:
    f = upload(client, tiny_root / "train.jsonl")
    long = tiny_job(tiny_root / "model", f["id"], hyperparameters={"n_epochs": 100})
    job = client.post(JOBS, headers=AUTH, json=long).json()
    queued = client.post(JOBS, headers=AUTH, json=long).json()  # waits for the only slot
    wait_for(lambda: {"e": events(client, job["id"])}, lambda d: len(_steps(d["e"])) >= 2, timeout=120)
    data_dir = Path(client.app.state.settings.data_dir)
    handle = _handle(data_dir, job["id"])
    assert _alive(handle)

    # the queued one is cancelled at once, never started
    r = client.post(f"{JOBS}/{queued['id']}/cancel", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert not _handle(data_dir, queued["id"])

    r = client.post(f"{JOBS}/{job['id']}/cancel", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
    done = wait_job(client, job["id"], timeout=60)
    assert done["status"] == "cancelled" and done["error"]["code"] == "cancelled"
    assert not _alive(handle)
    msgs = [e["message"] for e in events(client, job["id"])]
    assert "Cancellation requested" in msgs and "Training stopped by SIGTERM" in msgs
    assert msgs[-1] == "The job was cancelled"
    assert done["measured"]["steps"] < done["measured"]["total_steps"]


# ---- a real server process, killed and restarted ------------------------------------------------------------
@contextlib.contextmanager
def _server(data_dir: Path, roots: list[Path], slots: int) -> Iterator[tuple[httpx.Client, subprocess.Popen]]:
    env = {
        "ADVISOR_API_KEYS": KEY,
        "ADVISOR_MODEL_ROOTS": ":".join(str(r) for r in roots),
        "ADVISOR_JOB_GPU": "cpu",
        "ADVISOR_JOB_GPU_COUNT": str(slots),
        "ADVISOR_JOB_CPU_THREADS": "1",
        "ADVISOR_JOB_POLL_INTERVAL_S": "0.2",
        "ADVISOR_ACCESS_LOG": "false",
    }
    with serve_subprocess(data_dir, env) as served:
        yield served


def test_server_killed_mid_job_and_restarted_loses_nothing(tmp_path: Path, tiny_root: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    try:
        with _server(data, [tiny_root], slots=2) as (c, server):
            with (tiny_root / "train.jsonl").open("rb") as fh:
                fid = c.post("/v1/files", files={"file": ("t.jsonl", fh)}, data={"purpose": "fine-tune"}).json()["id"]
            # long enough (~400 steps: seconds, not the 27 steps of 0.6 s a tiny job takes) that both running
            # jobs are still training when the server dies, however fast this machine steps
            body = tiny_job(tiny_root / "model", fid, hyperparameters={"n_epochs": 45})
            kept, doomed, queued = (c.post(JOBS, json=body).json()["id"] for _ in range(3))
            wait_for(
                lambda: {"steps": _steps(c.get(f"{JOBS}/{kept}/events", params={"limit": 1000}).json()["data"])},
                lambda d: len(d["steps"]) >= 1,
                timeout=120,
            )
            assert c.get(f"{JOBS}/{queued}").json()["status"] == "queued"
            server.send_signal(signal.SIGKILL)  # no shutdown of any kind
            server.wait(10)
        kept_h, doomed_h = _handle(data, kept), _handle(data, doomed)
        assert _alive(kept_h), "the training process must outlive the server"
        if _alive(doomed_h):  # and one that dies while the server is away
            os.killpg(int(doomed_h["pid"]), signal.SIGKILL)

        with _server(data, [tiny_root], slots=2) as (c, _server2):
            get = lambda j: c.get(f"{JOBS}/{j}").json()  # noqa: E731
            for j in (kept, doomed, queued):
                wait_for(lambda j=j: get(j), lambda d: d["status"] in TERMINAL, timeout=180)
            k, d, q = get(kept), get(doomed), get(queued)
            assert k["status"] == "succeeded" and q["status"] == "succeeded", (k["error"], q["error"])
            assert d["status"] == "failed" and d["error"]["code"] in ("crashed", "oom")
            evs = c.get(f"{JOBS}/{kept}/events", params={"limit": 1000, "order": "asc"}).json()["data"]
            assert any("re-attached to the running training process" in e["message"] for e in evs)
            # every step exactly once: the events file was read on from where the first server stopped
            assert _steps(evs) == list(range(1, k["progress"]["total_steps"] + 1))
    finally:
        kill_job_processes(data)
