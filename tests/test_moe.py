"""Mixture-of-experts models (advisor/families/moe.py, advisor/estimators/moe.py): config defaults against
transformers' config classes, total and active parameters against transformers' own model on the meta device
for real published configs, the memory model against the simulated trace and a real CPU step, and the
recommend answer over HTTP."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from advisor.catalog import default_catalog, model_from_config
from advisor.errors import InvalidInputError
from advisor.estimators.analytical import AnalyticalEstimator
from advisor.families import get_family, hf_config
from advisor.families.moe import CONFIG_DEFAULTS
from advisor.plans import TrainingPlan, resolve_targets

HUB = Path(__file__).resolve().parent.parent / "reference" / "hub_configs"
TYPES = tuple(CONFIG_DEFAULTS)
DEEPSEEK = ("deepseek_v2", "deepseek_v3")


def _tiny(mt: str, **over) -> dict:
    width = "moe_intermediate_size" if mt in ("qwen2_moe", "qwen3_moe", *DEEPSEEK) else "intermediate_size"
    experts = {"mixtral": "num_local_experts", "gpt_oss": "num_local_experts"}.get(mt, "num_experts")
    experts = "n_routed_experts" if mt in DEEPSEEK else experts
    cfg = dict(
        model_type=mt,
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts_per_tok=2,
        **{width: 32, experts: 6},
    )
    if mt == "qwen2_moe":
        cfg.update(shared_expert_intermediate_size=48, intermediate_size=48)
    if mt in DEEPSEEK:  # MLA latents, one dense first layer, one shared expert, ungrouped routing
        cfg.update(
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=16,
            first_k_dense_replace=1,
            n_shared_experts=1,
            intermediate_size=48,
            n_group=1,
            topk_group=1,
        )
    cfg.update(over)
    return cfg


def _meta_params(cfg: dict) -> tuple[int, int]:
    """(total parameters, parameters of the fused expert tensors) of transformers' own model for `cfg`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = {k: v for k, v in cfg.items() if k != "quantization_config"}
    c = AutoConfig.for_model(d.pop("model_type"), **d)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(c)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total, experts


# ---- config.json mapping --------------------------------------------------------------------------
@pytest.mark.needs_torch
@pytest.mark.parametrize("mt", TYPES)
def test_defaults_are_the_config_class_defaults(mt):
    from transformers import AutoConfig

    c = AutoConfig.for_model(mt)
    for key, value in CONFIG_DEFAULTS[mt].items():
        got = getattr(c, key)
        if value is None and key == "num_key_value_heads":  # None: the class derives it from the heads
            assert got == c.num_attention_heads, (mt, key)
        else:
            assert got == value, (mt, key, got, value)


@pytest.mark.parametrize("mt", TYPES)
def test_a_minimal_config_reads_like_the_one_the_class_writes(mt):
    transformers = pytest.importorskip("transformers")
    # 32 heads: every class's default kv-head count (4, 8, 16) divides it
    core = dict(hidden_size=1024, vocab_size=512, num_hidden_layers=2, num_attention_heads=32)
    if mt == "deepseek_v2":
        core["num_experts_per_tok"] = 6  # DeepSeek-V2's; its class has no default
    bare = model_from_config({"model_type": mt, **core})
    full_cfg = transformers.AutoConfig.for_model(mt, **core).to_dict()
    full = model_from_config(json.loads(json.dumps(full_cfg, default=str)))
    for f in (
        "num_experts",
        "experts_per_token",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "kv_heads",
        "head_size",
        "norm_topk_prob",
        "param_count",
        "active_param_count",
    ):
        assert getattr(bare, f) == getattr(full, f), (mt, f)


