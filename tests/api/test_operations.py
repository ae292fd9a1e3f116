"""Health, readiness, Prometheus metrics, request ids, body limit and the JSON access log."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from advisor.api.deps import add_readiness_check, set_body_limit
from advisor.api.observability import ACCESS_LOGGER, JsonFormatter


def _samples(text: str, name: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    checks = {c["name"]: c for c in r.json()["checks"]}
    assert checks["catalogs"]["ok"] and "GPUs" in checks["catalogs"]["detail"]
    assert checks["data_dir"]["ok"]


def test_readyz_fails_with_the_failing_check_named(make_app, tmp_path: Path) -> None:
    app = make_app(data_dir=tmp_path / "missing", api_keys=["k" * 16])
    add_readiness_check(app, "store", lambda: (_ for _ in ()).throw(ConnectionError("db down")))
    with TestClient(app) as c:
        r = c.get("/readyz", headers={"Authorization": "Bearer " + "k" * 16})  # raw details need a key
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "not ready"
    checks = {c["name"]: c for c in body["checks"]}
    assert not checks["data_dir"]["ok"] and "does not exist" in checks["data_dir"]["detail"]
    assert not checks["store"]["ok"] and "db down" in checks["store"]["detail"]
    assert checks["catalogs"]["ok"]


def test_metrics_count_requests_by_route_template_and_status(client: TestClient) -> None:
    client.get("/v1/gpus/rtx-4090")
    client.get("/v1/gpus/t4")
    client.get("/v1/gpus/nope-gpu")
    client.post("/v1/recommend", json={"model": "llama-2-7b", "gpu": "rtx-4090"})
    client.post("/v1/recommend", json={"model": 1})
    text = client.get("/metrics").text
    counts = _samples(text, "advisor_http_requests_total")
    key = lambda m, r, s: (("method", m), ("route", r), ("status", s))  # noqa: E731
    assert counts[key("GET", "/v1/gpus/{gpu_id}", "200")] == 2
    assert counts[key("GET", "/v1/gpus/{gpu_id}", "404")] == 1
    assert counts[key("POST", "/v1/recommend", "200")] == 1
    assert counts[key("POST", "/v1/recommend", "422")] == 1
    latency = _samples(text, "advisor_http_request_duration_seconds_count")
    assert latency[key("POST", "/v1/recommend", "200")] == 1
    sums = _samples(text, "advisor_http_request_duration_seconds_sum")
    assert sums[key("POST", "/v1/recommend", "200")] > 0


def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    r = client.get("/healthz", headers={"X-Request-ID": "abc-123.x_y"})
    assert r.headers["x-request-id"] == "abc-123.x_y"
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32
    # an unsafe id (log injection) is replaced, not echoed
    r = client.get("/healthz", headers={"X-Request-ID": 'x"\\n{"admin":true}'})
    assert r.headers["x-request-id"] != 'x"\\n{"admin":true}' and len(r.headers["x-request-id"]) == 32
    # errors carry it too, in the header and the body
    r = client.get("/no/such/route")
    assert r.status_code == 404 and r.json()["request_id"] == r.headers["x-request-id"]


def test_bodies_over_the_limit_get_413(make_app) -> None:
    app = make_app(max_body_bytes=4096)
    big = b'{"model": "' + b"x" * 8000 + b'"}'
    with TestClient(app) as c:
        r = c.post("/v1/recommend", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["code"] == "body_too_large"
        assert r.json()["request_id"] == r.headers["x-request-id"]

        # a streamed body (chunked, no Content-Length) is cut off as it passes the limit
        def chunks():
            for _ in range(10):
                yield b" " * 1000

        r = c.post("/v1/recommend", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["code"] == "body_too_large"
        text = c.get("/metrics").text
    assert 'status="413"' in text


def test_one_json_access_log_line_per_request_without_secrets(make_app) -> None:
    key = "k" * 20 + "-secret"
    app = make_app(api_keys=key, lock_advice=True)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with TestClient(app) as c:
            r1 = c.get("/v1/gpus/t4", headers={"Authorization": f"Bearer {key}", "X-Request-ID": "req-1"})
            r2 = c.get("/v1/gpus/t4", headers={"Authorization": "Bearer wrong-key-wrong-key"})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert r1.status_code == 200 and r2.status_code == 401
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert first["request_id"] == "req-1" and first["route"] == "/v1/gpus/{gpu_id}" and first["status"] == 200
    assert first["method"] == "GET" and first["latency_ms"] > 0 and first["msg"] == "request"
    assert lines[1]["status"] == 401
    assert key not in stream.getvalue() and "wrong-key" not in stream.getvalue()


def test_a_router_can_raise_the_body_limit_under_its_prefix(make_app) -> None:
    app = make_app(max_body_bytes=4096)
    uploads = APIRouter()

    @uploads.post("/v1/uploads")
    async def upload(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    app.include_router(uploads)
    set_body_limit(app, "/v1/uploads", 16_384)
    with TestClient(app) as c:
        assert c.post("/v1/uploads", content=b"x" * 10_000).json() == {"bytes": 10_000}
        assert c.post("/v1/uploads", content=b"x" * 20_000).status_code == 413
        r = c.post("/v1/recommend", content=b"x" * 10_000, headers={"content-type": "application/json"})
        assert r.status_code == 413, "other routes keep the default limit"


def test_405_lists_every_method_served_at_the_path(make_app) -> None:
    app = make_app()
    extra = APIRouter()

    @extra.get("/v1/things")
    def list_things() -> list[str]:
        return []

    @extra.post("/v1/things")
    def create_thing() -> dict[str, str]:
        return {}

    app.include_router(extra)
    with TestClient(app) as c:
        r = c.delete("/v1/things")
        assert r.status_code == 405 and r.json()["code"] == "method_not_allowed"
        assert set(r.headers["allow"].split(", ")) == {"GET", "POST"}
        assert c.put("/v1/recommend").headers["allow"] == "POST"


def test_errors_are_documented_as_json_even_on_text_routes(make_app) -> None:
    from fastapi.responses import PlainTextResponse

    from advisor.api.errors import error_responses

    app = make_app()
    extra = APIRouter()

    @extra.get("/v1/text", response_class=PlainTextResponse, responses=error_responses(404))
    def text() -> str:
        return "hello"

    app.include_router(extra)
    responses = app.openapi()["paths"]["/v1/text"]["get"]["responses"]
    assert set(responses["404"]["content"]) == {"application/json"}
    assert set(responses["200"]["content"]) == {"text/plain"}
