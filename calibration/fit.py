"""Fit a calibration profile to measurements: scikit-learn regressions of the analytical model's terms.

Why this shape (the model itself is documented in ``advisor.estimators.calibrated``):

* every coefficient multiplies a physical quantity (bytes of a term, FLOPs over peak, bytes over
  bandwidth, host ops), so all are constrained non-negative (``positive=True``), and the GEMM
  coefficient is at least 1 (no step runs faster than the device's peak matmul);
* every coefficient is pulled toward its prior, the analytical model's own value (1 for a byte term,
  0 for a term the analytical model does not have, ``speed_priors`` for the time terms), by a ridge
  on the relative scale (``RIDGE_MEMORY``, ``RIDGE_SPEED``): a profile is a set of small corrections
  of the physics, not a free regression, so it extrapolates to vocabularies, widths and families the
  trials never had as the analytical terms do (checked on out-of-design real runs:
  ``python -m bench.cpu_truth``);
* errors are relative (a 2 MiB miss matters on a 10 MiB trial, not on a 10 GiB one), so each trial
  is weighted by 1/measured^2 (least squares on relative error);
* memory: the analytical model's own phases and max() are kept, so the allocated peak is piecewise
  linear in the scales; Gauss-Newton linearises it around the current scales and re-solves until stable;
* held-out error: leave one configuration group (architecture) out, fit on the rest, predict it;
  the analytical model is scored on the same trials beside it;
* step times measured while other processes were busy (CPU contention > 25%, or a step spread
  > 1.5x) are left out of the speed fit and counted in the profile's provenance; a trial measured
  more than once (re-measured, later timing passes) keeps its fastest undisturbed step time;
* finished jobs' measurements (``calibration.feedback``) join as extra rows, each job model its own
  group, when the job ran on this device and recorded the meter the profile is fitted on (a whole-
  process RSS is not live-tensor bytes: such rows are skipped and counted, with the reason). The rows
  used are kept in the run directory (``job_measurements.jsonl``), so the refit can be audited.

    python -m calibration.fit RUN_DIR        # writes RUN_DIR/profile.json and RUN_DIR/fit.json
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LinearRegression

from advisor.catalog import model_from_config
from advisor.errors import InvalidInputError
from advisor.estimators.analytical import DEFAULT_COEFFICIENTS, AnalyticalEstimator
from advisor.estimators.calibrated import (
    MEMORY_PRIOR,
    SPEED_TERMS,
    Features,
    features,
    memory_prediction,
    speed_features,
    speed_prediction,
    speed_priors,
)
from advisor.plans import TrainingPlan
from advisor.profiles import FittedRange, HeldOut, Profile, range_inputs
from advisor.specs import GpuSpec, ModelSpec
from calibration.feedback import JobFeedback, fitted_meter, select_job_rows, summary_line
from calibration.runner import MEASUREMENTS, RUN_META, read_measurements
from calibration.trial import timing_disturbed

#: the job rows a fit used (and skipped), written beside measurements.jsonl
JOB_MEASUREMENTS = "job_measurements.jsonl"


@dataclass
class Trial:
    """One successful measurement with everything the fit needs."""

    id: str
    group: str
    model: ModelSpec
    plan: TrainingPlan
    f: Features
    memory: float  # allocated peak (CUDA max_memory_allocated, or CPU live storages)
    reserved: float | None
    device_total: float | None
    step_time: float | None  # None when the timing was disturbed
    analytical_memory: float
    analytical_step_time: float


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """run.json and the measurements (the last line per trial id wins: a re-measured trial replaces the first)."""
    d = Path(run_dir)
    meta_path = d / RUN_META
    if not meta_path.exists():
        raise InvalidInputError(f"{d} has no {RUN_META}: not a calibration run directory", field="run_dir")
    meta = json.loads(meta_path.read_text())
    return meta, merge_passes(read_measurements(d / MEASUREMENTS))


def merge_passes(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per trial id: the latest line, with the fastest undisturbed step time over all its successful
    lines (re-measured disturbed trials, later timing passes: a shared machine only ever makes a step slower)."""
    latest: dict[str, dict[str, Any]] = {}
    times: dict[str, list[float]] = {}
    for r in rows:
        latest[r["trial_id"]] = r
        if r.get("status") == "ok" and r.get("step_time_s") and usable_timing(r):
            times.setdefault(r["trial_id"], []).append(float(r["step_time_s"]))
    out = []
    for tid, r in latest.items():
        if r.get("status") == "ok" and times.get(tid):
            r = {**r, "step_time_s": min(times[tid]), "timing_spread": None, "cpu_contention": None}
            r["timing_passes"] = len(times[tid])
        out.append(r)
    return out


