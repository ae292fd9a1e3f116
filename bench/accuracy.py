"""Predicted vs published peak memory, per dataset, beside two peer rules of thumb.

    python -m bench.accuracy            # writes bench/results/accuracy.{md,json}

Datasets (bench/published.py): ``published_1`` and ``published_2``, scored apart. Our statistic is
matched to the source's: allocated (litgpt, torchtune "active"), reserved (the caching allocator's
segments) or device (nvidia-smi-like: reserved + the CUDA context). Peers: "weights x 4 for Adam
training" (16-bit weights x 4; for LoRA and QLoRA applied to the frozen weights' real storage, which is
how it is usually quoted) and "weights only" (accelerate's estimate-memory: the model's storage).

No constant here or in the analytical model is fitted to these rows. Every scored row off by more than
20% carries a written explanation (``EXPLAINED``: what the source's set-up or stack keeps that the row's
plan cannot express, checkable against the cited source); the bench counts the unexplained ones.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from advisor.catalog import default_catalog
from advisor.estimators.analytical import AnalyticalEstimator
from advisor.units import GIB
from bench.published import DATASETS, Case, load_cases

OUT = Path(__file__).resolve().parent / "results"
CMD = "python -m bench.accuracy"
TARGET_MEDIAN = 5.0  # issue 10: memory median at most 5% per dataset
TARGET_WORST = 20.0  # ... and no row over 20% left unexplained

#: rows whose set-up is not what the plan can express, by Case.key: each note says what differs and how to check it
EXPLAINED: dict[str, str] = {}


#: rows over 20% we could not explain from their sources: what is known, so the next reader can check further
OPEN: dict[str, str] = {}


def explain(case: Case, ours: float, est: AnalyticalEstimator) -> str:
    """A computed explanation where the source's own code states a set-up the plan cannot carry."""
    if case.key == "published_2:7":
        # peft examples/sft/utils.py create_and_prepare_model: torch_dtype = quant_storage_dtype if 4-bit else
        # torch.float32, so FSDP keeps fp32 shards (bf16 only in the gathered blocks, mixed precision)
        fp32 = ours + case.model.param_count * (4 - 2) / case.plan.num_gpus / GIB
        return (
            "peft's examples/sft loads non-quantised models with torch_dtype=float32 (utils.create_and_prepare_model), "
            "so FSDP keeps fp32 shards where the plan has bf16 ones: with fp32 shards we predict "
            f"{fp32:.1f} GiB ({pct(fp32, case.measured_gib):+.0f}%)"
        )
    if case.framework == "litgpt" and case.plan.method == "qlora":
        # methods/qlora.py counts bitsandbytes' MatMul4Bit input saves in fp32 for litgpt; with Lightning's
        # BitsandbytesPrecision the compute dtype (bf16) is passed to bnb, which would save them in bf16
        from advisor.families import get_family

        m, p = case.model, case.plan
        parallel = get_family(m.family).parallel_residual
        per_tok = m.hidden_size + m.q_dim + (0 if parallel else m.hidden_size) + m.intermediate_size
        alt = ours - 2 * per_tok * p.micro_batch * p.seq_len * m.total_layers / GIB
        return (
            f"with bitsandbytes' saved linear inputs in bf16 instead of fp32 we predict {alt:.1f} GiB "
            f"({pct(alt, case.measured_gib):+.0f}%): the 2023 lit-gpt rows fit that, the 2024 config_hub rows the fp32 "
            "count"
        )
    return EXPLAINED.get(case.key, "")


def weights_bytes(case: Case) -> float:
    m, p = case.model, case.plan
    if p.method == "qlora":
        n_lin = m.linear_weight_params
        return n_lin * 0.5 + n_lin / 64 * (1 + 4 / 256) + (m.param_count - n_lin) * 2
    return m.param_count * 2


