"""The job API's contract without training: clear 4xx for every bad request, idempotency, plan ids,
OpenAI's pagination, per-key isolation. Jobs created here are cancelled before they train."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jobs_helpers import AUTH, OTHER_AUTH, TERMINAL, tiny_job, upload, wait_job

from advisor.plans import TrainingPlan

JOBS = "/v1/fine_tuning/jobs"


def _post(client: Any, body: dict[str, Any], **headers: str) -> Any:
    return client.post(JOBS, headers={**AUTH, **headers}, json=body)


def _cancel_and_wait(client: Any, job_id: str) -> dict[str, Any]:
    r = client.post(f"{JOBS}/{job_id}/cancel", headers=AUTH)
    assert r.status_code in (200, 409), r.text
    return wait_job(client, job_id, TERMINAL, timeout=120)


@pytest.fixture
def t4(make_client, big_root: Path, tiny_root: Path) -> Any:
    """A deployment whose jobs train on a T4 (the fit check's target), with a 7B config under its roots.
    (There is no CUDA here: a job that gets launched before the test cancels it ends at once.)"""
    return make_client(roots=[big_root, tiny_root], job_gpu="t4")


def test_bad_requests_are_4xx_naming_the_field(client, tiny_root: Path, tmp_path: Path) -> None:
    f = upload(client, tiny_root / "train.jsonl")
    model = tiny_root / "model"
    cases = [
        ({"model": "lama-2-7bb"}, 404, "model"),  # unknown catalog name: close matches suggested
        ({"model": str(tmp_path)}, 400, "model"),  # outside the allowed roots
        ({"model": str(tiny_root / ".." / "x")}, 400, "model"),
        ({"model": str(tiny_root)}, 400, "model"),  # inside, but no config.json
        ({"model": "13B"}, 400, "model"),  # a size is an estimate, not a model to load
        ({"model": "llama-2-7b"}, 400, "model"),  # not in the HF cache, downloads off
        ({"training_file": "file-doesnotexist0"}, 404, "training_file"),
        ({"validation_file": "file-doesnotexist0"}, 404, "validation_file"),
        ({"hyperparameters": {"batch_size": 3}, "method": {"micro_batch_size": 2}}, 400, "hyperparameters.batch_size"),
        ({"hyperparameters": {"n_epochs": 0}}, 400, "hyperparameters.n_epochs"),
        ({"method": {"lora": {"target_modules": ["c_attn"]}}}, 400, "method.lora.target_modules"),
        ({"method": {"type": "dpo"}}, 400, "method.type"),
        ({"method": {"type": "lora", "quantization": {"bits": 4}}}, 400, "method.quantization"),
        ({"method": {"type": "qlora", "optimizer": "sgd"}}, 400, "method.optimizer"),
        # accelerate gives CPU process groups DDP: an FSDP job here would not train what its plan says
        ({"method": {"num_gpus": 2, "sharding": "fsdp"}}, 400, "method.sharding"),
        ({"suffix": "a b"}, 400, "suffix"),
        ({"integrations": [{"type": "wandb"}]}, 400, "integrations"),
        ({"plan_id": "plan_0123456789abcdef"}, 404, "plan_id"),
        ({"typo_field": 1}, 400, "typo_field"),
    ]
    for patch, status, fld in cases:
        body = tiny_job(model, f["id"], "lora")
        for k, v in patch.items():
            body[k] = {**body[k], **v} if isinstance(v, dict) and isinstance(body.get(k), dict) else v
        r = _post(client, body)
        assert r.status_code == status, (patch, r.text)
        err = r.json()["error"]  # OpenAI's envelope: `param` names the field
        assert err["param"] == fld or any(e["field"] == fld for e in err["errors"]), (patch, r.json())
    assert client.get(JOBS, headers=AUTH).json()["data"] == []  # nothing was created


def test_unknown_catalog_model_suggests_close_matches(client, tiny_root: Path) -> None:
    f = upload(client, tiny_root / "train.jsonl")
    r = _post(client, tiny_job(Path("lama-2-7bb"), f["id"]))
    assert r.status_code == 404 and "llama-2-7b" in r.json()["error"]["suggestions"]


def test_custom_code_models_are_refused_unless_allowed(make_client, tmp_path: Path, tiny_root: Path) -> None:
    root = tmp_path / "custom"
    (root / "m").mkdir(parents=True)
    cfg = json.loads((tiny_root / "model" / "config.json").read_text())
    (root / "m" / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "x.Y"}}))
    c = make_client(roots=[root, tiny_root])
    f = upload(c, tiny_root / "train.jsonl")
    r = _post(c, tiny_job(root / "m", f["id"]))
    assert r.status_code == 400 and "custom code" in r.json()["error"]["message"]


def test_a_plan_that_does_not_fit_is_refused_with_the_breakdown_or_forced(t4, big_root: Path, tiny_root: Path) -> None:
    f = upload(t4, tiny_root / "train.jsonl")
    body = {"model": str(big_root / "llama-7b"), "training_file": f["id"], "method": {"type": "full"}}
    r = _post(t4, body)
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert err["code"] == "plan_does_not_fit" and "T4" in err["message"] and "force" in err["message"]
    est = err["estimate"]
    assert not est["fits"] and est["peak_memory_gib"] > est["device_memory_gib"] and est["gpu"] == "t4"
    assert sum(est["breakdown_gib"].values()) == pytest.approx(est["peak_memory_gib"], rel=0.02)
    assert t4.get(JOBS, headers=AUTH).json()["data"] == []

    r = _post(t4, {**body, "force": True})
    assert r.status_code == 200, r.text
    job = r.json()
    assert not job["estimate"]["fits"]
    assert any("force" in e["message"] for e in t4.get(f"{JOBS}/{job['id']}/events", headers=AUTH).json()["data"])
    assert _cancel_and_wait(t4, job["id"])["status"] == "cancelled"


def test_plan_ids_and_plans_from_recommend_launch_that_plan(t4, big_root: Path, tiny_root: Path) -> None:
    f = upload(t4, tiny_root / "train.jsonl")
    ask = {"model": "llama-2-7b", "gpu": "t4", "workload": {"seq_len": 512}, "constraints": {"max_gpus": 1}}
    plan = t4.post("/v1/recommend", json=ask).json()["plans"][0]["plan"]
    model = str(big_root / "llama-7b")
    r = _post(t4, {"model": model, "training_file": f["id"], "plan_id": plan["id"], "method": {"seq_len": 512}})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["plan_id"] == plan["id"] and job["estimate"]["fits"]
    same = {k: v for k, v in job["plan"].items() if k not in ("id", "grad_accum", "notes")}
    assert same == {k: v for k, v in plan.items() if k in same}
    _cancel_and_wait(t4, job["id"])

    r = _post(t4, {"model": model, "training_file": f["id"], "plan": plan})
    assert r.status_code == 200 and r.json()["plan_id"] == plan["id"], r.text
    _cancel_and_wait(t4, r.json()["id"])

    # a plan made for another GPU, or a plan whose fields do not match its id
    other = t4.post("/v1/recommend", json={**ask, "gpu": "rtx-4090"}).json()["plans"][0]["plan"]
    r = _post(t4, {"model": model, "training_file": f["id"], "plan": other})
    assert r.status_code == 400 and r.json()["error"]["param"] == "plan.gpu_id"
    # a plan for more GPUs than this deployment has
    wide = {**plan, "num_gpus": 2, "sharding": "ddp"}
    wide["id"] = TrainingPlan.from_dict({k: v for k, v in wide.items() if k != "id"}).id
    r = _post(t4, {"model": model, "training_file": f["id"], "plan": wide})
    assert (
        r.status_code == 400
        and r.json()["error"]["param"] == "method.num_gpus"
        and "1 device" in r.json()["error"]["message"]
    )
    r = _post(t4, {"model": model, "training_file": f["id"], "plan": {**plan, "micro_batch": plan["micro_batch"] + 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "plan.id"


def test_a_plan_id_carries_its_plan_dora_included(t4, big_root: Path, tiny_root: Path) -> None:
    """The id decodes to the plan (no search): a DoRA plan from /v1/recommend launches as that very plan;
    method fields that contradict the id, and ids of another GPU, are refused by name."""
    f = upload(t4, tiny_root / "train.jsonl")
    ask = {
        "model": "llama-2-7b",
        "gpu": "t4",
        "workload": {"seq_len": 256},
        "constraints": {"max_gpus": 1, "methods": ["dora"]},
    }
    plan = t4.post("/v1/recommend", json=ask).json()["plans"][0]["plan"]
    assert plan["method"] == "dora"
    model = str(big_root / "llama-7b")
    r = _post(t4, {"model": model, "training_file": f["id"], "plan_id": plan["id"]})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["plan_id"] == plan["id"] and job["method"]["type"] == "supervised"
    assert job["method"]["advisor"]["type"] == "dora"
    assert {k: v for k, v in job["plan"].items() if k in plan and k != "notes"} == {
        k: v for k, v in plan.items() if k != "notes"
    }
    _cancel_and_wait(t4, job["id"])
    r = _post(t4, {"model": model, "training_file": f["id"], "plan_id": plan["id"], "method": {"seq_len": 512}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "method.seq_len", r.text
    other = t4.post("/v1/recommend", json={**ask, "gpu": "l4"}).json()["plans"][0]["plan"]
    r = _post(t4, {"model": model, "training_file": f["id"], "plan_id": other["id"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "plan_id" and "l4" in r.json()["error"]["message"]
    r = _post(t4, {"model": model, "training_file": f["id"], "plan_id": "plan_v2.bm90IGEgcGxhbg"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "plan_id"


def test_idempotency_key(client, tiny_root: Path) -> None:
    f = upload(client, tiny_root / "train.jsonl")
    body = tiny_job(tiny_root / "model", f["id"], hyperparameters={"n_epochs": 50})
    first = _post(client, body, **{"Idempotency-Key": "abc-1"})
    again = _post(client, body, **{"Idempotency-Key": "abc-1"})
    assert first.status_code == again.status_code == 200
    assert first.json()["id"] == again.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    other = _post(client, {**body, "seed": 7}, **{"Idempotency-Key": "abc-1"})
    assert other.status_code == 409 and other.json()["error"]["param"] == "Idempotency-Key"
    # the same key of another API key is another request
    theirs = client.post(JOBS, headers={**OTHER_AUTH, "Idempotency-Key": "abc-1"}, json=body)
    assert theirs.status_code == 404  # their key cannot see our file
    assert len(client.get(JOBS, headers=AUTH).json()["data"]) == 1
    _cancel_and_wait(client, first.json()["id"])


def test_pagination_isolation_cancel_semantics(make_client, tiny_root: Path) -> None:
    client = make_client()
    f = upload(client, tiny_root / "train.jsonl")
    ids = []
    for i in range(3):
        r = _post(
            client, tiny_job(tiny_root / "model", f["id"], metadata={"n": str(i)}, hyperparameters={"n_epochs": 100})
        )
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    for i in ids:
        _cancel_and_wait(client, i)
    page = client.get(JOBS, headers=AUTH, params={"limit": 2}).json()
    assert page["object"] == "list" and page["has_more"] and [j["id"] for j in page["data"]] == ids[::-1][:2]
    rest = client.get(JOBS, headers=AUTH, params={"limit": 2, "after": page["data"][-1]["id"]}).json()
    assert [j["id"] for j in rest["data"]] == ids[:1] and not rest["has_more"]
    only = client.get(JOBS, headers=AUTH, params={"metadata[n]": "1"}).json()["data"]
    assert [j["id"] for j in only] == [ids[1]]

    job = client.get(f"{JOBS}/{ids[0]}", headers=AUTH).json()
    assert job["status"] == "cancelled" and job["error"]["code"] == "cancelled"
    again = client.post(f"{JOBS}/{ids[0]}/cancel", headers=AUTH)
    assert again.status_code == 409

    evs = client.get(f"{JOBS}/{ids[0]}/events", headers=AUTH, params={"limit": 2}).json()
    assert evs["has_more"] and evs["data"][0]["message"] == "The job was cancelled"  # newest first
    older = client.get(f"{JOBS}/{ids[0]}/events", headers=AUTH, params={"limit": 100, "after": evs["last_id"]}).json()
    assert older["data"][-1]["message"].startswith("Created fine-tuning job")

    for path in (f"{JOBS}/{ids[0]}", f"{JOBS}/{ids[0]}/events", f"{JOBS}/{ids[0]}/checkpoints"):
        assert client.get(path, headers=OTHER_AUTH).status_code == 404
        assert client.get(path).status_code == 401
    assert client.post(f"{JOBS}/{ids[0]}/cancel", headers=OTHER_AUTH).status_code == 404
    assert client.get(JOBS, headers=OTHER_AUTH).json()["data"] == []
    assert client.get(f"{JOBS}/ftjob-nope", headers=AUTH).status_code == 404


def test_a_file_in_use_cannot_be_deleted(make_client, tiny_root: Path) -> None:
    client = make_client()
    f = upload(client, tiny_root / "train.jsonl")
    job = _post(client, tiny_job(tiny_root / "model", f["id"], hyperparameters={"n_epochs": 100})).json()
    r = client.delete(f"/v1/files/{f['id']}", headers=AUTH)
    if client.get(f"{JOBS}/{job['id']}", headers=AUTH).json()["status"] not in TERMINAL:
        assert r.status_code == 409 and job["id"] in r.json()["error"]["message"]
    _cancel_and_wait(client, job["id"])
    assert client.delete(f"/v1/files/{f['id']}", headers=AUTH).status_code == 200


def test_readiness_reports_the_store(client) -> None:
    checks = {c["name"]: c for c in client.get("/readyz").json()["checks"]}
    assert checks["job_store"]["ok"] and "sqlite" in checks["job_store"]["detail"]


def test_readiness_without_a_data_dir_and_no_side_effects(tmp_path: Path, tiny_root: Path) -> None:
    from fastapi.testclient import TestClient
    from jobs_helpers import job_settings

    from advisor.api.app import create_app

    missing = tmp_path / "missing"
    with TestClient(create_app(job_settings(missing, [tiny_root]))) as c:
        checks = {x["name"]: x for x in c.get("/readyz").json()["checks"]}
        assert not checks["job_store"]["ok"] and "does not exist" in checks["job_store"]["detail"]
        assert c.get(JOBS, headers=AUTH).status_code == 503
    assert not missing.exists()
