"""Fit a calibration profile to measurements: scikit-learn regressions of the analytical model's terms.

Why this shape (the model itself is documented in ``advisor.estimators.calibrated``):

* every coefficient multiplies a physical quantity (bytes of a term, FLOPs over peak, bytes over
  bandwidth, a count of per-op overheads), so all are constrained non-negative (``positive=True``),
  and the compute coefficient is at least 1 (no step runs faster than the device's peak matmul);
* errors are relative (a 2 MiB miss matters on a 10 MiB trial, not on a 10 GiB one), so each trial
  is weighted by 1/measured^2 (least squares on relative error);
* with checkpointing the peak is a max of two phases; phases are assigned from the analytical prior,
  then re-assigned from the fit until stable;
* held-out error: leave one configuration group (architecture) out, fit on the rest, predict it;
  the analytical model is scored on the same trials beside it;
* step times measured while other processes were busy (CPU contention > 25%, or a step spread
  > 1.5x) are left out of the speed fit and counted in the profile's provenance;
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
    FAMILY_TERMS_CKPT,
    FAMILY_TERMS_NO_CKPT,
    MEMORY_TERMS_CKPT,
    MEMORY_TERMS_NO_CKPT,
    SPEED_TERMS,
    Features,
    features,
    memory_prediction,
    speed_features,
    speed_prediction,
)
from advisor.plans import TrainingPlan
from advisor.profiles import FittedRange, HeldOut, Profile, range_inputs
from advisor.specs import GpuSpec, ModelSpec
from calibration.feedback import JobFeedback, fitted_meter, select_job_rows, summary_line
from calibration.runner import MEASUREMENTS, RUN_META, read_measurements
from calibration.trial import timing_disturbed

#: the job rows a fit used (and skipped), written beside measurements.jsonl
JOB_MEASUREMENTS = "job_measurements.jsonl"

#: terms the analytical model does not have (its structure = these at 0, the others at 1)
ZERO_PRIOR = ("fixed_bytes", "attention_scores", "gradients")
#: feature name in Features.memory for each memory coefficient
_MEM_FEATURE = {
    "blocks": "blocks",
    "attention_scores": "scores",
    "recompute_block": "block",
    "residuals": "residuals",
    "tail": "tail",
    "logits": "logits",
    "quant_temporaries": "quant_temporaries",
    "backward_transient": "backward_transient",
    "gradients": "gradients",
}


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
    latest: dict[str, dict[str, Any]] = {}
    for r in read_measurements(d / MEASUREMENTS):
        latest[r["trial_id"]] = r
    return meta, list(latest.values())


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
def _columns(trials: list[Trial], ckpt: bool) -> list[tuple[str, str | None]]:
    """(coefficient, family or None) for every column of the memory design matrix."""
    fams = sorted({t.f.family for t in trials})
    fam_terms = FAMILY_TERMS_CKPT if ckpt else FAMILY_TERMS_NO_CKPT
    shared = MEMORY_TERMS_CKPT if ckpt else MEMORY_TERMS_NO_CKPT
    return [(n, fam) for n in fam_terms for fam in fams] + [(n, None) for n in shared]


def _value(t: Trial, name: str, family: str | None, phase: int) -> float:
    """Column value for trial t; phase (checkpointing only): 0 = end of forward, 1 = recompute."""
    if family is not None and t.f.family != family:
        return 0.0
    if name == "fixed_bytes":
        return 1.0
    m = t.f.memory
    if not t.f.checkpointing:
        return m[_MEM_FEATURE[name]]
    if name == "residuals":
        return m["residuals"]
    if name == "attention_scores":
        return m["scores_one_layer"] if phase == 1 else 0.0
    if name == "gradients":
        return m["gradients"]
    in_forward = name in ("tail", "logits")
    return m[_MEM_FEATURE[name]] if (phase == 0) == in_forward else 0.0


def _nnls(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    if len(y) == 0:
        return np.zeros(x.shape[1])
    return LinearRegression(positive=True, fit_intercept=False).fit(x, y, sample_weight=w).coef_


def _to_coef(cols: list[tuple[str, str | None]], theta: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for (name, fam), v in zip(cols, theta, strict=True):
        if fam is None:
            out[name] = float(v)
        else:
            out.setdefault(name, {})[fam] = float(v)
    return out


def _unit_coef(cols: list[tuple[str, str | None]]) -> dict[str, Any]:
    theta = np.array([0.0 if n in ZERO_PRIOR else 1.0 for n, _ in cols])
    return _to_coef(cols, theta)


def _fit_regime(trials: list[Trial], ckpt: bool, g: float = 1.0) -> dict[str, Any]:
    """One regime's coefficients on the trials whose peak is its forward/backward phase."""
    cols = _columns(trials, ckpt)
    coef = _unit_coef(cols)
    if not trials:
        return coef
    y = np.array([t.memory - t.f.static for t in trials])
    w = 1.0 / np.array([t.memory for t in trials]) ** 2
    key = "checkpointing" if ckpt else "no_checkpointing"
    prior = np.array([0.0 if n in ZERO_PRIOR else 1.0 for n, _ in cols])
    phases = [0] * len(trials)
    keep = np.ones(len(trials), bool)
    for _ in range(10):
        if ckpt:  # which phase holds the peak, under the current coefficients
            phases = [_ckpt_phase({key: coef}, t) for t in trials]
        x = np.array([[_value(t, n, fam, ph) for n, fam in cols] for t, ph in zip(trials, phases, strict=True)])
        # a coefficient no kept trial informs (e.g. a family never in that phase) keeps its prior
        free = (np.abs(x[keep]) > 0).any(axis=0)
        theta = prior.copy()
        rhs = y[keep] - x[keep][:, ~free] @ prior[~free]
        theta[free] = _nnls(x[keep][:, free], rhs, w[keep])
        new = _to_coef(cols, theta)
        # trials whose peak is the optimiser step say nothing about activations: leave them out
        step = {key: new, "optimizer_step": {"gradients": g}}
        new_keep = np.array([memory_prediction(step, t.f)[1] != "optimizer step" for t in trials])
        if new == coef and (new_keep == keep).all():
            break
        coef, keep = new, (new_keep if new_keep.any() else keep)
    return coef


