"""Helpers of the job tests (a module of its own: conftest modules are not importable by name)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

KEY = "test-key-" + "x" * 24
OTHER_KEY = "other-key-" + "y" * 24
AUTH = {"Authorization": f"Bearer {KEY}"}
OTHER_AUTH = {"Authorization": f"Bearer {OTHER_KEY}"}
TERMINAL = ("succeeded", "failed", "cancelled")


def job_settings(data_dir: Path, roots: list[Path], **overrides: Any) -> Any:
    from advisor.api.settings import Settings

    values: dict[str, Any] = dict(
        data_dir=data_dir,
        api_keys=[KEY, OTHER_KEY],
        model_roots=[str(r) for r in roots],
        job_gpu="cpu",
        job_cpu_threads=1,
        job_poll_interval_s=0.1,
        cancel_grace_s=5.0,
        access_log=False,
    )
    values.update(overrides)
    return Settings(**values)


def kill_job_processes(data_dir: Path) -> None:
    """SIGKILL the process group of every job whose handle names a process that still runs."""
    from advisor.jobs.launchers import proc_start_ticks
    from advisor.jobs.store import Store

    db = data_dir / "advisor.db"
    if not db.exists() or db.read_bytes()[:16] != b"SQLite format 3\x00":  # none, or a damaged one (a test's)
        return
    store = Store(f"sqlite:///{db}")
    try:
        for job in store.jobs_with_status(["running", "cancelling", "succeeded", "failed", "cancelled"]):
            h = job.get("handle") or {}
            pid = h.get("pid")
            if pid and proc_start_ticks(int(pid)) == h.get("start_ticks"):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(pid), signal.SIGKILL)
    finally:
        store.close()


def upload(client: Any, path: Path, purpose: str = "fine-tune", auth: dict[str, str] = AUTH) -> dict[str, Any]:
    with path.open("rb") as f:
        r = client.post("/v1/files", headers=auth, files={"file": (path.name, f)}, data={"purpose": purpose})
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(
    get: Callable[[], dict[str, Any]], until: Callable[[dict[str, Any]], bool], timeout: float = 180.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        doc = get()
        if until(doc):
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; last state: {doc}")
        time.sleep(0.2)


def wait_job(client: Any, job_id: str, statuses: tuple[str, ...] = TERMINAL, timeout: float = 180.0) -> dict[str, Any]:
    return wait_for(
        lambda: client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=AUTH).json(),
        lambda j: j["status"] in statuses,
        timeout,
    )


def events(client: Any, job_id: str) -> list[dict[str, Any]]:
    r = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=AUTH, params={"limit": 1000, "order": "asc"})
    assert r.status_code == 200, r.text
    return r.json()["data"]


def tiny_job(model: Path, file_id: str, kind: str = "lora", **extra: Any) -> dict[str, Any]:
    """A job body that trains the tiny model for real in a few seconds."""
    body: dict[str, Any] = {
        "model": str(model),
        "training_file": file_id,
        "hyperparameters": {
            "n_epochs": 2,
            "batch_size": 4,
            "learning_rate_multiplier": 50 if kind != "full" else 300,
        },
        "method": {"type": kind, "seq_len": 32, "lora": {"r": 8, "dropout": 0.0}, "gradient_checkpointing": False},
    }
    if kind == "full":
        del body["method"]["lora"]
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(body.get(k), dict):
            body[k] = {**body[k], **v}
        else:
            body[k] = v
    return body


@contextlib.contextmanager
def serve_subprocess(
    data_dir: Path, env: dict[str, str], ready_path: str = "/healthz", name: str = "the server"
) -> Iterator[tuple[Any, subprocess.Popen]]:
    """`advisor serve` in a process of its own (its own session: kill -9 reaches it alone) on a free port,
    with `env` over this environment; yields an httpx client holding the test key, once `ready_path`
    answers 200, and the process. Stopped with SIGTERM (SIGKILL after 20 s) at exit."""
    import httpx

    from advisor.jobs.launchers import free_port

    port = free_port()
    code = "import sys; from advisor.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "serve", "--port", str(port), "--data-dir", str(data_dir)]
    argv += ["--log-level", "warning"]
    proc = subprocess.Popen(
        argv, env={**os.environ, **env}, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=30)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if client.get(ready_path).status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, f"{name} did not start"
            time.sleep(0.2)
        yield client, proc
    finally:
        client.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
