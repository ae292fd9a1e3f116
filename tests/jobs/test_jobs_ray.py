"""Ray tier: a local `ray start --head` on this machine, real jobs through RayLauncher, Ray stopped after.

Skipped where the `ray` extra is not installed. The head is started with ``--block`` in a process
group of its own, so stopping it (SIGTERM, then SIGKILL to that group) ends exactly the processes
this test started. The dashboard (the Jobs API) listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from jobs_helpers import AUTH, events, tiny_job, upload, wait_for, wait_job

pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.needs_torch]
RAY = shutil.which("ray")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if RAY is None:
        pytest.skip("the ray CLI is not on PATH")
    tmp = tmp_path_factory.mktemp("ray")
    dash = _port()
    argv = [
        RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={_port()}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--num-gpus=0",
        "--disable-usage-stats", f"--temp-dir={tmp}",
    ]  # fmt: skip
    log = (tmp / "ray-start.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/api/version", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray did not start: {(tmp / 'ray-start.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()  # `ray start --block` stops what it started on SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of that group: ours
        proc.wait(10)
        log.close()


def test_jobs_run_on_a_ray_cluster(ray_head: str, make_client, tiny_root: Path) -> None:
    import sys

    client = make_client(job_launcher="ray", ray_address=ray_head, ray_python=sys.executable)
    f = upload(client, tiny_root / "train.jsonl")
    r = client.post("/v1/fine_tuning/jobs", headers=AUTH, json=tiny_job(tiny_root / "model", f["id"]))
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    job = wait_job(client, job_id, timeout=240)
    evs = events(client, job_id)
    assert job["status"] == "succeeded", (job["error"], [e["message"] for e in evs][-6:])
    assert any(e["message"].startswith(f"Fine-tuning job started (Ray submission {job_id})") for e in evs)
    losses = [e["data"]["train_loss"] for e in evs if e["type"] == "metrics"]
    assert len(losses) == job["progress"]["total_steps"] and losses[-1] < losses[0]

    # Ray knows the job under our id, and it ended there too
    info = httpx.get(f"{ray_head}/api/jobs/{job_id}", timeout=10).json()
    assert info["submission_id"] == job_id and info["status"] == "SUCCEEDED"
    assert "Running entrypoint" in client.get(f"/v1/fine_tuning/jobs/{job_id}/logs", headers=AUTH).text

    # cancel maps to Ray's stop
    long = tiny_job(tiny_root / "model", f["id"], hyperparameters={"n_epochs": 100})
    job_id = client.post("/v1/fine_tuning/jobs", headers=AUTH, json=long).json()["id"]
    wait_for(lambda: {"e": events(client, job_id)}, lambda d: any(e["type"] == "metrics" for e in d["e"]), timeout=180)
    client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=AUTH)
    job = wait_job(client, job_id, timeout=120)
    assert job["status"] == "cancelled"
    status = wait_for(
        lambda: httpx.get(f"{ray_head}/api/jobs/{job_id}", timeout=10).json(),
        lambda d: d["status"] in ("STOPPED", "SUCCEEDED", "FAILED"),
        timeout=60,
    )["status"]
    assert status in ("STOPPED", "SUCCEEDED")  # stopped by Ray, or exited 0 on our SIGTERM handling
