"""The response schemas mirror the core's dicts: a key the core adds or renames fails here first."""

from __future__ import annotations

from pydantic import BaseModel

from advisor.api import schemas
from advisor.api.routes.catalog import _gpu, _model
from advisor.plans import TrainingPlan
from advisor.service import AdvisorService, RecommendRequest


def _fields(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def _assert_mirrors(model: type[BaseModel], d: dict, where: str) -> None:
    missing = set(d) - _fields(model)
    assert not missing, f"{where}: the core returns {sorted(missing)} that {model.__name__} does not declare"
    model.model_validate(d)


def test_recommend_response_mirrors_the_service() -> None:
    svc = AdvisorService()
    d = svc.recommend(RecommendRequest(model="llama-2-13b", gpus=("rtx-4090", "a100-80gb"))).to_dict()
    _assert_mirrors(schemas.RecommendResponse, d, "recommend")
    _assert_mirrors(schemas.RankedPlan, d["plans"][0], "plans[]")
    _assert_mirrors(schemas.PlanOut, d["plans"][0]["plan"], "plans[].plan")
    _assert_mirrors(schemas.Rejection, d["rejected"][0], "rejected[]")
    _assert_mirrors(schemas.ModelSummary, d["model"], "model")
    _assert_mirrors(schemas.WorkloadOut, d["workload"], "workload")


def test_estimate_response_mirrors_the_service() -> None:
    svc = AdvisorService()
    model, gpu = svc.model("llama-2-7b"), svc.gpu("a100-80gb")
    d = svc.estimate(model, gpu, TrainingPlan(method="lora", gpu_id=gpu.id), claimed_memory_gib=20)
    extra = set(d) - _fields(schemas.EstimateResponse)
    assert not extra, f"the service's estimate returns {sorted(extra)} that EstimateResponse does not declare"
    _assert_mirrors(schemas.ClaimCheck, d["claim_check"], "claim_check")
    _assert_mirrors(schemas.EstimateGpu, d["gpu"], "gpu")


def test_catalog_schemas_mirror_the_specs() -> None:
    svc = AdvisorService()
    for g in svc.catalog.gpus:
        _assert_mirrors(schemas.GpuOut, _gpu(g), f"gpu {g.id}")
    for m in svc.catalog.models:
        _assert_mirrors(schemas.ModelOut, _model(m), f"model {m.name}")


def test_plan_in_accepts_every_plan_out_field() -> None:
    assert _fields(schemas.PlanOut) <= _fields(schemas.PlanIn)


def test_plan_in_covers_every_training_plan_field() -> None:
    from dataclasses import fields

    missing = {f.name for f in fields(TrainingPlan)} - _fields(schemas.PlanIn)
    assert not missing, f"TrainingPlan knobs {sorted(missing)} cannot be set over HTTP: add them to PlanIn"
