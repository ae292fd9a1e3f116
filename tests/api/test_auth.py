"""API keys: Bearer, constant-time compare, mutating endpoints always guarded, advice lockable."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from advisor.api.auth import ApiKey, match_key
from advisor.api.errors import error_responses
from advisor.api.settings import Settings

API_KEY = "test-key-0123456789abcdef"
OTHER_KEY = "another-key-fedcba9876543210"


def _with_mutating_route(app: FastAPI) -> FastAPI:
    """A mutating endpoint wired the way the jobs/calibrations routers will be."""
    router = APIRouter()

    @router.post("/v1/things", status_code=201, responses=error_responses(401))
    def create_thing(caller: ApiKey) -> dict[str, str]:
        return {"created_by": caller.key_id}

    app.include_router(router)
    return app


def test_mutating_endpoint_requires_a_valid_key(make_app) -> None:
    app = _with_mutating_route(make_app(api_keys=f"{API_KEY},{OTHER_KEY}"))
    with TestClient(app) as c:
        r = c.post("/v1/things")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["code"] == "unauthorized"
        assert c.post("/v1/things", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.post("/v1/things", headers={"Authorization": f"Basic {API_KEY}"}).status_code == 401
        a = c.post("/v1/things", headers={"Authorization": f"Bearer {API_KEY}"})
        b = c.post("/v1/things", headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert a.status_code == b.status_code == 201
    ida, idb = a.json()["created_by"], b.json()["created_by"]
    assert ida != idb and API_KEY not in ida, "callers are told apart by a fingerprint, not the key"


def test_mutating_endpoint_fails_closed_without_configured_keys(make_app) -> None:
    app = _with_mutating_route(make_app())
    with TestClient(app) as c:
        r = c.post("/v1/things", headers={"Authorization": "Bearer anything-at-all-here"})
    assert r.status_code == 401 and r.json()["code"] == "auth_not_configured"


def test_advice_is_open_by_default_and_lockable(make_app) -> None:
    body = {"model": "llama-2-7b", "gpu": "rtx-4090"}
    with TestClient(make_app(api_keys=API_KEY)) as c:
        assert c.post("/v1/recommend", json=body).status_code == 200
    locked = make_app(api_keys=API_KEY, lock_advice=True)
    with TestClient(locked) as c:
        assert c.post("/v1/recommend", json=body).status_code == 401
        assert c.get("/v1/gpus").status_code == 401
        assert c.post("/v1/recommend", json=body, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert c.get("/healthz").status_code == 200, "probes stay open"
        assert c.get("/metrics").status_code == 200
        spec = c.get("/openapi.json").json()
    assert spec["paths"]["/v1/recommend"]["post"]["security"] == [{"bearerAuth": []}]
    assert "401" in spec["paths"]["/v1/recommend"]["post"]["responses"]


def test_match_key_checks_every_key_and_returns_a_fingerprint() -> None:
    keys = [API_KEY, OTHER_KEY]
    assert match_key(API_KEY, keys) != match_key(OTHER_KEY, keys)
    assert match_key(API_KEY + "x", keys) is None
    assert match_key("", keys) is None
    assert match_key(API_KEY, []) is None


def test_keys_come_comma_separated_from_the_environment_and_never_show(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADVISOR_API_KEYS", f" {API_KEY} ,{OTHER_KEY},")
    s = Settings()
    assert [k.get_secret_value() for k in s.api_keys] == [API_KEY, OTHER_KEY]
    assert API_KEY not in repr(s) and API_KEY not in str(s.model_dump())
    monkeypatch.setenv("ADVISOR_API_KEYS", "short")
    with pytest.raises(ValidationError) as exc:
        Settings()
    assert "at least 16 characters" in str(exc.value) and "short" not in str(exc.value)
