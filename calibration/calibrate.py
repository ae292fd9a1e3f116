"""One calibration, end to end: device -> trial design -> measured trials -> fitted profile -> report.

Why one function: the CLI (``advisor calibrate``) and the API's background runs must do the same
steps in the same order, and a run directory must always hold everything needed to refit or audit it
(run.json, measurements.jsonl, logs/, profile.json, fit.json, report.md and the plots).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advisor.profiles import PROFILE_SUBDIR, InstallDecision, Profile, ProfileStore, default_data_dir
from calibration.trial import TrialResult, TrialSpec

#: (trial result, trials done, trials in this run) after each trial
ProgressCallback = Callable[[TrialResult, int, int], None]
#: (stage, trial id or None, index, count) before each trial and when fitting starts
StageCallback = Callable[[str, str | None, int, int], None]


@dataclass
class CalibrationResult:
    out_dir: Path
    profile: Profile | None
    profile_path: Path | None  # where the profile was installed (None: not installed)
    report_path: Path | None
    counts: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    #: whether the profile became its device's profile, and why (None: installing was not asked for)
    install_decision: InstallDecision | None = None


def subset(trials: list[TrialSpec], n: int) -> list[TrialSpec]:
    """At most n trials, taken round-robin over the configuration groups (so held-out validation keeps groups)."""
    by_group: dict[str, list[TrialSpec]] = {}
    for t in trials:
        by_group.setdefault(t.group, []).append(t)
    out: list[TrialSpec] = []
    i = 0
    while len(out) < n and any(i < len(v) for v in by_group.values()):
        for v in by_group.values():
            if i < len(v) and len(out) < n:
                out.append(v[i])
        i += 1
    return out


def calibrate(
    device: str = "auto",
    budget: str = "quick",
    out_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    threads: int | None = None,
    max_trials: int | None = None,
    extra_trials: list[TrialSpec] | None = None,
    progress: bool = True,
    on_result: ProgressCallback | None = None,
    on_stage: StageCallback | None = None,
    install: bool = True,
    command: str | None = None,
    with_jobs: bool = False,
    force: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> CalibrationResult:
    """Measure, fit and (by default) install a profile in <data_dir>/profiles. Measurements are kept in out_dir.

    `with_jobs`: finished jobs' measurements from the service's job store (``calibration.feedback``) join
    the fit where they are comparable (same device, same meter).

    Installing: the profile replaces its device's current one only if it beats it on held-out error and is
    fitted on enough trials (``advisor.profiles.install_decision``); `force` installs it anyway.
    `should_stop`: polled while a trial runs; once true the trial processes are killed and
    ``calibration.runner.RunCancelled`` is raised (the measurements so far stay in out_dir)."""
    from advisor.stack.device import best_of, describe, resolve_device, software_versions
    from calibration.design import budget_for, design
    from calibration.feedback import read_job_feedback
    from calibration.fit import write_fit
    from calibration.report import write_report
    from calibration.runner import RunCancelled, run_design, update_meta

    t0 = time.perf_counter()
    dev = resolve_device(device)
    gpu, raw = describe(dev, threads)
    data = Path(data_dir).expanduser() if data_dir else default_data_dir()
    out = Path(out_dir).expanduser() if out_dir else data / "calibrations" / time.strftime("%Y%m%d-%H%M%S")
    trials = design(gpu, budget, device_str=dev, threads=threads)
    if max_trials is not None:
        trials = subset(trials, max_trials)
    trials += list(extra_trials or [])
    meta: dict[str, Any] = {
        "device": gpu.to_dict(),
        "device_raw": raw,
        "device_str": dev,
        "software": software_versions(),
        "budget": budget,
        "threads": raw.get("threads") if gpu.gpu_class == "cpu" else None,
        "command": command,
    }
    passes = budget_for(gpu, budget).timing_passes
    summary = run_design(
        trials,
        out,
        meta=meta,
        progress=progress,
        on_result=on_result,
        on_stage=on_stage,
        timing_passes=passes,
        should_stop=should_stop,
    )
    if should_stop is not None and should_stop():  # cancelled as the last trial ended: nothing is fitted
        raise RunCancelled("cancelled before fitting")
    if on_stage is not None:
        on_stage("fitting", None, 0, 0)
    if gpu.gpu_class == "cpu":  # measured again now that the trials are done; the faster figures are kept
        again, raw_end = describe(dev, threads)
        update_meta(out, {"device": best_of(gpu, again).to_dict(), "device_raw_end": raw_end})
    jobs = read_job_feedback(data_dir=data_dir) if with_jobs else None
    profile = write_fit(out, command=command, jobs=jobs)
    report = write_report(out)
    installed, decision = ProfileStore(data / PROFILE_SUBDIR).install(profile, force) if install else (None, None)
    return CalibrationResult(
        out_dir=out,
        profile=profile,
        profile_path=installed,
        report_path=report,
        counts=summary.counts,
        wall_s=time.perf_counter() - t0,
        install_decision=decision,
    )
