"""/v1/calibrations: behind API keys; a real (small) calibration runs in the background and its profile is used."""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.needs_torch, pytest.mark.slow]

KEY = "test-key-0123456789abcdef"


@pytest.fixture
def client(tmp_path):
    from fastapi.testclient import TestClient

    from advisor.api.app import create_app
    from advisor.api.auth import match_key
    from advisor.api.settings import Settings

    # this key may force-install: a 2-trial calibration is otherwise kept in its run directory only
    app = create_app(Settings(data_dir=tmp_path, api_keys=[KEY], calibration_install_keys=[match_key(KEY, [KEY])]))
    with TestClient(app) as c:
        yield c


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_calibrations_need_an_api_key(client):
    assert client.get("/v1/calibrations").status_code == 401
    assert client.post("/v1/calibrations", json={"budget": "quick"}).status_code == 401
    assert client.get("/v1/calibrations/x", headers={"Authorization": "Bearer wrong-key-0123456789"}).status_code == 401


def test_bad_requests_name_the_field(client):
    r = client.post("/v1/calibrations", json={"budget": "huge"}, headers=AUTH)
    assert r.status_code == 422 and "budget" in r.text
    r = client.post("/v1/calibrations", json={"device": "cpu", "max_trials": 1}, headers=AUTH)
    assert r.status_code == 422 and "max_trials" in r.text
    r = client.get("/v1/calibrations/nope", headers=AUTH)
    assert r.status_code == 404


def test_a_background_calibration_is_followed_and_then_used(client):
    assert client.get("/v1/calibrations", headers=AUTH).json() == {"runs": [], "profiles": []}
    body = {"device": "cpu", "budget": "quick", "max_trials": 2, "install": "force"}
    r = client.post("/v1/calibrations", json=body, headers=AUTH)
    assert r.status_code == 202, r.text
    run = r.json()
    assert run["status"] in ("queued", "running")
    again = client.post("/v1/calibrations", json={"device": "cpu", "max_trials": 2}, headers=AUTH)
    assert again.status_code == 409  # one run at a time
    deadline = time.monotonic() + 600
    while True:
        status = client.get(f"/v1/calibrations/{run['id']}", headers=AUTH).json()["run"]
        if status["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            break
        assert status["trials_done"] <= (status["trials_total"] or 2)
        time.sleep(0.5)
    assert status["status"] == "succeeded", status["error"]
    assert status["trials_done"] == status["trials_total"] == 2
    profile = status["profile"]
    assert profile["held_out"]["n_trials"] >= 2
    assert status["installed"] and status["install_note"] == "installed explicitly (force)"
    listing = client.get("/v1/calibrations", headers=AUTH).json()
    assert [p["id"] for p in listing["profiles"]] == [profile["id"]]
    doc = client.get(f"/v1/calibrations/{profile['id']}", headers=AUTH).json()["profile_document"]
    assert doc["coefficients"]["speed"]["gemm"] >= 1
    # the service now estimates for this CPU with the new profile
    body = {
        "model": "gpt2",
        "gpu": profile["device"]["id"],
        "plan": {"method": "lora", "dtype": "fp32", "seq_len": 256, "micro_batch": 1},
    }
    est = client.post("/v1/estimate", json=body)
    assert est.status_code == 200, est.text
    assert est.json()["source"] == f"calibrated:{profile['id']}"