def device_of(meta: dict[str, Any]) -> GpuSpec:
    d = dict(meta["device"])
    d["aliases"] = tuple(d.get("aliases", ()))
    known = {f.name for f in fields(GpuSpec)}
    return GpuSpec(**{k: v for k, v in d.items() if k in known})


def usable_timing(r: dict[str, Any]) -> bool:
    return not timing_disturbed(r)


def build_trials(rows: Iterable[dict[str, Any]], gpu: GpuSpec) -> list[Trial]:
    base = AnalyticalEstimator(DEFAULT_COEFFICIENTS)
    out = []
    for r in rows:
        if r.get("status") != "ok" or not r.get("memory"):
            continue
        model = model_from_config(dict(r["arch"]), name=r["group"])
        plan = TrainingPlan.from_dict(r["plan"])
        est = base.estimate(model, gpu, plan)
        mem = r["memory"]
        out.append(
            Trial(
                id=r["trial_id"],
                group=r["group"],
                model=model,
                plan=plan,
                f=features(base, model, gpu, plan),
                memory=float(mem["peak_bytes"]),
                reserved=None if mem.get("reserved_bytes") is None else float(mem["reserved_bytes"]),
                device_total=None if mem.get("device_total_bytes") is None else float(mem["device_total_bytes"]),
                step_time=float(r["step_time_s"]) if r.get("step_time_s") and usable_timing(r) else None,
                analytical_memory=float(est.memory.allocated_peak_bytes),
                analytical_step_time=float(est.speed.step_time_s),
            )
        )
    return out


# ---- memory ----------------------------------------------------------------------------------------
#: ridge strength toward the priors, in squared relative error: moving a coefficient by its own scale
#: (``_PRIOR_SCALE``) costs as much as RIDGE_MEMORY (RIDGE_SPEED) trials off by 100%; small enough that a few
#: trials that insist move it, large enough that a term the trials barely inform stays at its physics
RIDGE_MEMORY = 1e-3
RIDGE_SPEED = 1e-3
#: the GEMM coefficient's floor (1/MFU): a step's matmuls cannot beat the device's measured peak
GEMM_FLOOR = 1.0


def _nnls(
    x: np.ndarray,
    y: np.ndarray,
    w: np.ndarray,
    prior: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    ridge: float = 0.0,
) -> np.ndarray:
    """Non-negative weighted least squares, pulled toward `prior` (ridge: ridge x ((theta - prior)/scale)^2
    per coefficient, against the weighted squared residuals of the trials)."""
    if len(y) == 0:
        return np.zeros(x.shape[1]) if prior is None else prior.copy()
    if prior is not None and ridge > 0:
        k = x.shape[1]
        sc = np.ones(k) if scale is None else scale
        x = np.vstack([x, np.diag(1.0 / sc)])
        y = np.concatenate([y, prior / sc])
        w = np.concatenate([w, np.full(k, ridge)])
    return LinearRegression(positive=True, fit_intercept=False).fit(x, y, sample_weight=w).coef_


#: finite-difference step of the scales (the allocated peak is piecewise linear in them)
_SCALE_STEP = 0.01


def _memory_theta(coef: dict[str, Any], fams: list[str]) -> np.ndarray:
    a = coef.get("activation_scale") or {}
    return np.array(
        [float(a.get(f, MEMORY_PRIOR["activation_scale"])) for f in fams]
        + [float(coef.get("logits_scale", MEMORY_PRIOR["logits_scale"])), float(coef.get("fixed_bytes", 0.0))]
    )


