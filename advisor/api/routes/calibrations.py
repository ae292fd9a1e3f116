"""/v1/calibrations: start a calibration of the server's device, follow it, list the fitted profiles.

Why a background thread and one run at a time: a calibration occupies the device for minutes (its
trials must not share it with another run, or both measure each other), while the request that
started it returns at once with the run's id. Runs and their measurements live in
``<data dir>/calibrations/<run id>``; the fitted profile is installed in ``<data dir>/profiles`` and
the service's estimates for that device say ``calibrated:<profile id>`` from then on. The runs themselves
(advisor.api.background.Calibrations) belong to the app's lifespan; this module only routes to them.

Every route needs an API key: a run is expensive, and profiles describe the server's hardware.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from advisor.api.auth import ApiKey, require_api_key
from advisor.api.deps import AppSettings, CalibrationRuns
from advisor.api.errors import ApiError, error_responses
from advisor.api.routes.common import route
from advisor.api.schemas import ErrorResponse

router = APIRouter(
    prefix="/v1", tags=["calibration"], dependencies=[Depends(require_api_key)], responses=error_responses(401)
)


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
    install: Literal["if_better", "force"] = Field(
        "if_better",
        description="if_better: the fitted profile becomes the device's profile only if it is fitted on enough "
        "trials and beats the current profile's held-out errors; force: install it anyway (only API keys listed "
        "in ADVISOR_CALIBRATION_INSTALL_KEYS; 403 otherwise)",
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
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
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
    installed: bool = Field(False, description="whether the fitted profile became the device's profile")
    install_note: str | None = Field(None, description="why the fitted profile was or was not installed")


class CalibrationList(BaseModel):
    runs: list[CalibrationRun] = Field(description="runs started by this server process, newest first")
    profiles: list[ProfileSummary] = Field(description="installed profiles, newest first")


class CalibrationStatus(BaseModel):
    run: CalibrationRun | None = None
    profile: ProfileSummary | None = None
    profile_document: dict[str, Any] | None = Field(None, description="the whole profile JSON, for a profile id")


# ---- routes ------------------------------------------------------------------------------------------
@route(
    router.post,
    "/calibrations",
    "startCalibration",
    "Start a calibration of this server's device in the background",
    CalibrationRun,
    status_code=202,
    errors=(403, 409, 422),
    responses={503: {"model": ErrorResponse, "description": "this server lacks the calibrate extra (torch, ...)"}},
)
def start_calibration(
    body: CalibrationRequest, cal: CalibrationRuns, caller: ApiKey, settings: AppSettings
) -> dict[str, Any]:
    """Short real LoRA/QLoRA fine-tunes (each in its own process) and a fitted profile, installed when it is
    fitted on enough trials and beats the device's current profile on held-out error (or `install: force`
    from a key in ADVISOR_CALIBRATION_INSTALL_KEYS). One run at a time: 409 while another is queued or running.
    Follow it with GET /v1/calibrations/{id}; stop it with POST /v1/calibrations/{id}/cancel."""
    force = body.install == "force"
    if force and caller.key_id not in settings.calibration_install_keys:
        raise ApiError(
            403,
            "install_not_allowed",
            f"this API key ({caller.key_id}) may not force-install a calibration profile: the operator lists the "
            "keys that may in ADVISOR_CALIBRATION_INSTALL_KEYS, or installs with advisor calibrate --fit RUN_DIR "
            "--force",
            field="install",
        )
    return cal.start(body.device, body.budget, body.max_trials, body.threads, force=force).view()


@route(
    router.post,
    "/calibrations/{calibration_id}/cancel",
    "cancelCalibration",
    "Cancel a queued or running calibration (its trial process is killed)",
    CalibrationRun,
    errors=(404, 409),
)
def cancel_calibration(calibration_id: str, cal: CalibrationRuns) -> dict[str, Any]:
    """The run's trial process is killed at once; the run ends `cancelled` (follow it with GET): its
    measurements stay in its run directory, nothing is fitted or installed. 409 once it has finished."""
    return cal.cancel(calibration_id).view()


@route(
    router.get,
    "/calibrations",
    "listCalibrations",
    "Installed calibration profiles and this server's runs",
    CalibrationList,
)
def list_calibrations(cal: CalibrationRuns) -> dict[str, Any]:
    return cal.listing()


@route(
    router.get,
    "/calibrations/{calibration_id}",
    "getCalibration",
    "A run's status, progress and result, or an installed profile",
    CalibrationStatus,
    errors=(404,),
)
def get_calibration(calibration_id: str, cal: CalibrationRuns) -> dict[str, Any]:
    """A run id gives status, trials done / total, the current trial, time left and, once done, the
    profile's held-out errors; a profile id gives the profile itself."""
    return cal.lookup(calibration_id)
