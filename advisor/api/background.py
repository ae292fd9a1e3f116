"""The app's background state: the job layer (store + reconciler threads) and calibration runs (a thread).

Both are created by the app factory's lifespan (``advisor.api.app.lifespan``), put on ``app.state``
(``jobs``, ``calibrations``), reach routes through ``advisor.api.deps`` and are shut down when the
lifespan ends. Nothing here runs at import or in ``create_app``: exporting the OpenAPI document
touches no disk and starts no thread.
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from advisor.api.errors import ApiError
from advisor.api.settings import Settings
from advisor.errors import AdvisorError
from advisor.jobs.config import JobsConfig
from advisor.jobs.errors import JobsError, UnavailableError
from advisor.jobs.manager import JobManager
from advisor.jobs.schema import damage_report, recovery_hint
from advisor.jobs.service import JobService
from advisor.jobs.store import Store
from advisor.launchable import LaunchTarget
from advisor.profiles import Profile
from advisor.service import AdvisorService


# ---- the job layer --------------------------------------------------------------------------------------
class JobsRuntime:
    """The app's JobService, built and started by ``start`` (the lifespan) or, while the data directory
    was missing then, by the first request after it appeared; stopped by ``stop``.

    Creating the data directory is `advisor serve`'s job (and /readyz says it is missing), not a side
    effect of starting the app: until it exists, ``get`` raises UnavailableError (503)."""

    def __init__(self, settings: Settings, service: AdvisorService):
        self.settings, self.service = settings, service
        self._jobs: JobService | None = None
        self._stopped = False
        self._lock = threading.Lock()

    def get(self) -> JobService:
        """The started JobService (idempotent, thread-safe)."""
        svc = self._jobs
        if svc is not None and svc.manager.started:
            return svc
        with self._lock:
            if self._stopped:
                raise UnavailableError("the server is shutting down", field="data_dir")
            if self._jobs is None:
                cfg = JobsConfig.from_settings(self.settings, self.service.catalog)
                if not cfg.data_dir.is_dir():
                    raise UnavailableError(f"the data directory {cfg.data_dir} does not exist", field="data_dir")
                damage = damage_report(cfg.database_url, cfg.data_dir)
                if damage:  # never start on it: that would list 0 jobs and write over the old job directories
                    raise UnavailableError(f"{damage}. To recover: {recovery_hint(cfg.database_url)}", field="database")
                store = Store(cfg.database_url)
                self._jobs = JobService(cfg, store, self.service, JobManager(cfg, store))
            if not self._jobs.manager.started:
                try:
                    self._jobs.manager.start()
                except SQLAlchemyError as exc:  # unreachable or unreadable database: job routes 503, advice serves
                    raise UnavailableError(
                        f"the job database cannot be opened ({type(exc).__name__}); "
                        "`advisor db status` says more, `advisor db upgrade` migrates an older schema",
                        field="database",
                    ) from exc
            return self._jobs

    def start(self) -> None:
        """Start the reconciler with the server (a restart re-adopts running jobs at once)."""
        with contextlib.suppress(UnavailableError):  # /readyz says why; the first request after the fix starts it
            self.get()

    def stop(self) -> None:
        """Stop the reconciler's threads and close the store; training processes keep running."""
        with self._lock:
            self._stopped = True
            svc, self._jobs = self._jobs, None
        if svc is not None:
            svc.manager.stop()
            svc.store.close()

    def launch_target(self) -> LaunchTarget:
        """The job runner /v1/recommend marks plans launchable for: the built JobService's launcher (a local one
        with its device slots), else the launcher the settings name. Never starts anything: recommend must not
        wait on a database that is down."""
        svc = self._jobs
        if svc is not None:
            return svc.launch_target()
        return LaunchTarget(str(self.settings.job_launcher), None)

    def check(self) -> tuple[bool, str]:
        """The `job_store` readiness check."""
        try:
            svc = self.get()
        except JobsError as exc:
            return False, f"job store not started: {exc}"
        ok, detail = svc.store.ping()
        if svc.manager.last_error:
            return False, f"{detail}; reconciler: {svc.manager.last_error}"
        return ok, detail + ("; reconciling" if svc.manager.leader else "; another process reconciles")


# ---- calibration runs ---------------------------------------------------------------------------------------
class CalibrationStopped(Exception):
    """Raised inside a run's progress callbacks once the server shuts down: the run ends between trials."""


@dataclass
class CalibrationRun:
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
    force: bool = False  # install even if it does not beat the device's profile (an install key asked)
    installed: bool = False
    install_note: str | None = None  # why the fitted profile was (not) installed
    cancel: threading.Event = field(default_factory=threading.Event)

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
            "installed": self.installed,
            "install_note": self.install_note,
        }


