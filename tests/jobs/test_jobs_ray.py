"""Ray tier: a one-node Ray cluster on this machine (``ray_local``: every Ray process in a loopback-only
network namespace, every listener flag on loopback), real jobs through RayLauncher (a Ray Train TorchTrainer
per job), the cluster's processes stopped after (exactly those in its namespace; never ``ray stop``).

Skipped where the ray extra is not installed or network namespaces cannot be made: the cluster is never
started unfenced.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
