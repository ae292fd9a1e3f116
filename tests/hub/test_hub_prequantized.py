"""Pre-quantized Hub checkpoints (GPTQ, AWQ, FP8, bitsandbytes 4-bit) through the test hub: the stored bytes come
from the checkpoint's safetensors metadata, the parameter count stays the architecture's, adapters train on the
stored weights and what cannot run (full fine-tuning, QLoRA on another quantiser, DoRA on GPTQ) is a clear 4xx."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hub_checkpoints import parameter_total
from hub_quantized import quantized_checkpoint_files, stored_bytes
from hub_server import HubHandle, make_repo

from advisor.api.app import create_app
from advisor.api.settings import Settings
from advisor.catalog import default_catalog, model_from_config
from advisor.errors import InvalidInputError
from advisor.estimators.analytical import AnalyticalEstimator
from advisor.hub import HubOptions, resolve_hub_model
from advisor.plans import make_plan
from advisor.prequant import build

DATA = Path(__file__).parent / "data"
GPTQ, AWQ, FP8, BNB = (
    "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4",
    "Qwen/Qwen2.5-7B-Instruct-AWQ",
    "Qwen/Qwen3-8B-FP8",
    "unsloth/Llama-3.2-1B-Instruct-bnb-4bit",
)
#: parameters of the unquantized models as their Hub pages state them (Qwen2.5-7B-Instruct 7.62B, Qwen3-8B 8.19B,
#: Llama-3.2-1B-Instruct 1.24B)
PUBLISHED = {GPTQ: 7.62e9, AWQ: 7.62e9, FP8: 8.19e9, BNB: 1.24e9}
#: (quant_method, bits, group size) each repo's quantization_config states
SETTINGS = {GPTQ: ("gptq", 4, 128), AWQ: ("awq", 4, 128), FP8: ("fp8", 8, None), BNB: ("bitsandbytes", 4, 64)}


def _config(repo: str) -> dict:
    return json.loads((DATA / repo / "config.json").read_text())


@pytest.fixture(scope="module")
def quant_hub(test_hub: HubHandle) -> HubHandle:
    """The four repos on the session's test hub; AWQ's without the model-info summary (headers read instead)."""
    for repo in PUBLISHED:
        cfg = _config(repo)
        files = {"config.json": json.dumps(cfg).encode(), **quantized_checkpoint_files(cfg)}
        test_hub.state.add(make_repo(repo, files, api_safetensors=repo != AWQ))
    return test_hub


def _files(hub: HubHandle, repo: str) -> dict:
    r = hub.state.repos[repo]
    return r.commits[r.refs["main"]].files


def _weights(spec, method: str, **plan) -> float:
    gpu = default_catalog().gpu("h100")
    est = AnalyticalEstimator().estimate(spec, gpu, make_plan(method, gpu, **plan))
    return est.memory.components["weights"]


@pytest.mark.parametrize("repo", list(PUBLISHED))
def test_storage_from_the_checkpoint_and_the_architecture_count(quant_hub: HubHandle, hf_cache, repo: str):
    spec = resolve_hub_model(repo, options=HubOptions(endpoint=quant_hub.url))
    files = _files(quant_hub, repo)
    pq = spec.prequantized
    assert pq is not None and (pq.method, pq.bits, pq.group_size) == SETTINGS[repo]
    assert abs(spec.param_count - PUBLISHED[repo]) / PUBLISHED[repo] < 0.005  # unpacked, not the stored elements
    assert pq.source == "checkpoint" and pq.storage_bytes == stored_bytes(files)
    assert spec.checkpoint_params == parameter_total(files)  # what the checkpoint states: packed elements
    if pq.method in ("gptq", "awq"):
        assert spec.checkpoint_params < 0.8 * spec.param_count  # eight 4-bit weights per int32 element
        assert "not the checkpoint's" in spec.note
    assert "pre-quantized" in spec.note and "safetensors" in spec.note
    assert 0 < pq.quantized_bytes < pq.storage_bytes
    # the config alone (no metadata) gives the same order of storage, and says it is from the config
    alone = build(model_from_config(_config(repo)), _config(repo), repo, None, "not read")
    assert alone.source == "config" and "not read" in alone.basis
    assert abs(alone.storage_bytes - pq.storage_bytes) / pq.storage_bytes < 0.01


@pytest.mark.parametrize("repo", list(PUBLISHED))
def test_lora_frozen_weights_are_the_stored_bytes(quant_hub: HubHandle, hf_cache, repo: str):
    """LoRA in bf16: the quantised linears as stored, the rest in bf16 (= the stored F16/BF16) -> the file's bytes."""
    spec = resolve_hub_model(repo, options=HubOptions(endpoint=quant_hub.url))
    stored = stored_bytes(_files(quant_hub, repo))
    assert _weights(spec, "lora", dtype="bf16", grad_checkpointing=True) == stored
    bf16 = 2 * spec.param_count
    assert stored < 0.75 * bf16  # not the bf16 weights the estimate assumed before