def peers(case: Case) -> dict[str, float]:
    w = weights_bytes(case) / case.plan.num_gpus if case.plan.sharding == "fsdp" else weights_bytes(case)
    return {"weights_x4": 4 * w / GIB, "weights_only": w / GIB}


def static_floor(case: Case, est: AnalyticalEstimator) -> float:
    """Weights + gradients + optimiser states the stated set-up must hold at its optimiser step."""
    gpu = default_catalog().gpu(case.plan.gpu_id)
    comp = est.memory(case.model, gpu, case.plan).components
    if case.plan.method != "full":
        return comp["weights"]
    m = case.model
    e = 2
    n = case.plan.num_gpus if case.plan.sharding == "fsdp" else 1
    states = 2 * e if case.plan.optimizer == "adamw" else 2
    return m.param_count * (e + e + (0 if case.plan.optimizer.startswith("paged") else states)) / n


def predict(case: Case, est: AnalyticalEstimator) -> float:
    """Our figure in GiB for the statistic the source printed."""
    gpu = default_catalog().gpu(case.plan.gpu_id)
    mem = est.memory(case.model, gpu, case.plan)
    if case.statistic == "reserved":
        value = mem.reserved_peak_bytes
    elif case.statistic == "device":
        value = mem.device_total_bytes
    else:
        value = mem.allocated_peak_bytes
    return value / GIB


def pct(pred: float, meas: float) -> float:
    return 100 * (pred - meas) / meas


def summary(errs: list[float]) -> dict:
    """n, median, p90, worst (absolute %), share within 10%."""
    if not errs:
        return {"n": 0, "median_abs_pct": None, "p90_abs_pct": None, "worst_abs_pct": None, "within_10pct": None}
    a = sorted(abs(e) for e in errs)
    p90 = a[min(len(a) - 1, round(0.9 * (len(a) - 1)))]
    return {
        "n": len(a),
        "median_abs_pct": round(statistics.median(a), 1),
        "p90_abs_pct": round(p90, 1),
        "worst_abs_pct": round(a[-1], 1),
        "within_10pct": round(sum(e <= 10 for e in a) / len(a), 3),
    }


def score_dataset(cases: list[Case], est: AnalyticalEstimator) -> dict:
    scored, oom, skipped, inconsistent = [], [], [], []
    for c in cases:
        if c.skip:
            skipped.append(
                {
                    "row": c.row,
                    "model": c.raw["model"],
                    "method": c.raw["method"],
                    "has_memory": c.measured_gib is not None and c.kind.startswith("measured"),
                    "reason": c.skip,
                }
            )
            continue
        gpu = default_catalog().gpu(c.plan.gpu_id)
        ours = predict(c, est)
        if c.kind.startswith("measured (OOM)"):
            fits = est.memory(c.model, gpu, c.plan).fits
            oom.append(
                {
                    "row": c.row,
                    "model": c.model.name,
                    "method": c.plan.method,
                    "gpu": gpu.id,
                    "micro_batch": c.plan.micro_batch,
                    "seq_len": c.plan.seq_len,
                    "predicted_gib": round(ours, 2),
                    "gpu_gib": gpu.memory_gib,
                    "we_predict_oom": not fits,
                }
            )
            continue
        floor = static_floor(c, est) / GIB
        if floor > c.measured_gib * 1.02:
            inconsistent.append(
                {
                    "row": c.row,
                    "model": c.model.name,
                    "method": c.plan.method,
                    "optimizer": c.plan.optimizer,
                    "num_gpus": c.plan.num_gpus,
                    "measured_gib": round(c.measured_gib, 2),
                    "static_floor_gib": round(floor, 2),
                }
            )
            continue
        alt = ""
        p = peers(c)
        err = pct(ours, c.measured_gib)
        scored.append(
            {
                "key": c.key,
                "row": c.row,
                "model": c.model.name,
                "method": c.plan.method,
                "framework": c.framework,
                "gpu": gpu.id,
                "num_gpus": c.plan.num_gpus,
                "seq_len": c.plan.seq_len,
                "micro_batch": c.plan.micro_batch,
                "grad_accum": c.plan.grad_accum,
                "ckpt": c.plan.grad_checkpointing,
                "optimizer": c.plan.optimizer,
                "statistic": c.statistic,
                "unit": c.unit,
                "measured_gib": round(c.measured_gib, 2),
                "predicted_gib": round(ours, 2),
                "error_pct": round(err, 1),
                "analytical_memory_error_pct": round(err, 1),
                "weights_x4_error_pct": round(pct(p["weights_x4"], c.measured_gib), 1),
                "weights_only_error_pct": round(pct(p["weights_only"], c.measured_gib), 1),
                "explanation": explain(c, ours, est) or alt,
            }
        )
    not_expressible = [s for s in skipped if s["has_memory"]]
    over = [r for r in scored if abs(r["error_pct"]) > TARGET_WORST]
    return {
        "rows_total": len(cases),
        "n": len(scored),
        "n_not_expressible": len(not_expressible),
        "oom_rows": len(oom),
        "oom_agreement": f"{sum(o['we_predict_oom'] for o in oom)}/{len(oom)}",
        "ours": summary([r["error_pct"] for r in scored]),
        "peer_weights_x4": summary([r["weights_x4_error_pct"] for r in scored]),
        "peer_weights_only": summary([r["weights_only_error_pct"] for r in scored]),
        "over_20pct": len(over),
        "over_20pct_unexplained": sum(not r["explanation"] for r in over),
        "scored": scored,
        "oom": oom,
        "inconsistent": inconsistent,
        "skipped": skipped,
    }


