"""Ray tier: a one-node Ray cluster on this machine (``ray_local``: every Ray process in a loopback-only
network namespace, every listener flag on loopback), real jobs through RayLauncher (a Ray Train TorchTrainer
per job), the cluster's processes stopped after (exactly those in its namespace; never ``ray stop``).

Skipped where the ray extra is not installed or network namespaces cannot be made: the cluster is never
started unfenced.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jobs_helpers import AUTH, events, tiny_job, upload, wait_for, wait_job

pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.needs_torch]

from ray_local import dump, exposure, fenced_cluster  # noqa: E402


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with fenced_cluster(tmp_path_factory.mktemp("ray"), nodes=1, cpus=2) as cluster:
        assert exposure(cluster) == [], dump(cluster)
        yield cluster.url


def test_jobs_run_on_a_ray_cluster(ray_head: str, make_client, tiny_root: Path, tmp_path: Path) -> None:
    import json
    import sys

    data = tmp_path / "data"
    client = make_client(data_dir=data, job_launcher="ray", ray_address=ray_head, ray_python=sys.executable)
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
    # started again after it ended (a resumed job): a new Ray submission, not an adoption of the ended one
    from advisor.jobs.launchers import RayLauncher

    rl = RayLauncher(ray_head)
    assert rl._submit({"entrypoint": "true", "entrypoint_num_cpus": 0}, job_id) == f"{job_id}-2"
    rl.shutdown()

    # cancel: the workers stop together at a step (a `cancel` file in storage), rank 0 writes a cancelled result
    long = tiny_job(tiny_root / "model", f["id"], hyperparameters={"n_epochs": 100})
    job_id = client.post("/v1/fine_tuning/jobs", headers=AUTH, json=long).json()["id"]
    wait_for(lambda: {"e": events(client, job_id)}, lambda d: any(e["type"] == "metrics" for e in d["e"]), timeout=180)
    client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=AUTH)
    job = wait_job(client, job_id, timeout=120)
    assert job["status"] == "cancelled"
    # the run's own stop (rank 0 wrote a cancelled result into the default storage, <data dir>/ray-storage)
    assert json.loads((data / "ray-storage" / job_id / "result.json").read_text())["status"] == "cancelled"
    status = wait_for(
        lambda: httpx.get(f"{ray_head}/api/jobs/{job_id}", timeout=10).json(),
        lambda d: d["status"] in ("STOPPED", "SUCCEEDED", "FAILED"),
        timeout=60,
    )["status"]
    assert status in ("STOPPED", "SUCCEEDED")  # exited 0 on the graceful stop, or Ray's stop after the grace


def _steps(evs: list[dict[str, Any]]) -> list[int]:
    return [e["data"]["step"] for e in evs if e["type"] == "metrics"]


def test_a_ray_job_pauses_into_storage_and_resumes_from_its_checkpoint(
    ray_head: str, make_client, tiny_root: Path, tmp_path: Path
) -> None:
    """Pause on Ray: a `pause` file in storage, the run checkpoints and ends `paused` (the Ray job exits 0, no
    Ray stop), its checkpoints and result are in storage; resume: a new Ray submission that downloads them and
    continues at the next step. Every step's metrics exactly once across the two runs."""
    import json
    import sys

    data = tmp_path / "data"
    client = make_client(data_dir=data, job_launcher="ray", ray_address=ray_head, ray_python=sys.executable)
    f = upload(client, tiny_root / "train.jsonl")
    # 540 steps: the first metrics reach the service ~2 s after they are logged (the event log's upload and
    # mirroring, 1 s each), the pause reaches the run ~2 s after the request; measured on 2 shared cores, runs
    # paused at step 118-150. 540 steps keep the pause mid-run on a machine several times as fast
    body = tiny_job(tiny_root / "model", f["id"], hyperparameters={"n_epochs": 60})
    job_id = client.post("/v1/fine_tuning/jobs", headers=AUTH, json=body).json()["id"]
    wait_for(lambda: {"e": events(client, job_id)}, lambda d: len(_steps(d["e"])) >= 1, timeout=180)
    r = client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=AUTH)
    assert r.status_code == 200 and r.json()["status"] in ("running", "paused"), r.text
    paused = wait_job(client, job_id, statuses=("paused", "succeeded", "failed", "cancelled"), timeout=90)
    evs = events(client, job_id)
    assert paused["status"] == "paused", (paused["error"], [e["message"] for e in evs][-6:])
    at, total = _steps(evs)[-1], paused["progress"]["total_steps"]
    assert 1 <= at < total
    # in storage: a `paused` result and the checkpoint of the step it paused at (the one the resume reads)
    storage = data / "ray-storage" / job_id
    assert json.loads((storage / "result.json").read_text())["status"] == "paused"
    rows, _ = client.app.state.jobs.get().store.list_checkpoints(job_id, limit=100)
    last = max(rows, key=lambda c: c["step"])
    assert last["step"] == at and (storage / "checkpoints" / Path(last["path"]).name).is_dir()
    # the run ended itself: Ray's job exited 0, not stopped
    assert httpx.get(f"{ray_head}/api/jobs/{job_id}", timeout=10).json()["status"] == "SUCCEEDED"

    r = client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=AUTH)
    assert r.status_code == 200, r.text
    done = wait_job(client, job_id, timeout=180)
    evs = events(client, job_id)
    assert done["status"] == "succeeded", (done["error"], [e["message"] for e in evs][-6:])
    assert _steps(evs) == list(range(1, total + 1))  # resumed at at + 1: none trained twice, none skipped
    assert any(e["message"].startswith(f"Fine-tuning job started (Ray submission {job_id}-2)") for e in evs)
    assert json.loads((storage / "result.json").read_text())["status"] == "succeeded"
    assert not (storage / "pause").exists()  # the resume's submission cleared the request


