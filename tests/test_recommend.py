"""The source study's use cases, checked end to end through AdvisorService.recommend."""

import pytest

from advisor.errors import InvalidInputError
from advisor.estimators.uncertainty import FITS
from advisor.recommend import Constraints
from advisor.service import AdvisorService, RecommendRequest
from advisor.specs import Workload

SVC = AdvisorService()


def rec(model, gpus, objective="cost", **kw):
    constraints = Constraints(**kw)
    return SVC.recommend(RecommendRequest(model=model, gpus=gpus, objective=objective, constraints=constraints))


def risky(ranked) -> bool:
    return ranked.candidate.estimate.memory.verdict != FITS


def methods(r):
    return {p.candidate.plan.method for p in r.recommendation.plans}


def test_7b_on_a_4090_gets_a_lora_or_qlora_plan_that_fits():
    r = rec("meta-llama/Llama-2-7b-hf", ("rtx-4090",), max_gpus=1)
    top = r.recommendation.plans[0].candidate
    assert top.plan.method in ("lora", "qlora")
    assert top.estimate.memory.fits and top.plan.num_gpus == 1
    assert "full" not in methods(r)
    full = [x for x in r.recommendation.rejected if x.group.startswith("full")]
    assert full and full[0].to_fix.startswith("To fix:") and "GiB" in full[0].reason


def test_65b_on_one_a100_80gb_only_qlora():
    r = rec("huggyllama/llama-65b", ("a100-80gb",), max_gpus=1)
    assert methods(r) == {"qlora"}
    reasons = " ".join(x.reason for x in r.recommendation.rejected if x.group.startswith("lora"))
    assert "weights" in reasons


def test_65b_lora_needs_several_gpus():
    r = rec("llama-65b", ("a100-80gb",), methods=("lora",))
    gpus = {p.candidate.plan.num_gpus for p in r.recommendation.plans}
    assert gpus and min(gpus) >= 2


def test_time_objective_for_7b_on_a100_picks_lora():
    r = rec("llama-2-7b", ("a100-80gb",), objective="time", max_gpus=1)
    assert r.recommendation.plans[0].candidate.plan.method == "lora"
    assert "fastest" in r.recommendation.plans[0].why


def test_study_claim_65b_qlora_12gb_is_impossible():
    r = rec("llama-65b", ("a100-80gb",), max_gpus=1)
    notes = " ".join(r.recommendation.notes)
    assert "QLoRA: 12GB" in notes and "physically impossible" in notes
    out = SVC.estimate(
        SVC.model("llama-65b"),
        SVC.gpu("a100-80gb"),
        __import__("advisor.plans").plans.TrainingPlan(method="qlora", gpu_id="a100-80gb"),
        claimed_memory_gib=12,
    )
    assert out.claim.possible is False
    assert out.estimate.memory.components["weights"] > 30 * 2**30


def test_seq2seq_t5_is_supported():
    r = rec("google/flan-t5-xl", ("a10g",), max_gpus=1)
    assert r.recommendation.plans


def test_whole_catalog_search_evaluates_thousands_of_plans():
    r = SVC.recommend(RecommendRequest(model="llama-2-13b"))
    assert r.recommendation.n_candidates >= 1000
    ids = {p.candidate.gpu.id for p in r.recommendation.plans}
    assert ids and "no GPU named: searched every catalog GPU" in r.assumptions


def test_ranking_follows_the_objective():
    r = rec("llama-2-7b", ("a100-80gb", "rtx-4090", "h100-sxm"), objective="cost")
    # safe plans first (a plan whose memory band crosses its GPU's memory ranks after them), each by the objective
    costs = [(risky(p), p.candidate.cost.cost_usd) for p in r.recommendation.plans]
    assert costs == sorted(costs)
    r = rec("llama-2-7b", ("a100-80gb", "rtx-4090", "h100-sxm"), objective="time")
    hours = [(risky(p), p.candidate.cost.hours) for p in r.recommendation.plans]
    assert hours == sorted(hours)


