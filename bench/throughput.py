"""Predicted vs published training throughput (tokens/s per GPU), on both vendored files.

    python -m bench.throughput

Reads every row with a throughput figure through ``bench.published.load_cases`` (the loader normalises
each source's unit to tokens/s per GPU and says why a row cannot be scored: ``throughput_skip``), predicts
it with the analytical model (``AnalyticalEstimator``, prior coefficients), and prints per dataset: rows
with a figure, n scored, n not expressible, median / p90 / worst absolute error, the share within 10%, and
a row table (signed error = (predicted - measured) / measured). Set-up the plan does not carry
(torch.compile, fused kernels, approximate figures) is shown per row in ``stack``; every scored row more than
15% off gets a line saying why (``explain``: evidence computed from the published rows themselves, e.g. the same
table's compiled vs uncompiled step, and from the row's text). A row whose figure needs more than 90% of the card's
measured matmul rate (``device.matmul_flops``) at the stated set-up is not that set-up and is not scored.

Fitted constants: the speed model's constants are documented priors (``advisor.estimators.device``). The
one candidate fitted to these rows, a global scale on the GPU classes' MFU priors (``MFU_FIT_SCALE``), is
checked leave-one-SOURCE-out here (each source's rows predicted with the scale fitted on the other sources'
rows): it is in the product only where that cross-validated error beats the unfitted priors.
Writes bench/results/throughput.{json,md}.
"""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from advisor.catalog import default_catalog
from advisor.estimators.analytical import DEFAULT_COEFFICIENTS, AnalyticalEstimator, Coefficients
from advisor.estimators.device import MFU_FIT_SCALE
from bench.published import DATASETS, load_cases

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _source_key(source: str) -> str:
    """The publication a row comes from (repository or paper, without commit or section): the unit left
    out together in the leave-one-source-out check."""
    head = source.split(" @")[0].split(",")[0].split(" (")[0].strip()
    return head.split(" ")[0] if "/" in head.split(" ")[0] else head


#: Skip reasons of the loader that concern the memory figure only: for throughput the row is still
#: expressible (the optimiser fused into backward does the same work; the default config names the
#: checkpointing). ``throughput_case`` builds these rows' plans by the rules below.
MEMORY_ONLY_SKIPS = (
    "optimiser step fused into backward is not modelled",
    "optimiser in backward / CPU offload is not modelled",
    "gradient checkpointing unknown",
)


#: torchtune's README table introduced in 0217d44c (2024-05-09) states no sequence length (the CSV's 2048 is a
#: reading); its configs trained on torchtune's alpaca dataset, which then truncated samples to max_seq_len=512 and
#: did not pack them (pytorch/torchtune torchtune/datasets/_alpaca.py @0432b3a5: ``max_seq_len: int = 512``,
#: ``packed: bool = False``): batches padded to their longest sample, so the tokens per step behind its tokens/s
#: are unknown (the memory bench reads the same table the same way: bench/accuracy.py).
TORCHTUNE_0217 = "0217d44c"
TORCHTUNE_0217_REASON = (
    "tokens per step not stated: the table (torchtune 0217d44c) names no sequence length; its alpaca dataset "
    "truncated samples at 512 tokens, unpacked, padded per batch (torchtune/datasets/_alpaca.py @0432b3a5)"
)


def trl_recasts_to_bf16(case) -> bool:
    """TRL's SFTTrainer on a 4-bit model in bf16: after prepare_model_for_kbit_training (the fp32 upcast) and
    get_peft_model it calls ``peft_module_casting_to_bf16`` (``if args.bf16 and is_loaded_in_4bit``;
    huggingface/trl trl/trainer/sft_trainer.py + trl/trainer/utils.py, from ~0.8 through the 2025 refactor): the
    LoRA layers and every module named *lm_head* / *embed_tokens* with fp32 weights (peft's modules_to_save copies
    too) go back to bf16, only the norms stay fp32. The nearest plan is ``kbit_upcast=False``."""
    plan = case.plan
    return (
        plan is not None
        and plan.method == "qlora"
        and plan.dtype == "bf16"
        and plan.kbit_upcast
        and "trl" in case.raw.get("framework", "").lower()
    )