@pytest.mark.needs_torch
@pytest.mark.parametrize("mt", TYPES)
def test_tiny_config_counts_and_round_trip_match_transformers(mt):
    spec = model_from_config(_tiny(mt), name=mt)
    assert spec.family == "moe" and spec.is_moe and spec.model_type == mt
    total, experts = _meta_params(_tiny(mt))
    assert spec.param_count == total
    assert spec.expert_params == experts
    idle = experts * (spec.num_experts - spec.experts_per_token) / spec.num_experts
    assert spec.active_param_count == total - round(idle)
    back = model_from_config(hf_config(spec), name=mt)
    assert back.param_count == spec.param_count and back.blocks == spec.blocks
    assert _meta_params(hf_config(spec))[0] == total


@pytest.mark.needs_torch
@pytest.mark.parametrize(
    "repo",
    ["Qwen/Qwen3-30B-A3B", "openai/gpt-oss-20b", "openai/gpt-oss-120b", "deepseek-ai/DeepSeek-V3"],
    ids=lambda r: r.split("/")[1],
)
def test_published_configs_total_and_active_against_transformers(repo):
    index = {m["repo"]: m for m in json.loads((HUB / "INDEX.json").read_text())["models"]}
    cfg = json.loads((HUB / repo / "config.json").read_text())
    spec = model_from_config(cfg, name=repo)
    total, experts = _meta_params(cfg)
    assert spec.param_count == total
    assert abs(spec.param_count - index[repo]["published_params"]) <= 0.005 * index[repo]["published_params"]
    active = total - experts * (spec.num_experts - spec.experts_per_token) / spec.num_experts
    assert spec.active_param_count == round(active)
    # the cards' rounded active counts: OpenAI's leave the input embedding table out, Qwen's keep it
    card = index[repo]["active_params"]
    embedding = spec.vocab_size * spec.hidden_size if repo.startswith(("openai/", "deepseek-ai/")) else 0
    assert abs(spec.active_param_count - embedding - card) <= 0.05 * card


