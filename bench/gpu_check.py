"""The GPU check, for the day a CUDA GPU is lent: ``python -m bench.gpu_check`` (under 10 minutes).

Stages, each with its own deadline (``STAGES``; they add up to less than ``TOTAL_BUDGET_S``):

1. ``preflight``: a CUDA device visible to torch, measured and matched to its catalog entry by
   ``advisor.stack.device.describe`` in a child process (this process never creates a CUDA context, so
   the driver's device-wide memory figure, where a per-process one is not available, is the trials' own);
2. ``calibrate``: ``advisor calibrate --device cuda --budget standard`` into a private data directory;
   at its deadline the run is stopped and its measurements so far are fitted (``--fit``), so a slow
   device still yields a profile (the stopped run is said in the result);
3. ``design_sample``: a sample of the real-run design (``bench.cpu_truth.cases``: random families,
   methods, widths, vocabularies, checkpointing) on the GPU, one trial process each;
4. ``qlora_real_size``: a real QLoRA run of a full-size architecture (Llama-3.2-1B's shape, random
   weights: NF4 + double quantisation, bf16 compute where the GPU has it, paged 8-bit AdamW,
   checkpointing), several timed steps;
5. ``report``: predicted (analytical, and calibrated with the fresh profile) vs measured allocated peak,
   reserved peak, device total and step time, written to ``bench/results/gpu/<device id>.json``.

Without a CUDA device it refuses in one line (exit status 2). Each measured row carries the signed errors
``<source>_<quantity>_error_pct`` that ``python -m bench.uncertainty`` reads into the error bands.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "bench" / "results" / "gpu"
TOTAL_BUDGET_S = 600.0
EXIT_NO_DEVICE = 2


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: float
    what: str


#: the stage plan: each stage stops at its deadline; the sum stays under TOTAL_BUDGET_S with a margin
STAGES = (
    Stage("preflight", 45, "CUDA visible; measure the device and match it to the catalog (child process)"),
    Stage("calibrate", 240, "advisor calibrate --device cuda --budget standard (stopped at the deadline)"),
    Stage("calibrate_fit", 30, "fit the measurements so far when the calibration was stopped"),
    Stage("design_sample", 120, "a sample of bench.cpu_truth's random design on the GPU"),
    Stage("qlora_real_size", 120, "QLoRA of Llama-3.2-1B's shape: NF4, paged-adamw-8bit, checkpointing"),
    Stage("report", 15, "predictions (analytical, calibrated) vs measurements, written as JSON"),
)
DESIGN_SAMPLE = 10  # cases of the design tried (every family and method appear in the first ones)
REAL_SIZE = ("llama-3.2-1b", "llama")


def plan_total_s() -> float:
    return float(sum(s.budget_s for s in STAGES))


def cuda_refusal() -> str | None:
    """One line saying why this machine cannot run the check, or None. ``torch.cuda.is_available`` asks the
    driver for the device count without creating a context."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - the calibrate extra is installed in dev
        return f"bench.gpu_check: needs torch (pip install -e '.[calibrate]'): {exc}"
    if not torch.cuda.is_available():
        return "bench.gpu_check: no CUDA device visible to torch: this check needs a GPU (nothing was run)"
    return None