def _memory_coef(theta: np.ndarray, fams: list[str]) -> dict[str, Any]:
    return {
        "activation_scale": {f: float(v) for f, v in zip(fams, theta[: len(fams)], strict=True)},
        "logits_scale": float(theta[len(fams)]),
        "fixed_bytes": float(theta[len(fams) + 1]),
    }


def fit_memory(trials: list[Trial]) -> dict[str, Any]:
    """The memory corrections (``advisor.estimators.calibrated``: the analytical model with a per-family
    activation scale, a logits scale and constant bytes), by Gauss-Newton on the relative errors: the
    allocated peak is a max of linear pieces in the scales, so each step linearises it around the current
    scales (finite differences) and solves the non-negative, ridge-regularised least squares (toward the
    analytical model: scales 1, no constant)."""
    fams = sorted({t.f.family for t in trials})
    prior = np.array([MEMORY_PRIOR["activation_scale"]] * len(fams) + [MEMORY_PRIOR["logits_scale"], 0.0])
    theta = prior.copy()
    if not trials:
        return _memory_coef(theta, fams)
    m = np.array([t.memory for t in trials])
    # the constant moves on the scale of the trials' median transient bytes (what a constant that size explains)
    transient = np.median([max(t.memory - t.f.static, 1.0) for t in trials])
    scale = np.array([1.0] * (len(fams) + 1) + [max(float(transient), 1.0)])
    for _ in range(12):
        coef = _memory_coef(theta, fams)
        x = np.zeros((len(trials), len(theta)))
        y = np.zeros(len(trials))
        for i, t in enumerate(trials):
            p0 = memory_prediction(coef, t.f)[0]
            j = fams.index(t.f.family)
            bumped_a = _memory_coef(theta + _SCALE_STEP * np.eye(len(theta))[j], fams)
            bumped_l = _memory_coef(theta + _SCALE_STEP * np.eye(len(theta))[len(fams)], fams)
            x[i, j] = (memory_prediction(bumped_a, t.f)[0] - p0) / _SCALE_STEP
            x[i, len(fams)] = (memory_prediction(bumped_l, t.f)[0] - p0) / _SCALE_STEP
            x[i, len(fams) + 1] = 1.0
            y[i] = m[i] - p0 + x[i] @ theta  # linearised: p(theta') = p0 + x (theta' - theta)
        new = _nnls(x, y, 1.0 / m**2, prior, scale, RIDGE_MEMORY)
        if np.allclose(new, theta, rtol=1e-4, atol=1e-6 * scale):
            theta = new
            break
        theta = new
    return _memory_coef(theta, fams)


def predict_memory(coef: dict[str, Any], t: Trial) -> float:
    return memory_prediction(coef, t.f)[0]


# ---- speed -------------------------------------------------------------------------------------------
def fit_speed(trials: list[Trial], memory_coef: dict[str, Any], gpu: GpuSpec | None = None) -> dict[str, float]:
    """Speed coefficients: non-negative corrections of the analytical time terms, pulled toward their
    priors (``speed_priors``: the analytical model's values) by a ridge on the relative scale, so a term the
    trials barely move keeps its physics and the profile extrapolates as the analytical terms do. The GEMM
    coefficient is at least 1 (no step beats the measured peak)."""
    priors = speed_priors(gpu) if gpu is not None else {n: 0.0 for n in SPEED_TERMS} | {"gemm": 1.0}
    timed = [t for t in trials if t.step_time]
    if not timed:
        return dict(priors)
    p = np.array([priors[n] for n in SPEED_TERMS])
    feats = [speed_features(memory_coef, t.f) for t in timed]
    x = np.array([[f[n] for n in SPEED_TERMS] for f in feats])
    y = np.array([t.step_time for t in timed], float)
    # scales: a prior's own size; a zero prior on the scale of the step it would have to explain
    typical = {
        n: float(np.median(y[x[:, i] > 0] / x[x[:, i] > 0, i])) if (x[:, i] > 0).any() else 1.0
        for i, n in enumerate(SPEED_TERMS)
    }
    scale = np.array([p[i] if p[i] > 0 else typical[n] for i, n in enumerate(SPEED_TERMS)])
    # gemm >= GEMM_FLOOR: fit gemm - floor (non-negative) on the time left after the floor's pass at the peak
    g = SPEED_TERMS.index("gemm")
    shift = np.zeros(len(SPEED_TERMS))
    shift[g] = GEMM_FLOOR
    theta = _nnls(x, y - x @ shift, 1.0 / y**2, np.maximum(p - shift, 0.0), scale, RIDGE_SPEED) + shift
    return {n: float(v) for n, v in zip(SPEED_TERMS, theta, strict=True)}


