"""Two-node Ray tier: a head (``ray start --head``) and a second node (``ray start --address``), one CPU each, in
a loopback-only network namespace (``ray_local``), running a real two-worker DDP fine-tune (gloo) as a Ray Train
``TorchTrainer`` submitted by ``RayLauncher``; its outputs are found under the storage path, and no Ray listener
is reachable beyond loopback.

Skipped where the ray extra is not installed or network namespaces cannot be made (the cluster is never
started unfenced).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from jobs_helpers import AUTH, events, tiny_job, upload, wait_job

pytest.importorskip("ray")
pytest.importorskip("ray.train")
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.needs_torch]

from ray_local import RayCluster, dump, exposure, fenced_cluster  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    with fenced_cluster(tmp_path_factory.mktemp("ray2"), nodes=2, cpus=1) as c:
        yield c
    assert c.pids() == []


def test_every_ray_listener_is_on_loopback(cluster: RayCluster) -> None:
    listeners = cluster.listeners()
    ports = {port for _, _, port in listeners}
    # the head's GCS and dashboard and both raylets are among them: the check sees the cluster's sockets
    assert {cluster.gcs_port, cluster.dashboard_port, 20001, 21001} <= ports, dump(cluster)
    assert cluster.addresses() <= {"127.0.0.1", "::1"}
    assert exposure(cluster) == [], dump(cluster)


def test_two_node_ddp_fine_tune_on_ray_train(cluster: RayCluster, make_client, tiny_root: Path, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    client = make_client(
        job_launcher="ray", ray_address=cluster.url, ray_python=sys.executable, ray_storage_path=str(storage)
    )
    f = upload(client, tiny_root / "train.jsonl")
    body = tiny_job(tiny_root / "model", f["id"], method={"num_gpus": 2}, hyperparameters={"n_epochs": 1})
    r = client.post("/v1/fine_tuning/jobs", headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    job = wait_job(client, job_id, timeout=300)
    evs = events(client, job_id)
    assert job["status"] == "succeeded", (job["error"], [e["message"] for e in evs][-8:])
    assert any("on 2 x cpu" in e["message"] for e in evs)  # one DDP run over two Ray Train workers
    losses = [e["data"]["train_loss"] for e in evs if e["type"] == "metrics"]
    assert len(losses) == job["progress"]["total_steps"] > 1

    info = httpx.get(f"{cluster.url}/api/jobs/{job_id}", timeout=10).json()
    assert info["status"] == "SUCCEEDED" and "advisor.jobs.ray_train" in info["entrypoint"]
    # the two workers ran on the two nodes (one CPU each), as node ranks 0 and 1 of one process group
    where = [json.loads(p.read_text()) for p in sorted((storage / job_id / "workers").glob("rank-*.json"))]
    assert [w["rank"] for w in where] == [0, 1]
    assert len({w["node_id"] for w in where}) == 2 and {w["node_ip"] for w in where} == {"127.0.0.1", "127.0.0.2"}
    assert sorted(w["node_rank"] for w in where) == [0, 1]

    # outputs under the storage path (the workers wrote there), and mirrored into the job's files
    job_storage = storage / job_id
    assert (job_storage / "output" / "adapter_model.safetensors").is_file()
    assert (job_storage / "result.json").is_file() and (job_storage / "events.jsonl").is_file()
    assert any(p.is_dir() for p in job_storage.iterdir() if p.name not in ("output", "inputs", "checkpoints"))
    assert job["result_files"], job


def test_the_exposure_check_sees_a_listener_beyond_loopback(tmp_path: Path) -> None:
    """The check itself, on real sockets of this process in the host's namespace: a listener on every
    interface is reported where the namespace has an address beyond loopback, one on 127.0.0.1 is not."""
    import os
    import socket
    import subprocess

    class ThisProcess(RayCluster):
        def pids(self) -> list[int]:
            return [os.getpid()]

        def addresses(self) -> set[str]:
            out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
            return {line.split()[3].split("/")[0] for line in out.splitlines()}

    here = ThisProcess(tmp_path)
    if not here.addresses() - {"127.0.0.1", "::1"}:
        pytest.skip("this host has no address beyond loopback")
    with socket.socket() as wide, socket.socket() as narrow:
        wide.bind(("0.0.0.0", 0))
        narrow.bind(("127.0.0.1", 0))
        wide.listen()
        narrow.listen()
        found = exposure(here)
        wide_port, narrow_port = wide.getsockname()[1], narrow.getsockname()[1]
    assert any(f"0.0.0.0:{wide_port}" in line for line in found), found
    assert not any(f":{narrow_port}" in line for line in found), found
