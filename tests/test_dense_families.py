"""The 2025-2026 dense families (Qwen3, Gemma-3, Llama-3.3, Mistral-Small, Phi-4, OLMo-2/3, SmolLM3, Granite,
EXAONE-4, Ministral, Seed-OSS): advisor reads their config.json as transformers' own class builds the model.

The truth is transformers itself: each config is instantiated on the meta device (no memory, no weights) and its
parameters counted; `model_from_config(cfg).param_count` must equal that count exactly, and the config.json
advisor rebuilds from the spec (`hf_config`, what the simulated referee traces) must build the same model.
"""

import json
from pathlib import Path

import pytest

from advisor.catalog import model_from_config
from advisor.families import hf_config
from advisor.families.llama import layer_types, qk_norm_params

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

HUB_CONFIGS = Path(__file__).resolve().parent.parent / "reference" / "hub_configs"

#: google/gemma-3-1b-pt config.json as published (huggingface.co/google/gemma-3-1b-pt/blob/main/config.json,
#: read 2025-03): no tie_word_embeddings key: Gemma3TextConfig ties (999,885,952 parameters, "1B")
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
    "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
    "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144,
}  # fmt: skip

#: shrunk configs with each type's own quirks (the keys their published config.json files use): widths and
#: vocabularies small, layer counts that show the sliding-window patterns
SHRUNK = {
    "qwen3": dict(model_type="qwen3", hidden_size=256, intermediate_size=768, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64, vocab_size=1000, tie_word_embeddings=True,
                  use_sliding_window=False, sliding_window=None, max_window_layers=3),
    "qwen3-bare": dict(model_type="qwen3", hidden_size=256, num_hidden_layers=2, num_attention_heads=32,
                       vocab_size=1000),
    "gemma3_text": dict(GEMMA3_1B, hidden_size=128, intermediate_size=384, num_hidden_layers=7, head_dim=64,
                        num_attention_heads=4, num_key_value_heads=1, vocab_size=1000, sliding_window=16),
    "gemma3_text-layer_types": dict(model_type="gemma3_text", hidden_size=128, intermediate_size=384,
                                    num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                    vocab_size=1000, sliding_window=32,
                                    layer_types=["sliding_attention", "full_attention"] * 2),
    # Llama-3.3-70B: rope_scaling llama3, GQA 8, untied
    "llama": dict(model_type="llama", hidden_size=256, intermediate_size=896, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=1280, tie_word_embeddings=False,
                  rope_scaling={"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                  rope_theta=500000.0, max_position_embeddings=131072),
    # Mistral-Small-24B: head_dim 128 with hidden 5120 and 32 heads (q is 4096 wide), no sliding window
    "mistral": dict(model_type="mistral", hidden_size=320, intermediate_size=1024, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=128, vocab_size=1000, sliding_window=None),
    "mistral-v0.1": dict(model_type="mistral", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, sliding_window=64),
    "ministral": dict(model_type="ministral", hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=1000, sliding_window=64,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    # Phi-4 (phi3, GQA 10 of 40, untied) and Phi-4-mini (partial rotary 0.75, tied)
    "phi3": dict(model_type="phi3", hidden_size=320, intermediate_size=1120, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False,
                 pad_token_id=None),
    "phi3-mini": dict(model_type="phi3", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True,
                      partial_rotary_factor=0.75, pad_token_id=None),
    "olmo2": dict(model_type="olmo2", hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, vocab_size=1000, pad_token_id=None,
                  eos_token_id=None),
    "olmo3": dict(model_type="olmo3", hidden_size=256, intermediate_size=688, num_hidden_layers=5,
                  num_attention_heads=8, num_key_value_heads=8, vocab_size=1000, sliding_window=32,
                  pad_token_id=None, eos_token_id=None),
    "smollm3": dict(model_type="smollm3", hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2, vocab_size=1000, pad_token_id=None,
                    no_rope_layer_interval=4, no_rope_layers=[1, 1, 1, 0]),
    "granite": dict(model_type="granite", hidden_size=256, intermediate_size=640, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True,
                    embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0078125,
                    logits_scaling=8.0, pad_token_id=None),
    "exaone4": dict(model_type="exaone4", hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2, vocab_size=1000, sliding_window=32,
                    sliding_window_pattern=4, tie_word_embeddings=True, pad_token_id=None),
    "exaone4-global": dict(model_type="exaone4", hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=2, vocab_size=1000, sliding_window=None,
                           layer_types=["full_attention"] * 2, pad_token_id=None),
    "seed_oss": dict(model_type="seed_oss", hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=32, vocab_size=1000, pad_token_id=None),
}  # fmt: skip


def _meta_model(cfg: dict):
    d = dict(cfg)
    config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        return config, transformers.AutoModelForCausalLM.from_config(config)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are one parameter


@pytest.mark.parametrize("name", sorted(SHRUNK))
def test_param_count_is_the_transformers_class_count(name):
    cfg = SHRUNK[name]
    spec = model_from_config(json.loads(json.dumps(cfg)))
    config, model = _meta_model(cfg)
    assert spec.note == "", spec.note  # read by its own model_type's mapping, not as a generic Llama
    assert spec.param_count == _count(model), (spec.param_count, _count(model))
    assert spec.tie_word_embeddings == (model.lm_head.weight is model.get_input_embeddings().weight)
    # the sliding-window layout is the config class's
    types = getattr(config, "layer_types", None)
    if types is not None and (spec.sliding_window or "sliding_attention" in types):
        assert layer_types(spec) == list(types)
        assert spec.sliding_window == config.sliding_window
    # one RMSNorm on q and k: what the layer holds
    layer = model.model.layers[0]
    norms = [n for n, _ in layer.named_parameters() if n.endswith(("q_norm.weight", "k_norm.weight"))]
    assert spec.qk_norm == bool(norms)
    assert qk_norm_params(spec) == sum(p.numel() for n, p in layer.named_parameters() if n in norms)


@pytest.mark.parametrize("name", sorted(SHRUNK))
def test_rebuilt_config_builds_the_same_model(name):
    """`hf_config` (what the simulated referee traces) rebuilds the same class with the same parameters and
    the same local / global layers; reading it back gives the same spec."""
    spec = model_from_config(json.loads(json.dumps(SHRUNK[name])))
    rebuilt = hf_config(spec)
    assert rebuilt["model_type"] == SHRUNK[name]["model_type"]
    config, model = _meta_model(rebuilt)
    orig_config, orig = _meta_model(SHRUNK[name])
    assert type(model) is type(orig) and _count(model) == _count(orig) == spec.param_count
    assert getattr(config, "layer_types", None) == getattr(orig_config, "layer_types", None)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in orig.named_parameters()]
    back = model_from_config(rebuilt)
    assert back.param_count == spec.param_count and back.blocks == spec.blocks
    for f in ("qk_norm", "sliding_window", "sliding_window_pattern", "model_type", "norms_per_layer", "hidden_act"):
        assert getattr(back, f) == getattr(spec, f), f


def test_gemma3_1b_without_tie_key_is_tied():
    """The issue's bug: Gemma-3-1B's config.json has no tie_word_embeddings; Gemma3TextConfig ties: 1.00B."""
    spec = model_from_config(dict(GEMMA3_1B))
    assert "tie_word_embeddings" not in GEMMA3_1B
    assert spec.tie_word_embeddings and spec.qk_norm and spec.norms_per_layer == 4
    assert (spec.sliding_window, spec.sliding_window_pattern, spec.sliding_layers) == (512, 6, 22)
    _, model = _meta_model(GEMMA3_1B)
    assert spec.param_count == _count(model) == 999_885_952


DENSE_TYPES = {
    "llama", "mistral", "ministral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "olmo3",
    "smollm3", "granite", "exaone4", "seed_oss",
}  # fmt: skip


def _hub_configs():
    """The stored published configs of the dense types (MoE ones are tests/test_hub_configs.py's)."""
    paths = sorted(HUB_CONFIGS.glob("*/*/config.json")) if HUB_CONFIGS.is_dir() else []
    return [p for p in paths if json.loads(p.read_text()).get("model_type") in DENSE_TYPES]


@pytest.mark.parametrize("path", _hub_configs(), ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_published_configs_count_as_transformers_builds_them(path):
    """Real published config.json files (reference/hub_configs, helper-collected copies): the parameter count
    advisor reads is the one transformers' class builds, at full size, on the meta device."""
    cfg = json.loads(path.read_text())
    spec = model_from_config(dict(cfg))
    clean = {k: v for k, v in cfg.items() if k not in ("architectures", "auto_map", "_name_or_path")}
    _, model = _meta_model(clean)
    assert spec.param_count == _count(model)


# ---- memory: the family's own terms against the trace of transformers' class ---------------------------------
_TRACE_BASE = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    head_dim=64, vocab_size=512, pad_token_id=None, eos_token_id=None, bos_token_id=None, tie_word_embeddings=False,
)  # fmt: skip


def _peaks(tmp_path, cfg: dict, **plan_fields) -> tuple[int, int]:
    from advisor.catalog import default_catalog
    from advisor.estimators.analytical import AnalyticalEstimator
    from advisor.plans import TrainingPlan
    from advisor.simulated import SimulatedEstimator

    gpu = default_catalog().gpu("h100-80gb")
    spec = model_from_config(dict(_TRACE_BASE, **cfg))
    plan = TrainingPlan(
        gpu_id=gpu.id, dtype="bf16", micro_batch=2, seq_len=512, grad_checkpointing=False, **plan_fields
    )
    sim = SimulatedEstimator(cache_dir=tmp_path)
    return (
        AnalyticalEstimator().estimate(spec, gpu, plan).memory.allocated_peak_bytes,
        sim.estimate(spec, gpu, plan).memory.allocated_peak_bytes,
    )


@pytest.mark.needs_torch
@pytest.mark.slow
@pytest.mark.parametrize(
    "pair, plan",
    [
        # qk-norm (Qwen3): q_norm / k_norm keep fp32 q and k (+ the normalised copies with trainable weights)
        (({"model_type": "llama"}, {"model_type": "qwen3"}), dict(method="lora", lora_targets=("all-linear",))),
        (({"model_type": "llama"}, {"model_type": "qwen3"}), dict(method="full")),
        # OLMo-2: q / k norms over the whole projections, weights multiplied in fp32
        (({"model_type": "llama"}, {"model_type": "olmo2"}), dict(method="full")),
        # Gemma-3: a window shorter than the sequence makes SDPA masks and repeated k / v on the sliding layers
        (
            ({"model_type": "gemma3_text", "sliding_window": 4096}, {"model_type": "gemma3_text", "sliding_window": 128}),
            dict(method="lora", lora_targets=("all-linear",)),
        ),
        (
            ({"model_type": "gemma3_text", "sliding_window": 4096}, {"model_type": "gemma3_text", "sliding_window": 128}),
            dict(method="qlora", lora_targets=("q", "v")),
        ),
        # EXAONE-4 post-norms under AMP: the norms read half outputs
        (({"model_type": "qwen3"}, {"model_type": "exaone4", "sliding_window": None,
                                    "layer_types": ["full_attention"] * 3}), dict(method="full")),
    ],
)  # fmt: skip
def test_family_terms_move_the_estimate_as_they_move_the_trace(tmp_path, pair, plan):
    """What a family adds over its neighbour (no checkpointing: every layer's saved tensors at the peak) is the
    same in the analytical model as in the trace of transformers' own class, to 0.1 MiB."""
    (a0, s0), (a1, s1) = (_peaks(tmp_path, cfg, **plan) for cfg in pair)
    assert s1 != s0  # the feature costs memory in the trace
    assert abs((a1 - a0) - (s1 - s0)) < 0.1 * 2**20, ((a1 - a0) / 2**20, (s1 - s0) / 2**20)


def test_bad_sliding_window_is_refused():
    from advisor.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="sliding_window must be positive"):
        model_from_config(dict(SHRUNK["mistral-v0.1"], sliding_window=0))
