"""The app factory: settings -> catalog -> AdvisorService -> FastAPI app, with nothing built at import.

Registering a router is one line in ``_include_routers``. Shared state lives on ``app.state``
(``settings``, ``service``, ``metrics``, ``readiness``) and reaches routes through the aliases in
``advisor.api.deps``. The background state (the job layer's store and reconciler, calibration runs:
``app.state.jobs``, ``app.state.calibrations``) is created and shut down by ``lifespan`` alone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import Depends, FastAPI

from advisor.api.auth import require_api_key
from advisor.api.background import Calibrations, JobsRuntime
from advisor.api.deps import add_readiness_check, catalogs_check, data_dir_check, profiles_check, set_body_limit
from advisor.api.errors import error_responses, errors_as_json, install_error_handlers
from advisor.api.observability import Metrics, RequestContextMiddleware, configure_logging
from advisor.api.routes import advice, calibrations, catalog, files, fine_tuning, health, models, web
from advisor.api.settings import Settings
from advisor.catalog import build_catalog
from advisor.profiles import PROFILE_SUBDIR, ProfileStore
from advisor.service import AdvisorService

#: room for the multipart envelope around a training file upload
MULTIPART_SLACK = 1 << 20

DESCRIPTION = """\
Hardware-aware fine-tuning advisor: will it fit, which method (full, LoRA, QLoRA), how long, how much.

Advice endpoints (`/v1/recommend`, `/v1/estimate`, catalogs) are open unless the server sets
`ADVISOR_LOCK_ADVICE=true`; mutating endpoints always need `Authorization: Bearer <key>`.
Every response carries an `X-Request-ID` header; every error body is an `ErrorResponse`.
"""


def _version() -> str:
    try:
        return version("tuneadvisor")
    except PackageNotFoundError:
        return "0.0.0"


def _include_routers(app: FastAPI, settings: Settings) -> None:
    # read-only advice: open by default, behind the API key when the server locks it
    advice_deps = [Depends(require_api_key)] if settings.lock_advice else []
    advice_resp = error_responses(401) if settings.lock_advice else {}
    app.include_router(health.router)
    app.include_router(catalog.router, dependencies=advice_deps, responses=advice_resp)
    app.include_router(advice.router, dependencies=advice_deps, responses=advice_resp)
    app.include_router(files.router)  # /v1/files: API key required (the router's own dependency)
    app.include_router(fine_tuning.router)  # /v1/fine_tuning: API key required
    app.include_router(calibrations.router)  # /v1/calibrations: API key required
    app.include_router(models.router)  # /v1/models: OpenAI's models list, API key required
    app.include_router(web.router)  # the page at /, /docs with bundled Swagger UI (no CDN)
    app.mount(web.STATIC_URL, web.static_files(), name="web-static")
    # uploads: the training file limit plus the multipart envelope, in place of the service-wide limit
    set_body_limit(app, "/v1/files", int(settings.max_file_bytes) + MULTIPART_SLACK)


def _jobs_check(app: FastAPI) -> tuple[bool, str]:
    runtime: JobsRuntime | None = getattr(app.state, "jobs", None)
    return runtime.check() if runtime is not None else (False, "job store not started: the server is not running")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The background state's whole life: the job layer's store and reconciler start with the server (a
    restart re-adopts running jobs at once) and calibration runs get their runner; both stop after."""
    settings, service = app.state.settings, app.state.service
    jobs, runs = JobsRuntime(settings, service), Calibrations(settings, service)
    app.state.jobs, app.state.calibrations = jobs, runs
    if not any(c.name == "job_store" for c in app.state.readiness):
        add_readiness_check(app, "job_store", lambda: _jobs_check(app))
    jobs.start()
    try:
        yield
    finally:
        app.state.jobs = app.state.calibrations = None
        runs.stop()
        jobs.stop()


def _document_errors_as_json(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = errors_as_json(generate())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings | None = None) -> FastAPI:
    """A fully wired app. Raises AdvisorError when a catalog override file is unusable.

    No side effects on disk: `advisor serve` creates the data directory; /readyz reports it missing."""
    settings = settings if settings is not None else Settings()
    # calibration profiles from the server's data dir: a calibrated CPU joins the catalog (reads, never writes)
    profiles = ProfileStore(settings.resolved_data_dir / PROFILE_SUBDIR)
    catalog = build_catalog(settings.gpu_files, settings.price_file)
    service = AdvisorService(catalog, profiles=profiles, allow_model_paths=False, hub=settings.hub_options())

    app = FastAPI(
        title="tuneadvisor",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served by advisor.api.routes.web with the package's own Swagger UI assets
        redoc_url=None,  # ReDoc would load its script from a CDN
        openapi_tags=[
            {"name": "advice", "description": "recommend and estimate training plans"},
            {"name": "catalog", "description": "the GPUs and models the advice is computed from"},
            {"name": "operations", "description": "liveness, readiness, metrics"},
        ],
    )
    app.state.settings = settings
    app.state.service = service
    app.state.metrics = Metrics()
    app.state.readiness = []
    app.state.body_limits = {}  # path prefix -> bytes (deps.set_body_limit); the default is max_body_bytes
    add_readiness_check(app, "catalogs", catalogs_check(service))
    add_readiness_check(app, "data_dir", data_dir_check(settings))
    add_readiness_check(app, "calibration_profiles", profiles_check(service))

    install_error_handlers(app)
    _document_errors_as_json(app)
    _include_routers(app, settings)
    app.add_middleware(
        RequestContextMiddleware,
        metrics=app.state.metrics,
        max_body_bytes=settings.max_body_bytes,
        body_limits=app.state.body_limits,
        access_log=settings.access_log,
    )
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory (``uvicorn --factory advisor.api.app:app_from_env``): settings from ADVISOR_* only."""
    settings = Settings()
    configure_logging(settings.log_level)
    return create_app(settings)