def throughput_case(case, cat):
    """The case with a plan for its throughput where the loader skipped it for a memory-only reason
    (``MEMORY_ONLY_SKIPS``), else with the throughput reason it stays not expressible (other cases as
    they are). One rule per field, from the row's
    own columns and notes: single-GPU rows of a fixed (packed) sequence length; checkpointing from the
    column, else from the notes' default config ("activation checkpointing on"); the optimiser from the
    column (AdamW8bit / PagedAdamW8bit / AdamW; CPU offload stays not expressible); LoRA rank and targets
    from the columns (not stated: not expressible); the loader's torchtune conventions otherwise
    (bf16 params, no master weights, chunked loss from the cumulative "Chunked Cross Entropy" step)."""
    from advisor.errors import AdvisorError
    from advisor.plans import TrainingPlan
    from bench.published import GPU_MAP, _num, _targets

    if TORCHTUNE_0217 in case.source and case.measured_tokens_per_s is not None and case.throughput_skip is None:
        return replace(case, throughput_skip=TORCHTUNE_0217_REASON)
    if trl_recasts_to_bf16(case):
        case = replace(case, plan=replace(case.plan, kbit_upcast=False))
    if case.throughput_skip not in MEMORY_ONLY_SKIPS or case.measured_tokens_per_s is None:
        return case
    r = case.raw
    notes = r.get("notes", "").lower()
    if (_num(r["num_gpus"]) or 1) != 1:
        return replace(case, throughput_skip="tokens/s on several GPUs, per-GPU vs aggregate not stated")
    if "offload" in (r["optimizer"] + notes).lower():
        return replace(case, throughput_skip="CPU / activation offloading is not modelled")
    if "paged" in r["optimizer"].lower():
        # paged states moving over PCIe under memory pressure: their traffic is not modelled
        return replace(case, throughput_skip="paged optimiser states paging over PCIe: their traffic is not modelled")
    if "step: baseline" in notes:
        return replace(case, throughput_skip="unpacked variable-length baseline: tokens per step not stated")
    if "rank/targets not stated" in notes and r["method"] != "full":
        return replace(case, throughput_skip="LoRA rank and targets not stated")
    ckpt_text = r["grad_checkpointing"].lower()
    if ckpt_text.startswith(("yes", "no")):
        ckpt = ckpt_text.startswith("yes")
    elif "activation checkpointing on" in notes or "+ activation checkpointing" in notes:
        ckpt = True
    else:
        return replace(case, throughput_skip="gradient checkpointing not stated (and no default config named)")
    opt_text = r["optimizer"].lower()
    opt = (
        "paged-adamw-8bit"
        if "paged" in opt_text and "8bit" in opt_text
        else "adamw-8bit"
        if "8bit" in opt_text
        else "adamw"
    )
    method = r["method"]
    try:
        model = cat.model(r["model"].split(" (")[0])
        plan = TrainingPlan(
            method=method,
            gpu_id=GPU_MAP[r["gpu"].strip().lower()],
            dtype="bf16",
            micro_batch=int(_num(r["micro_batch"])),
            seq_len=int(_num(r["seq_len"])),
            grad_checkpointing=ckpt,
            optimizer=opt,
            lora_r=int(_num(r["lora_r"]) or 8),
            lora_alpha=2 * int(_num(r["lora_r"]) or 8),
            lora_dropout=0.0,
            lora_targets=_targets(r["lora_targets"].split("(")[0]) if method != "full" else ("all-linear",),
            master_weights=False,
            framework=case.framework,
            chunked_loss="chunked cross entropy" in notes or "bd2a0fc7" in r["source"],
        )
    except (AdvisorError, KeyError, TypeError, ValueError) as exc:
        return replace(case, throughput_skip=f"plan not expressible: {exc}")
    stack = case.stack_notes
    if re.search(
        r"step: \+ (compile|chunked cross entropy|activation checkpointing|fuse optimizer|8-bit adamw)", notes
    ):
        # torchtune's "Optimization flags" table applies its techniques cumulatively: every step after
        # "+ Compile" runs compiled
        stack = (*stack, "torch.compile") if "torch.compile" not in stack else stack
    return replace(case, model=model, plan=plan, throughput_skip=None, stack_notes=stack)


