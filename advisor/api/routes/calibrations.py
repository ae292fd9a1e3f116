"""/v1/calibrations: start a calibration of the server's device, follow it, list the fitted profiles.

Why a background thread and one run at a time: a calibration occupies the device for minutes (its
trials must not share it with another run, or both measure each other), while the request that
started it returns at once with the run's id. Runs and their measurements live in
``<data dir>/calibrations/<run id>``; the fitted profile is installed in ``<data dir>/profiles`` and
the service's estimates for that device say ``calibrated:<profile id>`` from then on.

Every route needs an API key: a run is expensive, and profiles describe the server's hardware.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from advisor.api.auth import ApiKey, require_api_key
from advisor.api.errors import ApiError, error_responses
from advisor.api.schemas import ErrorResponse
from advisor.api.settings import Settings
from advisor.errors import AdvisorError
from advisor.profiles import PROFILE_SUBDIR, Profile, ProfileStore
from advisor.service import AdvisorService

router = APIRouter(prefix="/v1", tags=["calibration"], dependencies=[Depends(require_api_key)])


# ---- schemas (this router's request and response bodies) ----------------------------------------------
class CalibrationRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"device": "auto", "budget": "quick"}]},
    )
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: the GPU when one is visible")
    budget: Literal["quick", "standard", "thorough"] = Field("quick", description="how many trials")
    max_trials: int | None = Field(None, ge=2, le=10_000, description="run at most this many trials of the design")
    threads: int | None = Field(
        None, ge=1, le=1024, description="CPU: torch threads per trial (1 is robust on a shared machine)"
    )


class HeldOutErrors(BaseModel):
    memory_median_abs_pct_error: float
    memory_max_abs_pct_error: float
    step_time_median_abs_pct_error: float | None
    step_time_max_abs_pct_error: float | None
    n_trials: int
    n_step_time_trials: int
    n_groups: int
    analytical: dict[str, float | None]


class ProfileSummary(BaseModel):
    id: str
    created_at: str
    device: dict[str, Any]
    held_out: HeldOutErrors
    software: dict[str, str | None]


class CalibrationRun(BaseModel):
    id: str = Field(description="run id (also accepted by GET /v1/calibrations/{id})")
    status: Literal["queued", "running", "succeeded", "failed"]
    device: str
    budget: str
    created_at: str
    finished_at: str | None = None
    stage: str | None = Field(None, description="trials | re-measuring disturbed timings | fitting")
    trials_done: int = 0
    trials_total: int | None = None
    current_trial: str | None = Field(None, description="the trial running now")
    seconds_left: float | None = Field(None, description="estimate from the trials done so far")
    error: str | None = None
    profile: ProfileSummary | None = Field(None, description="the fitted profile, once succeeded")


class CalibrationList(BaseModel):
    runs: list[CalibrationRun] = Field(description="runs started by this server process, newest first")
    profiles: list[ProfileSummary] = Field(description="installed profiles, newest first")


class CalibrationStatus(BaseModel):
    run: CalibrationRun | None = None
    profile: ProfileSummary | None = None
    profile_document: dict[str, Any] | None = Field(None, description="the whole profile JSON, for a profile id")


# ---- the runs ----------------------------------------------------------------------------------------------
@dataclass
class _Run:
    id: str
    device: str
    budget: str
    max_trials: int | None
    threads: int | None
    created_at: str
    status: str = "queued"
    stage: str | None = None
    finished_at: str | None = None
    trials_done: int = 0
    trials_total: int | None = None
    current_trial: str | None = None
    started: float = field(default_factory=time.monotonic)
    error: str | None = None
    profile: Profile | None = None

    def view(self) -> dict[str, Any]:
        left = None
        if self.status == "running" and self.trials_done and self.trials_total:
            elapsed = time.monotonic() - self.started
            left = round(elapsed / self.trials_done * (self.trials_total - self.trials_done), 1)
        return {
            "id": self.id,
            "status": self.status,
            "device": self.device,
            "budget": self.budget,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "stage": self.stage,
            "trials_done": self.trials_done,
            "trials_total": self.trials_total,
            "current_trial": self.current_trial,
            "seconds_left": left,
            "error": self.error,
            "profile": None if self.profile is None else self.profile.summary(),
        }


class Calibrations:
    """The server's calibration runs (one at a time) and its profile store."""

    def __init__(self, settings: Settings, service: AdvisorService):
        self.data_dir = settings.resolved_data_dir
        self.store = ProfileStore(self.data_dir / PROFILE_SUBDIR)
        self.service = service
        self.runs: dict[str, _Run] = {}
        self._lock = threading.Lock()

    def active(self) -> _Run | None:
        return next((r for r in self.runs.values() if r.status in ("queued", "running")), None)

    def start(self, req: CalibrationRequest) -> _Run:
        try:  # fail fast: no training stack on this server, or no GPU for device=cuda
            from calibration.device import resolve_device
        except ImportError as exc:
            raise ApiError(
                503, "calibration_unavailable", f"this server lacks the calibrate extra (torch, ...): {exc}"
            ) from exc
        resolve_device(req.device)  # InvalidInputError -> 422 naming `device`
        with self._lock:
            busy = self.active()
            if busy is not None:
                raise ApiError(409, "calibration_running", f"calibration {busy.id} is still {busy.status}")
            run = _Run(
                id="cal_" + time.strftime("%Y%m%d-%H%M%S") + f"-{len(self.runs):03d}",
                device=req.device,
                budget=req.budget,
                max_trials=req.max_trials,
                threads=req.threads,
                created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
            self.runs[run.id] = run
        threading.Thread(target=self._work, args=(run,), name=f"calibration-{run.id}", daemon=True).start()
        return run

    def _work(self, run: _Run) -> None:
        run.status = "running"
        run.started = time.monotonic()

        def progress(result, done: int, total: int) -> None:
            run.trials_done, run.trials_total = done, total

        def stage(name: str, trial: str | None, index: int, count: int) -> None:
            run.stage, run.current_trial = name, trial
            if name == "trials":
                run.trials_total = count

        try:
            from calibration.calibrate import calibrate

            result = calibrate(
                device=run.device,
                budget=run.budget,
                out_dir=self.data_dir / "calibrations" / run.id,
                data_dir=self.data_dir,
                max_trials=run.max_trials,
                threads=run.threads,
                progress=False,
                on_result=progress,
                on_stage=stage,
                command=f"POST /v1/calibrations {run.budget} {run.device}",
            )
            run.profile = result.profile
            if result.profile is not None:
                self._adopt(result.profile)
            run.status = "succeeded"
        except AdvisorError as exc:
            run.status, run.error = "failed", f"{exc.field or 'input'}: {exc}"
        except Exception as exc:  # a failed run is reported in its status, never lost in a log
            run.status = "failed"
            run.error = f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_exc().splitlines(True)[-4:])
        run.finished_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        run.current_trial = run.stage = None

    def _adopt(self, profile: Profile) -> None:
        """Estimates use the new profile at once; a calibrated CPU becomes a device the catalog knows."""
        svc = self.service
        svc.profiles = self.store
        gpu = profile.gpu
        if gpu.id not in {g.id for g in svc.catalog.gpus}:
            svc.catalog = svc.catalog.with_gpus([gpu])

    def lookup(self, ident: str) -> dict[str, Any]:
        run = self.runs.get(ident)
        if run is not None:
            return {"run": run.view(), "profile": None if run.profile is None else run.profile.summary()}
        for p in self.store.profiles():
            if p.id == ident:
                return {"profile": p.summary(), "profile_document": p.to_dict()}
        raise ApiError(404, "unknown_calibration", f"no calibration run or profile {ident!r}", field="id")


