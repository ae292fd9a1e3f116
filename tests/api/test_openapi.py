"""openapi/openapi.json stays what the code produces; operation ids are stable; schemas have examples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from advisor.api import openapi
from advisor.api.errors import is_openai_path
from advisor.cli import main

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "openapi" / "openapi.json"

OPERATION_IDS = {
    ("post", "/v1/recommend"): "recommend",
    ("post", "/v1/estimate"): "estimate",
    ("get", "/v1/gpus"): "listGpus",
    ("get", "/v1/gpus/{gpu_id}"): "getGpu",
    ("get", "/v1/catalog/models"): "listCatalogModels",
    ("get", "/v1/catalog/models/{model_id}"): "getCatalogModel",
    ("get", "/v1/models"): "listModels",
    ("get", "/v1/models/{model}"): "retrieveModel",
    ("get", "/healthz"): "healthz",
    ("get", "/readyz"): "readyz",
    ("get", "/metrics"): "metrics",
    ("post", "/v1/files"): "createFile",
    ("get", "/v1/files"): "listFiles",
    ("get", "/v1/files/{file_id}"): "retrieveFile",
    ("delete", "/v1/files/{file_id}"): "deleteFile",
    ("get", "/v1/files/{file_id}/content"): "downloadFile",
    ("post", "/v1/fine_tuning/jobs"): "createFineTuningJob",
    ("get", "/v1/fine_tuning/jobs"): "listFineTuningJobs",
    ("get", "/v1/fine_tuning/jobs/{fine_tuning_job_id}"): "retrieveFineTuningJob",
    ("post", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel"): "cancelFineTuningJob",
    ("get", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events"): "listFineTuningEvents",
    ("get", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints"): "listFineTuningCheckpoints",
    ("get", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/logs"): "fineTuningJobLogs",
    ("post", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/pause"): "pauseFineTuningJob",
    ("post", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/resume"): "resumeFineTuningJob",
    ("get", "/v1/calibrations"): "listCalibrations",
    ("post", "/v1/calibrations"): "startCalibration",
    ("get", "/v1/calibrations/{calibration_id}"): "getCalibration",
    ("post", "/v1/calibrations/{calibration_id}/cancel"): "cancelCalibration",
}


def test_committed_openapi_matches_the_code() -> None:
    problem = openapi.drift(COMMITTED)
    assert problem is None, f"{problem}: run `advisor openapi` and commit openapi/openapi.json"


def test_openapi_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADVISOR_LOCK_ADVICE", "true")
    monkeypatch.setenv("ADVISOR_MAX_BODY_BYTES", "2048")
    assert openapi.drift(COMMITTED) is None


def test_check_flag_fails_on_drift_and_regenerates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "openapi.json"
    assert main(["openapi", "--check", "--output", str(out)]) == 1
    assert main(["openapi", "--output", str(out)]) == 0
    assert main(["openapi", "--check", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    doc["info"]["version"] = "0.0.0-stale"
    out.write_text(json.dumps(doc))
    assert main(["openapi", "--check", "--output", str(out)]) == 1
    assert "out of date" in capsys.readouterr().err


def test_operation_ids_are_stable_and_errors_documented() -> None:
    doc = json.loads(COMMITTED.read_text())
    found = {(m, p): op["operationId"] for p, ops in doc["paths"].items() for m, op in ops.items()}
    assert {k: found.get(k) for k in OPERATION_IDS} == OPERATION_IDS
    ids = list(found.values())
    assert len(ids) == len(set(ids)), "operation ids are unique"
    for (method, path), _ in OPERATION_IDS.items():
        responses = doc["paths"][path][method]["responses"]
        openai = is_openai_path(path)  # OpenAI's routes: its envelope, and 400 where the others say 422
        assert not (openai and "422" in responses), path
        for status in {"400" if openai else "422", "404"} & set(responses):
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/OpenAIErrorResponse" if openai else "/ErrorResponse"), (path, status)
    post = doc["paths"]["/v1/recommend"]["post"]["responses"]
    assert {"200", "404", "409", "413", "422"} <= set(post)


def test_request_schemas_carry_examples() -> None:
    schemas = json.loads(COMMITTED.read_text())["components"]["schemas"]
    for name in ("RecommendRequest", "EstimateRequest", "PlanIn", "WorkloadIn", "InlineModelConfig"):
        assert schemas[name].get("examples"), name
    assert {"model": "meta-llama/Llama-2-7b-hf", "gpu": "rtx-4090"} in schemas["RecommendRequest"]["examples"]