#: A row whose figure needs more than this share of the GPU's achievable matmul rate (FLOPs per token of the
#: stated set-up x measured tokens/s, against ``device.matmul_flops``: the card's measured dense matmul rate) cannot
#: be that set-up on that GPU: a whole training step (attention, norms, the optimiser, the host) does not run every
#: FLOP at the best large GEMM's rate. It is reported as not expressible rather than scored.
MAX_IMPLIED_SHARE = 0.9


def implied_share(case, cat) -> float:
    """Share of the GPU's achievable (measured) matmul rate the measured throughput implies for the stated set-up."""
    from advisor.estimators.device import matmul_flops

    gpu = cat.gpu(case.plan.gpu_id)
    fpt = AnalyticalEstimator().plan_terms(case.model, case.plan).flops_per_token
    return case.measured_tokens_per_s * fpt / matmul_flops(gpu, case.plan.dtype)


# the names bench.peers imports (same check)
MAX_IMPLIED_MFU = MAX_IMPLIED_SHARE
implied_mfu = implied_share


def predict(est: AnalyticalEstimator, cat, case) -> dict:
    gpu = cat.gpu(case.plan.gpu_id)
    e = est.estimate(case.model, gpu, case.plan)
    s = e.speed
    n = case.plan.num_gpus
    from advisor.estimators.device import wave_efficiency

    t = est.plan_terms(case.model, case.plan)
    d = est.device(gpu, case.plan.dtype)
    tokens = case.plan.micro_batch * case.plan.seq_len
    return {
        "predicted_tokens_per_s": s.tokens_per_s / n,
        "step_s": s.step_time_s,
        "compute_s": s.compute_s,
        "memory_bound_s": s.memory_bound_s,
        "communication_s": s.communication_s,
        "host_s": t.speed.host_ops * d.host_op_s,
        # the shape terms the row exercises: the attention kernels' share of the FLOPs, the widest GEMM's wave
        # efficiency on the card's SMs
        "attention_flops_share": t.speed.attention_flops_per_token / t.flops_per_token,
        "wave_efficiency": float(wave_efficiency(tokens, t.speed.gemm_n, d.sm_count)),
    }


def stats(errors: list[float]) -> dict:
    if not errors:
        return {"n": 0}
    a = sorted(abs(x) for x in errors)
    p90 = a[min(len(a) - 1, math.ceil(0.9 * len(a)) - 1)]
    return {
        "n": len(a),
        "median_abs_pct": round(statistics.median(a), 1),
        "p90_abs_pct": round(p90, 1),
        "worst_abs_pct": round(a[-1], 1),
        "within_10pct": round(sum(x <= 10 for x in a) / len(a), 3),
    }


def fit_scale(rows: list[dict]) -> float:
    """The MFU scale these rows ask for: the median of measured / predicted (unfitted) throughput over the
    rows whose stack the plan describes (no ``stack`` notes: torch.compile, fused or Triton kernels make a
    faster stack than the one the product models, so they are scored but not fitted to); 1.0 if none."""
    fit = [r for r in rows if not r["stack"]]
    if not fit:
        return 1.0
    return statistics.median(r["measured_tokens_per_s"] / r["unfitted_tokens_per_s"] for r in fit)


def with_scale(scale: float) -> AnalyticalEstimator:
    k = DEFAULT_COEFFICIENTS
    return AnalyticalEstimator(replace(k, device=replace(k.device, mfu_prior_scale=scale)))


