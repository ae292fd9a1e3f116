"""The response schemas are the wire format; the views fill them from the core's typed results."""

from __future__ import annotations

from pydantic import BaseModel

from advisor.api import schemas, views
from advisor.api.routes.catalog import _gpu, _model
from advisor.plans import TrainingPlan
from advisor.service import AdvisorService, RecommendRequest
from advisor.specs import Workload


def _fields(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields)


def _assert_mirrors(model: type[BaseModel], d: dict, where: str) -> None:
    missing = set(d) - _fields(model)
    assert not missing, f"{where}: the core returns {sorted(missing)} that {model.__name__} does not declare"
    model.model_validate(d)


def _filled(m: BaseModel, optional: set[str], where: str) -> None:
    """The view fills every field the response model declares (the optional ones may stay unset)."""
    unset = set(type(m).model_fields) - m.model_fields_set - optional
    assert not unset, f"{where}: the view leaves {sorted(unset)} of {type(m).__name__} unset"


def test_the_recommend_view_fills_the_response_schema() -> None:
    """Typed core results reach the wire through advisor.api.views only: every declared field is filled."""
    svc = AdvisorService()
    out = views.recommend_response(svc.recommend(RecommendRequest(model="llama-2-13b", gpus=("rtx-4090", "a100-80gb"))))
    _filled(out, {"simulations"}, "recommend")
    _filled(out.plans[0], {"phases_gib", "simulation"}, "plans[]")
    _filled(out.rejected[0], set(), "rejected[]")
    _filled(out.model, set(), "model")
    schemas.RecommendResponse.model_validate(views.as_json(out))  # and what is sent parses back


def test_the_estimate_view_fills_the_response_schema() -> None:
    svc = AdvisorService()
    model, gpu = svc.model("llama-2-7b"), svc.gpu("a100-80gb")
    res = svc.estimate(
        model, gpu, TrainingPlan(method="lora", gpu_id=gpu.id), claimed_memory_gib=20, workload=Workload()
    )
    out = views.estimate_response(res)
    _filled(out, {"phases_gib", "simulation"}, "estimate")
    _filled(out.claim_check, set(), "claim_check")
    assert out.breakdown_gib["weights"] == round(res.estimate.memory.components["weights"] / 2**30, 3)


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
