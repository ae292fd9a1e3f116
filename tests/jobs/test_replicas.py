"""Two `advisor serve` replicas on one PostgreSQL database and one data directory (issue 15).

Any replica answers for any job; exactly one (the holder of the `reconciler` lease) starts and follows
jobs; killing it with SIGKILL mid-training hands its jobs to the other, which re-attaches to the
training process (same host: same pid and start time) and ingests every step exactly once. Short lease
(2 s) and poll settings keep it fast; the model is the tiny random-initialised Llama of the job tests.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from jobs_helpers import KEY, TERMINAL, events, serve_subprocess, tiny_job, wait_for

from advisor.jobs.launchers import proc_start_ticks
from advisor.jobs.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.needs_torch]
JOBS = "/v1/fine_tuning/jobs"
LEASE_S = 2.0


@contextlib.contextmanager
def _replica(name: str, data_dir: Path, db_url: str, roots: list[Path]) -> Iterator[tuple[httpx.Client, Any]]:
    env = {
        "ADVISOR_API_KEYS": KEY,
        "ADVISOR_DATABASE_URL": db_url,
        "ADVISOR_REPLICA_ID": name,
        "ADVISOR_REPLICA_LEASE_S": str(LEASE_S),
        "ADVISOR_MODEL_ROOTS": ":".join(str(r) for r in roots),
        "ADVISOR_JOB_GPU": "cpu",
        "ADVISOR_JOB_GPU_COUNT": "20",
        "ADVISOR_JOB_CPU_THREADS": "1",
        "ADVISOR_JOB_POLL_INTERVAL_S": "0.2",
        "ADVISOR_CANCEL_GRACE_S": "3",
        "ADVISOR_ACCESS_LOG": "false",
    }
    with serve_subprocess(data_dir, env, ready_path="/readyz", name=f"replica {name}") as served:
        yield served


def _steps(evs: list[dict[str, Any]]) -> list[int]:
    return [e["data"]["step"] for e in evs if e["type"] == "metrics"]


def _kill_all(db_url: str) -> None:
    store = Store(db_url)
    try:
        for job in store.jobs_with_status(["running", "cancelling", "succeeded", "failed", "cancelled"]):
            h = job.get("handle") or {}
            if h.get("pid") and proc_start_ticks(int(h["pid"])) == h.get("start_ticks"):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(h["pid"]), signal.SIGKILL)
    finally:
        store.close()


def test_two_replicas_share_jobs_and_survive_a_kill(tmp_path: Path, tiny_root: Path, pg_url: str) -> None:
    data = tmp_path / "shared-data"
    data.mkdir()
    try:
        with (
            _replica("replica-a", data, pg_url, [tiny_root]) as (a, a_proc),
            _replica("replica-b", data, pg_url, [tiny_root]) as (b, _b_proc),
        ):
            with (tiny_root / "train.jsonl").open("rb") as fh:
                fid = a.post("/v1/files", files={"file": ("t.jsonl", fh)}, data={"purpose": "fine-tune"}).json()["id"]
            assert b.get(f"/v1/files/{fid}").status_code == 200  # an upload through A is B's too

            # 16 concurrent creations over both replicas: each job started exactly once, by the reconciler
            short = tiny_job(tiny_root / "model", fid, hyperparameters={"n_epochs": 1})
            with ThreadPoolExecutor(16) as pool:
                made = list(pool.map(lambda i: (a, b)[i % 2].post(JOBS, json=short), range(16)))
            ids = [r.json()["id"] for r in made]
            assert all(r.status_code == 200 for r in made) and len(set(ids)) == 16
            # the same Idempotency-Key through both replicas: one job
            keyed = [c.post(JOBS, json=short, headers={"Idempotency-Key": "k-1"}).json()["id"] for c in (a, b, a)]
            assert len(set(keyed)) == 1
            ids.append(keyed[0])

            def started(j: str) -> int:
                return sum(e["message"].startswith("Fine-tuning job started") for e in events(b, j))

            # cancel each job through either replica as soon as it has started (the machine has 2 cores)
            store = Store(pg_url)
            try:
                cancelled: set[str] = set()
                deadline = time.monotonic() + 120
                while len(cancelled) < len(ids):
                    assert time.monotonic() < deadline, f"not all started: {len(cancelled)}/{len(ids)}"
                    for i, j in enumerate(ids):
                        if j not in cancelled and (store.get_job(j) or {}).get("handle"):
                            assert (a, b)[i % 2].post(f"{JOBS}/{j}/cancel").status_code == 200
                            cancelled.add(j)
                    time.sleep(0.2)
                rows = [store.get_job(j) for j in ids]
            finally:
                store.close()
            assert {r["owner_replica"] for r in rows} == {"replica-a"}  # A holds the reconciler lease
            assert len({r["handle"]["pid"] for r in rows}) == len(ids)  # one process per job
            # a long job created through A, followed through B
            body = tiny_job(tiny_root / "model", fid, hyperparameters={"n_epochs": 40})
            kept = a.post(JOBS, json=body).json()["id"]
            assert kept in {j["id"] for j in b.get(JOBS, params={"limit": 100}).json()["data"]}
            for j in ids:
                wait_for(lambda j=j: b.get(f"{JOBS}/{j}").json(), lambda d: d["status"] in TERMINAL, timeout=60)
                assert b.get(f"{JOBS}/{j}").json()["status"] in ("cancelled", "succeeded")
                assert started(j) == 1
            wait_for(lambda: {"s": _steps(events(b, kept))}, lambda d: len(d["s"]) >= 2, timeout=120)

            a_proc.send_signal(signal.SIGKILL)  # the reconciler dies mid-training, no shutdown at all
            killed_at = time.monotonic()
            a_proc.wait(10)
            taken = wait_for(
                lambda: {
                    "e": [e for e in events(b, kept) if e["message"].startswith("Taken over by replica replica-b")]
                },
                lambda d: bool(d["e"]),
                timeout=LEASE_S * 5,
            )
            assert time.monotonic() - killed_at <= LEASE_S + 3
            assert "re-attached to the running training process" in taken["e"][0]["message"]
            done = wait_for(lambda: b.get(f"{JOBS}/{kept}").json(), lambda d: d["status"] in TERMINAL, timeout=180)
            assert done["status"] == "succeeded", done["error"]
            # every step exactly once across the takeover
            assert _steps(events(b, kept)) == list(range(1, done["progress"]["total_steps"] + 1))
            assert b.get("/readyz").status_code == 200
    finally:
        _kill_all(pg_url)