def _fmt(v) -> str:
    return "-" if v is None else f"{v}"


def render(res: dict) -> list[str]:
    lines = [
        "# Peak-memory accuracy on published measurements",
        "",
        f"`{CMD}` (analytical estimator, default coefficients; no constant tuned to these rows). Each dataset is "
        "scored apart; n = rows scored, n not expressible = rows with a memory figure whose set-up a plan cannot "
        "express (reason per row in accuracy.json). Errors are |predicted - measured| / measured.",
        "",
        "| dataset | estimator | n | n not expressible | median | p90 | worst | within 10% | rows > 20% (unexplained) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in res["datasets"].items():
        for label, key in (
            ("tuneadvisor analytical", "ours"),
            ("peer: weights x 4", "peer_weights_x4"),
            ("peer: weights only", "peer_weights_only"),
        ):
            s = d[key]
            within = "-" if s["within_10pct"] is None else f"{100 * s['within_10pct']:.0f}%"
            extra = f"{d['over_20pct']} ({d['over_20pct_unexplained']})" if key == "ours" else ""
            lines.append(
                f"| {name} | {label} | {s['n']} | {d['n_not_expressible']} | {_fmt(s['median_abs_pct'])}% | "
                f"{_fmt(s['p90_abs_pct'])}% | {_fmt(s['worst_abs_pct'])}% | {within} | {extra} |"
            )
    lines += ["", f"Targets (issue 10): median at most {TARGET_MEDIAN:.0f}% per dataset; no row over 20% unexplained."]
    for name, d in res["datasets"].items():
        lines += [
            "",
            f"## {name}",
            "",
            f"Rows: {d['rows_total']} in the file, {d['n']} scored, {d['oom_rows']} reported OOM "
            f"(we also predict OOM: {d['oom_agreement']}), {len(d['inconsistent'])} inconsistent with their stated "
            f"set-up, {len(d['skipped'])} skipped.",
            "",
            "| row | model | method | stack | GPU | n | seq | mb | ga | ckpt | optimizer | stat | measured GiB | ours GiB "
            "| ours % | x4 % | weights % |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in d["scored"]:
            lines.append(
                f"| {r['row']} | {r['model']} | {r['method']} | {r['framework']} | {r['gpu']} | {r['num_gpus']} | "
                f"{r['seq_len']} | {r['micro_batch']} | {r['grad_accum']} | {'on' if r['ckpt'] else 'off'} | "
                f"{r['optimizer']} | {r['statistic']} | {r['measured_gib']} | {r['predicted_gib']} | "
                f"{r['error_pct']:+} | {r['weights_x4_error_pct']:+} | {r['weights_only_error_pct']:+} |"
            )
        if d["oom"]:
            lines += [
                "",
                "| OOM row | model | method | GPU | mb x seq | ours GiB | GPU GiB | we predict OOM |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for o in d["oom"]:
                lines.append(
                    f"| {o['row']} | {o['model']} | {o['method']} | {o['gpu']} | {o['micro_batch']}x{o['seq_len']} | "
                    f"{o['predicted_gib']} | {o['gpu_gib']} | {o['we_predict_oom']} |"
                )
        if d["inconsistent"]:
            lines += [
                "",
                "Rows whose measurement is below what the stated set-up must hold (weights + gradients + the stated "
                "optimiser's states, before any activation): the source's set-up is not what the row says "
                "(e.g. the multi-GPU run behind a '1 GPU' row), so they are not scored.",
                "",
                "| row | model | method | optimizer | n | measured GiB | static floor GiB |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in d["inconsistent"]:
                lines.append(
                    f"| {r['row']} | {r['model']} | {r['method']} | {r['optimizer']} | {r['num_gpus']} | "
                    f"{r['measured_gib']} | {r['static_floor_gib']} |"
                )
        over = [r for r in d["scored"] if abs(r["error_pct"]) > TARGET_WORST]
        lines += ["", f"### {name}: rows off by more than {TARGET_WORST:.0f}%", ""]
        if not over:
            lines.append("none")
        for r in over:
            lines.append(
                f"- row {r['row']} ({r['model']} {r['method']}, {r['framework']}): {r['error_pct']:+}%. "
                + (r["explanation"] or "UNEXPLAINED: " + OPEN.get(r["key"], "no note"))
            )
        noted = [r for r in d["scored"] if r["explanation"] and abs(r["error_pct"]) <= TARGET_WORST]
        if noted:
            lines += ["", f"Notes on other {name} rows:", ""]
            for r in noted:
                lines.append(f"- row {r['row']} ({r['model']} {r['method']}): {r['error_pct']:+}%. {r['explanation']}")
    lines += ["", *NOTES]
    return lines


NOTES = [
    "## How the figures are built",
    "",
    "- The analytical model counts each stack's own code where `framework` says which ran: litgpt rows use litgpt's "
    "saved tensors (checked against litgpt 0.4.13 itself on CPU by `python -m bench.litgpt_probe`), its separate "
    "lm_head copy for tied models, NF4 lm_head under QLoRA, chunked loss; hf rows the transformers + peft counts "
    "the simulated referee checks.",
    "- reserved / device statistics add the caching-allocator slack counted from the plan's tensor sizes "
    "(`AnalyticalEstimator.allocator_slack`: 2 MiB segment rounding per live tensor over 10 MiB, 20 MiB / 2 MiB "
    "segment tails, one block's cached forward temporaries) and, for device, the CUDA context.",
    "- No constant of the model is fitted to these rows (the allocator's cached-blocks count is the structural "
    "prior 1), so there is no leave-one-source-out error to report beyond the figures above.",
]


def main() -> int:
    est = AnalyticalEstimator()
    datasets = {name: score_dataset(load_cases((name,)), est) for name in DATASETS}
    rows = []
    for name, d in datasets.items():
        for r in d["scored"]:
            rows.append({"dataset": name, **r})
    res = {"command": CMD, "datasets": datasets, "rows": rows}
    OUT.mkdir(exist_ok=True)
    (OUT / "accuracy.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = render(res)
    (OUT / "accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:14]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
