"""DoRA (peft use_dora) end to end against real and traced steps: the analytical terms of the method.

    python -m bench.dora          # writes bench/results/dora.{json,md}

Two checks, each beside LoRA of the same shape so the DoRA-specific share is visible:
1. real fp32 steps on this CPU (a calibration trial per plan: the live-tensor meter, one thread) on small
   Llama- and Qwen2-shaped models, with and without checkpointing and adapter dropout;
2. the FakeTensorMode trace of a full-size bf16 step (transformers + peft + bitsandbytes, the
   simulated estimator) on Llama-2-7B: where the adapter dtype (fp32) differs from the weights' (bf16),
   so the cast weight kept by DoRA's dropout path and the weight-norm temporaries are at full scale.
Both sides are allocated peaks (the analytical one without the 64 MiB CUDA workspace on the CPU).
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from advisor.catalog import default_catalog, model_from_config
from advisor.estimators.analytical import AnalyticalEstimator, Coefficients
from advisor.plans import TrainingPlan, make_plan
from advisor.units import GIB

OUT = Path(__file__).resolve().parent / "results"
CPU_ARCHS = {"llama-h128-l2": ("llama", 128, 2, 512, 32), "qwen2-h96-l2": ("qwen2", 96, 2, 640, 32)}
SHAPES = [
    dict(grad_checkpointing=False, lora_dropout=0.0, lora_targets=("all-linear",)),
    dict(grad_checkpointing=False, lora_dropout=0.05, lora_targets=("q", "v")),
    dict(grad_checkpointing=True, lora_dropout=0.0, lora_targets=("all-linear",)),
    dict(grad_checkpointing=True, lora_dropout=0.05, lora_targets=("all-linear",)),
]
FULL_SIZE = [
    dict(micro_batch=4, seq_len=512, lora_targets=("all-linear",)),
    dict(micro_batch=1, seq_len=2048, grad_checkpointing=False, lora_r=8, lora_targets=("q", "v")),
    dict(micro_batch=1, seq_len=2048, grad_checkpointing=False, lora_r=8, lora_dropout=0.0, lora_targets=("q", "v")),
]


def _pct(pred: float, meas: float) -> float:
    return round(100 * (pred - meas) / meas, 2)


def cpu_rows() -> list[dict]:
    from advisor.stack.device import describe
    from calibration.design import scaled_config
    from calibration.trial import TrialSpec, run_trial

    device, _ = describe("cpu", threads=1)
    est = AnalyticalEstimator(Coefficients(fixed_allocated_bytes=0))
    rows = []
    for name, (fam, h, layers, vocab, head) in CPU_ARCHS.items():
        arch = scaled_config(fam, h, layers, vocab, head)
        model = model_from_config(arch, name=name)
        for shape in SHAPES:
            for method in ("lora", "dora"):
                plan = TrainingPlan(
                    method=method, gpu_id=device.id, dtype="fp32", micro_batch=2, seq_len=64, lora_r=8, **shape
                )
                spec = TrialSpec(
                    id=f"{name}/{method}",
                    group=name,
                    arch=arch,
                    plan=plan.to_dict(),
                    threads=1,
                    timed_steps=1,
                    max_timing_s=1.0,
                    timeout_s=300,
                )
                res = run_trial(spec)
                if res.status != "ok":
                    rows.append({"model": name, "method": method, **_shape(shape), "status": res.status})
                    continue
                pred = est.estimate(model, device, plan).memory.allocated_peak_bytes
                meas = res.memory["peak_bytes"]
                rows.append(
                    {
                        "model": name,
                        "method": method,
                        **_shape(shape),
                        "measured_bytes": meas,
                        "predicted_bytes": pred,
                        "error_pct": _pct(pred, meas),
                        "trainable_params": res.trainable_params,
                    }
                )
    return rows


def traced_rows() -> list[dict]:
    from advisor.simulated import SimulatedEstimator

    cat = default_catalog()
    model, gpu = cat.model("llama-2-7b"), cat.gpu("h100-80gb")
    sim = SimulatedEstimator(cache_dir=tempfile.mkdtemp())
    ana = AnalyticalEstimator()
    rows = []
    for fields in FULL_SIZE:
        for method in ("lora", "dora"):
            plan = make_plan(method, gpu, **fields)
            t0 = time.process_time()
            s = sim.estimate(model, gpu, plan)
            a = ana.estimate(model, gpu, plan)
            sa, aa = s.memory.allocated_peak_bytes, a.memory.allocated_peak_bytes
            rows.append(
                {
                    "model": "llama-2-7b",
                    "method": method,
                    **_shape(fields),
                    "micro_batch": plan.micro_batch,
                    "seq_len": plan.seq_len,
                    "simulated_gib": round(sa / GIB, 3),
                    "analytical_gib": round(aa / GIB, 3),
                    "diff_pct": _pct(aa, sa),
                    "analytical_breakdown_gib": {k: round(v / GIB, 3) for k, v in a.memory.components.items() if v},
                    "trace_cpu_s": round(time.process_time() - t0, 1),
                }
            )
    return rows


def _shape(d: dict) -> dict:
    return {
        "checkpointing": d.get("grad_checkpointing", True),
        "lora_dropout": d.get("lora_dropout", 0.05),
        "targets": ",".join(d.get("lora_targets", ("all-linear",))),
    }


def main() -> int:
    t0 = time.time()
    cpu, traced = cpu_rows(), traced_rows()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc = {
        "command": "python -m bench.dora",
        "commit": commit,
        "machine": platform.processor() or platform.machine(),
        "wall_s": round(time.time() - t0, 1),
        "cpu_rows": cpu,
        "traced_rows": traced,
    }
    lines = [
        "# DoRA: analytical terms against real CPU steps and full-size traces",
        "",
        f"`{doc['command']}` at {commit}, {doc['wall_s']} s.",
        "",
        "## Real fp32 steps on this CPU (calibration trial, live-tensor meter)",
        "",
        "| model | method | ckpt | dropout | targets | measured MiB | predicted MiB | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in cpu:
        if "error_pct" in r:
            lines.append(
                f"| {r['model']} | {r['method']} | {r['checkpointing']} | {r['lora_dropout']} | {r['targets']} | "
                f"{r['measured_bytes'] / 2**20:.2f} | {r['predicted_bytes'] / 2**20:.2f} | {r['error_pct']:+.1f}% |"
            )
    for m in ("lora", "dora"):
        errs = [abs(r["error_pct"]) for r in cpu if r["method"] == m and "error_pct" in r]
        lines.append(
            f"\n{m}: median |error| {statistics.median(errs):.1f}%, worst {max(errs):.1f}% over {len(errs)} steps"
        )
    lines += [
        "",
        "## Full-size bf16 step traced under FakeTensorMode (Llama-2-7B, H100)",
        "",
        "| method | mb x seq | ckpt | dropout | targets | simulated GiB | analytical GiB | diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in traced:
        lines.append(
            f"| {r['method']} | {r['micro_batch']} x {r['seq_len']} | {r['checkpointing']} | {r['lora_dropout']} | "
            f"{r['targets']} | {r['simulated_gib']} | {r['analytical_gib']} | {r['diff_pct']:+.1f}% |"
        )
    _save("dora", doc, lines)
    print("\n".join(lines))
    return 0


def _save(name: str, doc: dict, lines: list[str]) -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (OUT / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