def _ckpt_phase(coef: dict[str, Any], t: Trial) -> int:
    k = coef["checkpointing"]
    m = t.f.memory
    fwd = k["tail"] * m["tail"] + k["logits"] * m["logits"]
    fam = t.f.family
    rec = (
        (k.get("recompute_block") or {}).get(fam, 1.0) * m["block"]
        + (k.get("attention_scores") or {}).get(fam, 0.0) * m["scores_one_layer"]
        + k["quant_temporaries"] * m["quant_temporaries"]
        + k["backward_transient"] * m["backward_transient"]
    )
    return 0 if fwd >= rec else 1


def fit_memory(trials: list[Trial]) -> dict[str, Any]:
    """Memory coefficients of both regimes and of the optimiser step, alternating until stable.

    g (optimiser step: weights + adapters + states + g*gradients) comes from the trials whose gradients
    are a real share of their memory (full fine-tuning) and whose forward/backward phase, as fitted,
    under-explains the measured peak; g >= 1 (the gradients themselves are alive)."""
    g = 1.0
    coef: dict[str, Any] = {}
    for _ in range(6):
        coef = {
            "no_checkpointing": _fit_regime([t for t in trials if not t.f.checkpointing], False, g),
            "checkpointing": _fit_regime([t for t in trials if t.f.checkpointing], True, g),
            "optimizer_step": {"gradients": g},
        }
        new_g = _fit_optimizer_step(coef, trials)
        if abs(new_g - g) < 1e-3:
            break
        g = new_g
    coef["optimizer_step"] = {"gradients": g}
    return coef


def _fit_optimizer_step(coef: dict[str, Any], trials: list[Trial]) -> float:
    ratios = []
    for t in trials:
        grads = t.f.memory["gradients"]
        if grads < 0.05 * t.memory:  # LoRA: the adapters' gradients are too small to tell
            continue
        k = coef["checkpointing" if t.f.checkpointing else "no_checkpointing"]
        forward_backward = memory_prediction({**coef, "optimizer_step": {"gradients": 0.0}}, t.f)[0]
        if forward_backward >= 0.93 * t.memory:  # explained by the forward/backward phase
            continue
        ratios.append((t.memory - t.f.optimizer_static - k["fixed_bytes"]) / grads)
    return max(1.0, float(np.median(ratios))) if ratios else 1.0


def predict_memory(coef: dict[str, Any], t: Trial) -> float:
    return memory_prediction(coef, t.f)[0]


# ---- speed -------------------------------------------------------------------------------------------
def fit_speed(trials: list[Trial], memory_coef: dict[str, Any]) -> dict[str, float]:
    """Speed coefficients; compute's is 1 + a non-negative part (mfu <= 1)."""
    timed = [t for t in trials if t.step_time]
    if not timed:
        return {name: 0.0 for name in SPEED_TERMS} | {"compute": 1.0}
    feats = [speed_features(memory_coef, t.f) for t in timed]
    x = np.array([[f[n] for n in SPEED_TERMS] for f in feats])
    y = np.array([t.step_time for t in timed], float)
    theta = _nnls(x, y - x[:, 0], 1.0 / y**2)
    theta[0] += 1.0
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
    return {"memory": memory, "speed": fit_speed(trials, memory), "runtime": fit_runtime(trials, gpu)}


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
            "step_time": "median of the last quiet window of timed steps: "
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
            "fit": "sklearn LinearRegression(positive=True), weights 1/measured^2, leave-one-configuration-group-out",
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