def fit_runtime(trials: list[Trial], gpu: GpuSpec) -> dict[str, float]:
    """CUDA only: caching-allocator slack on the transient part, and the context outside the allocator."""
    if gpu.gpu_class == "cpu":
        return {"allocator_fragmentation": 0.0, "cuda_context_bytes": 0}
    rows = [t for t in trials if t.reserved is not None]
    frag = 0.0
    if rows:
        transient = np.array([max(t.memory - t.f.static, 1.0) for t in rows])
        slack = np.array([max(t.reserved - t.memory, 0.0) for t in rows])
        frag = float(np.sum(slack * transient) / np.sum(transient**2))
    ctx = [t.device_total - t.reserved for t in rows if t.device_total is not None and t.reserved is not None]
    return {
        "allocator_fragmentation": round(frag, 4),
        "cuda_context_bytes": int(statistics.median(ctx)) if ctx else DEFAULT_COEFFICIENTS.cuda_context_bytes,
    }


def fit_all(trials: list[Trial], gpu: GpuSpec) -> dict[str, Any]:
    memory = fit_memory(trials)
    return {"memory": memory, "speed": fit_speed(trials, memory, gpu), "runtime": fit_runtime(trials, gpu)}


# ---- validation -------------------------------------------------------------------------------------
@dataclass
class Prediction:
    trial: Trial
    memory_held_out: float
    step_time_held_out: float | None


def leave_one_group_out(trials: list[Trial], gpu: GpuSpec) -> list[Prediction]:
    """Each configuration group predicted by coefficients fitted on all the other groups."""
    out = []
    for g in sorted({t.group for t in trials}):
        train = [t for t in trials if t.group != g]
        coef = fit_all(train, gpu)
        for t in trials:
            if t.group == g:
                step = speed_prediction(coef, t.f) if t.step_time else None
                out.append(Prediction(t, predict_memory(coef["memory"], t), step))
    return out


def _pct(pred: Iterable[float], meas: Iterable[float]) -> list[float]:
    return [abs(p - m) / m * 100 for p, m in zip(pred, meas, strict=True) if m]


def _stats(errors: list[float]) -> tuple[float | None, float | None]:
    if not errors:
        return None, None
    return round(float(np.median(errors)), 2), round(float(np.max(errors)), 2)


def held_out(preds: list[Prediction]) -> HeldOut:
    mem = _pct([p.memory_held_out for p in preds], [p.trial.memory for p in preds])
    timed = [p for p in preds if p.step_time_held_out is not None]
    step = _pct([p.step_time_held_out for p in timed], [p.trial.step_time for p in timed])
    a_mem = _pct([p.trial.analytical_memory for p in preds], [p.trial.memory for p in preds])
    a_step = _pct([p.trial.analytical_step_time for p in timed], [p.trial.step_time for p in timed])
    m_med, m_max = _stats(mem)
    s_med, s_max = _stats(step)
    am_med, am_max = _stats(a_mem)
    as_med, as_max = _stats(a_step)
    return HeldOut(
        memory_median_abs_pct_error=m_med if m_med is not None else float("nan"),
        memory_max_abs_pct_error=m_max if m_max is not None else float("nan"),
        step_time_median_abs_pct_error=s_med,
        step_time_max_abs_pct_error=s_max,
        n_trials=len(mem),
        n_step_time_trials=len(step),
        n_groups=len({p.trial.group for p in preds}),
        analytical={
            "memory_median_abs_pct_error": am_med,
            "memory_max_abs_pct_error": am_max,
            "step_time_median_abs_pct_error": as_med,
            "step_time_max_abs_pct_error": as_max,
        },
    )


