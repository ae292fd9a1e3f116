"""The published config.json files under reference/hub_configs/ against their published parameter counts.

reference/hub_configs/INDEX.json names, for every file, where it was copied from, when, the count the
model's publisher (model card or the Hub's safetensors metadata) states and, for mixture-of-experts
models, the active count. Three readers are checked against it: transformers itself (the model class
built on the meta device from the config), the advisor's own reader (advisor.catalog.model_from_config,
what a user's config.json or a Hub id goes through) and the catalog rows built from these files.
"""

from __future__ import annotations

import json
import re
from datetime import date
from pathlib import Path

import pytest

from advisor.catalog import default_catalog, model_from_config

ROOT = Path(__file__).resolve().parents[1] / "reference" / "hub_configs"
INDEX = json.loads((ROOT / "INDEX.json").read_text())["models"]
DENSE = [r for r in INDEX if r["active_params"] is None]
MOE = [r for r in INDEX if r["active_params"] is not None]

#: the issue's bar: parameter counts within 0.5% of the published count
TOLERANCE = 0.005
#: model cards give active parameters rounded to one decimal of a billion (3.3B, 3.6B, 5.1B, 37B)
ACTIVE_TOLERANCE = 0.05


def _config(row: dict) -> dict:
    return json.loads((ROOT / row["config"]).read_text())


def _rel(count: int, published: int) -> float:
    return abs(count - published) / published


@pytest.mark.parametrize("row", INDEX, ids=lambda r: r["repo"])
def test_index_row_names_its_source_and_counts(row):
    assert (ROOT / row["config"]).is_file()
    assert row["config"] == f"{row['repo']}/config.json"
    assert row["source_url"].startswith("https://") and row["mirrors"].startswith("https://huggingface.co/")
    if row["source_url"].startswith("https://github.com/"):  # a GitHub copy is named at the commit it was read at
        assert re.fullmatch(r"https://github\.com/[^/]+/[^/]+/blob/[0-9a-f]{40}/.+", row["source_url"])
    read = date.fromisoformat(row["read"])  # the day the copy was read (helpers add rows on later days)
    assert date(2026, 11, 1) <= read <= date.today() and date.fromisoformat(row["released"]) <= read
    assert isinstance(row["published_params"], int) and row["published_params"] > 0
    assert row["published_params_source"]
    if row["active_params"] is not None:
        assert row["active_params_source"] and isinstance(row["active_params_includes_input_embedding"], bool)
    assert isinstance(row["gated"], bool)
    cfg = _config(row)
    assert "model_type" in cfg and "architectures" in cfg
    if row["repo"].startswith(("meta-llama/", "google/gemma")):
        assert row["gated"], "meta-llama and gemma repos are gated on the Hub"


@pytest.mark.parametrize("row", INDEX, ids=lambda r: r["repo"])
def test_transformers_builds_the_published_count(row):
    """transformers' own model class from the config (meta device: no weights) holds the published count."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = _config(row)
    cfg.pop("quantization_config", None)  # from_config never quantizes; the key only names the checkpoint format
    cfg.pop("auto_map", None)  # remote-code classes: the native transformers class is the one to count
    cfg = cfg.get("text_config", cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    count = sum(p.numel() for p in model.parameters())
    assert _rel(count, row["published_params"]) < TOLERANCE, (count, row["published_params"])


@pytest.mark.parametrize("row", DENSE, ids=lambda r: r["repo"])
def test_advisor_reads_dense_config_at_published_count(row):
    spec = model_from_config(_config(row), name=row["repo"])
    assert spec.note == "", spec.note  # read by the family that claims the model_type, not as a fallback
    assert _rel(spec.param_count, row["published_params"]) < TOLERANCE, (spec.param_count, row["published_params"])


@pytest.mark.parametrize("row", MOE, ids=lambda r: r["repo"])
def test_advisor_reads_moe_config_at_published_total_and_active(row):
    spec = model_from_config(_config(row), name=row["repo"])
    # DeepSeek-V3 is published as block FP8: a pre-quantized base, said in its note
    assert spec.note == "" or (spec.prequantized is not None and spec.note.startswith("pre-quantized")), spec.note
    assert spec.is_moe
    assert _rel(spec.param_count, row["published_params"]) < TOLERANCE, (spec.param_count, row["published_params"])
    active = spec.active_param_count
    if not row["active_params_includes_input_embedding"]:
        # OpenAI and DeepSeek leave the input embedding table (a lookup, no compute) out of "active"
        assert not spec.tie_word_embeddings
        active -= spec.vocab_size * spec.hidden_size
    assert _rel(active, row["active_params"]) < ACTIVE_TOLERANCE, (active, row["active_params"])


def test_catalog_rows_built_from_hub_configs_match_the_files():
    """Every catalog row whose source names a reference/hub_configs file is what the advisor reads from it."""
    cat = default_catalog()
    built = [m for m in cat.models if "reference/hub_configs/" in m.source]
    assert len(built) >= 6
    by_repo = {r["repo"]: r for r in INDEX}
    for spec in built:
        row = by_repo[spec.hf_id]
        fresh = model_from_config(_config(row), name=spec.name)
        assert spec.param_count == fresh.param_count
        assert spec.published_params == row["published_params"]
        assert row["read"] in spec.source and row["published_params_source"] in spec.source


@pytest.mark.parametrize(
    "alias", ["qwen3-8b", "Qwen/Qwen3-8B", "qwen/qwen3-8b-base", "phi-4", "microsoft/phi-4", "qwen3-0.6b"]
)
def test_aliases_people_type_resolve(alias):
    assert default_catalog().model(alias).hf_id in {r["repo"] for r in INDEX}


def test_gemma3_text_config_without_tie_key_reads_tied():
    """The issue's Gemma-3-1B bug: a gemma3_text config.json without `tie_word_embeddings` must read as tied
    (transformers' Gemma3TextConfig defaults it to True): ~1.0B parameters, not 1.3B. The dims are
    google/gemma-3-1b-it's (26 layers, hidden 1152, 4 heads / 1 kv head of 256, MLP 6912, vocab 262144);
    the count is checked against transformers' own class built from the same dict."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": 1152,
        "intermediate_size": 6912,
        "max_position_embeddings": 32768,
        "num_attention_heads": 4,
        "num_hidden_layers": 26,
        "num_key_value_heads": 1,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-06,
        "sliding_window": 512,
        "vocab_size": 262144,
    }
    spec = model_from_config(cfg, name="gemma-3-1b")
    assert spec.tie_word_embeddings
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    assert model.config.tie_word_embeddings
    count = sum(p.numel() for p in model.parameters())
    assert _rel(spec.param_count, count) < TOLERANCE, (spec.param_count, count)