def test_every_rank_acknowledges_a_pause_before_rank_0_stops_the_run(tmp_path: Path) -> None:
    """The storage protocol of a pause across ranks (no cluster needed): each rank's watcher creates its run's
    PAUSE file and acknowledges; rank 0 sets the stop flag only once every rank has, so no rank leaves the step
    without knowing it is a pause (they checkpoint together). A cancel waits for the same acknowledgements."""
    import threading
    import time
    from types import SimpleNamespace

    from advisor.jobs import ray_train as rt
    from advisor.jobs.train import PAUSE

    job_uri = str(tmp_path / "storage" / "ftjob-x")
    runs = [SimpleNamespace(stop_requested=False) for _ in range(2)]
    dirs = [tmp_path / f"rank{r}" for r in range(2)]
    for d in dirs:
        d.mkdir()
    rt.put_text("cancel requested\n", rt.join(job_uri, rt.CANCEL))
    rt.put_text("pause requested\n", rt.join(job_uri, rt.PAUSE_MARKER))
    done = threading.Event()
    watch0 = threading.Thread(target=rt._watch, args=(runs[0], dirs[0], job_uri, None, done, 0, 2), daemon=True)
    watch0.start()
    try:
        deadline = time.monotonic() + 10
        while not (dirs[0] / PAUSE).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(rt.SYNC_S * 2.5)  # rank 0 acknowledged, and looked again: rank 1 has not
        assert (dirs[0] / PAUSE).exists() and not runs[0].stop_requested  # the cancel does not jump the pause
        watch1 = threading.Thread(target=rt._watch, args=(runs[1], dirs[1], job_uri, None, done, 1, 2), daemon=True)
        watch1.start()
        while not runs[0].stop_requested and time.monotonic() < deadline:
            time.sleep(0.1)
        assert runs[0].stop_requested and (dirs[1] / PAUSE).exists()
        assert not runs[1].stop_requested  # rank 0 alone stops the run (Run._check_stop all-reduces it)
    finally:
        done.set()
    # the next run of the job (a resume) starts without the requests, the acknowledgements or the result
    rt.put_text("{}", rt.join(job_uri, "result.json"))
    rt.put_text("kept", rt.join(job_uri, "checkpoints", "step-1", "f"))
    rt.clear_markers(job_uri)
    left = sorted(str(p.relative_to(tmp_path / "storage" / "ftjob-x")) for p in Path(job_uri).rglob("*"))
    assert left == ["checkpoints", "checkpoints/step-1", "checkpoints/step-1/f"]


def test_checkpoints_in_storage_mirror_the_runs_directory(tmp_path: Path) -> None:
    """sync_dir: storage ends with exactly the run's checkpoints (those it rotated out are deleted there too),
    whatever their names."""
    from advisor.jobs import ray_train as rt

    local, uri = tmp_path / "local", str(tmp_path / "remote")
    for name in ("checkpoint-2", "checkpoint-4"):
        (local / name).mkdir(parents=True)
        (local / name / "state.json").write_text(name)
    rt.sync_dir(local, uri)
    (local / "checkpoint-2" / "state.json").unlink()
    (local / "checkpoint-2").rmdir()
    (local / "checkpoint-6").mkdir()
    (local / "checkpoint-6" / "state.json").write_text("6")
    rt.sync_dir(local, uri)
    assert sorted(p.name for p in Path(uri).iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert (Path(uri) / "checkpoint-6" / "state.json").read_text() == "6"
    rt.sync_dir(tmp_path / "none", uri)  # no local directory (a run that never checkpointed): storage untouched
    assert len(list(Path(uri).iterdir())) == 2


def test_scaling_and_accelerate_settings_follow_the_plan() -> None:
    """What the driver asks Ray Train for, and what a worker's Accelerator reads (no cluster needed)."""
    from dataclasses import replace

    from advisor.jobs.launchers import accelerate_env, ray_train_argv
    from advisor.jobs.ray_train import scaling
    from advisor.jobs.spec import JobSpec, ModelSource
    from advisor.plans import TrainingPlan

    def spec(n: int, sharding: str, device: str) -> JobSpec:
        plan = TrainingPlan(method="lora", gpu_id="h100-sxm", dtype="bf16", num_gpus=n, sharding=sharding)
        return JobSpec(
            job_id="ftjob-0123456789ab", model="/m", source=ModelSource("local", "/m"), plan=plan,
            training_file="/f.jsonl", n_epochs=1, batch_size=n, learning_rate=1e-4, device=device,
        )  # fmt: skip

    gpu16 = spec(16, "fsdp", "cuda")
    assert scaling(gpu16, 4) == {"num_workers": 16, "use_gpu": True, "resources_per_worker": {"CPU": 4, "GPU": 1}}
    assert scaling(spec(2, "ddp", "cpu"), 1) == {
        "num_workers": 2,
        "use_gpu": False,
        "resources_per_worker": {"CPU": 1},
    }
    env = accelerate_env(gpu16)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_USE_ORIG_PARAMS"] == "true"
    assert "ACCELERATE_USE_FSDP" not in accelerate_env(replace(gpu16, plan=replace(gpu16.plan, sharding="ddp")))
    argv = ray_train_argv(gpu16, "s3://bucket/prefix", "/usr/bin/python3", 4)
    assert argv[1:3] == ["-m", "advisor.jobs.ray_train"] and argv[argv.index("--storage") + 1] == "s3://bucket/prefix"
