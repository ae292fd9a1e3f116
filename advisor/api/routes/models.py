"""/v1/models: OpenAI's models list, so ``client.models.list()`` / ``.retrieve()`` work unchanged.

What a caller can use: the base models a job can start from (catalog models with a Hugging Face id,
and the model directories directly under the deployment's ``ADVISOR_MODEL_ROOTS``) and the
fine-tuned model of each of the caller's succeeded jobs. The advisor's own catalog, with architecture
numbers, is at /v1/catalog/models. Deleting a fine-tuned model is not offered: its files are the
job's result, removed with the job's directory.
"""

from __future__ import annotations

from pathlib import Path as FsPath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path

from advisor.api.auth import ApiKey, require_api_key
from advisor.api.deps import Jobs, Service
from advisor.api.errors import error_responses
from advisor.api.routes.common import route
from advisor.api.schemas import OpenAIModel, OpenAIModelList
from advisor.jobs import objects
from advisor.jobs.errors import NotFoundError
from advisor.jobs.service import JobService
from advisor.service import AdvisorService

router = APIRouter(
    prefix="/v1", tags=["models"], dependencies=[Depends(require_api_key)], responses=error_responses(401)
)

ModelId = Annotated[str, Path(min_length=1, max_length=1000, description="a model id from GET /v1/models")]


def _model(model_id: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


def _base_models(svc: AdvisorService, roots: list[FsPath]) -> list[dict[str, Any]]:
    """Catalog models by Hugging Face id (owned by the id's organisation), then local model directories
    (created: their config.json's modification time)."""
    out = [_model(m.hf_id, 0, m.hf_id.split("/")[0]) for m in svc.catalog.models if m.hf_id and "/" in m.hf_id]
    for root in roots:
        if not root.is_dir():
            continue
        for d in sorted(root.iterdir()):
            config = d / "config.json"
            if config.is_file():
                out.append(_model(str(d), int(config.stat().st_mtime), "local"))
    return out


def _fine_tuned(jobs: JobService, owner: str) -> list[dict[str, Any]]:
    rows = [r for r in jobs.store.jobs_with_status(["succeeded"]) if r["owner"] == owner and r["fine_tuned_model"]]
    return [
        _model(r["fine_tuned_model"], int(r.get("finished_at") or r["created_at"]), objects.ORGANIZATION) for r in rows
    ]


@route(
    router.get,
    "/models",
    "listModels",
    "Models: the base models jobs start from, and your fine-tuned models",
    OpenAIModelList,
)
def list_models(caller: ApiKey, svc: Service, jobs: Jobs) -> dict[str, Any]:
    """OpenAI's list (no pages): base models first, then fine-tuned models, oldest first."""
    return {"object": "list", "data": _base_models(svc, jobs.cfg.model_roots) + _fine_tuned(jobs, caller.key_id)}


@route(
    router.get,
    "/models/{model:path}",
    "retrieveModel",
    "One model by id (a fine-tuned model's or a base model's)",
    OpenAIModel,
    errors=(404,),
)
def retrieve_model(model: ModelId, caller: ApiKey, svc: Service, jobs: Jobs) -> dict[str, Any]:
    """`model` may hold '/' (Hugging Face ids, local directories) and ':' (fine-tuned models)."""
    for m in _fine_tuned(jobs, caller.key_id) + _base_models(svc, jobs.cfg.model_roots):
        if m["id"] == model or (m["owned_by"] == "local" and m["id"] == "/" + model.lstrip("/")):
            return m
    raise NotFoundError(f"no model {model!r}: GET /v1/models lists the models you can use", field="model")