def test_gptq_keeps_its_dequantised_weights_for_backward(quant_hub: HubHandle, hf_cache):
    """gptqmodel's torch kernel: matmul(x, dequantised) saves the dequantised weight: without checkpointing all
    linears' copies are alive at the end of forward; the dequantisation traffic is counted as QLoRA's."""
    spec = resolve_hub_model(GPTQ, options=HubOptions(endpoint=quant_hub.url))
    pq = spec.prequantized
    gpu = default_catalog().gpu("h100")
    plan = make_plan("lora", gpu, dtype="bf16", grad_checkpointing=False)
    est = AnalyticalEstimator().estimate(spec, gpu, plan)
    assert est.memory.components["weights"] == pq.storage_bytes + 2 * pq.quantized_params
    terms = AnalyticalEstimator().plan_terms(spec, plan)
    assert terms.memory_traffic_bytes >= pq.quantized_bytes + 4 * pq.quantized_params


@pytest.mark.parametrize(
    ("repo", "method", "plan", "field", "words"),
    [
        (GPTQ, "full", {}, "method", "full fine-tuning needs the unquantized base"),
        (FP8, "full", {}, "method", "full fine-tuning needs the unquantized base"),
        (AWQ, "qlora", {}, "method", "cannot be quantised again"),
        (GPTQ, "dora", {}, "method", "does not support DoRA"),
        (FP8, "dora", {}, "method", "without its block scales"),
        (BNB, "lora", {"num_gpus": 2, "sharding": "fsdp"}, "sharding", "bnb_4bit_quant_storage uint8"),
    ],
)
def test_what_cannot_train_is_refused_naming_the_field(
    quant_hub: HubHandle, hf_cache, repo: str, method: str, plan: dict, field: str, words: str
):
    spec = resolve_hub_model(repo, options=HubOptions(endpoint=quant_hub.url))
    with pytest.raises(InvalidInputError) as exc:
        _weights(spec, method, **plan)
    assert exc.value.field == field and words in str(exc.value) and "To fix:" in str(exc.value)
    if method == "full":
        assert "Qwen/" in str(exc.value) and "use lora" in str(exc.value)  # the base to name, and the way out


def test_bnb_4bit_checkpoint_is_qlora_with_its_own_settings(quant_hub: HubHandle, hf_cache):
    spec = resolve_hub_model(BNB, options=HubOptions(endpoint=quant_hub.url))
    pq = spec.prequantized
    assert (pq.quant_type, pq.double_quant, pq.quant_storage) == ("nf4", True, "uint8")
    stored = pq.storage_bytes
    # the plan's double_quant does not change what the checkpoint stores
    for dq in (True, False):
        assert _weights(spec, "qlora", dtype="bf16", double_quant=dq, kbit_upcast=False) == stored
    # k-bit preparation upcasts the unquantised rest (embeddings, norms) to fp32
    other = spec.param_count - pq.quantized_params
    assert _weights(spec, "qlora", dtype="bf16", kbit_upcast=True) == pq.quantized_bytes + 4 * other
    assert _weights(spec, "dora", dtype="bf16") == stored  # peft's DoRA dequantises bitsandbytes weights


def test_http_shows_the_quantization_and_refuses_full(quant_hub: HubHandle, hf_cache, tmp_path: Path):
    with TestClient(create_app(Settings(data_dir=tmp_path / "data", hub_endpoint=quant_hub.url))) as client:
        ok = client.post("/v1/estimate", json={"model": GPTQ, "gpu": "l4", "plan": {"method": "lora"}})
        assert ok.status_code == 200, ok.text
        q = ok.json()["model"]["prequantized"]
        assert (q["method"], q["bits"], q["group_size"], q["source"]) == ("gptq", 4, 128, "checkpoint")
        assert q["storage_bytes"] == stored_bytes(_files(quant_hub, GPTQ)) and q["storage_gib"] > 5
        rec = client.post(
            "/v1/recommend",
            json={"model": BNB, "gpu": "l4", "constraints": {"methods": ["lora", "qlora"], "max_gpus": 1}},
        )
        assert rec.status_code == 200, rec.text
        assert rec.json()["model"]["prequantized"]["quant_type"] == "nf4" and rec.json()["plans"]
        full = client.post("/v1/estimate", json={"model": GPTQ, "gpu": "l4", "plan": {"method": "full"}})
        assert 400 <= full.status_code < 500, full.text
        assert "method" in full.text and "unquantized base" in full.text
        # the default search keeps only what the checkpoint can run (adapters, no FSDP)
        rec = client.post("/v1/recommend", json={"model": GPTQ, "gpu": "a100-80gb", "limit": 5})
        assert rec.status_code == 200, rec.text
        plans = [p["plan"] for p in rec.json()["plans"]]
        assert plans and {p["method"] for p in plans} == {"lora"} and all(p["sharding"] != "fsdp" for p in plans)
        only_full = client.post(
            "/v1/recommend", json={"model": GPTQ, "gpu": "l4", "constraints": {"methods": ["full"]}}
        )
        assert 400 <= only_full.status_code < 500 and "unquantized base" in only_full.text
