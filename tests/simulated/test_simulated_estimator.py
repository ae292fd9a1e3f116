"""The simulated estimator as the rest of the advisor sees it: Estimate shape, cache, errors, service, CLI."""

import json
from dataclasses import replace

import pytest

import advisor.simulated as simulated
from advisor.api import views
from advisor.catalog import default_catalog, model_from_config
from advisor.cli import main
from advisor.errors import InvalidInputError
from advisor.estimators.analytical import DEFAULT_COEFFICIENTS
from advisor.families import hf_config
from advisor.plans import TrainingPlan
from advisor.service import AdvisorService, RecommendRequest
from advisor.simulated import SimulatedEstimator, TraceCache, cache_key
from advisor.simulated.runner import trace_in_subprocess
from advisor.specs import Workload
from advisor.units import GIB

pytestmark = pytest.mark.needs_torch

TINY = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=512,
)


@pytest.fixture
def tiny():
    return model_from_config(TINY, name="tiny-llama")


@pytest.fixture
def gpu():
    return default_catalog().gpu("rtx-4090")


def _plan(**kw) -> TrainingPlan:
    return TrainingPlan(**{"method": "lora", "gpu_id": "rtx-4090", "micro_batch": 2, "seq_len": 64, **kw})


def test_estimate_is_an_estimate_with_phases(tmp_path, tiny, gpu):
    est = SimulatedEstimator(cache_dir=tmp_path).estimate(tiny, gpu, _plan())
    mem = est.memory
    assert est.source == "simulated"
    assert sum(mem.components.values()) == mem.device_total_bytes  # the breakdown adds up to the total
    assert mem.allocated_peak_bytes == est.trace.peak_bytes + DEFAULT_COEFFICIENTS.fixed_allocated_bytes
    assert mem.allocated_peak_bytes <= mem.reserved_peak_bytes < mem.device_total_bytes  # + CUDA context
    assert set(est.phases) == set(simulated.PHASES)
    assert est.phases["after_weights"] < est.trace.peak_bytes == max(est.phases.values())
    d = views.estimate_fields(est)
    assert d["source"] == "simulated" and d["phases_gib"] and d["simulation"]["ops"] > 0
    assert any("speed is the analytical model's" in n for n in d["notes"])


def test_cache_answers_without_tracing(tmp_path, tiny, gpu, monkeypatch):
    est = SimulatedEstimator(cache_dir=tmp_path)
    first = est.estimate(tiny, gpu, _plan())

    def no_trace(*a, **k):
        raise AssertionError("traced although the cache holds the result")

    import advisor.simulated.trace as traced

    monkeypatch.setattr(traced, "trace_step", no_trace)
    again = SimulatedEstimator(cache_dir=tmp_path).estimate(tiny, gpu, _plan(gpu_id="a100-80gb"))
    assert again.memory.allocated_peak_bytes == first.memory.allocated_peak_bytes
    with pytest.raises(AssertionError):  # another plan is another key
        est.estimate(tiny, gpu, _plan(micro_batch=4))


def test_cache_key_covers_config_plan_and_versions(tiny):
    cfg = hf_config(tiny)
    v = simulated.library_versions()
    key = cache_key(cfg, _plan(), v)
    assert key == cache_key(cfg, _plan(gpu_id="h100-80gb"), v)  # memory does not depend on which GPU
    assert key != cache_key(cfg, _plan(lora_r=8), v)
    assert key != cache_key({**cfg, "hidden_size": 128}, _plan(), v)
    assert key != cache_key(cfg, _plan(), {**v, "transformers": "0.0"})


def test_cache_ignores_a_corrupt_entry(tmp_path, tiny):
    cache = TraceCache(tmp_path)
    key = cache_key(hf_config(tiny), _plan())
    cache.path(key).parent.mkdir(parents=True)
    cache.path(key).write_text("{not json")
    assert cache.get(key) is None


def test_multi_gpu_plans_are_a_clear_error(tmp_path, tiny, gpu):
    with pytest.raises(InvalidInputError) as err:
        SimulatedEstimator(cache_dir=tmp_path).estimate(tiny, gpu, _plan(num_gpus=2, sharding="fsdp"))
    assert err.value.field == "num_gpus"