def fitted_range(trials: list[Trial]) -> FittedRange:
    numeric: dict[str, tuple[float, float]] = {}
    for t in trials:
        for k, v in range_inputs(t.model, t.plan).items():
            lo, hi = numeric.get(k, (v, v))
            numeric[k] = (min(lo, v), max(hi, v))
    return FittedRange(
        families=tuple(sorted({t.model.family for t in trials})),
        methods=tuple(sorted({t.plan.method for t in trials})),
        dtypes=tuple(sorted({t.plan.dtype for t in trials})),
        optimizers=tuple(sorted({t.plan.optimizer for t in trials})),
        attention=tuple(sorted({t.plan.attention for t in trials})),
        numeric=numeric,
    )


# ---- the profile ---------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:80]


def fit_run(
    run_dir: str | Path, command: str | None = None, jobs: JobFeedback | None = None
) -> tuple[Profile, list[Prediction]]:
    """Fit the measurements of one run directory (plus, with `jobs`, finished jobs' measurements) into a
    profile (not yet saved anywhere)."""
    d = Path(run_dir)
    meta, rows = load_run(d)
    gpu = device_of(meta)
    job_used: list[dict[str, Any]] = []
    job_skipped: list[dict[str, Any]] = []
    if jobs is not None:
        job_used, job_skipped = select_job_rows(jobs.rows, gpu.to_dict(), meta.get("threads"), _step_meter(rows))
        jobs.used, jobs.skipped = job_used, job_skipped
    trial_rows = build_trials(rows, gpu)
    trials = trial_rows + build_trials(job_used, gpu)
    if len({t.group for t in trials}) < 2:
        raise InvalidInputError(
            f"{d} has {len(trials)} usable trials in {len({t.group for t in trials})} configuration group(s): "
            "a fit needs at least two groups (held-out validation leaves one out)",
            field="run_dir",
        )
    coef = fit_all(trials, gpu)
    preds = leave_one_group_out(trials, gpu)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.get("status", "?")] = counts.get(r.get("status", "?"), 0) + 1
    digest = hashlib.sha256((d / MEASUREMENTS).read_bytes()).hexdigest()
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    cuda = gpu.gpu_class != "cpu"
    profile = Profile(
        id=f"{_slug(gpu.id)}-{time.strftime('%Y%m%d-%H%M%S')}",
        created_at=created,
        device=gpu.to_dict(),
        software=dict(meta.get("software", {})),
        coefficients=coef,
        fitted_range=fitted_range(trials),
        held_out=held_out(preds),
        meters={
            "peak_memory": "cuda:max_memory_allocated" if cuda else "cpu:torch_dispatch_live_storage_bytes",
            "reserved": "cuda:max_memory_reserved" if cuda else None,
            "device_total": next((r["memory"].get("device_total_meter") for r in rows if r.get("memory")), None),
            "rss": "getrusage(RUSAGE_SELF).ru_maxrss of the trial process (recorded, not fitted)",
            "step_time": "last quiet window of timed steps (minimum of process CPU times, else median): "
            + STEP_METERS.get(_step_meter(rows), "wall clock (time.perf_counter)"),
            "device_peak_flops": gpu.spec_source or "catalog",
        },
        provenance={
            "command": command or meta.get("command"),
            "run_dir": str(d),
            "budget": meta.get("budget"),
            "trials": counts,
            "trials_fitted_memory": len(trial_rows),
            "trials_fitted_step_time": sum(1 for t in trial_rows if t.step_time),
            "step_time_excluded_disturbed": sum(1 for t in trial_rows if t.step_time is None),
            "measurements_sha256": digest,
            "run_started_at": meta.get("started_at"),
            "run_wall_s": meta.get("run_wall_s"),
            "load_average_start": meta.get("load_average_start"),
            "load_average_end": meta.get("load_average_end"),
            "threads": meta.get("threads"),
            "fit": "corrections of the analytical terms: sklearn LinearRegression(positive=True) (memory: "
            "Gauss-Newton on the analytical model's scales), weights 1/measured^2, ridge toward the analytical "
            f"priors (memory {RIDGE_MEMORY}, speed {RIDGE_SPEED}), leave-one-configuration-group-out; "
            "step time: fastest undisturbed of each trial's timing passes",
            "job_measurements": _job_provenance(jobs, job_used, job_skipped, gpu),
        },
    )
    return profile, preds