class StageClock:
    """Deadlines: each stage's own, and the whole run's."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.timings: dict[str, dict[str, Any]] = {}
        self._current: tuple[Stage, float] | None = None

    def start(self, name: str) -> Stage:
        stage = next(s for s in STAGES if s.name == name)
        self._current = (stage, time.monotonic())
        return stage

    def left(self) -> float:
        """Seconds left in the current stage (never past the whole run's budget)."""
        assert self._current is not None
        stage, started = self._current
        now = time.monotonic()
        return max(0.0, min(started + stage.budget_s - now, self.t0 + TOTAL_BUDGET_S - now))

    def end(self, **info: Any) -> None:
        assert self._current is not None
        stage, started = self._current
        self.timings[stage.name] = {"budget_s": stage.budget_s, "used_s": round(time.monotonic() - started, 1), **info}
        self._current = None


def _run(cmd: list[str], timeout: float, cwd: Path = ROOT, env: dict[str, str] | None = None) -> tuple[int | None, str]:
    """A child command in its own process group, killed with its children at the deadline."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


def _describe_in_child(timeout: float, device: str = "cuda:0") -> dict[str, Any]:
    threads = "1" if device == "cpu" else "None"
    code = (
        "import json; from advisor.stack.device import describe, software_versions; "
        f"g, raw = describe({device!r}, {threads}); "
        "print(json.dumps({'gpu': g.to_dict(), 'raw': raw, 'software': software_versions()}))"
    )
    rc, out = _run([sys.executable, "-c", code], timeout)
    if rc != 0:
        raise RuntimeError(f"measuring the device failed (exit {rc}): {out[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _gpu_spec(d: dict[str, Any]):
    from dataclasses import fields

    from advisor.specs import GpuSpec

    known = {f.name for f in fields(GpuSpec)}
    d = {k: v for k, v in d.items() if k in known}
    d["aliases"] = tuple(d.get("aliases", ()))
    return GpuSpec(**d)


def _pct(pred: float | None, meas: float | None) -> float | None:
    if pred is None or not meas:
        return None
    return round((pred - meas) / meas * 100.0, 2)


def score(result: dict[str, Any], gpu, estimators: dict[str, Any]) -> dict[str, Any]:
    """One trial's row: what was measured, each estimator's prediction and signed errors."""
    from advisor.catalog import model_from_config
    from advisor.plans import TrainingPlan

    plan = replace(TrainingPlan.from_dict(result["plan"]), gpu_id=gpu.id)
    mem = result.get("memory") or {}
    row: dict[str, Any] = {
        "trial_id": result["trial_id"],
        "status": result["status"],
        "error": (result.get("error") or "")[:300] or None,
        "method": plan.method,
        "framework": plan.framework,
        "num_gpus": 1,
        "device": "cpu" if gpu.gpu_class == "cpu" else "cuda",  # the band table keeps CPU and GPU rows apart
        "dtype": plan.dtype,
        "optimizer": plan.optimizer,
        "micro_batch": plan.micro_batch,
        "seq_len": plan.seq_len,
        "checkpointing": plan.grad_checkpointing,
        "measured": {
            "allocated_bytes": mem.get("peak_bytes"),
            "reserved_bytes": mem.get("reserved_bytes"),
            "device_total_bytes": mem.get("device_total_bytes"),
            "device_total_meter": mem.get("device_total_meter"),
            "step_time_s": result.get("step_time_s"),
            "step_time_meter": result.get("step_time_meter"),
        },
    }
    if result["status"] != "ok":
        return row
    model = model_from_config(dict(result["arch"]), name=result.get("group") or "gpu-check")
    row["params"] = model.param_count
    for source, est in estimators.items():
        e = est.estimate(model, gpu, plan)
        m = e.memory
        row[source] = {
            "allocated_bytes": m.allocated_peak_bytes,
            "reserved_bytes": m.reserved_peak_bytes,
            "device_total_bytes": m.device_total_bytes,
            "paged_bytes": m.paged_bytes,
            "step_time_s": e.speed.step_time_s,
        }
        meas = row["measured"]
        row[f"{source}_memory_error_pct"] = _pct(m.allocated_peak_bytes, meas["allocated_bytes"])
        row[f"{source}_reserved_error_pct"] = _pct(m.reserved_peak_bytes, meas["reserved_bytes"])
        row[f"{source}_device_total_error_pct"] = _pct(m.device_total_bytes, meas["device_total_bytes"])
        row[f"{source}_step_time_error_pct"] = _pct(e.speed.step_time_s, meas["step_time_s"])
    return row


def summary(rows: list[dict[str, Any]], sources: list[str]) -> dict[str, Any]:
    import numpy as np

    out: dict[str, Any] = {}
    for s in sources:
        for q in ("memory", "reserved", "device_total", "step_time"):
            errs = [r[f"{s}_{q}_error_pct"] for r in rows if r.get(f"{s}_{q}_error_pct") is not None]
            if not errs:
                continue
            a = np.abs(np.asarray(errs, dtype=float))
            out[f"{s} {q}"] = {
                "n": int(a.size),
                "median_pct": round(float(np.median(a)), 2),
                "p90_pct": round(float(np.percentile(a, 90)), 2),
                "worst_pct": round(float(a.max()), 2),
                "within_10pct": round(float((a <= 10).mean()), 3),
            }
    return out


def _run_trials(specs: list, work: Path, clock: StageClock, min_left_s: float = 15.0) -> list[dict[str, Any]]:
    """Trials one at a time, each in its own process, none started with less than `min_left_s` left, each
    killed at the stage's deadline."""
    from calibration.runner import TrialServer, run_isolated

    work.mkdir(parents=True, exist_ok=True)
    server = TrialServer(work / "server.log")
    out = []
    try:
        for spec in specs:
            left = clock.left()
            if left < min_left_s:
                out.append({"trial_id": spec.id, "status": "skipped", "error": "stage deadline", "plan": spec.plan})
                continue
            spec = replace(spec, timeout_s=min(spec.timeout_s, left - 5.0), max_timing_s=min(spec.max_timing_s, 20.0))
            out.append({**run_isolated(spec, work, server).to_dict(), "group": spec.group})
    finally:
        server.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=str(OUT_DIR), help="where <device id>.json is written")
    ap.add_argument("--plan", action="store_true", help="print the stage plan (budgets) and exit")
    ap.add_argument(
        "--smoke-cpu",
        action="store_true",
        help="run the same stages on this CPU at toy sizes (quick budget, 6 trials, 2 design cases, a scaled-down "
        "QLoRA) to check the plumbing without a GPU; writes to a temporary directory unless --out-dir is given",
    )
    args = ap.parse_args(argv)
    if args.plan:
        for s in STAGES:
            print(f"{s.name:16s} {s.budget_s:5.0f} s  {s.what}")
        print(f"{'total':16s} {plan_total_s():5.0f} s  (budget {TOTAL_BUDGET_S:.0f} s)")
        return 0
    smoke = args.smoke_cpu
    refusal = None if smoke else cuda_refusal()
    if refusal:
        print(refusal, file=sys.stderr)
        return EXIT_NO_DEVICE
    device = "cpu" if smoke else "cuda:0"
    if smoke and args.out_dir == str(OUT_DIR):
        args.out_dir = tempfile.mkdtemp(prefix="gpu-check-smoke-")

    from advisor.estimators.analytical import AnalyticalEstimator
    from advisor.estimators.calibrated import CalibratedEstimator
    from advisor.profiles import ProfileStore

    clock = StageClock()
    work = Path(tempfile.mkdtemp(prefix="tuneadvisor-gpu-check-"))
    data_dir = work / "data"
    env = {**os.environ, "ADVISOR_DATA_DIR": str(data_dir)}
    result: dict[str, Any] = {"command": "python -m bench.gpu_check", "stages": [asdict(s) for s in STAGES]}

    # 1. preflight
    clock.start("preflight")
    described = _describe_in_child(clock.left(), device)
    gpu = _gpu_spec(described["gpu"])
    result.update(device=described["gpu"], device_raw=described["raw"], software=described["software"])
    clock.end(device=gpu.id)
    print(f"device {gpu.name} ({gpu.id}), {gpu.memory_gib:.1f} GiB", file=sys.stderr)

    # 2. calibrate (standard budget), fitted from what ran if stopped at the deadline
    clock.start("calibrate")
    run_dir = work / "calibration"
    cmd = [sys.executable, "-m", "advisor.cli", "calibrate", "--device", "cuda", "--budget", "standard"]
    if smoke:
        cmd = [*cmd[:5], "cpu", "--budget", "quick", "--max-trials", "6", "--threads", "1"]
    # --force: a private data directory, and a run stopped at the deadline may be smaller than a profile needs
    # to be installed for everyone (advisor.profiles.install_decision); this check wants it installed anyway
    rc, log = _run(
        [*cmd, "--out", str(run_dir), "--data-dir", str(data_dir), "--json", "--force"], clock.left(), env=env
    )
    clock.end(exit=rc, stopped_at_deadline=rc is None, log_tail=log[-1500:])
    clock.start("calibrate_fit")
    if rc != 0 and run_dir.exists():
        refit = [sys.executable, "-m", "advisor.cli", "calibrate", "--fit", str(run_dir), "--data-dir", str(data_dir)]
        rc2, log2 = _run(
            [*refit, "--force"],
            clock.left(),
            env=env,
        )
        clock.end(exit=rc2, log_tail=log2[-1500:])
    else:
        clock.end(skipped="the calibration finished in time" if rc == 0 else "no run directory")
    profiles = [p for p in ProfileStore(data_dir / "profiles").profiles() if not p.stale]
    estimators: dict[str, Any] = {"analytical": AnalyticalEstimator()}
    if profiles:
        profile = max(profiles, key=lambda p: p.created_at)
        estimators["calibrated"] = CalibratedEstimator(profile, gpu, scaled=False)
        result["profile"] = {"id": profile.id, "held_out": asdict(profile.held_out)}

    # 3. a sample of the real-run design on this GPU
    clock.start("design_sample")
    from bench.cpu_truth import cases

    design = cases(gpu, seed=10, device=device, threads=1 if smoke else None)[: 2 if smoke else DESIGN_SAMPLE]
    trials = _run_trials(design, work / "design", clock)
    clock.end(cases=len(design), ok=sum(t["status"] == "ok" for t in trials))

    # 4. a real QLoRA run of a full-size architecture
    clock.start("qlora_real_size")
    from calibration.design import catalog_config, device_plan
    from calibration.trial import TrialSpec

    name, mtype = REAL_SIZE
    seq, mb = (128, 1) if smoke else (1024, 4)
    plan = device_plan(gpu, "qlora", seq, mb, True, optimizer="paged-adamw-8bit", lora_targets=("all-linear",))
    if smoke:
        from calibration.design import scaled_config

        arch, name = scaled_config("llama", 256, 2, 2048, 64), "llama-h256-l2"
    else:
        arch = catalog_config(name, mtype)
    real = TrialSpec(
        id=f"real-size/{name}/qlora-s{seq}-b{mb}-ckpt-paged",
        group=f"real-size-{name}",
        arch=arch,
        plan=plan.to_dict(),
        device=device,
        threads=1 if smoke else None,
        warmup_steps=2,
        timed_steps=5,
        timeout_s=clock.left(),
        weights_cache=str(work / "weights"),
    )
    real_trials = _run_trials([real], work / "real-size", clock, min_left_s=30.0)
    clock.end(ok=sum(t["status"] == "ok" for t in real_trials))

    # 5. report
    clock.start("report")
    rows = [{**score(t, gpu, estimators), "stage": "design_sample"} for t in trials if t["status"] != "skipped"]
    rows += [{**score(t, gpu, estimators), "stage": "qlora_real_size"} for t in real_trials if t["status"] != "skipped"]
    rows += [{**t, "stage": "skipped"} for t in [*trials, *real_trials] if t["status"] == "skipped"]
    result["rows"] = rows
    result["summary"] = summary(rows, list(estimators))
    result["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    commit = _run(["git", "rev-parse", "--short", "HEAD"], 10)[1].strip()
    result["commit"] = commit or None
    clock.end()
    result["timings"] = clock.timings
    result["wall_s"] = round(time.monotonic() - clock.t0, 1)
    result["smoke_cpu"] = smoke
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{gpu.id}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"{'estimate vs measured':32s} {'n':>3} {'median%':>8} {'p90%':>7} {'worst%':>7} {'<=10%':>6}")
    for k, s in result["summary"].items():
        print(
            f"{k:32s} {s['n']:>3} {s['median_pct']:>8.1f} {s['p90_pct']:>7.1f} {s['worst_pct']:>7.1f} "
            f"{s['within_10pct']:>6.0%}"
        )
    print(f"wrote {path} in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
