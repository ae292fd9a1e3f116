"""Calibration benchmark: how long a calibration takes, how well its profile predicts, on this machine.

    python -m calibration.bench --device cpu --budget quick --threads 1
        -> bench/results/calibration_<device>.json / .md, the profile, its report and plots
    python -m calibration.bench ... --reuse     # the same, refitting the trials already measured in --work

Measured and written (numbers, never timing assertions):

1. wall time of ``calibrate`` (trials + fit + report) against the 10-minute target for ``quick``;
2. held-out error of the profile (leave one configuration group out), beside the analytical model on
   the same trials (as shipped, and without its CUDA workspace constant, which a CPU does not have);
3. extrapolation: trials larger than any that was fitted (wider, longer sequences), predicted by the
   profile and by the analytical model;
4. the scaled rule: the same CPU with another thread count is a device "without a profile"; its
   trials are predicted from the profile scaled by the FLOP/s and bandwidth ratios;
5. how loaded the machine was (load averages, the share of CPU other processes took per trial).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from advisor.catalog import model_from_config
from advisor.estimators.analytical import AnalyticalEstimator, Coefficients
from advisor.estimators.calibrated import CalibratedEstimator
from advisor.plans import TrainingPlan
from advisor.profiles import Profile
from advisor.specs import GpuSpec
from calibration.trial import TrialResult, TrialSpec, timing_disturbed

RESULTS = Path("bench/results")


def _pct(pred: float, meas: float) -> float:
    return (pred - meas) / meas * 100


def _stats(errs: list[float]) -> dict[str, float | int | None]:
    a = [abs(e) for e in errs]
    if not a:
        return {"median_abs_pct": None, "max_abs_pct": None, "n": 0}
    return {"median_abs_pct": round(statistics.median(a), 2), "max_abs_pct": round(max(a), 2), "n": len(a)}


def extrapolation_trials(device: GpuSpec, device_str: str, threads: int | None, gpu: bool) -> list[TrialSpec]:
    """Larger than the design: wider models, longer sequences, more tokens per step."""
    from calibration.design import device_plan, scaled_config

    if gpu:
        shapes = [("llama", 3072, 28, 128256, 128), ("qwen2", 2048, 24, 65536, 128)]
        plans = [("lora", 4096, 4, False), ("qlora", 4096, 8, True), ("lora", 8192, 2, True)]
    else:
        shapes = [("llama", 512, 4, 2048, 64), ("qwen2", 448, 3, 1024, 64), ("gpt2", 384, 3, 1024, 64)]
        plans = [("lora", 1024, 2, False), ("qlora", 1024, 2, True), ("lora", 2048, 1, True)]
    out = []
    for fam, h, layers, vocab, hd in shapes:
        cfg = scaled_config(fam, h, layers, vocab, hd)
        for method, seq, mb, ckpt in plans:
            plan = device_plan(device, method, seq, mb, ckpt, lora_r=16)
            name = f"{fam}-h{h}-l{layers}"
            out.append(
                _beyond_design("extrapolate", name, f"extrapolate-{fam}-h{h}", cfg, plan, device_str, threads, 900)
            )
    return out


def _beyond_design(
    kind: str,
    name: str,
    group: str,
    cfg: dict,
    plan: TrainingPlan,
    device: str,
    threads: int | None,
    timeout_s: float,
    **kw: Any,
) -> TrialSpec:
    """A trial outside the design (`kind`: extrapolate, real-size): three timed steps."""
    from calibration.design import shape_label

    return TrialSpec(
        id=f"{kind}/{name}/{shape_label(plan)}",
        group=group,
        arch=cfg,
        plan=plan.to_dict(),
        device=device,
        threads=threads,
        timed_steps=3,
        timeout_s=timeout_s,
        **kw,
    )


def predict(results: list[TrialResult], est: AnalyticalEstimator, gpu: GpuSpec) -> list[dict[str, Any]]:
    """Per successful trial: measured and predicted peak memory and step time."""
    rows = []
    for r in results:
        if r.status != "ok" or not r.memory:
            continue
        model = model_from_config(dict(r.arch), name=r.group)
        plan = TrainingPlan.from_dict(r.plan)
        e = est.estimate(model, gpu, plan)
        rows.append(
            {
                "trial_id": r.trial_id,
                "measured_memory_bytes": r.memory["peak_bytes"],
                "predicted_memory_bytes": e.memory.allocated_peak_bytes,
                "memory_error_pct": round(_pct(e.memory.allocated_peak_bytes, r.memory["peak_bytes"]), 2),
                "measured_step_time_s": r.step_time_s,
                "predicted_step_time_s": e.speed.step_time_s,
                "step_time_error_pct": None
                if timing_disturbed(r.to_dict()) or not r.step_time_s
                else round(_pct(e.speed.step_time_s, r.step_time_s), 2),
                "cpu_contention": r.cpu_contention,
                "notes": [n for n in e.notes if n.startswith(("extrapolating", "no profile"))],
            }
        )
    return rows


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "memory": _stats([r["memory_error_pct"] for r in rows]),
        "step_time": _stats([r["step_time_error_pct"] for r in rows if r["step_time_error_pct"] is not None]),
    }


def _analytical_on_fitted(run_dir: Path, gpu: GpuSpec) -> dict[str, Any]:
    """The analytical model on the fitted trials: as shipped, and without the CUDA workspace constant."""
    from calibration.fit import build_trials, load_run

    _, rows = load_run(run_dir)
    trials = build_trials(rows, gpu)
    no_fixed = AnalyticalEstimator(Coefficients(fixed_allocated_bytes=0))
    errs = [_pct(no_fixed.estimate(t.model, gpu, t.plan).memory.allocated_peak_bytes, t.memory) for t in trials]
    return {"memory_without_fixed_allocated_bytes": _stats(errs)}


def _contention(results: list[TrialResult]) -> dict[str, Any]:
    c = [r.cpu_contention for r in results if r.cpu_contention is not None]
    if not c:
        return {}
    return {
        "median_other_processes_cpu_share": round(statistics.median(c), 3),
        "max_other_processes_cpu_share": round(max(c), 3),
        "trials_disturbed": sum(1 for r in results if r.status == "ok" and timing_disturbed(r.to_dict())),
    }


#: published pairs (same recipe, two GPUs; reference/published_measurements.csv, torchtune README
#: @bd2a0fc7, "Memory and training speed"): (model, plan, (gpu, tokens/s), (gpu, tokens/s), caveat)
PUBLISHED_PAIRS = [
    (
        "llama-3.1-8b",
        dict(
            method="lora",
            micro_batch=2,
            seq_len=2048,
            grad_checkpointing=True,
            lora_r=8,
            lora_alpha=16,
            lora_targets=("q", "v", "o", "gate", "up", "down"),
        ),
        ("rtx-4090", 3083.0),
        ("rtx-a6000", 4699.0),
        "torchtune (torch.compile, its own model code), not the hf stack; per-GPU vs aggregate not stated",
    ),
]


def published_scaled_check() -> list[dict[str, Any]]:
    """The scaled rule's arithmetic on public pairs: the source GPU's time split (analytical here, as no
    profile of either GPU exists) moved to the target by the FLOP/s and bandwidth ratios."""
    from advisor.catalog import default_catalog

    cat = default_catalog()
    est = AnalyticalEstimator()
    out = []
    for name, kw, (src_id, src_tps), (dst_id, dst_tps), caveat in PUBLISHED_PAIRS:
        model, src, dst = cat.model(name), cat.gpu(src_id), cat.gpu(dst_id)
        plan = TrainingPlan(gpu_id=src.id, dtype="bf16", **kw)
        sp = est.speed(model, src, plan)
        other = sp.step_time_s - sp.compute_s - sp.memory_bound_s
        t_dst = (
            sp.compute_s * src.tflops("bf16") / dst.tflops("bf16")
            + sp.memory_bound_s * src.memory_bandwidth_gbps / dst.memory_bandwidth_gbps
            + other
        )
        predicted, measured = sp.step_time_s / t_dst, dst_tps / src_tps
        out.append(
            {
                "model": name,
                "plan": kw | {"lora_targets": list(kw.get("lora_targets", ()))},
                "source_gpu": src_id,
                "target_gpu": dst_id,
                "predicted_throughput_ratio": round(predicted, 3),
                "measured_throughput_ratio": round(measured, 3),
                "error_pct": round((predicted / measured - 1) * 100, 1),
                "caveat": caveat,
            }
        )
    return out


def _measured(run_dir: Path) -> list[TrialResult]:
    """Every trial measured in `run_dir` (this run's and, with --reuse, earlier runs'), one per trial id,
    with its fastest undisturbed step time over repeated lines."""
    from calibration.fit import merge_passes
    from calibration.runner import read_measurements

    return [
        TrialResult(**{k: v for k, v in r.items() if k != "timing_passes"})
        for r in merge_passes(read_measurements(run_dir))
    ]


def run(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    from advisor.stack.device import describe, resolve_device
    from calibration.calibrate import calibrate
    from calibration.design import design
    from calibration.runner import load_average, run_design

    work = Path(args.work)
    if work.exists() and not args.reuse:
        shutil.rmtree(work)
    command = "python -m calibration.bench " + " ".join(a for a in sys.argv[1:] if a != "--reuse")
    load_start = load_average()
    t0 = time.perf_counter()
    res = calibrate(
        device=args.device,
        budget=args.budget,
        out_dir=work / "run",
        data_dir=work / "data",
        threads=args.threads,
        progress=True,
        install=False,
        command=command,
    )
    wall = time.perf_counter() - t0
    wall_file = work / "calibration_wall_s.json"
    if args.reuse and wall_file.exists():
        # resumed: the earlier runs' wall time, plus this run's if it measured trials (a pure refit adds nothing)
        wall = float(json.loads(wall_file.read_text())["wall_s"]) + (wall if sum(res.counts.values()) else 0.0)
    wall_file.write_text(json.dumps({"wall_s": wall}))
    profile: Profile = res.profile
    gpu = profile.gpu
    dev = resolve_device(args.device)
    meta = json.loads((res.out_dir / "run.json").read_text())
    from calibration.runner import read_measurements

    fitted_results = [TrialResult(**r) for r in read_measurements(res.out_dir)]
    out: dict[str, Any] = {
        "command": command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "platform": platform.platform(),
            "cpus": meta.get("device_raw", {}).get("threads"),
            "device": gpu.name,
            "device_id": gpu.id,
            "fp32_tflops_measured": gpu.fp32_tflops,
            "bandwidth_gbps_measured": gpu.memory_bandwidth_gbps,
            "load_average_start": load_start,
            "load_average_end_of_calibration": load_average(),
            "contention_during_calibration": _contention(fitted_results),
        },
        "software": profile.software,
        "calibration": {
            "budget": args.budget,
            "threads": args.threads,
            "wall_s": round(wall, 1),
            "target_s": 600 if args.budget == "quick" else None,
            "trials": profile.provenance.get("trials"),
            "retried_disturbed": meta.get("retried_disturbed"),
            "profile_id": profile.id,
        },
        "held_out": {
            "calibrated": {
                "memory_median_abs_pct": profile.held_out.memory_median_abs_pct_error,
                "memory_max_abs_pct": profile.held_out.memory_max_abs_pct_error,
                "step_time_median_abs_pct": profile.held_out.step_time_median_abs_pct_error,
                "step_time_max_abs_pct": profile.held_out.step_time_max_abs_pct_error,
                "n_trials": profile.held_out.n_trials,
                "n_step_time_trials": profile.held_out.n_step_time_trials,
                "n_groups": profile.held_out.n_groups,
            },
            "analytical_as_shipped": profile.held_out.analytical,
            "analytical_on_cpu": _analytical_on_fitted(res.out_dir, gpu),
            "targets": {"memory_median_abs_pct": 5.0, "step_time_median_abs_pct": 15.0},
        },
    }
    # extrapolation ---------------------------------------------------------------------------------
    extra = extrapolation_trials(gpu, dev, args.threads, gpu.gpu_class != "cpu")
    ex = run_design(extra, work / "extrapolate", meta={"device": gpu.to_dict()}, progress=True)
    ex.results = _measured(work / "extrapolate")
    cal = CalibratedEstimator(profile)
    ana = AnalyticalEstimator()
    cal_rows = predict(ex.results, cal, gpu)
    ana_rows = predict(ex.results, ana, gpu)
    out["extrapolation"] = {
        "fitted_range": {k: list(v) for k, v in profile.fitted_range.numeric.items()},
        "calibrated": _summary(cal_rows),
        "analytical": _summary(ana_rows),
        "trials": [
            {
                **c,
                "analytical_memory_error_pct": a["memory_error_pct"],
                "analytical_step_time_error_pct": a["step_time_error_pct"],
            }
            for c, a in zip(cal_rows, ana_rows, strict=True)
        ],
        "failed": [{"trial_id": r.trial_id, "status": r.status} for r in ex.results if r.status != "ok"],
    }
    # the scaled rule -----------------------------------------------------------------------------------
    if gpu.gpu_class == "cpu" and not args.skip_scaled:
        other_threads = 2 if (args.threads or 1) == 1 else 1
        other, _ = describe("cpu", other_threads)
        subset = [
            t for i, t in enumerate(design(other, "quick", device_str="cpu", threads=other_threads)) if i % 5 == 0
        ]
        sc = run_design(subset, work / "scaled", meta={"device": other.to_dict()}, progress=True)
        sc.results = _measured(work / "scaled")
        scaled = CalibratedEstimator(profile, gpu=other, scaled=True)
        sc_rows = predict(sc.results, scaled, other)
        unscaled_rows = predict(sc.results, cal, gpu)
        out["scaled_rule"] = {
            "source_device": gpu.name,
            "target_device": other.name,
            "flops_ratio": round(other.fp32_tflops / gpu.fp32_tflops, 3),
            "bandwidth_ratio": round(other.memory_bandwidth_gbps / gpu.memory_bandwidth_gbps, 3),
            "scaled": _summary(sc_rows),
            "unscaled_profile_as_is": _summary(unscaled_rows),
            "analytical": _summary(predict(sc.results, ana, other)),
            "contention": _contention(sc.results),
        }
    if args.real_size:
        from calibration.design import catalog_config, device_plan

        name, mtype = args.real_size.split(":") if ":" in args.real_size else (args.real_size, "llama")
        cfg = catalog_config(name, mtype)
        real = []
        for ckpt in (True, False):
            plan = device_plan(gpu, "lora", 512, 1, ckpt)
            real.append(
                _beyond_design(
                    "real-size", name, f"real-size-{name}", cfg, plan, dev, args.threads, 1800, max_timing_s=120
                )
            )
        rs = run_design(real, work / "real-size", meta={"device": gpu.to_dict()}, progress=True)
        rs.results = _measured(work / "real-size")
        cal_r, ana_r = predict(rs.results, cal, gpu), predict(rs.results, ana, gpu)
        out["real_size"] = {
            "model": name,
            "trials": [
                {
                    **c,
                    "analytical_memory_error_pct": a["memory_error_pct"],
                    "analytical_step_time_error_pct": a["step_time_error_pct"],
                }
                for c, a in zip(cal_r, ana_r, strict=True)
            ],
            "failed": [
                {"trial_id": r.trial_id, "status": r.status, "error": r.error} for r in rs.results if r.status != "ok"
            ],
        }
    out["scaled_rule_on_published_pairs"] = published_scaled_check()
    out["machine"]["load_average_end"] = load_average()
    return out, res


def markdown(r: dict[str, Any]) -> str:
    h = r["held_out"]
    c, a, cpu = (
        h["calibrated"],
        h["analytical_as_shipped"],
        h["analytical_on_cpu"]["memory_without_fixed_allocated_bytes"],
    )
    m = r["machine"]

    def f(v: Any) -> str:
        return "-" if v is None else (f"{v:.1f}%" if isinstance(v, float) else str(v))

    lines = [
        f"# Calibration benchmark: {m['device']}",
        "",
        f"Command: `{r['command']}` ({r['date']}); {r['software'].get('torch')} torch, transformers "
        f"{r['software'].get('transformers')}, peft {r['software'].get('peft')}, bitsandbytes {r['software'].get('bitsandbytes')}.",
        f"Machine load (1/5/15-min load averages) at start {m['load_average_start']}, end {m['load_average_end']}; "
        f"other processes' share of the CPU during the calibration trials: {json.dumps(m['contention_during_calibration'])}.",
        "",
        f"**Wall time** of `--budget {r['calibration']['budget']}` (trials, fit, report): "
        f"{r['calibration']['wall_s']:.0f} s (target {r['calibration']['target_s']} s); trials {json.dumps(r['calibration']['trials'])}, "
        f"{r['calibration']['retried_disturbed']} re-measured after a disturbed timing.",
        "",
        "**Held-out error** (leave one configuration group out, absolute relative error per trial):",
        "",
        "| model | memory median | memory max | step time median | step time max |",
        "|---|---|---|---|---|",
        f"| calibrated profile | {f(c['memory_median_abs_pct'])} | {f(c['memory_max_abs_pct'])} | {f(c['step_time_median_abs_pct'])} | {f(c['step_time_max_abs_pct'])} |",
        f"| analytical as shipped | {f(a.get('memory_median_abs_pct_error'))} | {f(a.get('memory_max_abs_pct_error'))} | {f(a.get('step_time_median_abs_pct_error'))} | {f(a.get('step_time_max_abs_pct_error'))} |",
        f"| analytical without its 64 MiB CUDA workspace | {f(cpu['median_abs_pct'])} | {f(cpu['max_abs_pct'])} | | |",
        "",
        f"Targets: memory median <= {h['targets']['memory_median_abs_pct']}%, step time median <= {h['targets']['step_time_median_abs_pct']}%. "
        f"{c['n_trials']} trials ({c['n_step_time_trials']} with undisturbed timing) in {c['n_groups']} groups.",
        "",
    ]
    ex = r["extrapolation"]
    lines += [
        "**Extrapolation** (trials larger than any fitted; fitted ranges "
        + ", ".join(
            f"{k} {v[0]:g}..{v[1]:g}"
            for k, v in ex["fitted_range"].items()
            if k in ("hidden_size", "seq_len", "tokens_per_micro_step")
        )
        + "):",
        "",
        "| trial | memory: calibrated / analytical | step time: calibrated / analytical |",
        "|---|---|---|",
    ]
    for t in ex["trials"]:
        lines.append(
            f"| `{t['trial_id']}` | {t['memory_error_pct']:+.1f}% / {t['analytical_memory_error_pct']:+.1f}% | "
            + (
                "disturbed"
                if t["step_time_error_pct"] is None
                else f"{t['step_time_error_pct']:+.1f}% / {t['analytical_step_time_error_pct']:+.1f}%"
            )
            + " |"
        )
    lines += [
        "",
        f"Summary: calibrated {json.dumps(ex['calibrated'])}; analytical {json.dumps(ex['analytical'])}.",
        "",
    ]
    if "scaled_rule" in r:
        s = r["scaled_rule"]
        lines += [
            f"**Scaled rule** ({s['source_device']} profile -> {s['target_device']}, FLOP/s ratio {s['flops_ratio']}, "
            f"bandwidth ratio {s['bandwidth_ratio']}): scaled {json.dumps(s['scaled'])}; "
            f"the profile as is (no scaling) {json.dumps(s['unscaled_profile_as_is'])}; analytical {json.dumps(s['analytical'])}; "
            f"contention {json.dumps(s['contention'])}.",
            "",
        ]
    if "real_size" in r:
        lines += [
            f"**A full-size model** ({r['real_size']['model']}, random-initialised, far outside the fitted range):",
            "",
        ]
        lines += [
            "| trial | measured | memory: calibrated / analytical | step time: calibrated / analytical |",
            "|---|---|---|---|",
        ]
        for t in r["real_size"]["trials"]:
            lines.append(
                f"| `{t['trial_id']}` | {t['measured_memory_bytes'] / 2**30:.2f} GiB, {t['measured_step_time_s']:.2f} s | "
                f"{t['memory_error_pct']:+.1f}% / {t['analytical_memory_error_pct']:+.1f}% | "
                + (
                    "disturbed"
                    if t["step_time_error_pct"] is None
                    else f"{t['step_time_error_pct']:+.1f}% / {t['analytical_step_time_error_pct']:+.1f}%"
                )
                + " |"
            )
        lines.append("")
    for p in r.get("scaled_rule_on_published_pairs", []):
        lines += [
            f"**Scaled rule on a published pair**: {p['model']} {p['plan']['method']} from {p['source_gpu']} to "
            f"{p['target_gpu']}: predicted throughput ratio {p['predicted_throughput_ratio']}, measured "
            f"{p['measured_throughput_ratio']} ({p['error_pct']:+.1f}%; {p['caveat']}).",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m calibration.bench")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--budget", default="quick", choices=("quick", "standard", "thorough"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", default="/tmp/tuneadvisor-calibration-bench")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--name", default=None, help="results file stem (default: calibration_<cpu|gpu id>)")
    p.add_argument("--skip-scaled", action="store_true")
    p.add_argument("--real-size", default=None, help="also train a catalog model at full size, e.g. qwen2.5-0.5b:qwen2")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep --work: trials already measured there are not run again (a refit after the terms changed)",
    )
    args = p.parse_args()
    out, res = run(args)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = args.name or (
        "calibration_cpu" if res.profile.gpu.gpu_class == "cpu" else f"calibration_{res.profile.gpu.id}"
    )
    (results / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")
    (results / f"{stem}.md").write_text(markdown(out))
    shutil.copy(res.out_dir / "profile.json", results / f"{stem}_profile.json")
    report = (res.out_dir / "report.md").read_text()
    for png in ("memory_predicted_vs_measured.png", "step_time_predicted_vs_measured.png"):
        report = report.replace(f"]({png})", f"]({stem}_{png})")
    (results / f"{stem}_report.md").write_text(report)
    for png in ("memory_predicted_vs_measured.png", "step_time_predicted_vs_measured.png"):
        shutil.copy(res.out_dir / png, results / f"{stem}_{png}")
    print(markdown(out))


if __name__ == "__main__":
    main()
