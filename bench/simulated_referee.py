"""Analytical vs simulated peak memory at full size, for every architecture family in the catalog.

    python -m bench.simulated_referee                 # all models x plans (~20 min on 2 cores, cached after)
    python -m bench.simulated_referee --models llama-2-7b --plans lora-ckpt

Writes bench/results/simulated_referee.{json,md}. Both sides are the allocated peak of one GPU
(analytical: its allocated peak; simulated: the traced tensor peak + the same fixed 64 MiB), so the
difference is the estimators' disagreement, not allocator or CUDA-context constants. Rows that differ
by more than 5% are flagged; docs/simulated.md says which side is wrong and why. Each trace's seconds
are its own (cached traces keep the time of the run that made them).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

from advisor.catalog import default_catalog
from advisor.estimators.analytical import AnalyticalEstimator
from advisor.families import hf_config
from advisor.plans import TrainingPlan
from advisor.simulated import SimulatedEstimator, library_versions
from advisor.units import GIB

OUT = Path(__file__).resolve().parent / "results"
FLAG = 0.05

#: one model per architecture family (and Llama-format variant) in the catalog, 7B-70B where the
#: family has one; smaller where the catalog's largest member is smaller (phi-2, stablelm, gpt2-xl, t5-xl)
MODELS = (
    "llama-2-7b",
    "llama-3-8b",
    "mistral-7b",
    "qwen2.5-7b",
    "gemma-7b",
    "gemma-2-9b",
    "phi-3-mini",
    "phi-2",
    "stablelm-base-alpha-3b",
    "gpt2-xl",
    "t5-xl",
    "llama-2-70b",
)

#: bf16 on one GPU; seq_len capped at the model's context
PLANS = {
    "lora-ckpt": dict(method="lora", micro_batch=4, seq_len=512, lora_targets=("all-linear",)),
    "qlora-ckpt": dict(method="qlora", micro_batch=1, seq_len=2048, lora_targets=("all-linear",)),
    "full-ckpt": dict(method="full", micro_batch=1, seq_len=2048),
    "lora-nockpt": dict(
        method="lora", micro_batch=1, seq_len=2048, grad_checkpointing=False, lora_r=8, lora_targets=("q", "v")
    ),
}


def plan_for(model, fields: dict) -> TrainingPlan:
    plan = TrainingPlan(gpu_id="h100-80gb", dtype="bf16", **fields)
    return replace(plan, seq_len=min(plan.seq_len, model.max_position_embeddings))


def row(sim: SimulatedEstimator, ana: AnalyticalEstimator, name: str, label: str) -> dict:
    cat = default_catalog()
    model, gpu = cat.model(name), cat.gpu("h100-80gb")
    plan = plan_for(model, PLANS[label])
    t0 = time.perf_counter()
    s = sim.estimate(model, gpu, plan)
    wall = time.perf_counter() - t0
    a = ana.estimate(model, gpu, plan)
    sa, aa = s.memory.allocated_peak_bytes, a.memory.allocated_peak_bytes
    return {
        "model": name,
        "model_type": hf_config(model).get("model_type"),
        "params_b": round(model.param_count / 1e9, 2),
        "plan": label,
        "plan_fields": {k: v for k, v in plan.to_dict().items() if k not in ("notes", "id")},
        "analytical_gib": round(aa / GIB, 3),
        "simulated_gib": round(sa / GIB, 3),
        "diff_pct": round(100 * (aa - sa) / sa, 1),
        "flag": abs(aa - sa) > FLAG * sa,
        "analytical_phase": a.memory.peak_phase,
        "simulated_phase": s.trace.peak_phase,
        "simulated_phases_gib": {k: round(v / GIB, 3) for k, v in s.phases.items()},
        "analytical_breakdown_gib": _gib(a.memory.components),
        "simulated_breakdown_gib": _gib(s.memory.components),
        "paged_gib": {
            "analytical": round(a.memory.paged_bytes / GIB, 3),
            "simulated": round(s.trace.paged_bytes / GIB, 3),
        },
        "trace_seconds": round(s.trace.seconds, 1),
        "trace_cpu_seconds": round(s.trace.cpu_seconds, 1),
        "trace_ops": s.trace.ops,
        "cached": wall < 0.5 * s.trace.seconds,
        "notes": [n for n in s.notes if not n.startswith(("memory traced", "allocated =", "speed is"))],
    }


def _commit() -> str:
    """HEAD, and whether analytical.py differs from it (the table scores the working tree's model)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=OUT.parent)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "advisor/estimators/analytical.py"],
            capture_output=True,
            text=True,
            cwd=OUT.parent.parent,
        )
        return head.stdout.strip() + (" (analytical.py modified)" if dirty.stdout.strip() else "")
    except OSError:
        return ""