def install(app: FastAPI, settings: Settings) -> None:
    """Register the routes and point the service at the profiles in the server's data dir."""
    calibrations = Calibrations(settings, app.state.service)
    app.state.calibrations = calibrations
    svc: AdvisorService = app.state.service
    svc.profiles = calibrations.store
    known = {g.id for g in svc.catalog.gpus}
    extra = [g for g in calibrations.store.devices() if g.id not in known]
    if extra:
        svc.catalog = svc.catalog.with_gpus(extra)
    app.include_router(router, responses=error_responses(401))


# ---- routes ------------------------------------------------------------------------------------------
def _state(app: FastAPI) -> Calibrations:
    return app.state.calibrations


@router.post(
    "/calibrations",
    operation_id="startCalibration",
    summary="Start a calibration of this server's device in the background",
    status_code=202,
    response_model=CalibrationRun,
    responses={
        **error_responses(409, 422),
        503: {"model": ErrorResponse, "description": "this server lacks the calibrate extra (torch, ...)"},
    },
)
def start_calibration(body: CalibrationRequest, request: Request, caller: ApiKey) -> dict[str, Any]:
    """Short real LoRA/QLoRA fine-tunes (each in its own process), a fitted profile, installed on success.
    One run at a time: 409 while another is queued or running. Follow it with GET /v1/calibrations/{id}."""
    return _state(request.app).start(body).view()


@router.get(
    "/calibrations",
    operation_id="listCalibrations",
    summary="Installed calibration profiles and this server's runs",
    response_model=CalibrationList,
)
def list_calibrations(request: Request) -> dict[str, Any]:
    cal = _state(request.app)
    runs = sorted(cal.runs.values(), key=lambda r: r.created_at, reverse=True)
    return {"runs": [r.view() for r in runs], "profiles": [p.summary() for p in cal.store.profiles()]}


@router.get(
    "/calibrations/{calibration_id}",
    operation_id="getCalibration",
    summary="A run's status, progress and result, or an installed profile",
    response_model=CalibrationStatus,
    responses=error_responses(404),
)
def get_calibration(calibration_id: str, request: Request) -> dict[str, Any]:
    """A run id gives status, trials done / total, the current trial, time left and, once done, the
    profile's held-out errors; a profile id gives the profile itself."""
    return _state(request.app).lookup(calibration_id)
