"""GET /v1/gpus and /v1/catalog/models: the catalogs the advice is computed from, with sources and dates.

The model catalog lives under /v1/catalog because /v1/models is OpenAI's models list (routes/models.py):
what a job can start from and what jobs produced, in the shape OpenAI's clients parse."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from advisor.api.deps import Service
from advisor.api.routes.common import route
from advisor.api.schemas import GpuList, GpuOut, ModelList, ModelOut
from advisor.specs import GpuSpec, ModelSpec

router = APIRouter(prefix="/v1", tags=["catalog"])


def _gpu(g: GpuSpec) -> dict[str, Any]:
    return g.to_dict()


def _model(m: ModelSpec) -> dict[str, Any]:
    d = m.to_dict()
    d["params"] = m.param_count
    d["params_b"] = round(m.param_count / 1e9, 3)
    d["lora_module_names"] = list(m.module_names)
    d["active_params"] = m.active_param_count
    d["active_params_b"] = round(m.active_param_count / 1e9, 3)
    return d


@route(router.get, "/gpus", "listGpus", "GPU catalog with prices and sources", GpuList)
def list_gpus(svc: Service) -> dict[str, Any]:
    gpus = [_gpu(g) for g in svc.catalog.gpus]
    return {"count": len(gpus), "gpus": gpus}


@route(router.get, "/gpus/{gpu_id}", "getGpu", "One GPU by id or alias", GpuOut, errors=(404, 422))
def get_gpu(gpu_id: Annotated[str, Path(min_length=1, max_length=100)], svc: Service) -> dict[str, Any]:
    return _gpu(svc.gpu(gpu_id))


@route(router.get, "/catalog/models", "listCatalogModels", "Model catalog with architecture numbers", ModelList)
def list_models(svc: Service) -> dict[str, Any]:
    models = [_model(m) for m in svc.catalog.models]
    return {"count": len(models), "models": models}


@route(
    router.get,
    "/catalog/models/{model_id:path}",
    "getCatalogModel",
    "One catalog model by name, Hugging Face id or alias",
    ModelOut,
    errors=(404, 422),
)
def get_model(model_id: Annotated[str, Path(min_length=1, max_length=200)], svc: Service) -> dict[str, Any]:
    """Catalog entries only (no sizes, no paths): for anything else post an inline config to /v1/estimate."""
    return _model(svc.catalog.model(model_id))