def _job_provenance(
    jobs: JobFeedback | None, used: list[dict[str, Any]], skipped: list[dict[str, Any]], gpu: GpuSpec
) -> dict[str, Any]:
    """How many finished jobs' measurements joined the fit, and why the others did not."""
    if jobs is None:
        return {"used": 0, "skipped": 0, "summary": "job measurements not read (advisor calibrate --with-jobs)"}
    reasons: dict[str, int] = {}
    for r in skipped:
        reasons[r["skip"]] = reasons.get(r["skip"], 0) + 1
    payload = json.dumps(used + skipped, sort_keys=True).encode()
    return {
        "used": len(used),
        "used_step_time": sum(1 for r in used if r.get("step_time_s") is not None),
        "skipped": len(skipped),
        "skipped_reasons": reasons,
        "meter": fitted_meter(gpu.gpu_class),
        "store": jobs.source,
        "job_ids": [r["job_id"] for r in used],
        "rows_sha256": hashlib.sha256(payload).hexdigest(),
        "summary": summary_line(used, skipped),
    }


STEP_METERS = {
    "process_cpu_time": "CPU time of the single-threaded trial process per step (time.process_time)",
    "cuda_synchronized_wall": "wall clock (time.perf_counter) with torch.cuda.synchronize around each step",
    "wall": "wall clock (time.perf_counter)",
}


def _step_meter(rows: list[dict[str, Any]]) -> str | None:
    found = {r.get("step_time_meter") for r in rows if r.get("status") == "ok"}
    return found.pop() if len(found) == 1 else None


def predictions_table(preds: list[Prediction], coef: dict[str, Any]) -> list[dict[str, Any]]:
    """Per trial: measured, held-out calibrated and analytical figures (what the report plots)."""
    rows = []
    for p in preds:
        t = p.trial
        rows.append(
            {
                "trial_id": t.id,
                "group": t.group,
                "family": t.model.family,
                "method": t.plan.method,
                "grad_checkpointing": t.plan.grad_checkpointing,
                "measured_memory_bytes": t.memory,
                "held_out_memory_bytes": p.memory_held_out,
                "fitted_memory_bytes": predict_memory(coef["memory"], t),
                "analytical_memory_bytes": t.analytical_memory,
                "measured_step_time_s": t.step_time,
                "held_out_step_time_s": p.step_time_held_out,
                "analytical_step_time_s": t.analytical_step_time,
            }
        )
    return rows


def write_fit(run_dir: str | Path, command: str | None = None, jobs: JobFeedback | None = None) -> Profile:
    """fit_run + profile.json and fit.json (per-trial predictions) in the run directory; with `jobs`, also
    job_measurements.jsonl (every job row read, used or skipped with its reason)."""
    d = Path(run_dir)
    profile, preds = fit_run(d, command, jobs)
    (d / "profile.json").write_text(json.dumps(profile.to_dict(), indent=1) + "\n")
    table = predictions_table(preds, profile.coefficients)
    doc: dict[str, Any] = {"profile_id": profile.id, "trials": table}
    job_prov = profile.provenance.get("job_measurements") or {}
    if jobs is not None:
        doc["job_measurements"] = job_prov.get("summary")
        lines = [json.dumps({**r, "used": True}) for r in jobs.used] + [
            json.dumps({**r, "used": False}) for r in jobs.skipped
        ]
        (d / JOB_MEASUREMENTS).write_text("".join(line + "\n" for line in lines))
    (d / "fit.json").write_text(json.dumps(doc, indent=1) + "\n")
    return profile


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m calibration.fit RUN_DIR")
    p = write_fit(sys.argv[1], command="python -m calibration.fit " + sys.argv[1])
    print(json.dumps(p.summary(), indent=1))