def loso(rows: list[dict], cases: dict, cat) -> None:
    """Leave-one-SOURCE-out check of the candidate fitted constant: each source's rows predicted with the
    MFU scale fitted (``fit_scale``) on the other sources' rows, as ``loso_fit_error_pct``."""
    for src in sorted({r["source_key"] for r in rows}):
        train = [r for r in rows if r["source_key"] != src]
        scale = fit_scale(train) if train else 1.0
        est = with_scale(scale)
        for r in rows:
            if r["source_key"] == src:
                pred = predict(est, cat, cases[r["key"]])["predicted_tokens_per_s"]
                r["loso_scale"] = round(scale, 3)
                r["loso_fit_error_pct"] = round(
                    (pred - r["measured_tokens_per_s"]) / r["measured_tokens_per_s"] * 100, 1
                )


#: A scored row further off than this gets a line saying why (``explain``).
EXPLAIN_OVER_PCT = 15.0

#: A stated plan the memory model puts this far over its GPU's memory (beyond the memory bench's typical error)
#: cannot be what the run kept on the GPU: said in the row's explanation.
NOT_FIT_MARGIN = 1.1

#: A second figure a row's own CSV text gives for the same run (tokens/s per GPU, and what it is), reported with
#: the row's error against it; never scored.
ROW_ALTERNATIVE_FIGURES = {
    "published_2:5": (
        403.7,
        "the source's text gives 02:05:58 for the run where its progress bar (the CSV's figure) gives 2:19:28",
    ),
}