def test_budget_and_deadline_reject_with_reasons():
    r = SVC.recommend(
        RecommendRequest(
            model="llama-2-70b",
            gpus=("a100-80gb",),
            workload=Workload(dataset_tokens=2_000_000_000),
            constraints=Constraints(max_budget_usd=10),
        )
    )
    assert not r.recommendation.plans
    assert any("budget" in x.reason for x in r.recommendation.rejected)
    r = SVC.recommend(
        RecommendRequest(
            model="llama-2-7b",
            gpus=("t4",),
            workload=Workload(dataset_tokens=1_000_000_000),
            constraints=Constraints(deadline_hours=1, max_gpus=1),
        )
    )
    assert any("deadline" in x.reason for x in r.recommendation.rejected)


def test_qlora_convergence_factor_is_documented_and_overridable():
    base = rec("llama-2-7b", ("rtx-3060-12gb",), max_gpus=1, methods=("qlora",))
    p = base.recommendation.plans[0].candidate
    assert p.cost.convergence_factor == 1.25
    r = SVC.recommend(
        RecommendRequest(
            model="llama-2-7b",
            gpus=("rtx-3060-12gb",),
            convergence={"qlora": 1.0},
            constraints=Constraints(max_gpus=1, methods=("qlora",)),
        )
    )
    assert r.recommendation.plans[0].candidate.cost.hours == pytest.approx(p.cost.hours / 1.25, rel=1e-6)


def test_fit_objective_needs_a_gpu_and_keeps_headroom():
    with pytest.raises(InvalidInputError) as exc:
        SVC.recommend(RecommendRequest(model="llama-2-7b", objective="fit"))
    assert exc.value.field == "gpu"
    r = rec("llama-2-13b", ("rtx-3090",), objective="fit")
    assert r.recommendation.plans  # the study: "QLoRA 13B models: RTX 3090"
    assert r.recommendation.plans[0].candidate.plan.method == "qlora"
    for p in r.recommendation.plans:
        m = p.candidate.estimate.memory
        assert m.device_total_bytes <= 0.95 * m.device_bytes


def test_stated_defaults_and_assumed_architecture():
    r = SVC.recommend(
        RecommendRequest(
            model="13B", gpus=("a100-80gb",), workload=Workload(stated_defaults=("seq_len not given: assumed 2048",))
        )
    )
    assert any("assumed" in a for a in r.assumptions)
    assert r.model.assumed is True


def test_plan_ids_are_stable():
    a = rec("llama-2-7b", ("a100-80gb",), max_gpus=1).recommendation.plans[0].candidate.plan
    b = rec("llama-2-7b", ("a100-80gb",), max_gpus=1).recommendation.plans[0].candidate.plan
    assert a.id == b.id and a.id.startswith("plan_")
    from advisor.plans import TrainingPlan

    assert TrainingPlan.from_dict(a.to_dict()).id == a.id


def test_seq_len_beyond_the_context_window():
    """A learned position table is a hard end (refused, naming the field); rotary positions run past the
    trained length (a note says so)."""
    from advisor.plans import make_plan

    gpt2, llama = SVC.model("gpt2"), SVC.model("llama-2-7b")
    t4, a100 = SVC.gpu("t4"), SVC.gpu("a100-80gb")
    with pytest.raises(InvalidInputError, match="learned position table") as e:
        SVC.estimate(gpt2, t4, make_plan("lora", t4, seq_len=2048))
    assert e.value.field == "plan.seq_len"
    with pytest.raises(InvalidInputError) as e:
        SVC.recommend(RecommendRequest(model="gpt2", gpus=("t4",), workload=Workload(seq_len=1025)))
    assert e.value.field == "seq_len"
    assert SVC.estimate(gpt2, t4, make_plan("lora", t4, seq_len=1024)).estimate.memory.device_total_bytes > 0
    long = SVC.estimate(llama, a100, make_plan("lora", a100, seq_len=8192)).estimate
    assert any("beyond llama-2-7b's context window (4096)" in n for n in long.notes)
    rec = SVC.recommend(RecommendRequest(model="llama-2-7b", gpus=("a100-80gb",), workload=Workload(seq_len=8192)))
    assert any("context window" in n for n in rec.recommendation.notes)


# ---- issue 11: budget order, GPU counts, ROCm caveats ---------------------------------------------------
def _svc_g():
    from advisor.catalog import default_catalog
    from advisor.service import AdvisorService

    return AdvisorService(default_catalog())


