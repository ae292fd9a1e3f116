"""One exception handler for every error type; the background state belongs to the app's lifespan."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from advisor.api.background import Calibrations, JobsRuntime
from advisor.errors import NoFeasiblePlanError, UnknownGpuError
from advisor.jobs.errors import FileValidationError, JobsError, NotFoundError, PlanDoesNotFitError

KEY = "errors-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _raising(app: FastAPI, errors: dict[str, Exception]) -> TestClient:
    def raiser(exc: Exception):
        def boom() -> None:
            raise exc

        return boom

    for name, exc in errors.items():
        app.add_api_route(f"/boom/{name}", raiser(exc))
    return TestClient(app)


def test_every_domain_error_is_answered_by_the_one_handler(make_app) -> None:
    errors = {
        "fit": PlanDoesNotFitError("does not fit", field="plan", extra={"estimate": {"peak_gib": 99.0}}),
        "line": FileValidationError("not JSON", line=7),
        "job404": NotFoundError("no such job", field="fine_tuning_job_id"),
        "jobs": JobsError("bad", field="seq_len"),  # a job field is an API path already: not mapped
        "gpu": UnknownGpuError("unknown GPU 'rtx-409'", field="gpu", suggestions=["rtx-4090"]),
        "none": NoFeasiblePlanError("nothing fits", field="seq_len", reasons=["halve seq_len"]),
    }
    with _raising(make_app(), errors) as c:
        r = c.get("/boom/fit")
        assert r.status_code == 409 and r.json()["code"] == "plan_does_not_fit"
        assert r.json()["estimate"] == {"peak_gib": 99.0} and r.json()["request_id"] == r.headers["x-request-id"]
        r = c.get("/boom/line").json()
        assert (r["code"], r["line"], r["field"], r["detail"]) == ("invalid_file", 7, "file", "line 7: not JSON")
        assert c.get("/boom/job404").status_code == 404
        r = c.get("/boom/jobs").json()
        assert r["field"] == "seq_len" and r["errors"] == [
            {"field": "seq_len", "message": "bad", "type": "invalid_input"}
        ]
        r = c.get("/boom/gpu")
        assert r.status_code == 404 and r.json()["suggestions"] == ["rtx-4090"]
        r = c.get("/boom/none")
        assert r.status_code == 409 and r.json()["field"] == "workload.seq_len"  # a core field: its JSON path
        assert [e["message"] for e in r.json()["errors"]] == ["nothing fits", "halve seq_len"]


def test_the_lifespan_creates_and_stops_the_background_state(make_app) -> None:
    app = make_app(api_keys=[KEY])
    plain = TestClient(app)  # no lifespan: no background state, and the job routes say so
    r = plain.get("/v1/files", headers=AUTH)
    assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"  # OpenAI's envelope there
    assert r.json()["error"]["type"] == "server_error"
    assert getattr(app.state, "jobs", None) is None
    with TestClient(app) as c:
        jobs, runs = app.state.jobs, app.state.calibrations
        assert isinstance(jobs, JobsRuntime) and isinstance(runs, Calibrations)
        assert c.get("/v1/files", headers=AUTH).json()["data"] == []
        manager = jobs.get().manager
        assert manager.started
        assert c.get("/v1/calibrations", headers=AUTH).json() == {"runs": [], "profiles": []}
    assert app.state.jobs is None and app.state.calibrations is None
    assert not manager.started
    with TestClient(app) as c:  # a second server life gets fresh state
        assert app.state.jobs is not jobs and c.get("/v1/files", headers=AUTH).status_code == 200


def test_openai_routes_answer_openai_s_envelope_and_400_where_advice_keeps_422(make_app) -> None:
    """OpenAI's clients pick their exception class by status and read `error.message/type/param/code`."""
    with TestClient(make_app(api_keys=[KEY])) as c:
        r = c.post("/v1/fine_tuning/jobs", headers=AUTH, json={"model": "m", "training_file": "f", "seed": -1})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", "seed", "invalid_input")
        assert err["message"] == "invalid request: seed" and err["request_id"] == r.headers["x-request-id"]
        assert [e["field"] for e in err["errors"]] == ["seed"]
        r = c.get("/v1/fine_tuning/jobs/ftjob-nope", headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["param"] == "fine_tuning_job_id"
        r = c.get("/v1/files", headers={"Authorization": "Bearer wrong-key-0123456789"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = c.get("/v1/models/no-such/model", headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        r = c.post("/v1/estimate", json={"model": "llama-2-7b", "gpu": "a100-80gb", "plan": {"micro_batch": 0}})
        assert r.status_code == 422 and r.json()["code"] == "invalid_input" and "error" not in r.json()
        assert c.get("/v1/filesystem").json()["code"] == "not_found"  # a prefix match is not a route match


def test_a_bug_and_an_oversized_body_on_openai_routes_answer_openai_s_envelope_too(make_app) -> None:
    """The middleware's own answers (an unhandled exception: 500; a declared body over the limit: 413) follow the
    route's convention like the handlers' (a 500 on /v1/fine_tuning used to be an ErrorResponse)."""
    app = make_app(api_keys=[KEY], max_body_bytes=1024)

    def bug() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/v1/fine_tuning/boom", bug)
    app.add_api_route("/boom/bug", bug)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/v1/fine_tuning/boom", headers=AUTH)
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert (err["type"], err["code"]) == ("server_error", "internal_error") and "a bug" not in r.text
        r = c.get("/boom/bug")
        assert r.status_code == 500 and r.json()["code"] == "internal_error" and "error" not in r.json()
        r = c.post("/v1/fine_tuning/jobs", headers=AUTH, content=b"x" * 2048)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_the_openapi_document_says_what_openai_s_routes_answer(make_app) -> None:
    doc = make_app().openapi()
    create = doc["paths"]["/v1/fine_tuning/jobs"]["post"]["responses"]
    assert "422" not in create and create["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/OpenAIErrorResponse"
    )
    estimate = doc["paths"]["/v1/estimate"]["post"]["responses"]
    assert estimate["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