def pct(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured * 100


def _plan_key(case, **drop) -> tuple:
    """The plan's fields that set the speed, without those named in `drop` (to find pairs of rows)."""
    d = {k: v for k, v in case.plan.to_dict().items() if k not in drop and k != "id"}
    return (case.model.name, tuple(sorted((k, str(v)) for k, v in d.items())))


def explain(row: dict, rows: list[dict], cases: dict, cat, coefficients: Coefficients) -> str:
    """Why a scored row is more than EXPLAIN_OVER_PCT off: evidence computed from the published rows themselves
    (pairs of rows of one source that differ in one thing), the row's stack notes and CSV text, and what the
    model says about the stated plan (a plan that does not fit its GPU is not what the run ran)."""
    err = row["analytical_throughput_error_pct"]
    if abs(err) <= EXPLAIN_OVER_PCT:
        return ""
    case = cases[row["key"]]
    why = []
    same_source = [r for r in rows if r["source_key"] == row["source_key"] and r["key"] != row["key"]]
    if "torch.compile" in row["stack"]:
        # the same table's measured step from an uncompiled to a compiled row with one plan
        both = [*same_source, row]
        pairs = [
            (a, b)
            for a in both
            for b in both
            if "torch.compile" not in a["stack"]
            and "torch.compile" in b["stack"]
            and _plan_key(cases[a["key"]]) == _plan_key(cases[b["key"]])
        ]
        if pairs:
            # the row's own pair where it has one, else the table's first compiled step of one plan
            a, b = next((p for p in pairs if p[1] is row), min(pairs, key=lambda p: p[1]["key"]))
            gain = (b["measured_tokens_per_s"] / a["measured_tokens_per_s"] - 1) * 100
            why.append(
                f"torch.compile, which the plan does not carry: in this table one plan runs {gain:+.0f}% faster "
                f"compiled ({a['key']} -> {b['key']}, measured; the uncompiled row is predicted "
                f"{a['analytical_throughput_error_pct']:+.1f}%)"
            )
        else:
            why.append("torch.compile, which the plan does not carry (fused element-wise kernels, fewer launches)")
    # rows of one source with one plan but the gradient accumulation: step = per-optimiser-step + GA x per-micro-step
    pair = [
        r
        for r in same_source
        if _plan_key(cases[r["key"]], grad_accum=0, attention=0) == _plan_key(case, grad_accum=0, attention=0)
        and cases[r["key"]].plan.grad_accum != case.plan.grad_accum
    ]
    if pair:
        other = cases[pair[0]["key"]]
        tok = case.plan.micro_batch * case.plan.seq_len
        t1, g1 = tok * case.plan.grad_accum / case.measured_tokens_per_s, case.plan.grad_accum
        t2, g2 = tok * other.plan.grad_accum / other.measured_tokens_per_s, other.plan.grad_accum
        micro = (t2 - t1) / (g2 - g1)
        fixed = t1 - g1 * micro
        why.append(
            f"with {pair[0]['key']} (same plan, grad_accum {g2} vs {g1}) the published times split into "
            f"{fixed:.1f} s per optimiser step + {micro:.2f} s per micro-step; the model's micro-step is "
            f"{row['step_s']:.2f} s ({(row['step_s'] / micro - 1) * 100:+.0f}%) and its optimiser step far less "
            "than that per-step cost"
        )
    gpu = cat.gpu(case.plan.gpu_id)
    mem = AnalyticalEstimator(coefficients).memory(case.model, gpu, case.plan)
    if mem.device_total_bytes > NOT_FIT_MARGIN * gpu.memory_bytes:
        why.append(
            f"the stated plan does not fit the {gpu.id} by the memory model ({mem.device_total_bytes / 2**30:.1f} of "
            f"{gpu.memory_gib:.1f} GiB), so the run's stack kept less on the GPU than the plan says"
        )
    if "approximate figure" in row["stack"]:
        why.append("the figure is the source's estimate (est. steps / est. time), not a timed run")
    if row["key"] in ROW_ALTERNATIVE_FIGURES:
        alt, what = ROW_ALTERNATIVE_FIGURES[row["key"]]
        why.append(
            f"{what}: against its {alt:.0f} tok/s the prediction is {pct(row['predicted_tokens_per_s'], alt):+.1f}%"
        )
    if gpu.matmul_tflops_measured and gpu.matmul_tflops_measured < 0.6 * (gpu.bf16_tflops or gpu.fp16_tflops):
        why.append(
            f"power-limited card: its measured matmul rate ({gpu.matmul_tflops_measured:.0f} TFLOP/s) is a short "
            "square-GEMM benchmark; under a step's mixed GEMM, dequantisation and memory load its clock is not measured"
        )
    if case.plan.lora_r >= 128 and case.plan.method in ("lora", "qlora", "dora") and gpu.sm_count:
        from advisor.estimators.device import wave_efficiency

        t = AnalyticalEstimator(coefficients).plan_terms(case.model, case.plan)
        from advisor.methods import get_method

        saved = get_method(case.plan.method).saved_module_params(case.model, case.plan)
        adapter = t.terms["trainable_params"] - saved  # the adapters alone (not modules_to_save copies)
        share = (8 if case.plan.grad_checkpointing else 6) * adapter / t.flops_per_token
        tokens = case.plan.micro_batch * case.plan.seq_len
        busy = float(wave_efficiency(tokens, case.plan.lora_r, gpu.sm_count))
        why.append(
            f"rank-{case.plan.lora_r} adapters: {share:.0%} of the FLOPs, and their r-wide GEMMs keep {busy:.0%} of "
            f"the {gpu.sm_count} SMs busy (the model quantises waves on the widest GEMM only)"
        )
    return "; ".join(why) if why else "not explained"


def run(coefficients: Coefficients = DEFAULT_COEFFICIENTS) -> dict:
    cat = default_catalog()
    unfitted = with_scale(1.0)
    product = AnalyticalEstimator(coefficients)
    rows, skipped, cases = [], [], {}
    for case in load_cases():
        if case.raw.get("throughput_value", "").strip() == "":
            continue
        case = throughput_case(case, cat)
        base = {
            "dataset": case.dataset,
            "key": case.key,
            "model": case.raw.get("model", ""),
            "gpu": case.raw.get("gpu", ""),
            "num_gpus": case.plan.num_gpus if case.plan else case.raw.get("num_gpus"),
            "method": case.plan.method if case.plan else case.raw.get("method"),
            "framework": case.framework,
            "source_key": _source_key(case.source),
            "stack": list(case.stack_notes),
        }
        if case.throughput_skip or case.plan is None or case.measured_tokens_per_s is None:
            skipped.append({**base, "reason": case.throughput_skip or "plan not expressible"})
            continue
        implied = implied_share(case, cat)
        if implied > MAX_IMPLIED_SHARE:
            from advisor.estimators.device import matmul_flops

            rate = matmul_flops(cat.gpu(case.plan.gpu_id), case.plan.dtype) / 1e12
            skipped.append(
                {
                    **base,
                    "reason": f"the figure needs {implied:.0%} of {case.plan.gpu_id}'s achievable {case.plan.dtype} "
                    f"matmul rate ({rate:.0f} TFLOP/s measured) at the stated set-up (FLOPs per token x tokens/s; "
                    f"{'checkpointing ' + ('on' if case.plan.grad_checkpointing else 'off')}): not that set-up",
                }
            )
            continue
        cases[case.key] = case
        u = predict(unfitted, cat, case)["predicted_tokens_per_s"]
        pp = predict(product, cat, case)
        p = pp["predicted_tokens_per_s"]
        plan = case.plan
        rows.append(
            {
                **base,
                "plan": (
                    f"{plan.method} mb{plan.micro_batch} s{plan.seq_len} ga{plan.grad_accum} "
                    f"{'ckpt' if plan.grad_checkpointing else 'no-ckpt'} {plan.sharding} {plan.framework} "
                    f"{plan.attention} r{plan.lora_r} {','.join(plan.lora_targets)}"
                ),
                "measured_tokens_per_s": case.measured_tokens_per_s,
                "unfitted_tokens_per_s": round(u, 1),
                "unfitted_error_pct": round((u - case.measured_tokens_per_s) / case.measured_tokens_per_s * 100, 1),
                **{k: round(v, 4) for k, v in pp.items()},
                "analytical_throughput_error_pct": round(
                    (p - case.measured_tokens_per_s) / case.measured_tokens_per_s * 100, 1
                ),
            }
        )
    loso(rows, cases, cat)
    for r in rows:
        r["explanation"] = explain(r, rows, cases, cat, coefficients)
    summary = {}
    for ds in DATASETS:
        summary[ds] = {
            "rows_with_throughput": sum(r["dataset"] == ds for r in rows) + sum(s["dataset"] == ds for s in skipped),
            "not_expressible": sum(s["dataset"] == ds for s in skipped),
            **stats([r["analytical_throughput_error_pct"] for r in rows if r["dataset"] == ds]),
            f"over_{EXPLAIN_OVER_PCT:.0f}pct": sum(r["dataset"] == ds and bool(r["explanation"]) for r in rows),
            f"over_{EXPLAIN_OVER_PCT:.0f}pct_unexplained": sum(
                r["dataset"] == ds and r["explanation"] == "not explained" for r in rows
            ),
        }
    summary["all"] = stats([r["analytical_throughput_error_pct"] for r in rows])
    unfit = {ds: stats([r["unfitted_error_pct"] for r in rows if r["dataset"] == ds]) for ds in DATASETS}
    cand = {ds: stats([r["loso_fit_error_pct"] for r in rows if r["dataset"] == ds]) for ds in DATASETS}
    return {
        "bench": "throughput",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "commit": _commit(),
        "target": "median absolute error <= 15% per dataset",
        "summary": summary,
        "fitted_constants": {
            "in_product": {"advisor.estimators.device.MFU_FIT_SCALE": MFU_FIT_SCALE},
            "candidate": "one global scale on the GPU classes' MFU priors, median measured / unfitted-predicted "
            "over rows without stack notes",
            "candidate_fit_on_all_rows": round(fit_scale(rows), 3) if rows else None,
            "candidate_loso": cand,
            "unfitted": unfit,
        },
        "rows": rows,
        "not_expressible": skipped,
    }


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def markdown(res: dict) -> str:
    lines = ["# Throughput: analytical vs published (tokens/s per GPU)", ""]
    lines.append(f"{res['date']} @ {res['commit']} · `python -m bench.throughput` · target: {res['target']}")
    over = f"over_{EXPLAIN_OVER_PCT:.0f}pct"
    lines += [
        "",
        "| dataset | rows with a figure | n scored | n not expressible | median | p90 | worst | within 10% | "
        f"over {EXPLAIN_OVER_PCT:.0f}% (unexplained) |",
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for ds, s in res["summary"].items():
        if s.get("n", 0) == 0:
            lines.append(
                f"| {ds} | {s.get('rows_with_throughput', '')} | 0 | {s.get('not_expressible', '')} | | | | | |"
            )
            continue
        lines.append(
            f"| {ds} | {s.get('rows_with_throughput', '')} | {s['n']} | {s.get('not_expressible', '')} | "
            f"{s['median_abs_pct']}% | {s['p90_abs_pct']}% | {s['worst_abs_pct']}% | {s['within_10pct']:.0%} | "
            f"{s.get(over, '')} ({s.get(over + '_unexplained', '')}) |"
        )
    f = res["fitted_constants"]
    lines += [
        "",
        f"Fitted constants in the product: {f['in_product']} (1.0 = none). Candidate: {f['candidate']} "
        f"(= {f['candidate_fit_on_all_rows']} on all rows); its leave-one-SOURCE-out error against the unfitted "
        "priors (adopted only if it validates):",
        "",
        "| dataset | variant | n | median | p90 | worst | within 10% |",
        "|---|---|---|---|---|---|---|",
    ]
    variants = [(ds, "unfitted priors", s) for ds, s in f["unfitted"].items()]
    variants += [(ds, "candidate scale, LOSO", s) for ds, s in f["candidate_loso"].items()]
    for ds, name, s in variants:
        if s.get("n"):
            lines.append(
                f"| {ds} | {name} | {s['n']} | {s['median_abs_pct']}% | {s['p90_abs_pct']}% | {s['worst_abs_pct']}% | "
                f"{s['within_10pct']:.0%} |"
            )
    lines += ["", "## Scored rows", ""]
    lines.append(
        "| row | model | GPU x n | plan | stack | measured | predicted | error | candidate LOSO error | "
        "compute / mem / comm / host s | attention FLOPs / wave eff. |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        lines.append(
            f"| {r['key']} | {r['model']} | {r['gpu']} x{r['num_gpus']} | {r['plan']} | {', '.join(r['stack'])} | "
            f"{r['measured_tokens_per_s']:.0f} | {r['predicted_tokens_per_s']:.0f} | "
            f"{r['analytical_throughput_error_pct']:+.1f}% | {r['loso_fit_error_pct']:+.1f}% | "
            f"{r['compute_s']:.3f} / {r['memory_bound_s']:.3f} / "
            f"{r['communication_s']:.3f} / {r['host_s']:.3f} | "
            f"{r['attention_flops_share']:.0%} / {r['wave_efficiency']:.2f} |"
        )
    lines += ["", f"## Why rows are more than {EXPLAIN_OVER_PCT:.0f}% off", ""]
    for r in res["rows"]:
        if r.get("explanation"):
            lines.append(f"- {r['key']} ({r['analytical_throughput_error_pct']:+.1f}%): {r['explanation']}")
    lines += ["", "## Not expressible", "", "| row | model | GPU | reason |", "|---|---|---|---|"]
    for s in res["not_expressible"]:
        lines.append(f"| {s['key']} | {s['model']} | {s['gpu']} | {s['reason']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    res = run()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    (RESULTS / "throughput.md").write_text(md)
    print(md.split("## Not expressible")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
