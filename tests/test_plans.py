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
    # the weight-norm temporaries are counted; on q/v they are a peak candidate of their own (at that moment the
    # recomputed block holds only its input), which here stays under the block's backward peak
    assert est.plan_terms(model, dora).terms["forward_temporaries"] > 0
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


# ---- LoRA on the head / the embedding, modules_to_save ------------------------------------------------
def test_modules_to_save_and_outer_targets_round_trip_through_ids():
    plan = make_plan("lora", "rtx-4090", lora_targets=("all-linear", "lm_head"), modules_to_save=["embed_tokens"])
    assert plan.modules_to_save == ("embed_tokens",)
    assert decode_plan_id(plan.id) == plan
    assert list(PlanIn(**plan.to_dict()).modules_to_save) == ["embed_tokens"]  # the API takes what it sends
    # fields appended after notes: ids of plans without them are unchanged (the known id above)
    assert [f.name for f in PLAN_FIELDS][-2:] == ["modules_to_save", "gpus_per_node"]


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(modules_to_save=("head",)), "modules_to_save"),
        (dict(modules_to_save=("lm_head", "lm_head")), "modules_to_save"),
        (dict(lora_targets=("lm_head",), modules_to_save=("lm_head",)), "modules_to_save"),
    ],
)
def test_bad_modules_to_save_name_the_field(kw, field):
    with pytest.raises(InvalidInputError) as exc:
        make_plan("lora", "rtx-4090", **kw)
    assert exc.value.field == field


def test_full_fine_tuning_refuses_modules_to_save():
    with pytest.raises(InvalidInputError) as exc:
        make_plan("full", "rtx-4090", modules_to_save=("lm_head",))
    assert exc.value.field == "modules_to_save"


def test_outer_targets_resolve_to_each_familys_module_names():
    from advisor.plans import resolve_modules_to_save, resolve_targets

    llama, gpt2, neox, t5 = (CAT.model(n) for n in ("llama-2-7b", "gpt2", "stablelm-base-alpha-3b", "t5-xl"))
    blocks = resolve_targets(llama, ("all-linear",))
    assert resolve_targets(llama, ("all-linear", "lm_head")) == blocks | {"lm_head"}  # all-linear no longer stops
    assert resolve_targets(gpt2, ("embed_tokens",)) == {"wte"}
    assert resolve_targets(neox, ("embed_tokens", "lm_head")) == {"embed_in", "lm_head"}
    assert resolve_targets(gpt2, ("wte",)) == {"wte"}  # the real name works too
    plan = make_plan("lora", "rtx-4090", modules_to_save=("embed_tokens",))
    assert resolve_modules_to_save(neox, plan) == ("embed_in",)
    with pytest.raises(InvalidInputError, match="encoder-decoder") as exc:
        resolve_modules_to_save(t5, plan)
    assert exc.value.field == "modules_to_save"
    with pytest.raises(InvalidInputError, match="either a LoRA target"):
        resolve_modules_to_save(
            gpt2, make_plan("lora", "rtx-4090", lora_targets=("wte",), modules_to_save=plan.modules_to_save)
        )


@pytest.mark.parametrize("method, copy_bytes", [("lora", 2), ("dora", 2), ("qlora", 4)])
def test_modules_to_save_counts_a_trainable_copy_in_the_modules_dtype(method, copy_bytes):
    """peft keeps the original frozen and trains a deep copy: weights + gradient + two AdamW states in the
    module's dtype (bf16; fp32 under QLoRA's prepare_model_for_kbit_training). Before: refused."""
    model, ana = CAT.model("llama-3.2-1b"), AnalyticalEstimator()  # tied embeddings: the copy is untied
    base = make_plan(method, "h100-80gb", dtype="bf16")
    saved = replace(base, modules_to_save=("lm_head",))
    t0, t1 = ana.terms(model, base), ana.terms(model, saved)
    n = model.vocab_size * model.hidden_size
    assert t1["trainable_params"] - t0["trainable_params"] == n
    assert t1["adapters"] - t0["adapters"] == n * copy_bytes
    assert t1["gradients"] - t0["gradients"] == n * copy_bytes
    assert t1["optimizer_states"] - t0["optimizer_states"] == 2 * n * copy_bytes
    # the trained head adds its weight-gradient matmul: 2 V h FLOPs per token
    assert t1["flops_per_token"] - t0["flops_per_token"] == pytest.approx(2 * n)


def test_lora_on_the_head_and_embedding_counts_their_adapters():
    model, ana = CAT.model("llama-2-7b"), AnalyticalEstimator()
    base = make_plan("lora", "h100-80gb", lora_targets=("q", "v"), lora_r=8)
    h, v = model.hidden_size, model.vocab_size
    for target in ("lm_head", "embed_tokens"):
        t0 = ana.terms(model, base)
        t1 = ana.terms(model, replace(base, lora_targets=("q", "v", target)))
        assert t1["trainable_params"] - t0["trainable_params"] == 8 * (h + v)
        assert t1["lora_modules"] - t0["lora_modules"] == 1


def test_an_estimate_refuses_what_peft_cannot_train():
    """T5's shared embedding through modules_to_save: a clear error naming the field, not a silent estimate."""
    plan = make_plan("lora", "h100-80gb", seq_len=512, modules_to_save=("embed_tokens",))
    with pytest.raises(InvalidInputError) as exc:
        AnalyticalEstimator().estimate(CAT.model("t5-xl"), CAT.gpu("h100-80gb"), plan)
    assert exc.value.field == "modules_to_save"