def test_budget_rejections_are_ordered_by_cost_and_say_what_it_takes():
    """llama-3-70b, 200M tokens, $50: every group costs more; the list starts at the cheapest, and the notes
    name the closest plans with the budget they need."""
    from advisor.recommend import Constraints as C
    from advisor.service import RecommendRequest as R
    from advisor.specs import Workload as W

    res = _svc_g().recommend(R(model="llama-3-70b", workload=W(dataset_tokens=200_000_000), constraints=C(50.0)))
    rec = res.recommendation
    assert not rec.plans
    budget = [r for r in rec.rejected if r.kind == "budget" and r.closest.cost.cost_usd is not None]
    costs = [r.closest.cost.cost_usd for r in budget]
    assert len(costs) >= 3 and costs == sorted(costs)
    assert rec.rejected[0] is budget[0]  # the closest to the budget comes first, not the smallest in memory
    cheapest = costs[0]
    assert f"${cheapest:,.2f} at best" in rec.rejected[0].reason
    need = f"${int(-(-cheapest // 1)):,}"
    assert need in rec.rejected[0].to_fix
    closest = [n for n in rec.notes if n.startswith("closest by cost")]
    assert closest and f"raise the budget to {need}" in closest[0] and "on-demand at" in closest[0]


def test_deadline_rejections_are_ordered_by_time():
    from advisor.recommend import Constraints as C
    from advisor.service import RecommendRequest as R
    from advisor.specs import Workload as W

    res = _svc_g().recommend(
        R(
            model="llama-3-70b",
            workload=W(dataset_tokens=200_000_000),
            objective="time",
            constraints=C(deadline_hours=0.5),
        )
    )
    dl = [r for r in res.recommendation.rejected if r.kind == "deadline"]
    hours = [r.closest.cost.hours for r in dl]
    assert len(hours) >= 3 and hours == sorted(hours)
    assert any(n.startswith("closest by time") and "move the deadline to" in n for n in res.recommendation.notes)


def test_gpu_count_from_the_name():
    from advisor.service import RecommendRequest as R
    from advisor.specs import Workload as W

    res = _svc_g().recommend(R(model="llama-3-8b", gpus=("A100:8",), workload=W(dataset_tokens=20_000_000)))
    plans = res.recommendation.plans
    assert plans and {r.candidate.plan.num_gpus for r in plans} == {8}
    assert {r.candidate.gpu.id for r in plans} == {"a100-40gb"}
    mixed = _svc_g().recommend(
        R(model="llama-3-8b", gpus=("A100:8", "L4"), workload=W(dataset_tokens=20_000_000), limit=40)
    )
    by_gpu = {}
    for r in mixed.recommendation.plans:
        by_gpu.setdefault(r.candidate.gpu.id, set()).add(r.candidate.plan.num_gpus)
    assert by_gpu["a100-40gb"] == {8} and len(by_gpu.get("l4", set())) >= 1


def test_rocm_caveat_on_every_plan_and_no_cuda_wording():
    from advisor.service import RecommendRequest as R
    from advisor.specs import Workload as W

    svc = _svc_g()
    res = svc.recommend(R(model="llama-3-8b", gpus=("MI300X",), workload=W(dataset_tokens=20_000_000), limit=20))
    mi = svc.catalog.gpu("MI300X")
    assert res.recommendation.plans
    for r in res.recommendation.plans:
        notes = r.candidate.estimate.notes
        assert mi.caveat in notes
        assert not any("CUDA unified" in n for n in notes)
    assert any(r.candidate.plan.optimizer.startswith("paged") for r in res.recommendation.plans)


def test_moe_qlora_rejection_says_the_experts_stay_unquantised():
    """QLoRA of a transformers-5 mixture of experts leaves the fused 3-D experts in the compute dtype: a rejected
    QLoRA group says so and points to LoRA with FSDP, instead of only asking for a larger GPU."""
    rec = SVC.recommend(RecommendRequest(model="qwen3-30b-a3b", gpus=("H100:8",))).recommendation
    qlora = [r for r in rec.rejected if r.group.startswith("qlora")]
    assert qlora, "expected QLoRA groups rejected for memory on 8x H100"
    assert all("unquantised" in r.to_fix and "fsdp" in r.to_fix for r in qlora)
    dense = SVC.recommend(RecommendRequest(model="llama-2-70b", gpus=("rtx-4090",))).recommendation
    assert any(r.group.startswith("qlora") for r in dense.rejected)
    assert not any("unquantised" in r.to_fix for r in dense.rejected)
