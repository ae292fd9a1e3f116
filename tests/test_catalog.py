import json

import pytest

from advisor.catalog import (
    build_catalog,
    default_catalog,
    model_from_config,
    model_from_size,
    resolve_model,
)
from advisor.errors import ClosedModelError, InvalidInputError, UnknownGpuError, UnknownModelError

CAT = default_catalog()


#: checkpoints whose published count includes a separate lm_head that transformers 5 drops by tying
#: it to the embedding (T5: advisor/families/t5.py)
HEAD_DROPPED_AT_LOAD = {"t5-xl", "flan-t5-xl"}


@pytest.mark.parametrize("model", [m for m in CAT.models if m.published_params], ids=lambda m: m.name)
def test_parameter_count_matches_published(model):
    dropped = model.vocab_size * model.hidden_size if model.name in HEAD_DROPPED_AT_LOAD else 0
    assert abs(model.param_count + dropped - model.published_params) / model.published_params < 0.001


def test_t5_head_is_tied_whatever_config_json_says():
    """transformers 5 forces T5Config.tie_word_embeddings = True: a config.json saying false builds one
    vocab x hidden matrix, and the spec must count one (it counted two before)."""
    cfg = {
        "model_type": "t5",
        "d_model": 64,
        "d_ff": 128,
        "d_kv": 16,
        "num_layers": 2,
        "num_heads": 4,
        "vocab_size": 1000,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
    }
    spec = model_from_config(cfg)
    assert spec.tie_word_embeddings
    assert CAT.model("t5-xl").tie_word_embeddings


@pytest.mark.parametrize(
    "name,exact",
    [
        ("meta-llama/Llama-2-7b-hf", 6_738_415_616),
        ("meta-llama/Meta-Llama-3-8B", 8_030_261_248),
        ("mistralai/Mistral-7B-v0.1", 7_241_732_096),
    ],
)
def test_issue_counts(name, exact):
    assert abs(resolve_model(name).param_count - exact) / exact < 0.001


def test_every_entry_has_source_and_date():
    doc = json.loads((__import__("advisor.catalog").catalog.DATA_DIR / "models.json").read_text())
    assert doc["recorded"]
    for m in doc["models"]:
        assert m["source"].startswith("https://huggingface.co/") and "recorded" in m["source"], m["name"]
    gdoc = json.loads((__import__("advisor.catalog").catalog.DATA_DIR / "gpus.json").read_text())
    for g in gdoc["gpus"]:
        assert g["price_source"] and g["price_date"] and g["spec_source"], g["id"]


@pytest.mark.parametrize(
    "alias,name",
    [
        ("huggyllama/llama-65b", "llama-65b"),
        ("LLAMA-2-7B", "llama-2-7b"),
        ("Qwen/Qwen2.5-72B-Instruct", "qwen2.5-72b"),
        ("google/flan-t5-xl", "flan-t5-xl"),
        ("gpt2", "gpt2"),
        ("https://huggingface.co/meta-llama/Llama-2-13b-hf", "llama-2-13b"),
    ],
)
def test_model_aliases(alias, name):
    assert resolve_model(alias).name == name


def test_required_catalog_coverage():
    names = {m.name for m in CAT.models}
    for n in [
        "llama-7b",
        "llama-13b",
        "llama-33b",
        "llama-65b",
        "llama-2-7b",
        "llama-2-13b",
        "llama-2-70b",
        "llama-3-8b",
        "llama-3.1-8b",
        "llama-3-70b",
        "llama-3.1-70b",
        "mistral-7b",
        "qwen2.5-0.5b",
        "qwen2.5-1.5b",
        "qwen2.5-7b",
        "qwen2.5-14b",
        "qwen2.5-32b",
        "qwen2.5-72b",
        "gemma-2-2b",
        "gemma-2-9b",
        "gemma-2-27b",
        "phi-3-mini",
        "gpt2",
        "gpt2-medium",
        "gpt2-large",
        "gpt2-xl",
        "t5-xl",
        "flan-t5-xl",
    ]:
        assert n in names
    gpus = {g.id for g in CAT.gpus}
    for g in [
        "t4",
        "l4",
        "a10g",
        "v100-16gb",
        "v100-32gb",
        "a100-40gb",
        "a100-80gb",
        "h100-sxm",
        "h100-pcie",
        "h200",
        "l40s",
        "rtx-3060-12gb",
        "rtx-3090",
        "rtx-4090",
        "rtx-a6000",
        "mi300x",
    ]:
        assert g in gpus


def test_unknown_model_suggests_close_matches():
    with pytest.raises(UnknownModelError) as exc:
        resolve_model("llama-2-7bb")
    assert exc.value.field == "model"
    assert "llama-2-7b" in exc.value.suggestions


@pytest.mark.parametrize("name", ["gpt-4", "GPT-3.5-turbo", "openai/gpt-4o"])
def test_closed_models_are_refused_with_reason(name):
    with pytest.raises(ClosedModelError, match="weights are not published"):
        resolve_model(name)


