"""The page for people (``GET /``), its static files, and ``/docs`` with Swagger UI served from the package.

Why here and not a CDN: the page and the API docs must work on a machine with no network but the app's own
origin, so every asset ships inside ``advisor/web/static`` (Swagger UI's ``swagger-ui-dist`` files are vendored:
``tools/fetch_swagger_ui.sh`` re-creates them). The page is plain JS + SVG, no build step: what is in the
package is what the browser runs.

``GET /web/deployment`` tells the page (with the API key it was given) which device this server's jobs train
on, so that a plan for another GPU is launched as its settings (the server re-checks the fit on its device)
rather than refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from advisor.api.auth import ApiKey

STATIC_DIR = Path(__file__).resolve().parents[2] / "web" / "static"
STATIC_URL = "/web/static"

router = APIRouter(include_in_schema=False)


def static_files() -> StaticFiles:
    """The page's assets (and Swagger UI's), mounted at STATIC_URL by the app factory."""
    return StaticFiles(directory=STATIC_DIR)


@router.get("/", response_class=FileResponse)
def index() -> FileResponse:
    """The page: one HTML file; everything it needs comes from STATIC_URL."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/docs", response_class=HTMLResponse)
def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI with the vendored assets: FastAPI's default points at a CDN (a blank page offline)."""
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - API docs",
        swagger_js_url=f"{root}{STATIC_URL}/swagger/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{STATIC_URL}/swagger/swagger-ui.css",
        swagger_favicon_url=f"{root}{STATIC_URL}/favicon.svg",
        # the validator badge would ask validator.swagger.io about the schema: an outside request
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get("/web/deployment")
def deployment(request: Request, caller: ApiKey) -> dict[str, Any]:
    """Where this server's jobs train: its device (catalog GPU or the host CPU), how many, which launcher.

    Behind the API key (launching needs it anyway); the job layer answers 503 while it is not started."""
    cfg = request.app.state.jobs.get().cfg
    return {
        "gpu": {"id": cfg.gpu.id, "name": cfg.gpu.name, "memory_gib": round(cfg.gpu.memory_gib, 3)},
        "devices": len(cfg.slots),
        "device": cfg.device,
        "launcher": cfg.launcher,
        "model_roots": [str(p) for p in cfg.model_roots],
    }