def _gib(components: dict[str, int]) -> dict[str, float]:
    return {k: round(v / GIB, 3) for k, v in components.items() if k != "runtime_overhead"}


def write(rows: list[dict], cmd: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    doc = {
        "command": cmd,
        "commit": _commit(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "versions": library_versions(),
        "flag_threshold_pct": 100 * FLAG,
        "rows": rows,
    }
    (OUT / "simulated_referee.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [
        "# Analytical vs simulated peak memory, full size",
        "",
        f"`{cmd}` at {doc['commit']} · bf16, one GPU, allocated peak (both sides + the same 64 MiB fixed buffers) · "
        f"torch {doc['versions']['torch']}, transformers {doc['versions']['transformers']}, "
        f"peft {doc['versions']['peft']}, bitsandbytes {doc['versions']['bitsandbytes']}",
        "",
        "diff = (analytical - simulated) / simulated. Rows beyond ±5% are flagged (**bold**); "
        "docs/simulated.md says which side is wrong and by which term.",
        "",
        "| model | type | plan | mb x seq | analytical GiB | simulated GiB | diff | peak phase (sim) | trace s | CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | {r['plan']} | | | | error: {r['error'][:120]} | | | |")
            continue
        pf = r["plan_fields"]
        diff = f"{r['diff_pct']:+.1f}%"
        lines.append(
            f"| {r['model']} | {r['model_type']} | {r['plan']} | {pf['micro_batch']}x{pf['seq_len']} | "
            f"{r['analytical_gib']:.2f} | {r['simulated_gib']:.2f} | {f'**{diff}**' if r['flag'] else diff} | "
            f"{r['simulated_phase']} | {r['trace_seconds']:.1f} | {r.get('trace_cpu_seconds', 0):.1f} |"
        )
    rows = [r for r in rows if "error" not in r]
    flagged = [r for r in rows if r["flag"]]
    within = len(rows) - len(flagged)
    lines += ["", f"{within}/{len(rows)} rows within 5%."]
    big = [r for r in rows if r["params_b"] >= 60]
    seven = [r for r in rows if 6 <= r["params_b"] <= 10]
    for label, sel, budget in (("7-9B", seven, 30), ("70B", big, 300)):
        if sel:
            wall = max(r["trace_seconds"] for r in sel)
            cpu = max(r.get("trace_cpu_seconds", 0) for r in sel)
            lines.append(f"Slowest {label} trace: {cpu:.1f} CPU s, {wall:.1f} s wall (budget {budget} s).")
    lines.append(
        "Trace seconds: wall time on a shared 2-core CPU with other jobs running (load average 3-15), and the "
        "trace's own CPU time (what it takes on an idle core; the trace is one Python thread); one traced step "
        "after priming the optimiser states. Cached rows keep the times of the run that traced them."
    )
    (OUT / "simulated_referee.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--plans", default=",".join(PLANS))
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    sim, ana = SimulatedEstimator(), AnalyticalEstimator()
    cmd = "python -m bench.simulated_referee" + (f" {' '.join(argv)}" if argv else "")
    rows = []
    for name in args.models.split(","):
        for label in args.plans.split(","):
            try:
                r = row(sim, ana, name, label)
            except Exception as exc:  # a family the trace cannot build is a result, not a crash
                rows.append({"model": name, "plan": label, "error": f"{type(exc).__name__}: {exc}"})
                print(f"{name:24s} {label:12s} ERROR {type(exc).__name__}: {exc}", flush=True)
                write(rows, cmd)
                continue
            rows.append(r)
            print(
                f"{name:24s} {label:12s} analytical {r['analytical_gib']:7.2f}  simulated {r['simulated_gib']:7.2f} "
                f" {r['diff_pct']:+6.1f}%  {r['trace_seconds']:6.1f}s",
                flush=True,
            )
            write(rows, cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
