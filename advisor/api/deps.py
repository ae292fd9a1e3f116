"""Shared state on ``app.state`` behind small ``Annotated`` aliases, and the readiness checks.

Routers never import globals: they take ``svc: Service``, ``settings: AppSettings``, ``jobs: Jobs`` or
``cal: CalibrationRuns`` as parameters, so every app built by ``create_app`` (one per test) is
independent. ``Jobs`` and ``CalibrationRuns`` are the background state the app's lifespan creates
(advisor.api.background); without a running lifespan they answer 503.

Readiness is a list of named checks. A later issue that brings a store appends its own::

    add_readiness_check(app, "database", lambda: (engine_ok(), "sqlite:///... reachable"))
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request

from advisor.api.background import Calibrations
from advisor.api.settings import Settings
from advisor.jobs.errors import UnavailableError
from advisor.jobs.service import JobService
from advisor.service import AdvisorService

#: A check returns (ok, one-line detail); raising counts as not ok with the exception as detail.
Check = Callable[[], tuple[bool, str]]


@dataclass(frozen=True)
class ReadinessCheck:
    name: str
    check: Check


def get_service(request: Request) -> AdvisorService:
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def _background(request: Request, name: str) -> Any:
    state = getattr(request.app.state, name, None)
    if state is None:
        raise UnavailableError(f"the server's {name} are not running (its lifespan has not started)")
    return state


def get_jobs(request: Request) -> JobService:
    """The started JobService; UnavailableError (503) while the data directory is missing."""
    return _background(request, "jobs").get()


def get_calibrations(request: Request) -> Calibrations:
    return _background(request, "calibrations")


Service = Annotated[AdvisorService, Depends(get_service)]
AppSettings = Annotated[Settings, Depends(get_settings)]
Jobs = Annotated[JobService, Depends(get_jobs)]
CalibrationRuns = Annotated[Calibrations, Depends(get_calibrations)]


def add_readiness_check(app: FastAPI, name: str, check: Check) -> None:
    """Register a check that /readyz runs; names must be unique."""
    checks: list[ReadinessCheck] = app.state.readiness
    if any(c.name == name for c in checks):
        raise ValueError(f"readiness check {name!r} already registered")
    checks.append(ReadinessCheck(name, check))


def set_body_limit(app: FastAPI, path_prefix: str, max_bytes: int) -> None:
    """Raise (or lower) the request body limit under `path_prefix` (e.g. file uploads under /v1/files);
    everything else keeps ADVISOR_MAX_BODY_BYTES. The longest matching prefix wins."""
    if not path_prefix.startswith("/") or max_bytes < 0:
        raise ValueError("path_prefix must start with '/' and max_bytes be >= 0")
    app.state.body_limits[path_prefix] = max_bytes


def run_readiness(app: FastAPI) -> list[tuple[str, bool, str]]:
    out = []
    for c in app.state.readiness:
        try:
            ok, detail = c.check()
        except Exception as exc:  # a failing check is a result, not a crash of /readyz
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        out.append((c.name, bool(ok), str(detail)))
    return out


# ---- the built-in checks ---------------------------------------------------------------------------
def catalogs_check(svc: AdvisorService) -> Check:
    def check() -> tuple[bool, str]:
        cat = svc.catalog
        ok = bool(cat.models) and bool(cat.gpus)
        return ok, f"{len(cat.models)} models, {len(cat.gpus)} GPUs"

    return check


def profiles_check(svc: AdvisorService) -> Check:
    """Calibration profiles fitted on other analytical terms are never used; their devices' requests fail
    until they are refitted, so the service is not ready while one is installed. A profile file that does
    not validate (advisor.profiles.validate_profile) is quarantined: never used (its device gets the
    catalog's numbers), and the service is not ready until the operator fixes or removes it. The detail
    names profile ids and counts only: /readyz is open to callers without a key, so no paths or reasons."""

    def check() -> tuple[bool, str]:
        quarantined = svc.profiles.quarantined()
        stale = svc.profiles.stale_profiles()
        problems = []
        if quarantined:
            ids = ", ".join(q.id for q in quarantined[:10]) + (", ..." if len(quarantined) > 10 else "")
            problems.append(
                f"{len(quarantined)} calibration profile(s) quarantined as invalid, not used: {ids} "
                "(advisor calibrate --list says why)"
            )
        problems += [p.stale_reason() for p in stale]
        if problems:
            return False, "; ".join(problems)
        return True, f"{len(svc.profiles.profiles())} calibration profiles"

    return check


def data_dir_check(settings: Settings) -> Check:
    def check() -> tuple[bool, str]:
        path = settings.resolved_data_dir
        if not path.is_dir():
            return False, f"{path} does not exist"
        if not os.access(path, os.W_OK | os.X_OK):
            return False, f"{path} is not writable"
        return True, f"{path} writable"

    return check
