"""The plan field table, make_plan's defaults, plan ids that decode, the method registry."""

from dataclasses import replace

import pytest

from advisor.api.schemas import PlanIn, PlanOut
from advisor.catalog import default_catalog
from advisor.cli import build_parser
from advisor.errors import InvalidInputError
from advisor.estimators.analytical import AnalyticalEstimator
from advisor.methods import DEFAULT_SEARCH, METHOD_NAMES, METHODS, get_method
from advisor.plans import (
    PLAN_FIELDS,
    SHAPE_FIELDS,
    PlanIdError,
    SearchSpace,
    decode_plan_id,
    enumerate_plans,
    make_plan,
)
from advisor.recommend import Constraints
from advisor.service import AdvisorService, RecommendRequest

CAT = default_catalog()


def test_every_field_is_in_the_table_and_reaches_cli_and_api():
    names = {f.name for f in PLAN_FIELDS}
    for f in PLAN_FIELDS:
        assert f.metadata["doc"], f.name
    assert set(PlanIn.model_fields) == names | {"id"}
    assert set(PlanOut.model_fields) == names | {"id"}
    estimate = build_parser()._subparsers._group_actions[0].choices["estimate"]
    flags = {o for a in estimate._actions for o in a.option_strings}
    for f in PLAN_FIELDS:
        if f.metadata["cli"]:
            assert "--" + f.name.replace("_", "-") in flags, f.name
    # the shape key is every field but the GPU and the notes
    assert set(SHAPE_FIELDS) == names - {"gpu_id", "notes"}


def test_shape_key_separates_frameworks_and_chunked_loss():
    """The live bug: an hf plan estimated after a litgpt/chunked_loss twin got the twin's cached counts."""
    svc = AdvisorService()
    model, gpu = svc.model("llama-2-7b"), svc.gpu("a100-80gb")
    hf = make_plan("lora", gpu, micro_batch=4, seq_len=2048)
    fresh = AnalyticalEstimator().estimate(model, gpu, hf).memory.device_total_bytes
    svc.estimate(model, gpu, replace(hf, framework="litgpt", chunked_loss=True), source="analytical")
    again = svc.estimate(model, gpu, hf, source="analytical")
    assert again.estimate.memory.device_total_bytes == fresh
    assert hf.shape_key != replace(hf, framework="litgpt").shape_key
    assert hf.shape_key != replace(hf, chunked_loss=True).shape_key


def test_make_plan_defaults_live_in_one_place():
    t4, h100 = CAT.gpu("t4"), CAT.gpu("h100-sxm")
    assert make_plan("lora", t4).dtype == "fp16" and make_plan("lora", h100).dtype == "bf16"
    assert make_plan("full", h100, num_gpus=4).sharding == "fsdp"
    assert make_plan("lora", h100, num_gpus=4).sharding == "ddp"
    assert make_plan("lora", h100).sharding == "none"
    assert make_plan("qlora", h100, lora_r=64).lora_alpha == 128
    assert make_plan("qlora", h100, lora_r=64, lora_alpha=16).lora_alpha == 16
    with pytest.raises(InvalidInputError) as e:
        make_plan("lora", h100, micro_batch=0)
    assert e.value.field == "micro_batch"
    with pytest.raises(InvalidInputError) as e:
        make_plan("lora", h100, warp_speed=9)
    assert e.value.field == "warp_speed"


def test_plan_ids_decode_to_the_plan():
    plans = list(enumerate_plans([CAT.gpu("rtx-4090")], 1024, SearchSpace(methods=METHOD_NAMES)))
    for p in plans[::37]:
        assert decode_plan_id(p.id) == p
        assert p.id.startswith("plan_v2.") and len(p.id) < 200
    odd = make_plan("qlora", "l4", lora_targets=("q", "k"), framework="torchtune", notes=("x",))
    assert decode_plan_id(odd.id) == odd


def test_a_known_id_keeps_decoding():
    """Pins the id format: reordering the plan fields without bumping PLAN_ID_VERSION fails here."""
    known = "plan_v2.W1swLCJsb3JhIl0sWzEsInJ0eC00MDkwIl0sWzMsNF0sWzEzLFsicSIsInYiXV1d"
    assert decode_plan_id(known) == make_plan("lora", "rtx-4090", micro_batch=4, lora_targets=("q", "v"))
    assert make_plan("lora", "rtx-4090", micro_batch=4, lora_targets=("q", "v")).id == known


@pytest.mark.parametrize(
    "bad, stale",
    [
        ("plan_0123456789abcdef", True),
        ("plan_v1.W1swLCJsb3JhIl1d", True),
        ("plan_v2.!!", False),
        ("plan_v2.AAAA", False),
        ("plan_v2.W1s5OSwxXV0", False),
        ("hello", False),
    ],
)
def test_bad_plan_ids_are_clear_errors(bad, stale):
    with pytest.raises(PlanIdError) as e:
        decode_plan_id(bad)
    assert e.value.field == "plan_id" and e.value.stale is stale


def test_a_tampered_id_that_decodes_to_an_invalid_plan_is_refused():
    import base64
    import json

    raw = json.dumps([[0, "lora"], [1, "t4"], [3, 0]]).encode()
    pid = "plan_v2." + base64.urlsafe_b64encode(raw).decode().rstrip("=")
    with pytest.raises(PlanIdError, match="micro_batch"):
        decode_plan_id(pid)


def test_method_registry_is_the_only_list_of_methods():
    assert tuple(METHODS) == METHOD_NAMES and "dora" in METHOD_NAMES
    assert "dora" not in DEFAULT_SEARCH  # asked for by name only
    assert set(Constraints().methods) == set(DEFAULT_SEARCH)
    with pytest.raises(InvalidInputError) as e:
        get_method("adalora")
    assert e.value.field == "method"
    for m in METHODS.values():
        assert m.summary and (m.lighter or m.name == "qlora")


def test_dora_costs_more_than_lora_by_its_magnitudes_and_temporaries():
    svc = AdvisorService()
    model, gpu = svc.model("llama-2-7b"), svc.gpu("a100-80gb")
    est = AnalyticalEstimator()
    lora = make_plan("lora", gpu, micro_batch=2, seq_len=512, lora_targets=("q", "v"))
    dora = replace(lora, method="dora")
    n_lora, _ = est.adapters(model, lora)
    n_dora, _ = est.adapters(model, dora)
    # one magnitude per output feature of each adapted linear: q and v of 32 layers (4096 outputs each)
    assert n_dora - n_lora == 32 * 2 * 4096
    a, b = est.estimate(model, gpu, lora), est.estimate(model, gpu, dora)
    assert b.memory.allocated_peak_bytes > a.memory.allocated_peak_bytes
    assert b.memory.components["adapter_temporaries"] > 0  # the weight-norm temporaries, recomputed with the block
    assert b.speed.flops_per_token > a.speed.flops_per_token  # the second base matmul under dropout
    nodrop = replace(dora, lora_dropout=0.0)
    assert est.estimate(model, gpu, nodrop).speed.flops_per_token < b.speed.flops_per_token


def test_dora_is_recommended_when_asked_for():
    svc = AdvisorService()
    res = svc.recommend(
        RecommendRequest(model="llama-2-7b", gpus=("a100-80gb",), constraints=Constraints(methods=("lora", "dora")))
    )
    methods = {r.candidate.plan.method for r in res.recommendation.plans}
    assert methods == {"lora", "dora"}
    default = svc.recommend(RecommendRequest(model="llama-2-7b", gpus=("a100-80gb",)))
    assert "dora" not in {r.candidate.plan.method for r in default.recommendation.plans}
