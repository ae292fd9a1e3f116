"""Hub ids over HTTP (the FastAPI test client, as tests/api) and through the CLI (a subprocess whose
huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_TOKEN and HF_HUB_OFFLINE from its environment)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hub_server import GATED_TOKEN, HubHandle

from advisor.api.app import create_app
from advisor.api.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
ONLY_ON_THE_HUB = "NousResearch/Meta-Llama-3.1-8B"  # not a catalog id: only the Hub knows it


def _client(tmp_path: Path, **settings) -> TestClient:
    return TestClient(create_app(Settings(data_dir=tmp_path / "data", **settings)))


def test_recommend_with_a_hub_id_answers_plans_fast_after_the_first(test_hub: HubHandle, hf_cache, tmp_path):
    with _client(tmp_path, hub_endpoint=test_hub.url) as client:
        body = {"model": ONLY_ON_THE_HUB, "gpu": "l4", "constraints": {"methods": ["qlora", "lora"]}}
        t0 = time.perf_counter()
        r = client.post("/v1/recommend", json=body)
        t1 = time.perf_counter()
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["plans"], d
        model = d["model"]
        repo = test_hub.state.repos[ONLY_ON_THE_HUB]
        assert model["hf_id"] == ONLY_ON_THE_HUB and model["revision"] == repo.refs["main"]
        assert (
            model["checkpoint_params"] and abs(model["params"] - model["checkpoint_params"]) / model["params"] < 0.005
        )
        assert model["checkpoint_dtypes"] == {"BF16": model["checkpoint_params"]}
        mark = len(test_hub.state.requests)
        t2 = time.perf_counter()
        again = client.post("/v1/recommend", json=body)
        t3 = time.perf_counter()
        assert again.status_code == 200 and test_hub.requests_since(mark) == []  # resolved once per process
        print(f"/v1/recommend with a Hub id: first {t1 - t0:.3f} s, then {t3 - t2:.3f} s")
        est = client.post(
            "/v1/estimate",
            json={"model": ONLY_ON_THE_HUB, "model_revision": "main", "gpu": "l4", "plan": {"method": "qlora"}},
        )
        assert est.status_code == 200, est.text
        assert est.json()["model"]["checkpoint_params"] == model["checkpoint_params"]


def test_recommend_with_a_moe_hub_id(test_hub: HubHandle, hf_cache, tmp_path):
    """Pinned to a revision, so the Hub answers even though the catalog lists the model."""
    with _client(tmp_path, hub_endpoint=test_hub.url) as client:
        r = client.post("/v1/recommend", json={"model": "Qwen/Qwen3-30B-A3B@main", "gpu": "h100", "limit": 3})
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["plans"]
        model = d["model"]
        assert model["revision"] == test_hub.state.repos["Qwen/Qwen3-30B-A3B"].refs["main"]
        assert abs(model["params"] - model["checkpoint_params"]) / model["params"] < 0.005
        assert abs(model["params"] - 30_532_122_624) / 30_532_122_624 < 0.005  # Qwen's published total


def test_hub_errors_are_4xx_naming_the_field(test_hub: HubHandle, hf_cache, tmp_path):
    with _client(tmp_path, hub_endpoint=test_hub.url) as client:
        r = client.post("/v1/recommend", json={"model": "acme/no-such-model", "gpu": "l4"})
        assert r.status_code == 404 and r.json()["field"] == "model" and "To fix:" in r.json()["detail"]
        r = client.post("/v1/recommend", json={"model": "google-bert/bert-base-uncased", "gpu": "l4"})
        assert r.status_code == 422 and "not a causal language model" in r.json()["detail"]
        r = client.post("/v1/recommend", json={"model": ONLY_ON_THE_HUB, "model_revision": "nope", "gpu": "l4"})
        assert r.status_code == 422 and r.json()["field"] == "model_revision"
    gated = {"model": "meta-llama/Llama-3.2-3B@main", "gpu": "l4"}
    with _client(tmp_path, hub_endpoint=test_hub.url) as client:
        r = client.post("/v1/recommend", json=gated)
        assert r.status_code == 422 and "gated" in r.json()["detail"] and "HF_TOKEN" in r.json()["detail"]


def test_hub_lookups_off_is_a_clear_4xx(test_hub: HubHandle, hf_cache, tmp_path):
    mark = len(test_hub.state.requests)
    with _client(tmp_path, hub_endpoint=test_hub.url, hub_lookups=False) as client:
        r = client.post("/v1/recommend", json={"model": ONLY_ON_THE_HUB, "gpu": "l4"})
        assert r.status_code == 422, r.text
        err = r.json()
        assert err["field"] == "model" and "look-ups are off" in err["detail"] and "inline" in err["detail"]
        assert client.post("/v1/recommend", json={"model": "llama-3.1-8b", "gpu": "l4"}).status_code == 200
    assert test_hub.requests_since(mark) == []


def test_settings_read_the_hub_environment(monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.setenv("ADVISOR_HUB_LOOKUPS", "false")
    monkeypatch.setenv("ADVISOR_HUB_DEADLINE_S", "12")
    opts = Settings(data_dir=tmp_path).hub_options()
    assert opts.enabled is False and opts.deadline_s == 12


# ---- the CLI, in a subprocess whose huggingface_hub reads the HF_* environment at import ----------------
def _cli(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ADVISOR_HUB"))}
    return subprocess.run(
        [sys.executable, "-m", "advisor.cli", *args],
        env={**base, "HF_HUB_DISABLE_PROGRESS_BARS": "1", **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_estimate_through_the_hub_then_offline_from_its_cache(test_hub: HubHandle, tmp_path):
    env = {"HF_ENDPOINT": test_hub.url, "HF_HOME": str(tmp_path / "hf-home")}
    estimate = ["estimate", "--model", ONLY_ON_THE_HUB, "--gpu", "l4", "--method", "qlora"]
    out = _cli(estimate, env)
    assert out.returncode == 0, out.stderr
    assert f"checkpoint: {ONLY_ON_THE_HUB} at " in out.stdout and "parameters stored (BF16" in out.stdout
    assert (tmp_path / "hf-home" / "hub" / "models--NousResearch--Meta-Llama-3.1-8B").is_dir()  # HF_HOME honoured

    mark = len(test_hub.state.requests)
    offline = _cli(estimate, {**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert test_hub.requests_since(mark) == []
    assert "FITS" in offline.stdout

    miss = _cli(estimate, {**env, "HF_HOME": str(tmp_path / "empty-home"), "HF_HUB_OFFLINE": "1"})
    assert miss.returncode == 2
    line = miss.stderr.strip()
    assert "\n" not in line and line.startswith("advisor estimate: error: --model:")
    assert "not in the local Hugging Face cache" in line and "To fix:" in line


def test_cli_errors_exit_2_with_one_line(test_hub: HubHandle, tmp_path):
    env = {"HF_ENDPOINT": test_hub.url, "HF_HOME": str(tmp_path / "hf-home")}
    unknown = _cli(["estimate", "--model", "acme/no-such-model", "--gpu", "l4", "--method", "qlora"], env)
    assert unknown.returncode == 2
    line = unknown.stderr.strip()
    assert "\n" not in line and "no model repo 'acme/no-such-model'" in line and "To fix:" in line

    gated = ["recommend", "--model", "meta-llama/Llama-3.2-3B", "--revision", "main", "--gpu", "l4"]
    refused = _cli(gated, env)
    assert refused.returncode == 2 and "gated" in refused.stderr and "\n" not in refused.stderr.strip()
    allowed = _cli(gated, {**env, "HF_TOKEN": GATED_TOKEN})
    assert allowed.returncode == 0, allowed.stderr
    assert "checkpoint: meta-llama/Llama-3.2-3B at " in allowed.stdout

    off = _cli(["estimate", "--model", ONLY_ON_THE_HUB, "--gpu", "l4", "--method", "qlora", "--no-hub"], env)
    assert off.returncode == 2 and "look-ups are off" in off.stderr
    bad_rev = _cli(
        ["estimate", "--model", ONLY_ON_THE_HUB, "--revision", "nope", "--gpu", "l4", "--method", "qlora"], env
    )
    assert bad_rev.returncode == 2 and "error: --revision:" in bad_rev.stderr