class Calibrations:
    """The server's calibration runs (one at a time, each in a background thread) and its profile store
    (the service's: a fitted profile is used by the estimates at once)."""

    #: how long shutdown waits for a run to reach its next trial boundary
    STOP_WAIT_S = 5.0

    def __init__(self, settings: Settings, service: AdvisorService):
        self.data_dir = settings.resolved_data_dir
        self.service = service
        self.store = service.profiles
        self.runs: dict[str, CalibrationRun] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def active(self) -> CalibrationRun | None:
        return next((r for r in self.runs.values() if r.status in ("queued", "running")), None)

    def start(
        self, device: str, budget: str, max_trials: int | None, threads: int | None, force: bool = False
    ) -> CalibrationRun:
        try:  # fail fast: no training stack on this server, or no GPU for device=cuda
            from advisor.stack.device import resolve_device
        except ImportError as exc:
            raise ApiError(
                503, "calibration_unavailable", f"this server lacks the calibrate extra (torch, ...): {exc}"
            ) from exc
        resolve_device(device)  # InvalidInputError -> 422 naming `device`
        with self._lock:
            if self._stopping.is_set():
                raise ApiError(503, "unavailable", "the server is shutting down")
            busy = self.active()
            if busy is not None:
                raise ApiError(409, "calibration_running", f"calibration {busy.id} is still {busy.status}")
            run = CalibrationRun(
                id="cal_" + time.strftime("%Y%m%d-%H%M%S") + f"-{len(self.runs):03d}",
                device=device,
                budget=budget,
                max_trials=max_trials,
                threads=threads,
                created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                force=force,
            )
            self.runs[run.id] = run
            thread = threading.Thread(target=self._work, args=(run,), name=f"calibration-{run.id}", daemon=True)
            self._threads.append(thread)
        thread.start()
        return run

    def cancel(self, ident: str) -> CalibrationRun:
        """Cancel a queued or running run: its trial process is killed within TrialServer.POLL_S, the run ends
        `cancelled` (its measurements stay in its run directory; nothing is installed). Cancelling a finished
        run is a 409; an unknown id a 404."""
        run = self.runs.get(ident)
        if run is None:
            raise ApiError(404, "unknown_calibration", f"no calibration run {ident!r}", field="id")
        if run.status not in ("queued", "running"):
            raise ApiError(409, "calibration_finished", f"calibration {ident} already {run.status}")
        run.cancel.set()
        return run

    def stop(self) -> None:
        """No new runs; a running one is cancelled (its trial killed; waited for up to STOP_WAIT_S)."""
        self._stopping.set()
        deadline = time.monotonic() + self.STOP_WAIT_S
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _work(self, run: CalibrationRun) -> None:
        run.started = time.monotonic()
        if run.cancel.is_set():  # cancelled while queued
            run.status, run.error = "cancelled", "cancelled: before it started"
            run.finished_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            return
        run.status = "running"

        def should_stop() -> bool:
            return self._stopping.is_set() or run.cancel.is_set()

        def check() -> None:
            if run.cancel.is_set():
                raise CalibrationStopped("cancelled")
            if self._stopping.is_set():
                raise CalibrationStopped("the server shut down during the run")

        def progress(result: Any, done: int, total: int) -> None:
            run.trials_done, run.trials_total = done, total
            check()

        def stage(name: str, trial: str | None, index: int, count: int) -> None:
            check()
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
                force=run.force,
                should_stop=should_stop,
            )
            run.profile = result.profile
            decision = result.install_decision
            run.installed = bool(result.profile_path)
            run.install_note = None if decision is None else decision.reason
            if result.profile is not None and run.installed:
                self._adopt(result.profile)
            run.status = "succeeded"
        except AdvisorError as exc:
            run.status, run.error = "failed", f"{exc.field or 'input'}: {exc}"
        except Exception as exc:  # a failed run is reported in its status, never lost in a log
            if run.cancel.is_set() or self._stopping.is_set():  # CalibrationStopped, the runner's RunCancelled
                cancelled = run.cancel.is_set()
                run.status = "cancelled" if cancelled else "failed"
                run.error = f"cancelled: {exc}" if cancelled else "the server shut down during the run"
            else:
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
                return {"profile": p.summary(), "profile_document": p.public_dict()}
        raise ApiError(404, "unknown_calibration", f"no calibration run or profile {ident!r}", field="id")

    def listing(self) -> dict[str, Any]:
        runs = sorted(self.runs.values(), key=lambda r: r.created_at, reverse=True)
        return {"runs": [r.view() for r in runs], "profiles": [p.summary() for p in self.store.profiles()]}