def test_other_stacks_keep_adapters_in_the_model_dtype(tmp_path, tiny, gpu):
    """litgpt / torchtune plans: the same code with their dtype conventions, said in the notes."""
    est = SimulatedEstimator(cache_dir=tmp_path)
    hf = est.estimate(tiny, gpu, _plan(dtype="bf16"))
    tt = est.estimate(tiny, gpu, _plan(dtype="bf16", framework="torchtune", chunked_loss=True))
    assert tt.memory.components["adapters"] * 2 == hf.memory.components["adapters"]  # bf16 vs fp32
    assert any("torchtune plan traced" in n for n in tt.notes)
    assert any("chunked cross-entropy" in n for n in tt.notes)


def test_missing_train_extra_is_a_clear_error(tmp_path, tiny, gpu, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(InvalidInputError) as err:
        AdvisorService().estimate(tiny, gpu, _plan(), source="simulated")
    assert err.value.field == "source" and "train extra" in str(err.value)


def test_every_catalog_family_builds_with_the_spec_parameter_count():
    """hf_config rebuilds each family's real architecture: built on the meta device, it has the
    spec's parameters, T5 included (transformers 5 ties its lm_head and so does the spec)."""
    from advisor.stack.build import build_meta

    cat = default_catalog()
    plan = _plan(method="full", dtype="bf16", master_weights=False)
    for name in ("tinyllama-1.1b", "mistral-7b", "qwen2.5-0.5b", "gemma-2b", "gemma-2-2b", "phi-3-mini", "phi-1.5"):
        spec = cat.model(name)
        n = build_meta(hf_config(spec), plan).param_count
        assert n == spec.param_count, name
    for name in ("gpt2", "stablelm-base-alpha-3b", "t5-xl"):
        spec = cat.model(name)
        assert build_meta(hf_config(spec), plan).param_count == spec.param_count, name


def test_a_deadline_kills_the_trace(tiny):
    cfg = hf_config(replace(tiny, num_layers=2))
    with pytest.raises(TimeoutError):
        trace_in_subprocess(cfg, _plan(), ["q_proj", "v_proj"], timeout_s=0.2)


# ---- service and CLI ------------------------------------------------------------------------------
def test_service_estimate_source_simulated(tmp_path, monkeypatch, tiny, gpu):
    monkeypatch.setenv(simulated.CACHE_ENV, str(tmp_path))
    svc = AdvisorService()
    out = views.estimate_fields(svc.estimate(tiny, gpu, _plan(), source="simulated").estimate)
    ana = views.estimate_fields(svc.estimate(tiny, gpu, _plan(), source="analytical").estimate)
    assert out["source"] == "simulated" and ana["source"] == "analytical"
    assert set(out["phases_gib"]) == set(simulated.PHASES) and out["simulation"]["ops"] > 0
    assert list(tmp_path.rglob("*.json"))  # stored in the configured cache dir


def test_recommend_simulates_the_top_plans_within_budget(tmp_path, monkeypatch):
    monkeypatch.setenv(simulated.CACHE_ENV, str(tmp_path))
    req = RecommendRequest(
        model=TINY,
        gpus=("rtx-4090",),
        workload=Workload(dataset_tokens=1_000_000, seq_len=64),
        simulate_top=1,
        simulate_budget_s=300,
    )
    res = views.as_json(views.recommend_response(AdvisorService().recommend(req)))
    (sim,) = res["simulations"]
    top = res["plans"][0]
    assert sim["rank"] == 1 and sim["plan_id"] == top["plan"]["id"] and not sim["cached"]
    assert sim["peak_memory_gib"] > 0 and sim["fits"] is True
    assert sim["analytical_peak_memory_gib"] == top["peak_memory_gib"]
    assert AdvisorService().recommend(replace(req, simulate_top=0)).simulations is None
    with pytest.raises(InvalidInputError) as err:
        AdvisorService().recommend(replace(req, simulate_top=50))
    assert err.value.field == "simulate_top"


def test_recommend_budget_spent_skips_untraced_plans(tmp_path, monkeypatch):
    monkeypatch.setenv(simulated.CACHE_ENV, str(tmp_path))
    req = RecommendRequest(
        model=TINY, gpus=("rtx-4090",), workload=Workload(seq_len=64), simulate_top=3, simulate_budget_s=1e-9
    )
    sims = AdvisorService().recommend(req).simulations
    assert sims and all("skipped" in s for s in sims)


def test_cli_estimate_source_simulated(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(simulated.CACHE_ENV, str(tmp_path / "cache"))
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    argv = ["estimate", "--model", str(cfg), "--gpu", "rtx-4090", "--method", "qlora", "--seq-len", "64"]
    assert main([*argv, "--source", "simulated", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["source"] == "simulated" and d["simulation"]["traced_peak_gib"] * GIB > 0
    assert main([*argv, "--source", "simulated"]) == 0  # the table, from the cache
    out = capsys.readouterr().out
    assert "traced live GiB: after weights" in out and "source simulated" in out
    assert main([*argv, "--source", "simulated", "--num-gpus", "2"]) == 2
    assert "--num-gpus" in capsys.readouterr().err


def test_module_imports_without_torch():
    """The estimator lives in the pure core's package: torch is imported only when a trace runs."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from advisor.catalog import default_catalog\n"
        "from advisor.families import hf_config\n"
        "from advisor.simulated import SimulatedEstimator\n"
        "SimulatedEstimator(); hf_config(default_catalog().model('llama-2-7b'))\n"
        "print(','.join(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# ---- LoRA on the head / the embedding and modules_to_save, refereed by the trace ----------------------------
WIDE_VOCAB = dict(TINY, vocab_size=8192, hidden_size=128, intermediate_size=256)


@pytest.mark.parametrize(
    "method, kw",
    [
        ("lora", dict(lora_targets=("all-linear", "lm_head"))),
        ("lora", dict(lora_targets=("q", "v", "embed_tokens"))),
        ("lora", dict(modules_to_save=("lm_head",))),
        ("qlora", dict(modules_to_save=("embed_tokens",))),
        # the trained head's gradient is alive through the blocks' backward (fp32 under QLoRA)
        (
            "qlora",
            dict(modules_to_save=("lm_head",), dtype="fp32", grad_checkpointing=False, micro_batch=1, seq_len=64),
        ),
        ("dora", dict(lora_targets=("q", "v", "embed_tokens"))),
        ("dora", dict(lora_targets=("all-linear", "lm_head"), grad_checkpointing=False)),
        # the head's weight-norm temporaries come once at the end of forward, not with a recomputed block
        ("dora", dict(lora_targets=("all-linear", "lm_head"), micro_batch=1, seq_len=16)),
    ],
)
def test_analytical_matches_the_trace_on_head_and_embedding_adapters(tmp_path, gpu, method, kw):
    """Before: refused (unknown LoRA target, no modules_to_save field). The copies and adapters are traced
    (peft builds them) and the analytical count stays within 2% of the traced allocated peak."""
    from advisor.estimators.analytical import AnalyticalEstimator

    model = model_from_config(WIDE_VOCAB, name="tiny-llama-wide-vocab")
    plan = _plan(**{"method": method, "dtype": "bf16", "seq_len": 128, **kw})
    sim = SimulatedEstimator(cache_dir=tmp_path).estimate(model, gpu, plan)
    bare = SimulatedEstimator(cache_dir=tmp_path).estimate(model, gpu, _plan(method=method, dtype="bf16", seq_len=128))
    ana = AnalyticalEstimator().estimate(model, gpu, plan)
    s, a = sim.memory.allocated_peak_bytes, ana.memory.allocated_peak_bytes
    assert abs(a - s) <= 0.02 * s, (a / GIB, s / GIB)
    assert sim.trace.phases["after_weights"] > bare.trace.phases["after_weights"]  # something more was built


def test_the_builder_trains_what_the_plan_counts():
    """The real builder (jobs, calibration) builds modules_to_save and LoRA on the head: its trainable
    parameters are the analytical count; a module the model lacks is a clear error, not silently skipped."""
    from advisor.estimators.analytical import AnalyticalEstimator
    from advisor.stack.build import build

    model = model_from_config(WIDE_VOCAB, name="tiny")
    plan = _plan(dtype="fp32", lora_targets=("q", "lm_head"), modules_to_save=("embed_tokens",))
    built = build(dict(WIDE_VOCAB), plan, device="cpu")
    assert built.trainable_params == AnalyticalEstimator().terms(model, plan)["trainable_params"]
    built.train_step(built.random_batch())  # one real step runs


# ---- analytical fixes the random referee found (bench/simulated_referee.py --random) ----------------------------
LONG_EAGER = dict(
    TINY, model_type="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=4, max_position_embeddings=4096
)
GPT2_TINY = dict(model_type="gpt2", n_embd=128, n_inner=512, n_layer=2, n_head=4, vocab_size=1000, n_positions=4096)


@pytest.mark.parametrize(
    "config, kw",
    [
        # eager attention's softmax backward (two more fp32 s x s per head): was 30-47% low
        (LONG_EAGER, dict(method="lora", attention="eager", grad_checkpointing=False)),
        (LONG_EAGER, dict(method="lora", attention="eager", grad_checkpointing=True)),
        # GPT-2's attention dropout on the probabilities (output + bool mask, s x s per head): was 34% low
        (GPT2_TINY, dict(method="full", attention="eager", grad_checkpointing=False, dtype="fp32")),
        # full fine-tuning under AMP in an RMSNorm decoder: fp32 normalised outputs and one half input cast per
        # linear: was 8-10% low
        (dict(TINY, hidden_size=256, intermediate_size=512, num_hidden_layers=4), dict(method="full")),
        # ... and GPT-2's gelu_new composite runs in fp32 under AMP (torch.pow autocasts): was 12-15% low; the
        # head's half copy autocast keeps (vocab x hidden) was missing too
        (
            dict(GPT2_TINY, n_layer=4, n_embd=256, n_inner=1024),
            dict(method="full", seq_len=512, micro_batch=4, grad_checkpointing=False),
        ),
        (
            dict(TINY, vocab_size=64000, num_hidden_layers=1, hidden_size=512, intermediate_size=1024),
            dict(method="full", seq_len=512, grad_checkpointing=False),
        ),
    ],
)
def test_analytical_matches_the_trace_where_the_random_referee_found_it_wrong(tmp_path, gpu, config, kw):
    from advisor.estimators.analytical import AnalyticalEstimator

    model = model_from_config(config, name="tiny")
    plan = _plan(**{"micro_batch": 2, "seq_len": 1024, "dtype": "bf16", **kw})
    s = SimulatedEstimator(cache_dir=tmp_path).estimate(model, gpu, plan).memory.allocated_peak_bytes
    a = AnalyticalEstimator().estimate(model, gpu, plan).memory.allocated_peak_bytes
    assert abs(a - s) <= 0.03 * s, (a / GIB, s / GIB)


def test_paged_state_buffers_never_enter_the_device_peak(tmp_path, gpu):
    """bitsandbytes allocates paged states with cudaMallocManaged: not even for an instant in the device count.
    Before, the meter counted each buffer between its creation and mark_paged: the optimiser step of a full
    fine-tuning plan peaked one largest-parameter higher (-11% to -13% in the random referee)."""
    from advisor.estimators.analytical import AnalyticalEstimator

    model = model_from_config(dict(TINY, vocab_size=32000, hidden_size=128), name="tiny")
    plan = _plan(method="full", dtype="fp32", optimizer="paged-adamw-32bit", seq_len=32, micro_batch=1)
    est = SimulatedEstimator(cache_dir=tmp_path).estimate(model, gpu, plan)
    assert est.trace.paged_bytes > 0
    a = AnalyticalEstimator().estimate(model, gpu, plan).memory.allocated_peak_bytes
    assert abs(a - est.memory.allocated_peak_bytes) <= 0.02 * est.memory.allocated_peak_bytes
