"""GET /v1/gpus and /v1/catalog/models: the catalogs with their sources and dates."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi.testclient import TestClient


def test_gpu_catalog_lists_every_gpu_with_price_sources_and_dates(client: TestClient, app) -> None:
    d = client.get("/v1/gpus").json()
    assert d["count"] == len(d["gpus"]) == len(app.state.service.catalog.gpus)
    priced = [g for g in d["gpus"] if g["price_usd_per_hour"] is not None]
    assert priced and all(g["price_date"] and g["price_source"] for g in priced)
    assert all(g["spec_source"] for g in d["gpus"])


def test_gpu_by_id_or_alias_and_404_with_suggestions(client: TestClient) -> None:
    assert client.get("/v1/gpus/rtx-4090").json()["id"] == "rtx-4090"
    assert client.get("/v1/gpus/NVIDIA A100 80GB").json()["id"] == "a100-80gb"
    r = client.get("/v1/gpus/rtx-409")
    assert r.status_code == 404 and r.json()["code"] == "unknown_gpu" and r.json()["suggestions"]


def test_model_catalog_and_lookup_by_hf_id_with_a_slash(client: TestClient) -> None:
    d = client.get("/v1/catalog/models").json()
    assert d["count"] == len(d["models"]) > 10
    assert all(m["source"] for m in d["models"])
    m = client.get("/v1/catalog/models/meta-llama/Llama-2-7b-hf").json()
    assert m["name"] == "llama-2-7b" and m["params"] == m["published_params"] == 6738415616
    assert "q_proj" in m["lora_module_names"]
    assert client.get("/v1/catalog/models/llama-2-7b").json()["hf_id"] == "meta-llama/Llama-2-7b-hf"


def test_model_lookup_is_catalog_only(client: TestClient) -> None:
    r = client.get("/v1/catalog/models/lama-2-7b")
    assert r.status_code == 404 and "llama-2-7b" in r.json()["suggestions"]
    # a size is something /v1/recommend accepts, but it is not a catalog entry
    assert client.get("/v1/catalog/models/13B").status_code == 404
    assert client.get("/v1/catalog/models/gpt-4").json()["code"] == "closed_model"


def test_catalog_override_files_from_settings(make_app, tmp_path: Path) -> None:
    gpu = {
        "id": "my-card",
        "name": "My Card 48GB",
        "memory_gib": 44.5,
        "memory_gb": 48,
        "bf16_tflops": 150,
        "fp16_tflops": 150,
        "fp32_tflops": 40,
        "memory_bandwidth_gbps": 900,
        "bf16_supported": True,
        "price_usd_per_hour": 0.9,
    }
    gpu_file = tmp_path / "gpus.json"
    gpu_file.write_text(json.dumps({"gpus": [gpu]}))
    price_file = tmp_path / "prices.json"
    price_file.write_text(json.dumps({"prices": {"t4": {"price_usd_per_hour": 0.1, "price_date": "2026-01-02"}}}))
    app = make_app(gpu_files=[gpu_file], price_file=price_file)
    with TestClient(app) as c:
        assert c.get("/v1/gpus/my-card").json()["memory_gib"] == 44.5
        t4 = c.get("/v1/gpus/t4").json()
        assert t4["price_usd_per_hour"] == 0.1 and t4["price_date"] == "2026-01-02"
        r = c.post("/v1/recommend", json={"model": "llama-2-7b", "gpu": "my-card"})
        assert r.status_code == 200 and r.json()["plans"][0]["gpu"]["id"] == "my-card"
