"""How long a trace takes at full size (the budgets: a 7B under 30 s, a 70B under 5 minutes).

    python -m bench.simulated_timing        # writes bench/results/simulated_timing.{json,md}

No cache: every trace runs. Wall seconds depend on what else the machine runs, so the load average
is recorded before and after, next to the trace's CPU seconds (what it takes on an idle core: the
trace is one Python thread).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from advisor.catalog import default_catalog
from advisor.plans import TrainingPlan
from advisor.simulated import SimulatedEstimator, library_versions
from advisor.units import GIB

OUT = Path(__file__).resolve().parent / "results"
CMD = "python -m bench.simulated_timing"

CASES = (
    ("llama-2-7b", dict(method="lora", micro_batch=4, seq_len=512, lora_targets=("all-linear",))),
    ("llama-2-7b", dict(method="qlora", micro_batch=1, seq_len=2048, lora_targets=("all-linear",))),
    ("llama-3-8b", dict(method="full", micro_batch=1, seq_len=2048)),
    ("llama-2-70b", dict(method="qlora", micro_batch=1, seq_len=2048, lora_targets=("all-linear",))),
    ("llama-2-70b", dict(method="lora", micro_batch=4, seq_len=512, lora_targets=("all-linear",))),
)


def main() -> int:
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    cat = default_catalog()
    sim = SimulatedEstimator(use_cache=False)
    rows = []
    for name, fields in CASES:
        model = cat.model(name)
        plan = TrainingPlan(gpu_id="h100-80gb", dtype="bf16", **fields)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        trace = sim.trace(model, plan)
        wall = time.perf_counter() - t0
        rows.append(
            {
                "model": name,
                "params_b": round(model.param_count / 1e9, 2),
                "plan": {k: v for k, v in plan.to_dict().items() if k not in ("notes", "id", "gpu_id")},
                "wall_seconds": round(wall, 1),
                "trace_cpu_seconds": round(trace.cpu_seconds, 1),
                "ops": trace.ops,
                "peak_gib": round(trace.peak_bytes / GIB, 3),
                "load_avg_1min_before": round(load_before, 2),
                "load_avg_1min_after": round(os.getloadavg()[0], 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    doc = {"command": CMD, "cpus": os.cpu_count(), "versions": library_versions(), "rows": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "simulated_timing.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [
        "# Simulated estimator: trace time at full size",
        "",
        f"`{CMD}` · no cache · {os.cpu_count()} CPU cores shared with other jobs (load average recorded) · "
        f"torch {doc['versions']['torch']}, transformers {doc['versions']['transformers']}",
        "",
        "| model | plan | wall s | CPU s | ops | traced peak GiB | load avg before / after |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["plan"]
        label = f"{p['method']} {p['micro_batch']}x{p['seq_len']} ckpt {'on' if p['grad_checkpointing'] else 'off'}"
        lines.append(
            f"| {r['model']} | {label} | {r['wall_seconds']} | {r['trace_cpu_seconds']} | {r['ops']:,} | "
            f"{r['peak_gib']} | {r['load_avg_1min_before']} / {r['load_avg_1min_after']} |"
        )
    lines += ["", "Budgets: a 7B under 30 s, a 70B under 300 s (wall, on this machine)."]
    (OUT / "simulated_timing.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