@pytest.mark.parametrize(
    "alias,gid",
    [
        ("A100 80GB", "a100-80gb"),
        ("4090", "rtx-4090"),
        ("NVIDIA H100", "h100-sxm"),
        ("rtx 3060", "rtx-3060-12gb"),
        ("Tesla T4", "t4"),
    ],
)
def test_gpu_aliases(alias, gid):
    assert CAT.gpu(alias).id == gid


def test_unknown_gpu_suggests():
    with pytest.raises(UnknownGpuError) as exc:
        CAT.gpu("a100-90gb")
    assert exc.value.suggestions and exc.value.suggestions[0].startswith("a100")


def test_no_bf16_gpus_train_in_fp16():
    assert CAT.gpu("t4").default_dtype() == "fp16"
    assert CAT.gpu("v100-32gb").default_dtype() == "fp16"
    assert CAT.gpu("a100-80gb").default_dtype() == "bf16"


def test_size_gives_llama_shaped_assumed_model():
    m = model_from_size("13B")
    assert m.assumed and "assumed" in m.note
    assert abs(m.param_count - 13e9) / 13e9 < 0.05
    assert abs(model_from_size("350M").param_count - 350e6) / 350e6 < 0.1
    with pytest.raises(InvalidInputError):
        model_from_size("13X")


def test_config_json_path_and_directory(tmp_path):
    qwen = {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "num_hidden_layers": 24,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(qwen))
    by_dir = resolve_model(str(tmp_path))
    by_file = resolve_model(str(tmp_path / "config.json"))
    assert by_dir.param_count == by_file.param_count == 494_032_768  # Qwen2.5-0.5B, q/k/v bias implied by qwen2


def test_mistral_config_dict():
    mistral = {
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_hidden_layers": 32,
        "vocab_size": 32000,
    }
    assert model_from_config(mistral).param_count == 7_241_732_096


def test_bad_config_names_missing_fields(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(InvalidInputError, match="num_hidden_layers"):
        resolve_model(str(tmp_path))
    # a mixture of experts is modelled now (advisor/families/moe.py): its missing keys are named like any other's
    with pytest.raises(InvalidInputError, match="num_hidden_layers"):
        model_from_config({"model_type": "mixtral", "hidden_size": 1})
    with pytest.raises(InvalidInputError, match="num_hidden_layers"):
        model_from_config({"model_type": "deepseek_v3", "hidden_size": 1})


def test_user_gpu_file_and_price_override(tmp_path):
    gpu = dict(CAT.gpu("a100-80gb").to_dict(), id="my-a100", name="Our A100", aliases=["ours"], price_usd_per_hour=0.5)
    (tmp_path / "gpus.json").write_text(json.dumps({"gpus": [gpu]}))
    (tmp_path / "prices.json").write_text(
        json.dumps({"prices": {"rtx-4090": {"price_usd_per_hour": 0.2, "price_date": "2026-11-01"}}})
    )
    cat = build_catalog([tmp_path / "gpus.json"], tmp_path / "prices.json")
    assert cat.gpu("ours").price_usd_per_hour == 0.5
    assert cat.gpu("4090").price_usd_per_hour == 0.2 and cat.gpu("4090").price_date == "2026-11-01"
    (tmp_path / "bad.json").write_text(json.dumps({"prices": {"no-such-gpu": {"price_usd_per_hour": 1}}}))
    with pytest.raises(UnknownGpuError):
        build_catalog([], tmp_path / "bad.json")


@pytest.mark.parametrize(
    "change, named",
    [
        ({"interconnect_gbps": 0}, "interconnect_gbps"),  # was a ZeroDivisionError in the speed model
        ({"fp16_tflops": None}, "fp16_tflops"),  # was a TypeError
        ({"memory_bandwidth_gbps": -1}, "memory_bandwidth_gbps"),
        ({"bf16_tflops": 0}, "bf16_tflops"),
        ({"gpu_class": "quantum"}, "gpu_class"),
    ],
)
def test_a_gpu_file_with_unusable_numbers_is_refused_naming_the_field(tmp_path, change, named):
    gpu = dict(CAT.gpu("rtx-4090").to_dict(), id="my-4090", name="Our 4090", aliases=[], **change)
    (tmp_path / "gpus.json").write_text(json.dumps({"gpus": [gpu]}))
    with pytest.raises(InvalidInputError, match=named) as e:
        build_catalog([tmp_path / "gpus.json"])
    assert e.value.field == "gpu_file" and "gpus.json" in e.value.message


def test_paths_can_be_switched_off(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_attention_heads": 4,
                "num_hidden_layers": 2,
                "vocab_size": 100,
            }
        )
    )
    assert resolve_model(str(tmp_path)).num_layers == 2
    with pytest.raises(UnknownModelError, match="inline"):
        resolve_model(str(tmp_path), allow_paths=False)