@pytest.mark.needs_torch
@pytest.mark.parametrize("mt", ["mixtral", "qwen2_moe", "olmoe"])
def test_published_class_default_models(mt):
    """Mixtral-8x7B (46.7B total, 12.9B active: Mistral AI's announcement, 2023-12-11), Qwen1.5-MoE-A2.7B (14.3B /
    2.7B: its model card) and OLMoE-1B-7B (6.9B / 1.3B: the OLMoE paper, arXiv 2409.02060): their config
    classes' defaults are those models."""
    from transformers import AutoConfig

    published = {"mixtral": (46.7e9, 12.9e9), "qwen2_moe": (14.3e9, 2.7e9), "olmoe": (6.9e9, 1.3e9)}[mt]
    c = AutoConfig.for_model(mt)
    cfg = {
        "model_type": mt,
        **{k: getattr(c, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")},
    }
    if mt == "olmoe":
        cfg["intermediate_size"] = 1024  # OLMoE-1B-7B's expert width (paper, Table 1); the class defaults to 2048
    spec = model_from_config(cfg, name=mt)
    assert spec.param_count == _meta_params(cfg)[0]
    assert abs(spec.param_count - published[0]) <= 0.01 * published[0]
    assert abs(spec.active_param_count - published[1]) <= 0.06 * published[1]


def test_experts_are_not_linears_for_bitsandbytes_or_peft():
    spec = model_from_config(_tiny("qwen3_moe"), name="q")
    kinds = {lin.name: lin.kind for b in spec.blocks for lin in b.linears}
    assert kinds["experts.gate_up_proj"] == kinds["experts.down_proj"] == "experts" and kinds["gate"] == "router"
    assert "gate_up_proj" not in spec.module_names and "gate" not in spec.module_names
    assert resolve_targets(spec, ("all-linear",)) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    with pytest.raises(InvalidInputError, match=r"fused expert parameters.*To fix"):
        resolve_targets(spec, ("gate", "up", "down"))
    # DeepSeek: peft remaps gate_proj / up_proj / down_proj targets onto the experts, so its shared experts and
    # dense first layers are never wrapped by name either
    ds = model_from_config(_tiny("deepseek_v3"), name="ds")
    assert resolve_targets(ds, ("all-linear",)) == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    expert_weights = sum(b.count * lin.weight_params for b in spec.blocks for lin in b.linears if lin.kind != "linear")
    assert spec.quantized_weight_params == spec.linear_weight_params - expert_weights
    # QLoRA: the unquantised experts are upcast to fp32 with the norms (prepare_model_for_kbit_training)
    plan = TrainingPlan(gpu_id="h100-80gb", method="qlora", lora_targets=("all-linear",))
    terms = AnalyticalEstimator().plan_terms(spec, plan)
    assert terms.terms["weights"] >= 4 * spec.expert_params
    assert any("stay unquantised" in n for n in terms.notes)


def test_unmodelled_moe_types_are_refused_clearly():
    with pytest.raises(InvalidInputError, match="lacks num_experts_per_tok"):
        model_from_config(
            {
                "model_type": "deepseek_v2",
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "vocab_size": 100,
            }
        )
    with pytest.raises(InvalidInputError, match="To fix"):
        model_from_config(
            {
                "model_type": "dbrx_like",
                "hidden_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "vocab_size": 100,
                "num_local_experts": 16,
            }
        )
    with pytest.raises(InvalidInputError, match="mlp_only_layers"):
        model_from_config(_tiny("qwen3_moe", mlp_only_layers=[0]))


def test_flops_follow_the_active_parameters():
    spec = model_from_config(_tiny("mixtral"), name="m")
    wider = model_from_config(_tiny("mixtral", num_local_experts=24), name="m24")  # 4x the experts, same top-k
    plan = TrainingPlan(gpu_id="h100-80gb", method="lora", lora_targets=("q", "v"))
    ana = AnalyticalEstimator()
    assert wider.param_count > 2 * spec.param_count
    # only the router grows with the expert count in what a token runs through
    assert wider.active_param_count - spec.active_param_count == spec.num_layers * spec.hidden_size * 18
    f1, f2 = ana.plan_terms(spec, plan).flops_per_token, ana.plan_terms(wider, plan).flops_per_token
    assert f1 == pytest.approx(f2, rel=0.03)
    assert get_family("moe").model_types == TYPES


# ---- memory: the simulated trace and a real CPU step ---------------------------------------------
@pytest.mark.needs_torch
@pytest.mark.parametrize(
    "arch,label",
    [
        ("mixtral", "lora-ckpt"),
        ("qwen3_moe", "qlora-nockpt"),
        ("gpt_oss", "full-ckpt"),
        ("olmoe", "lora-nockpt"),
        ("deepseek_v3", "full-ckpt"),
        ("deepseek_v3", "lora-nockpt"),
        # LoRA on the experts (peft target_parameters): folded expert weights
        ("qwen3_moe", "lora-experts-ckpt"),
        ("mixtral", "lora-experts-nockpt"),
        ("gpt_oss", "qlora-experts-nockpt"),
    ],
)
def test_memory_within_3pct_of_the_trace(arch, label, tmp_path):
    from advisor.simulated import SimulatedEstimator
    from bench.simulated_referee_moe import row

    r = row(SimulatedEstimator(cache_dir=tmp_path), AnalyticalEstimator(), arch, label)
    assert abs(r["diff_pct"]) <= 3.0, r


@pytest.mark.needs_torch
@pytest.mark.parametrize("method", ["full", "lora"])
def test_real_fp32_cpu_step_of_a_tiny_qwen3_moe(method, tmp_path):
    """One real fp32 training step (AdamW; full fine-tuning, or LoRA on all linears) of a random-initialised tiny
    Qwen3-MoE through the builder, counted by the live-bytes meter on real CPU tensors (torch's grouped_mm CPU
    kernel), against the analytical CPU estimate (measured: full -0.9%, LoRA -0.6%)."""
    import time

    from advisor.simulated.trace import trace_step
    from advisor.stack.targets import lora_target_modules

    cfg = _tiny(
        "qwen3_moe",
        hidden_size=256,
        head_dim=64,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=128,
        vocab_size=1024,
        norm_topk_prob=True,
    )
    spec = model_from_config(cfg, name="tiny-qwen3-moe")
    plan = TrainingPlan(
        gpu_id="cpu", method=method, dtype="fp32", micro_batch=2, seq_len=256, lora_targets=("all-linear",)
    )
    targets = list(lora_target_modules(spec, plan)) if method == "lora" else []
    t0 = time.perf_counter()
    real = trace_step(hf_config(spec), plan, targets, fake=False, steps=1)
    seconds = time.perf_counter() - t0
    predicted = AnalyticalEstimator().plan_terms(spec, plan, cpu=True).allocated
    assert real.param_count == spec.param_count
    assert abs(predicted - real.peak_bytes) <= 0.03 * real.peak_bytes, (predicted, real.peak_bytes)
    assert seconds < 120


# ---- the answer over HTTP --------------------------------------------------------------------------
def test_recommend_answers_an_moe_model_with_total_and_active_params(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from advisor.api.app import create_app
    from advisor.api.settings import Settings

    cfg = json.loads((HUB / "Qwen/Qwen3-30B-A3B/config.json").read_text())
    with TestClient(create_app(Settings(data_dir=tmp_path, allow_simulation=False))) as c:
        r = c.post("/v1/recommend", json={"model": cfg, "gpu": ["h100-80gb"], "workload": {"seq_len": 2048}})
    assert r.status_code == 200, r.text
    body = r.json()
    m = body["model"]
    assert m["family"] == "moe" and m["num_experts"] == 128 and m["experts_per_token"] == 8
    assert m["params"] == 30_532_122_624 and m["active_params"] < m["params"] / 8
    assert body["plans"], body["rejected"][:3]
    # every plan holds all experts resident: more than the bf16 weights of the whole model
    single = [p for p in body["plans"] if p["plan"]["method"] == "lora" and p["plan"]["num_gpus"] == 1]
    assert all(p["peak_memory_gib"] > 2 * m["params"] / 2**30 for p in single)


def test_catalog_moe_models_resolve():
    cat = default_catalog()
    names = {m.name for m in cat.models if m.is_moe}
    assert names, "the catalog has MoE rows (qwen3-30b-a3b, gpt-oss-20b, ...)"
    for name in names:
        m = cat.model(name)
        assert m.active_param_count < m.param_count


# ---- LoRA on the experts (peft target_parameters) ----------------------------------------------------------------
def test_expert_targets_resolve_and_are_validated():
    from advisor.stack.targets import lora_target_modules, lora_target_parameters

    spec = model_from_config(_tiny("qwen3_moe"), name="q")
    experts = {"experts.gate_up_proj", "experts.down_proj"}
    assert resolve_targets(spec, ("experts",)) == experts
    assert resolve_targets(spec, ("experts.down_proj",)) == {"experts.down_proj"}
    assert resolve_targets(spec, ("all-linear",)) == {"q_proj", "k_proj", "v_proj", "o_proj"}  # as peft's all-linear
    plan = TrainingPlan(gpu_id="h100-80gb", method="lora", lora_targets=("q", "experts"), lora_dropout=0.0)
    assert lora_target_modules(spec, plan) == ("q_proj",)
    assert lora_target_parameters(spec, plan) == ("experts.down_proj", "experts.gate_up_proj")
    # peft's ParamWrapper refuses dropout and DoRA: a clear error on the field, with the fix
    with pytest.raises(InvalidInputError, match=r"lora_dropout.*To fix: set lora_dropout to 0") as exc:
        TrainingPlan(gpu_id="h100-80gb", method="lora", lora_targets=("experts",))
    assert exc.value.field == "lora_dropout"
    with pytest.raises(InvalidInputError, match="DoRA cannot adapt the experts"):
        TrainingPlan(gpu_id="h100-80gb", method="dora", lora_targets=("experts",), lora_dropout=0.0)
    dense = default_catalog().model("llama-2-7b")
    with pytest.raises(InvalidInputError, match=r"has no experts.*To fix") as exc:
        resolve_targets(dense, ("experts",))
    assert exc.value.field == "lora_targets"
    with pytest.raises(InvalidInputError, match=r"or the experts themselves with 'experts'"):
        resolve_targets(spec, ("gate", "up", "down"))


@pytest.mark.needs_torch
@pytest.mark.parametrize("mt", ["qwen3_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v3"])
def test_expert_adapter_count_matches_peft(mt):
    """peft 0.21's ParamWrapper on every fused expert layout (gpt-oss's transposed one too): r (in + out) per expert
    and parameter, fp32 adapters, counted on the model the builder makes."""
    import torch

    from advisor.stack.build import build_meta
    from advisor.stack.targets import lora_target_modules

    spec = model_from_config(_tiny(mt), name=mt)
    plan = TrainingPlan(gpu_id="h100-80gb", method="lora", lora_targets=("q", "experts"), lora_dropout=0.0, lora_r=4)
    built = build_meta(hf_config(spec), plan, lora_target_modules(spec, plan))
    trainable = [(n, p) for n, p in built.model.named_parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and "lora_" in n for n, p in trainable)
    assert sum("experts" in n for n, _ in trainable) == 4 * sum(b.count for b in spec.blocks if b.kind == "decoder")
    predicted = AnalyticalEstimator().plan_terms(spec, plan).terms["trainable_params"]
    assert predicted == sum(p.numel() for _, p in trainable)


@pytest.mark.needs_torch
@pytest.mark.parametrize("targets,ckpt", [(("experts",), False), (("all-linear", "experts"), True)])
def test_real_fp32_cpu_step_with_lora_on_the_experts(targets, ckpt):
    """One real fp32 step of a tiny Qwen3-MoE with LoRA on its experts (peft target_parameters), live bytes on real
    CPU tensors against the analytical CPU estimate. Measured: experts only, no checkpointing 52.82 MiB vs 53.21
    (+0.7%); all-linear + experts, checkpointing 47.06 vs 46.43 (-1.4%). The folded expert weights (6 MiB a layer
    here) are what sets them apart from LoRA on the attention alone (31 MiB)."""
    from advisor.simulated.trace import trace_step
    from advisor.stack.targets import lora_target_modules

    cfg = _tiny(
        "qwen3_moe",
        hidden_size=256,
        head_dim=64,
        num_experts=16,
        num_experts_per_tok=4,
        moe_intermediate_size=128,
        vocab_size=1024,
        norm_topk_prob=True,
    )
    spec = model_from_config(cfg, name="tiny-qwen3-moe")
    plan = TrainingPlan(
        gpu_id="cpu",
        method="lora",
        dtype="fp32",
        micro_batch=2,
        seq_len=256,
        lora_targets=targets,
        lora_dropout=0.0,
        grad_checkpointing=ckpt,
    )
    real = trace_step(hf_config(spec), plan, list(lora_target_modules(spec, plan)), fake=False, steps=1)
    terms = AnalyticalEstimator().plan_terms(spec, plan, cpu=True)
    assert abs(terms.allocated - real.peak_bytes) <= 0.03 * real.peak_bytes, (terms.allocated, real.peak_bytes)
    assert real.components["adapters"] == terms.terms["adapters"]


@pytest.mark.needs_torch
def test_builder_trains_the_experts_through_peft_target_parameters():
    """build() (what jobs and calibration trials run): peft ParamWrappers on the fused experts, next to lora.Linear
    on the attention, and one optimiser step moves the expert adapters."""
    import torch
    from peft.tuners.lora.layer import ParamWrapper

    from advisor.stack.build import build

    cfg = _tiny("qwen3_moe")
    plan = TrainingPlan(
        gpu_id="cpu",
        method="lora",
        dtype="fp32",
        micro_batch=1,
        seq_len=16,
        lora_targets=("q", "experts"),
        lora_dropout=0.0,
    )
    built = build(cfg, plan, "cpu")
    wrappers = [m for m in built.model.modules() if isinstance(m, ParamWrapper)]
    assert sorted({w.parameter_name for w in wrappers}) == ["down_proj", "gate_up_proj"]
    assert len(wrappers) == 2 * cfg["num_hidden_layers"]
    assert built.lora_modules == ("q_proj",)
    b = dict(built.model.named_parameters())
    name = next(n for n in b if "experts" in n and "lora_B" in n)
    before = b[name].detach().clone()
    loss = built.train_step(built.random_batch(torch.Generator().manual_seed(0)))
    assert loss == loss and not torch.equal(before, b[name].detach())


def test_expert_lora_flops_count_the_fold_and_the_weight_gradients():
    spec = model_from_config(_tiny("qwen3_moe", num_experts=64, num_experts_per_tok=4), name="q")
    ana = AnalyticalEstimator()
    base = TrainingPlan(gpu_id="h100-80gb", method="lora", lora_targets=("q",), lora_dropout=0.0, seq_len=512)
    both = TrainingPlan(gpu_id="h100-80gb", method="lora", lora_targets=("q", "experts"), lora_dropout=0.0, seq_len=512)
    tb, te = ana.plan_terms(spec, base), ana.plan_terms(spec, both)
    experts = spec.expert_params  # both fused parameters of every layer (no expert biases here)
    tokens = both.micro_batch * both.seq_len
    # the routed rows' weight gradients (2 per active expert weight) and the fold (forward, recompute: 2 r each;
    # backward: 4 r) per token; the expert adapters themselves never multiply a token
    extra = 2 * experts * 4 / 64 + (2 * 2 + 4) * both.lora_r * experts / tokens
    assert te.flops_per_token - tb.flops_per_token == pytest.approx(extra, rel=1e-9)
    # folding reads W and writes the folded copy per forward pass, writes and reads its gradient in backward (bf16);
    # the rest of the difference: more saved activations moved, more adapter states stepped (no narrow LoRA matmul
    # traffic for the experts)
    other = sum(te.terms[k] - tb.terms[k] for k in ("activation_traffic_bytes", "optimizer_traffic_bytes"))
    assert te.memory_traffic_bytes - tb.memory_traffic_bytes == pytest.approx((2 * 2 + 3) * 2 * experts + other)


def test_estimate_with_expert_targets_over_http(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from advisor.api.app import create_app
    from advisor.api.settings import Settings

    cfg = json.loads((HUB / "Qwen/Qwen3-30B-A3B/config.json").read_text())
    attn = {"method": "lora", "lora_targets": ["all-linear"], "lora_dropout": 0.0}
    with TestClient(create_app(Settings(data_dir=tmp_path, allow_simulation=False))) as c:
        r = c.post(
            "/v1/estimate",
            json={"model": cfg, "gpu": "h100-80gb", "plan": {**attn, "lora_targets": ["all-linear", "experts"]}},
        )
        r0 = c.post("/v1/estimate", json={"model": cfg, "gpu": "h100-80gb", "plan": attn})
        bad = c.post(
            "/v1/estimate",
            json={"model": cfg, "gpu": "h100-80gb", "plan": {"method": "lora", "lora_targets": ["experts"]}},
        )
        dense = c.post(
            "/v1/estimate",
            json={"model": "llama-2-7b", "gpu": "h100-80gb", "plan": {**attn, "lora_targets": ["experts"]}},
        )
    assert r.status_code == 200 and r0.status_code == 200, (r.text, r0.text)
    d, d0 = r.json(), r0.json()
    assert d["plan"]["lora_targets"] == ["all-linear", "experts"]
    # 48 layers x (2 x 128 experts x 16 x (2048 + 1536) + ...) fp32 adapters: GiBs of adapters, states and gradients
    assert d["peak_memory_gib"] > d0["peak_memory_gib"] + 4
    assert d["step_time_s"] > d0["step_time_s"]
    assert bad.status_code in (400, 422) and "lora_dropout" in bad.text and "To fix" in bad.text
    assert dense.status_code in (400, 422) and "has no experts" in dense.text
