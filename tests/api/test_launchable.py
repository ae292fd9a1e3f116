"""Every plan /v1/recommend offers is launchable by the configured job runner, or says why not
(advisor.launchable: one pure function over the plan and the launcher)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from advisor.api import views
from advisor.launchable import LaunchTarget, launchability
from advisor.methods import get_method
from advisor.plans import make_plan
from advisor.recommend import Constraints
from advisor.service import AdvisorService
from advisor.service import RecommendRequest as CoreRequest

#: a 70B model on 48 GB cards: the search offers DDP and FSDP plans of LoRA and QLoRA on 2-8 GPUs
BIG = CoreRequest(
    model="llama-3-70b", gpus=("rtx-a6000",), constraints=Constraints(max_gpus=8, methods=("lora", "qlora")), limit=40
)


@pytest.fixture(scope="module")
def big_result():
    return AdvisorService().recommend(BIG)


def _every_plan_launchable_or_explained(plans: list[dict]) -> None:
    assert plans
    for p in plans:
        assert isinstance(p["launchable"], bool)
        assert p["launchable"] == (p["not_launchable_reason"] is None), p
        if not p["launchable"]:
            assert len(p["not_launchable_reason"]) > 20


def test_fsdp_qlora_is_launchable_on_any_launcher(big_result) -> None:
    """FSDP + QLoRA plans store the 4-bit weights in the compute dtype (bnb_4bit_quant_storage, what FSDP needs to
    shard them with the rest: tests/stack/test_fsdp_qlora.py runs it), so every plan here is launchable."""
    plans = [r.candidate.plan for r in big_result.recommendation.plans]
    fsdp_qlora = [p for p in plans if p.method == "qlora" and p.sharding == "fsdp"]
    assert fsdp_qlora and len(fsdp_qlora) < len(plans), "the search offers FSDP-QLoRA and other plans here"
    for p in fsdp_qlora:
        assert (get_method(p.method).quantization(p) or {}).get("bnb_4bit_quant_storage") == p.dtype
    for target in (LaunchTarget("ray"), LaunchTarget("local", None)):
        d = views.as_json(views.recommend_response(big_result, target=target))
        _every_plan_launchable_or_explained(d["plans"])
        for out in d["plans"]:
            assert out["launchable"], out["not_launchable_reason"]


def test_a_local_launcher_marks_plans_with_more_gpus_than_it_has(big_result) -> None:
    d = views.as_json(views.recommend_response(big_result, target=LaunchTarget("local", 2)))
    _every_plan_launchable_or_explained(d["plans"])
    for out in d["plans"]:
        if out["plan"]["num_gpus"] > 2:
            assert not out["launchable"] and "needs" in out["not_launchable_reason"]
    # the same plans on a Ray cluster: the device count is the cluster's business (it queues the job)
    assert all(
        launchability(r.candidate.plan, LaunchTarget("ray")).launchable
        for r in big_result.recommendation.plans
        if r.candidate.plan.method == "lora"
    )


def test_rules_follow_the_plan_fields() -> None:
    base = make_plan("lora", "a100-80gb", num_gpus=2)
    assert launchability(base).launchable
    assert "framework hf" in (launchability(replace(base, framework="litgpt")).reason or "")
    assert "chunked_loss" in (launchability(replace(base, chunked_loss=True)).reason or "")
    assert launchability(make_plan("qlora", "a100-80gb", num_gpus=2, sharding="ddp")).launchable
    assert launchability(make_plan("qlora", "a100-80gb", num_gpus=2, sharding="fsdp")).launchable
    assert launchability(make_plan("qlora", "a100-80gb", num_gpus=2, sharding="fsdp", dtype="fp16")).launchable
    assert launchability(make_plan("full", "a100-80gb", num_gpus=4, sharding="fsdp")).launchable


def test_recommend_over_http_says_launchable_for_the_running_launcher(client: TestClient) -> None:
    body = {"model": "llama-3-70b", "gpu": "rtx-a6000", "constraints": {"max_gpus": 8, "methods": ["lora", "qlora"]}}
    r = client.post("/v1/recommend", json={**body, "limit": 40})
    assert r.status_code == 200, r.text
    plans = r.json()["plans"]
    _every_plan_launchable_or_explained(plans)
    assert any(not p["launchable"] for p in plans)
