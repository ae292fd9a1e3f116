"""`source: simulated` on /v1/estimate and `simulate_top` on /v1/recommend (issue 5 over HTTP)."""

import pytest
from fastapi.testclient import TestClient

from advisor.api.app import create_app
from advisor.api.settings import default_settings

pytestmark = pytest.mark.needs_torch

TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 256,
    "max_position_embeddings": 256,
}


@pytest.fixture(scope="module")
def client():
    # anonymous simulation is off by default (tests/api/test_abuse_simulation.py): opened here on purpose
    return TestClient(create_app(default_settings().model_copy(update={"simulation_without_key": True})))


def test_estimate_source_simulated(client):
    body = {
        "model": TINY,
        "gpu": "a100-80gb",
        "plan": {"method": "lora", "dtype": "fp32", "micro_batch": 2, "seq_len": 64, "grad_checkpointing": False},
        "source": "simulated",
    }
    r = client.post("/v1/estimate", json=body)
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["source"] == "simulated"
    assert any("FakeTensorMode" in n for n in d["notes"])
    analytical = client.post("/v1/estimate", json={**body, "source": "analytical"}).json()
    # tiny model: the fixed buffers dominate both; the traced and counted peaks agree closely
    assert d["allocated_peak_gib"] == pytest.approx(analytical["allocated_peak_gib"], rel=0.05)


def test_recommend_simulates_top_plans_within_bounds(client):
    r = client.post(
        "/v1/recommend",
        json={
            "model": TINY,
            "gpu": "a100-80gb",
            "simulate_top": 1,
            "simulate_budget_s": 120,
            "constraints": {"max_gpus": 1},
        },
    )
    assert r.status_code == 200, r.text
    sims = r.json()["simulations"]
    assert len(sims) == 1 and sims[0]["rank"] == 1
    assert sims[0]["skipped"] or sims[0]["peak_memory_gib"] > 0
    bad = client.post("/v1/recommend", json={"model": TINY, "gpu": "a100-80gb", "simulate_top": 50})
    assert bad.status_code == 422 and bad.json()["field"] == "simulate_top"


def test_simulation_can_be_switched_off(tmp_path):
    from advisor.api.settings import Settings

    off = TestClient(create_app(Settings(data_dir=tmp_path, allow_simulation=False)))
    r = off.post(
        "/v1/estimate", json={"model": TINY, "gpu": "a100-80gb", "plan": {"method": "lora"}, "source": "simulated"}
    )
    assert r.status_code == 422 and r.json()["field"] == "source"
    r = off.post("/v1/recommend", json={"model": TINY, "gpu": "a100-80gb", "simulate_top": 1})
    assert r.status_code == 422 and r.json()["field"] == "simulate_top"
