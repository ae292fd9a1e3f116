"""Our own real-run truth on this CPU: real fp32 training steps over a random design, scored against the estimators.

    python -m bench.cpu_truth --run      # measure the design's cases not yet in the data file, one at a time
    python -m bench.cpu_truth --run --repeat   # measure every case again later; step time = min over passes
    python -m bench.cpu_truth            # score analytical and calibrated against the data file

Why: calibration reports held-out error on its own trials, which share the calibration design's
vocabularies, widths and families; a profile can look good there and still extrapolate badly. This
bench draws a *different* random design (seeded): every family in ``advisor.families`` with a
trainable transformers class (Llama, Qwen2, Mistral, Gemma, Gemma-2, Phi-3, Phi, GPT-2, GPT-NeoX,
T5), every method (full, LoRA, QLoRA, DoRA), checkpointing on and off, vocabularies 1k-50k (not
powers of two), widths, depths, head sizes, GQA ratios, sequence lengths, micro-batches, LoRA ranks,
targets and dropout, all random, each case its own architecture.

Each case is one calibration trial (``calibration.trial``: its own forked process, the live-tensor
meter (TorchDispatchMode) for the allocated peak of one steady-state step, then timed steps by the
process's CPU time on one thread). Step time is the minimum over the quiet window of timed steps and
over repeated passes at different times (``--repeat``): on a shared machine (here a 2-vCPU VM) even a
process's CPU time is stretched by its neighbours (cache, memory bandwidth, the host's other tenants),
by up to 2x on this machine, never shortened.

Data: ``bench/data/cpu_truth.jsonl``, one JSON object per measured case, appended (and fsync'ed) as
each case finishes, so a killed run keeps what it measured and ``--run`` resumes. Schema (``ROW_SCHEMA``)::

    case_id, design_seed, family, model_type, arch (HF config dict), plan (TrainingPlan dict),
    status (ok | oom | error), error, peak_bytes (allocated peak, live storages), rss_peak_bytes,
    step_time_s (min CPU s/step), step_time_median_s, step_times_s, step_time_meter, timing_spread,
    cpu_contention, threads, step_time_passes_s / peak_bytes_passes / measured_at_passes (after
    ``--repeat``), device (GpuSpec dict of this CPU as measured at the start of the run:
    fp32 matmul FLOP/s and copy bandwidth), cpu_model, software (torch, transformers, peft,
    bitsandbytes versions), measured_at (UTC)

Scoring writes ``bench/results/cpu_truth.{json,md}``: for the analytical model (on the CPU device
recorded with the data) and the calibrated profile (``bench/results/calibration_cpu_profile.json``,
on its own device): n, median, p90, worst and share within 10% of the absolute relative error, for
memory and step time, overall, per family and per method, and apart for the cases outside the
profile's fitted ranges (``FittedRange.outside``). Targets (issue 10): analytical memory median
<= 5%; calibrated, outside the calibration ranges: memory median <= 3%, worst <= 10%, step time
median <= 10%.

``run_case(case, device)`` runs one case on any device (``bench.gpu_check`` calls it on CUDA) and
returns its data row; ``cases(device_spec, n, seed)`` draws the design for a device (its default
dtype: fp32 on a CPU, bf16/fp16 on a GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data" / "cpu_truth.jsonl"
RESULTS = ROOT / "bench" / "results"
PROFILE = RESULTS / "calibration_cpu_profile.json"
SEED = 10
N_CASES = 72

ROW_SCHEMA = (
    "case_id",
    "design_seed",
    "family",
    "model_type",
    "arch",
    "plan",
    "status",
    "error",
    "peak_bytes",
    "rss_peak_bytes",
    "step_time_s",
    "step_time_median_s",
    "step_times_s",
    "step_time_meter",
    "timing_spread",
    "cpu_contention",
    "threads",
    "device",
    "cpu_model",
    "software",
    "measured_at",
)

#: design family -> (catalog model whose HF config is the template, HF model_type); the family column
#: of the results is this name (Qwen2, Mistral and Gemma share the Llama family's model code in the advisor)
TEMPLATES: dict[str, tuple[str, str]] = {
    "llama": ("llama-3.2-1b", "llama"),
    "qwen2": ("qwen2.5-0.5b", "qwen2"),
    "mistral": ("mistral-7b", "mistral"),
    "gemma": ("gemma-2b", "gemma"),
    "gemma2": ("gemma-2-2b", "gemma2"),
    "phi3": ("phi-3-mini", "phi3"),
    "phi": ("phi-2", "phi"),
    "gpt2": ("gpt2", "gpt2"),
    "gpt_neox": ("stablelm-base-alpha-3b", "gpt_neox"),
    "t5": ("t5-xl", "t5"),
}
METHODS = ("full", "lora", "qlora", "dora")
#: LoRA targets drawn from (role names of advisor.plans; "all-linear" = every linear of the blocks)
TARGETS = (("q", "v"), ("all-linear",), ("q", "k", "v", "o"), ("gate", "up", "down"), ("o", "down"), ("k", "v"))
RANKS = (2, 4, 8, 16, 32, 64)
SEQ_LENS = (40, 96, 160, 200, 320, 384, 600, 768, 1000)
MICRO_BATCHES = (1, 1, 2, 3, 4)
#: a case must be cheap: at most this many seconds and bytes by ``cost_proxy`` (a fixed formula, not the
#: estimators: the design must not move when the models it checks change)
MAX_STEP_S = 0.9
MAX_BYTES = 2 * 2**30


# ---- the design -------------------------------------------------------------------------------------
def _round16(x: float) -> int:
    return max(16, round(x / 16) * 16)


def random_config(family: str, rng: random.Random) -> dict[str, Any]:
    """A random-initialisable HF config of `family`: the catalog template with its width, depth, heads,
    GQA ratio, MLP ratio and vocabulary drawn at random (the template's other settings kept)."""
    from advisor.catalog import default_catalog
    from advisor.families import hf_config

    template_name, _ = TEMPLATES[family]
    tpl = hf_config(default_catalog().model(template_name))
    head_dim = rng.choice((32, 64, 128) if family in ("gemma", "gemma2") else (16, 32, 48, 64))
    heads = rng.randint(1, max(1, min(12, 640 // head_dim)))
    hidden = heads * head_dim
    while hidden < 48:
        heads += 1
        hidden = heads * head_dim
    layers = rng.randint(1, 5)
    vocab = rng.randint(1000, 50000)
    if family == "gpt2":
        inner = _round16(hidden * rng.uniform(2.5, 4.5))
        return {
            "model_type": "gpt2",
            "n_embd": hidden,
            "n_layer": layers,
            "n_head": heads,
            "n_inner": inner,
            "vocab_size": vocab,
            "n_positions": 2048,
            "bos_token_id": 0,
            "eos_token_id": vocab - 1,
            "tie_word_embeddings": True,
        }
    if family == "t5":
        d_ff = _round16(hidden * rng.uniform(1.5, 3.5))
        return {
            "model_type": "t5",
            "d_model": hidden,
            "d_kv": head_dim,
            "num_heads": heads,
            "d_ff": d_ff,
            "num_layers": layers,
            "num_decoder_layers": rng.randint(1, 4),
            "vocab_size": vocab,
            "relative_attention_num_buckets": 32,
            "feed_forward_proj": tpl.get("feed_forward_proj", "gated-gelu"),
            "tie_word_embeddings": False,
            "decoder_start_token_id": 0,
            "pad_token_id": 0,
            "eos_token_id": 1,
        }
    ratio = tpl["intermediate_size"] / tpl["hidden_size"]
    cfg = dict(tpl)
    tpl_heads = tpl["num_attention_heads"]
    groups = tpl_heads // (tpl.get("num_key_value_heads") or tpl_heads)
    kv = max(1, heads // max(1, rng.choice((1, groups, groups, 2 * groups))))
    while heads % kv:
        kv -= 1
    cfg.update(
        hidden_size=hidden,
        intermediate_size=_round16(hidden * ratio * rng.uniform(0.6, 1.4)),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=vocab - 1,
        pad_token_id=None,
    )
    if family in ("phi", "gpt_neox"):
        cfg.pop("num_key_value_heads", None)  # no GQA in these classes
        cfg.pop("head_dim", None)
    elif family == "phi3":
        cfg["num_key_value_heads"] = kv
        cfg.pop("head_dim", None)
    else:
        cfg["num_key_value_heads"] = kv
        cfg["head_dim"] = head_dim
    if family == "gemma2":
        cfg["query_pre_attn_scalar"] = head_dim
    return cfg


@dataclass(frozen=True)
class DesignLimits:
    max_step_s: float = MAX_STEP_S
    max_bytes: int = MAX_BYTES


def cost_proxy(model, plan) -> tuple[float, float]:
    """(seconds, bytes) of one training step by a deliberately crude, frozen formula (one thread at ~40 GFLOP/s
    for 6-8 FLOPs per parameter and token, ~8 ns per logit for the loss; 16 bytes per trained parameter, 12 per
    logit, ~40 bytes per hidden unit, token and layer of activations). It only keeps the design quick to run;
    it is not an estimate and never scored."""
    tokens = plan.micro_batch * plan.seq_len
    params = model.linear_weight_params + model.vocab_size * model.hidden_size
    flops = (8 if plan.grad_checkpointing else 6) * params * tokens
    seconds = flops / 40e9 + tokens * model.vocab_size * 8e-9
    trained = params if plan.method == "full" else 0.02 * params
    nbytes = 4 * params + 16 * trained + 12 * tokens * model.vocab_size
    nbytes += 40 * tokens * model.hidden_size * model.total_layers
    return seconds, nbytes


def cases(device_spec, n: int = N_CASES, seed: int = SEED, device: str = "cpu", threads: int | None = 1, limits=None):
    """The design: `n` TrialSpecs cycling through families x methods (every family gets every method),
    checkpointing drawn apart, everything else drawn at random; a draw too slow or too big for a quick CPU
    trial (``DesignLimits``, by ``cost_proxy``) is drawn again. Nothing here reads the estimators, so a seed
    always gives the same cases."""
    from advisor.catalog import model_from_config
    from advisor.errors import InvalidInputError
    from advisor.plans import TrainingPlan
    from calibration.trial import TrialSpec

    limits = limits or DesignLimits()
    rng = random.Random(seed)
    fams = list(TEMPLATES)
    ckpt_rng = random.Random(seed + 1)  # checkpointing drawn apart, so it is independent of the method
    out: list[TrialSpec] = []
    for i in range(n):
        family = fams[i % len(fams)]
        k = i // len(fams)
        method = METHODS[(k + fams.index(family)) % len(METHODS)]
        ckpt = ckpt_rng.random() < 0.5
        for _attempt in range(200):
            cfg = random_config(family, rng)
            seq = rng.choice(SEQ_LENS)
            mb = rng.choice(MICRO_BATCHES)
            r = rng.choice(RANKS)
            plan_kw: dict[str, Any] = {}
            if method != "full":
                plan_kw = dict(
                    lora_r=r,
                    lora_alpha=rng.choice((r, 2 * r)),
                    lora_targets=rng.choice(TARGETS),
                    lora_dropout=rng.choice((0.0, 0.05, 0.1)),
                )
            try:
                plan = TrainingPlan(
                    method=method,
                    gpu_id=device_spec.id,
                    dtype=device_spec.default_dtype(),
                    micro_batch=mb,
                    seq_len=seq,
                    grad_checkpointing=ckpt,
                    # transformers has no SDPA path for Gemma-2: its models must be built with eager attention
                    attention="eager" if family == "gemma2" else "sdpa",
                    **plan_kw,
                )
                model = model_from_config(dict(cfg), name=f"truth-{i}")
            except InvalidInputError:
                continue
            seconds, nbytes = cost_proxy(model, plan)
            if seconds > limits.max_step_s or nbytes > limits.max_bytes:
                continue
            break
        else:
            raise RuntimeError(f"no case {i} ({family}, {method}) within the design limits after 200 draws")
        case_id = f"truth{seed}-{i:03d}-{family}-{method}-{'ckpt' if ckpt else 'nockpt'}"
        out.append(
            TrialSpec(
                id=case_id,
                group=case_id,
                arch=cfg,
                plan=plan.to_dict(),
                device=device,
                warmup_steps=1,
                timed_steps=5,
                threads=threads,
                seed=seed,
                timeout_s=600,
                max_timing_s=30.0,
            )
        )
    return out


def design_family(case_id: str) -> str:
    """The design family of a case id (``truth10-003-mistral-lora-ckpt`` -> ``mistral``)."""
    for fam in sorted(TEMPLATES, key=len, reverse=True):
        if f"-{fam}-" in case_id:
            return fam
    return "?"


# ---- measuring ----------------------------------------------------------------------------------------
def _row(result: dict[str, Any], device: dict[str, Any], seed: int, meta: dict[str, Any]) -> dict[str, Any]:
    times = list(result.get("step_times_s") or [])
    window = times[-5:]
    mem = result.get("memory") or {}
    return {
        "case_id": result["trial_id"],
        "design_seed": seed,
        "family": design_family(result["trial_id"]),
        "model_type": result["arch"].get("model_type"),
        "arch": result["arch"],
        "plan": result["plan"],
        "status": result["status"],
        "error": result.get("error"),
        "peak_bytes": mem.get("peak_bytes"),
        "rss_peak_bytes": mem.get("rss_peak_bytes"),
        "step_time_s": min(window) if window else None,
        "step_time_median_s": result.get("step_time_s"),
        "step_times_s": times,
        "step_time_meter": result.get("step_time_meter"),
        "timing_spread": result.get("timing_spread"),
        "cpu_contention": result.get("cpu_contention"),
        "threads": result.get("threads"),
        "device": device,
        "cpu_model": meta.get("cpu_model"),
        "software": meta.get("software"),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _machine(device: str, threads: int | None) -> tuple[Any, dict[str, Any]]:
    from advisor.devices import cpu_model_name
    from advisor.stack.device import describe, software_versions

    spec, raw = describe(device, threads)
    return spec, {"cpu_model": cpu_model_name(), "software": software_versions(), "device_raw": raw}


def run_case(case, device: str = "cpu", work_dir: str | Path | None = None) -> dict[str, Any]:
    """Run one case (a ``calibration.trial.TrialSpec`` or its dict) on `device` ("cpu", "cuda", "cuda:0")
    in its own process; returns its data row (``ROW_SCHEMA``; status ok | oom | error, never raises for a
    failed trial). The row's ``device`` is the GpuSpec of `device` as ``advisor.stack.device.describe``
    measures or matches it (a catalog GPU on CUDA)."""
    from calibration.runner import run_isolated
    from calibration.trial import TrialSpec

    spec = case if isinstance(case, TrialSpec) else TrialSpec.from_dict(dict(case))
    dev = "cuda:0" if device == "cuda" else device
    spec = replace(spec, device=dev, threads=spec.threads if dev == "cpu" else None)
    gpu, meta = _machine(dev, spec.threads)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="cpu-truth-"))
    result = run_isolated(spec, work)
    return _row(result.to_dict(), gpu.to_dict(), spec.seed, meta)


def read_rows(path: Path = DATA) -> list[dict[str, Any]]:
    """The data file's rows (the last row per case id wins: a re-measured case replaces the first)."""
    rows: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line of a killed run
                rows[r["case_id"]] = r
    return list(rows.values())


def _append(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def merge_pass(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """One case measured again later (``--repeat``): the step time is the minimum over the passes (a shared
    machine only ever makes a pass slower: cache, memory bandwidth and, in a VM, the host's other tenants
    stretch even process CPU time, by up to 2x here), every pass kept; the peak must not move (it is
    deterministic) and the largest is kept if it does."""
    if new.get("status") != "ok":
        return {**old, "failed_passes": [*old.get("failed_passes", []), new.get("error")]}
    passes = [*old.get("step_time_passes_s", [old["step_time_s"]]), new["step_time_s"]]
    return {
        **old,
        "step_time_s": min(passes),
        "step_time_passes_s": passes,
        "peak_bytes": max(old["peak_bytes"], new["peak_bytes"]),
        "peak_bytes_passes": [*old.get("peak_bytes_passes", [old["peak_bytes"]]), new["peak_bytes"]],
        "measured_at_passes": [*old.get("measured_at_passes", [old["measured_at"]]), new["measured_at"]],
    }


def run(n: int, seed: int, data: Path, work: Path, only: Iterable[str] | None = None, repeat: bool = False) -> None:
    """Measure the design's cases not yet in `data` (one at a time, single-threaded), appending rows; with
    `repeat`, measure the cases already there again and append each merged row (``merge_pass``)."""
    from calibration.runner import run_design

    gpu, meta = _machine("cpu", 1)
    rows = {r["case_id"]: r for r in read_rows(data)}
    done = {k for k, r in rows.items() if r["status"] != "error"}  # errors are measured again
    wanted = set(only) if only is not None else None
    design_cases = [c for c in cases(gpu, n, seed) if wanted is None or c.id in wanted]
    if repeat:  # exactly what the data file holds, whatever the design code says today
        todo = [
            replace(c, arch=rows[c.id]["arch"], plan=rows[c.id]["plan"])
            for c in design_cases
            if c.id in rows and rows[c.id]["status"] == "ok"
        ]
    else:
        todo = [c for c in design_cases if c.id not in done]
    what = "to measure again" if repeat else f"to measure ({len(done)} already in {data})"
    print(f"{len(todo)} case(s) {what}; CPU {meta['cpu_model']}", file=sys.stderr)
    if not todo:
        return

    def on_result(result, i: int, total: int) -> None:
        row = _row(result.to_dict(), gpu.to_dict(), seed, meta)
        _append(data, merge_pass(rows[row["case_id"]], row) if repeat else row)

    work.mkdir(parents=True, exist_ok=True)
    (work / "measurements.jsonl").unlink(missing_ok=True)
    run_design(todo, work, meta={"device": gpu.to_dict(), **meta}, on_result=on_result, retry_disturbed=False)


# ---- scoring ------------------------------------------------------------------------------------------
def _gpu(d: dict[str, Any]):
    from advisor.specs import GpuSpec

    d = dict(d)
    d["aliases"] = tuple(d.get("aliases", ()))
    from dataclasses import fields

    known = {f.name for f in fields(GpuSpec)}
    return GpuSpec(**{k: v for k, v in d.items() if k in known})


def _stats(errors: list[float]) -> dict[str, Any]:
    a = sorted(abs(e) for e in errors if e is not None and math.isfinite(e))
    if not a:
        return {"n": 0}
    p90 = a[min(len(a) - 1, math.ceil(0.9 * len(a)) - 1)]
    return {
        "n": len(a),
        "median": round(statistics.median(a), 2),
        "p90": round(p90, 2),
        "worst": round(a[-1], 2),
        "within_10pct": round(sum(x <= 10 for x in a) / len(a), 3),
    }


def score(rows: list[dict[str, Any]], profile_path: Path | None = PROFILE) -> dict[str, Any]:
    """Analytical and calibrated predictions of every ok row, their errors, and the summary tables."""
    from advisor.catalog import model_from_config
    from advisor.estimators.analytical import AnalyticalEstimator
    from advisor.estimators.calibrated import CalibratedEstimator, StaleProfileError
    from advisor.plans import TrainingPlan
    from advisor.profiles import Profile

    profile = None
    calibrated = None
    if profile_path is not None and Path(profile_path).exists():
        profile = Profile.from_dict(json.loads(Path(profile_path).read_text()))
        try:
            calibrated = CalibratedEstimator(profile)
        except StaleProfileError as exc:  # scored as analytical only, and said so
            print(f"calibrated not scored: {exc}", file=sys.stderr)
    analytical = AnalyticalEstimator()
    out_rows = []
    for r in rows:
        if r.get("status") != "ok" or not r.get("peak_bytes"):
            continue
        model = model_from_config(dict(r["arch"]), name=r["case_id"])
        plan = TrainingPlan.from_dict(r["plan"])
        cpu = _gpu(r["device"])
        a = analytical.estimate(model, replace(cpu, id=plan.gpu_id), plan)
        row = {
            "case_id": r["case_id"],
            "family": r["family"],
            "method": plan.method,
            "framework": plan.framework,
            "num_gpus": plan.num_gpus,
            "checkpointing": plan.grad_checkpointing,
            "vocab": model.vocab_size,
            "hidden": model.hidden_size,
            "layers": model.total_layers,
            "tokens": plan.micro_batch * plan.seq_len,
            "measured_bytes": r["peak_bytes"],
            "measured_step_s": r["step_time_s"],
            "analytical_bytes": a.memory.allocated_peak_bytes,
            "analytical_step_s": a.speed.step_time_s,
            "analytical_memory_error_pct": _pct(a.memory.allocated_peak_bytes, r["peak_bytes"]),
            "analytical_step_time_error_pct": _pct(a.speed.step_time_s, r["step_time_s"]),
        }
        if calibrated is not None:
            c = calibrated.estimate(model, profile.gpu, replace(plan, gpu_id=profile.gpu.id))
            outside = profile.fitted_range.outside(model, plan)
            row.update(
                calibrated_bytes=c.memory.allocated_peak_bytes,
                calibrated_step_s=c.speed.step_time_s,
                calibrated_memory_error_pct=_pct(c.memory.allocated_peak_bytes, r["peak_bytes"]),
                calibrated_step_time_error_pct=_pct(c.speed.step_time_s, r["step_time_s"]),
                outside_calibration=outside,
            )
        out_rows.append(row)
    return {
        "rows": out_rows,
        "profile": None if profile is None else profile.id,
        "profile_stale": None if profile is None else profile.stale,
    }


def _pct(pred: float, meas: float | None) -> float | None:
    if not meas:
        return None
    return round((pred - meas) / meas * 100, 2)


def summarise(scored: dict[str, Any]) -> dict[str, Any]:
    rows = scored["rows"]
    out_rows = [r for r in rows if r.get("outside_calibration")]

    def block(rs: list[dict[str, Any]]) -> dict[str, Any]:
        d = {
            "analytical": {
                "memory": _stats([r["analytical_memory_error_pct"] for r in rs]),
                "step_time": _stats([r["analytical_step_time_error_pct"] for r in rs]),
            }
        }
        if rs and "calibrated_memory_error_pct" in rs[0]:
            d["calibrated"] = {
                "memory": _stats([r["calibrated_memory_error_pct"] for r in rs]),
                "step_time": _stats([r["calibrated_step_time_error_pct"] for r in rs]),
            }
        return d

    by = {}
    for key in ("family", "method", "checkpointing"):
        by[key] = {str(v): block([r for r in rows if r[key] == v]) for v in sorted({r[key] for r in rows}, key=str)}
    return {"all": block(rows), "outside_calibration": block(out_rows), "by": by}


#: what is known about the largest misses (hand-written, from the investigation of each; see issue 10's report)
KNOWN_GAPS: dict[tuple[str, str], str] = {
    ("t5", "memory"): "T5 (its head is tied since transformers 5; the advisor counts it so since issue 10): the rest "
    "is not traced yet",
    ("gpt2", "memory"): "DoRA on GPT-2 (Conv1D weights) under checkpointing, few tokens: the peak is under-counted; "
    "not traced yet (the DoRA weight-norm temporaries are the only term of that size)",
    ("gemma2", "memory"): "Gemma-2 (eager attention) QLoRA under checkpointing: under-counted; not traced yet",
    ("gemma2", "step time"): "Gemma-2 runs eager attention (its only path in transformers) with soft-capping: the "
    "calibration's eager trials (Llama, Qwen2, GPT-2 shapes) under-predict it; not traced yet",
}

TARGETS_TEXT = {
    "analytical memory median (all cases)": ("all", "analytical", "memory", "median", 5.0),
    "calibrated memory median (outside the calibration)": (
        "outside_calibration",
        "calibrated",
        "memory",
        "median",
        3.0,
    ),
    "calibrated memory worst (outside the calibration)": ("outside_calibration", "calibrated", "memory", "worst", 10.0),
    "calibrated step time median (outside the calibration)": (
        "outside_calibration",
        "calibrated",
        "step_time",
        "median",
        10.0,
    ),
}


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, (part, est, what, stat, limit) in TARGETS_TEXT.items():
        v = summary.get(part, {}).get(est, {}).get(what, {}).get(stat)
        out.append({"target": name, "limit_pct": limit, "value_pct": v, "met": v is not None and v <= limit})
    return out


def markdown(doc: dict[str, Any]) -> str:
    s = doc["summary"]

    def line(label: str, st: dict[str, Any]) -> str:
        if not st.get("n"):
            return f"| {label} | 0 | | | | |"
        return f"| {label} | {st['n']} | {st['median']}% | {st['p90']}% | {st['worst']}% | {st['within_10pct'] * 100:.0f}% |"

    head = "| estimator / set | n | median | p90 | worst | within 10% |\n|---|---|---|---|---|---|"
    lines = [
        "# CPU truth: real fp32 training steps vs the estimators",
        "",
        f"Command: `{doc['command']}`. Data: `{doc['data']}` ({doc['n_rows']} rows, {doc['n_ok']} ok; design seed "
        f"{doc['design_seed']}; CPU {doc['cpu_model']}; {doc['software']}). Profile: `{doc['profile']}`.",
        "",
        "Absolute relative error of the allocated peak (live tensors) and of the step time (process CPU time, "
        "one thread, minimum over the quiet window). *Outside the calibration*: cases that "
        "`FittedRange.outside` flags (another family, method, or a number beyond the fitted ranges).",
        "",
        "## Targets",
        "",
        "| target | limit | value | met |",
        "|---|---|---|---|",
    ]
    for t in doc["targets"]:
        lines.append(f"| {t['target']} | {t['limit_pct']}% | {t['value_pct']}% | {'yes' if t['met'] else 'NO'} |")
    for what in ("memory", "step_time"):
        lines += ["", f"## {what.replace('_', ' ')}", "", head]
        for part, label in (("all", "all cases"), ("outside_calibration", "outside the calibration")):
            for est in ("analytical", "calibrated"):
                st = s[part].get(est, {}).get(what)
                if st is not None:
                    lines.append(line(f"{est}, {label}", st))
        for key in ("family", "method", "checkpointing"):
            lines += ["", f"By {key}:", "", head]
            for v, blk in s["by"][key].items():
                for est in ("analytical", "calibrated"):
                    st = blk.get(est, {}).get(what)
                    if st is not None:
                        lines.append(line(f"{est}, {key}={v}", st))
    lines += [
        "",
        "## Every case",
        "",
        "| case | vocab | hidden | layers | tokens | measured MiB | analytical | calibrated | measured s | analytical | "
        "calibrated | outside |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| `{r['case_id']}` | {r['vocab']} | {r['hidden']} | {r['layers']} | {r['tokens']} | "
            f"{r['measured_bytes'] / 2**20:.1f} | {r['analytical_memory_error_pct']:+.1f}% | "
            f"{_fmt(r.get('calibrated_memory_error_pct'))} | {r['measured_step_s']:.3f} | {_fmt(r['analytical_step_time_error_pct'])} | "
            f"{_fmt(r.get('calibrated_step_time_error_pct'))} | {'; '.join(r.get('outside_calibration') or [])[:60]} |"
        )
    lines += ["", "## Worst cases and what is known about them", ""]
    for what, key in (("memory", "calibrated_memory_error_pct"), ("step time", "calibrated_step_time_error_pct")):
        worst = sorted((r for r in doc["rows"] if r.get(key) is not None), key=lambda r: -abs(r[key]))[:5]
        for r in worst:
            why = KNOWN_GAPS.get((r["family"], what), "")
            lines.append(f"- {what} `{r['case_id']}`: calibrated {r[key]:+.1f}%{': ' + why if why else ''}")
    failed = doc.get("failed") or []
    if failed:
        lines += ["", "## Cases that did not run", ""]
        lines += [f"- `{f['case_id']}`: {f['status']}: {(f.get('error') or '').splitlines()[0][:160]}" for f in failed]
    return "\n".join(lines) + "\n"


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:+.1f}%"


def report(data: Path, profile: Path, results: Path, command: str) -> dict[str, Any]:
    rows = read_rows(data)
    scored = score(rows, profile)
    summary = summarise(scored)
    ok = [r for r in rows if r.get("status") == "ok"]
    first = ok[0] if ok else {}
    doc = {
        "command": command,
        "data": str(data.relative_to(ROOT) if data.is_relative_to(ROOT) else data),
        "n_rows": len(rows),
        "n_ok": len(ok),
        "design_seed": first.get("design_seed"),
        "cpu_model": first.get("cpu_model"),
        "software": ", ".join(f"{k} {v}" for k, v in (first.get("software") or {}).items() if v),
        "profile": scored["profile"],
        "summary": summary,
        "targets": targets(summary),
        "rows": scored["rows"],
        "failed": [
            {"case_id": r["case_id"], "status": r["status"], "error": r.get("error")}
            for r in rows
            if r.get("status") != "ok"
        ],
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / "cpu_truth.json").write_text(json.dumps(doc, indent=1) + "\n")
    (results / "cpu_truth.md").write_text(markdown(doc))
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_truth", description=__doc__.split("\n")[0])
    p.add_argument("--run", action="store_true", help="measure the cases not yet in the data file, then score")
    p.add_argument("--n", type=int, default=N_CASES)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--profile", default=str(PROFILE))
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "tuneadvisor-cpu-truth"))
    p.add_argument("--only", nargs="*", default=None, help="case ids to measure (default: all missing)")
    p.add_argument("--repeat", action="store_true", help="with --run: measure the cases already there again")
    p.add_argument("--list", action="store_true", help="print the design and exit")
    args = p.parse_args(argv)
    data = Path(args.data)
    if args.list:
        from advisor.devices import host_cpu_spec

        for c in cases(host_cpu_spec(), args.n, args.seed):
            h = c.arch.get("hidden_size") or c.arch.get("n_embd") or c.arch.get("d_model")
            print(c.id, c.arch.get("vocab_size"), h, c.plan["seq_len"], c.plan["micro_batch"], c.plan.get("lora_r"))
        return 0
    if args.run:
        run(args.n, args.seed, data, Path(args.work), args.only, args.repeat)
    doc = report(data, Path(args.profile), Path(args.results), "python -m bench.cpu_truth")
    for t in doc["targets"]:
        print(f"{t['target']}: {t['value_pct']}% (limit {t['limit_pct']}%) {'met' if t['met'] else 'NOT MET'}")
    print(markdown(doc).split("## memory")[1].split("By family")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
