"""/v1/recommend marks plans launchable for the launcher the running service really has: a local launcher's device
slots bound the GPUs of a launchable plan (before this, the route looked the launcher up on the wrong object and
never knew the slot count, so a 4-GPU plan looked launchable on a one-device machine)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.testclient import TestClient

BODY = {
    "model": "llama-3-70b",
    "gpu": "rtx-a6000",
    "constraints": {"max_gpus": 8, "methods": ["lora"]},
    "limit": 40,
}


def _plans(app: FastAPI) -> list[dict]:
    with TestClient(app) as client:
        r = client.post("/v1/recommend", json=BODY)
        assert r.status_code == 200, r.text
        return r.json()["plans"]


def test_a_local_launcher_with_four_slots_marks_bigger_plans(make_app: Callable[..., FastAPI]) -> None:
    plans = _plans(make_app(job_gpu_count=4))
    bigger = [p for p in plans if p["plan"]["num_gpus"] > 4]
    fitting = [p for p in plans if p["plan"]["num_gpus"] <= 4]
    assert bigger and fitting, "a 70B LoRA on 48 GB cards is offered on 4 and on more GPUs"
    for p in bigger:
        assert not p["launchable"]
        assert "this deployment's local launcher has 4" in p["not_launchable_reason"]
    assert all(p["launchable"] for p in fitting), [p["not_launchable_reason"] for p in fitting]


def test_a_ray_launcher_leaves_the_gpu_count_to_the_cluster(make_app: Callable[..., FastAPI]) -> None:
    plans = _plans(make_app(job_launcher="ray", ray_address="http://127.0.0.1:1"))
    assert any(p["plan"]["num_gpus"] > 4 for p in plans)
    assert all(p["launchable"] for p in plans), [p["not_launchable_reason"] for p in plans]
