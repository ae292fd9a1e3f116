"""Analytical vs simulated peak memory for the 2025-2026 dense families, one command:

    python -m bench.simulated_referee_families            # the design below (~10 min on 2 cores, cached after)
    python -m bench.simulated_referee_families --per-type 4 --types qwen3,gemma3_text
    python -m bench.simulated_referee_families --rescore  # the analytical side against the stored traces

Writes bench/results/simulated_referee_families.{json,md}: per model_type the number of rows, the share within 2%
of the trace, the median and the worst difference, and every row beyond 2% with the component where the two
sides differ most.

Bases are published config.json files: reference/hub_configs/<org>/<repo>/config.json where one is stored, else the
copy below (each with the address it was read from). Each row shrinks its base the way bench/referee_design.py does
(``shallow``: the real widths, vocabulary and head layout with 1-3 layers; ``tiny``: widths 128-1024, 2-6 layers
so the sliding-window pattern shows, vocabularies 1k-50k), and draws the plan from that design's distributions,
with the methods (full / LoRA / QLoRA / DoRA), checkpointing (on / off) and attention (sdpa / eager) cycled so that
every type gets every one of them; tiny variants of sliding-window types draw a window on both sides of the
sequence length (SDPA builds an explicit mask only when the window is shorter than the sequence).
Both sides are the allocated peak of one GPU, as in bench/simulated_referee.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

from advisor.catalog import default_catalog, model_from_config
from advisor.estimators.analytical import AnalyticalEstimator
from advisor.plans import TrainingPlan
from advisor.simulated import SimulatedEstimator, library_versions
from advisor.specs import ModelSpec
from advisor.units import GIB
from bench.referee_design import DTYPES, GRAD_ACCUM, MICRO_BATCHES, OPTIMIZERS, _pick, draw_method_knobs
from bench.simulated_referee import _BYTE_TERMS, _commit, _gib, _stats, diagnose, slice_rows, stored_rows

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results"
HUB = ROOT / "reference" / "hub_configs"
TARGET = 0.02

#: model_type -> (Hub repo, fallback config.json when reference/hub_configs has none). Fallbacks: the published
#: files' architecture keys as read on the Hub page named (huggingface.co/<repo>/blob/main/config.json, 2025).
BASES: dict[str, tuple[str, dict[str, Any] | None]] = {
    "qwen3": ("Qwen/Qwen3-8B", None),
    "llama": ("meta-llama/Llama-3.3-70B-Instruct", None),
    "phi3": ("microsoft/phi-4", None),
    "phi3-mini": ("microsoft/Phi-4-mini-instruct", None),
    "granite": ("ibm-granite/granite-3.3-8b-instruct", None),
    "gemma3_text": (
        "google/gemma-3-1b-pt",
        dict(model_type="gemma3_text", hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
             num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
             max_position_embeddings=32768, sliding_window=512, sliding_window_pattern=6,
             query_pre_attn_scalar=256, hidden_activation="gelu_pytorch_tanh"),
    ),
    "mistral": (
        "mistralai/Mistral-Small-24B-Base-2501",
        dict(model_type="mistral", hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
             num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=131072,
             max_position_embeddings=32768, sliding_window=None, tie_word_embeddings=False),
    ),
    "ministral": (
        "mistralai/Ministral-8B-Instruct-2410",
        dict(model_type="mistral", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
             num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=131072,
             max_position_embeddings=32768, sliding_window=32768, tie_word_embeddings=False),
    ),
    "olmo2": (
        "allenai/OLMo-2-1124-7B",
        dict(model_type="olmo2", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, vocab_size=100352, max_position_embeddings=4096,
             tie_word_embeddings=False),
    ),
    "olmo3": (
        "allenai/Olmo-3-1025-7B",
        dict(model_type="olmo3", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, vocab_size=100278, max_position_embeddings=65536,
             sliding_window=4096, tie_word_embeddings=False),
    ),
    "smollm3": (
        "HuggingFaceTB/SmolLM3-3B",
        dict(model_type="smollm3", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
             num_attention_heads=16, num_key_value_heads=4, vocab_size=128256, max_position_embeddings=65536,
             tie_word_embeddings=True, no_rope_layer_interval=4),
    ),
    "exaone4": (
        "LGAI-EXAONE/EXAONE-4.0-1.2B",
        dict(model_type="exaone4", hidden_size=2048, intermediate_size=4096, num_hidden_layers=30,
             num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=102400,
             max_position_embeddings=65536, sliding_window=None, layer_types=["full_attention"] * 30,
             tie_word_embeddings=True),
    ),
    "exaone4-hybrid": (
        "LGAI-EXAONE/EXAONE-4.0-32B",
        dict(model_type="exaone4", hidden_size=5120, intermediate_size=27392, num_hidden_layers=64,
             num_attention_heads=40, num_key_value_heads=8, head_dim=128, vocab_size=102400,
             max_position_embeddings=131072, sliding_window=4096, sliding_window_pattern=4,
             tie_word_embeddings=False),
    ),
}  # fmt: skip


def base_spec(key: str) -> ModelSpec:
    """The base architecture: the stored published config.json, else the fallback copy."""
    repo, fallback = BASES[key]
    path = HUB / repo / "config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else dict(fallback or {})
    spec = model_from_config(cfg, name=repo.split("/")[-1].lower())
    return replace(spec, hf_id=repo, source=str(path.relative_to(ROOT)) if path.is_file() else f"{repo} (fallback)")


def _shrink(rng: random.Random, base: ModelSpec, size: str, seq: int) -> dict[str, Any]:
    if size == "shallow":
        return {"num_layers": rng.randint(1, 3)}
    head = rng.choice((32, 64, 128)) if base.head_size <= 128 else rng.choice((64, 128, 256))
    heads = rng.choice((2, 4, 8, 16))
    while heads * head > 2048 and heads > 1:
        heads //= 2
    gqa = base.kv_heads < base.num_attention_heads
    kv = rng.choice([d for d in (1, 2, 4) if heads % d == 0 and d < heads]) if gqa else heads
    hidden = heads * head if rng.random() < 0.7 else 64 * rng.randint(2, 16)
    arch: dict[str, Any] = {
        "num_layers": rng.randint(2, 6),
        "hidden_size": hidden,
        "intermediate_size": 64 * max(1, round(hidden * rng.uniform(2.0, 4.0) / 64)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head,
        "vocab_size": round(10 ** rng.uniform(3, 4.7)),
        "max_position_embeddings": max(base.max_position_embeddings, seq),
    }
    if base.family == "phi3":  # Phi3Attention's head is hidden / heads (its config has no head_dim)
        arch.update(hidden_size=heads * head, head_dim=None)
    if base.sliding_window is not None:
        # both sides of the sequence: SDPA masks only when the window is shorter
        arch["sliding_window"] = rng.choice((seq // 4, seq // 2, seq, 2 * seq))
    return arch


def draw(per_type: int, seed: int, types: list[str]) -> list[dict[str, Any]]:
    """`per_type` rows per base: methods x checkpointing x attention cycled, the rest drawn."""
    rng = random.Random(seed)
    rows = []
    cycle = [(m, c, a) for m in ("full", "lora", "qlora", "dora") for c in (True, False) for a in ("sdpa", "eager")]
    for key in types:
        base = base_spec(key)
        order = cycle[:]
        rng.shuffle(order)
        for j in range(per_type):
            method, ckpt, attention = order[j % len(order)]
            size = "shallow" if j % 3 == 2 else "tiny"
            seq = max(64, min(8192, round(10 ** rng.uniform(2.1, 3.7) / 8) * 8))
            if size == "shallow":
                seq = min(seq, base.max_position_embeddings, 4096)
            arch = _shrink(rng, base, size, seq)
            plan: dict[str, Any] = {
                "method": method,
                "dtype": _pick(rng, DTYPES),
                "micro_batch": _pick(rng, MICRO_BATCHES[:4]),
                "seq_len": seq,
                "grad_checkpointing": ckpt,
                "optimizer": _pick(rng, OPTIMIZERS),
                "attention": attention,
                "grad_accum": _pick(rng, GRAD_ACCUM),
            }
            draw_method_knobs(rng, plan, method, dropouts=(0.0, 0.05, 0.1))
            rows.append({"id": len(rows), "base": key, "size": size, "arch": arch, "plan": plan})
    return rows


def model_of(d: dict[str, Any]) -> ModelSpec:
    base = base_spec(d["base"])
    a = d["arch"]
    tag = "x".join(str(a.get(k, "")) for k in ("num_layers", "hidden_size", "vocab_size"))
    return replace(base, name=f"{base.name}~{d['size']}{tag}", published_params=None, source="", **a)


def llama_twin(model: ModelSpec) -> ModelSpec:
    """The same widths, vocabulary, head layout and tying as a plain Llama (the layout the shared analytical model
    was first checked on): what is left of a row's difference once the twin's is taken off is the family's own
    (its qk-norm, sliding windows, sandwich or post norms, fused projections, activation)."""
    return replace(
        model,
        name=model.name + "~llama-twin",
        family="llama",
        model_type="llama",
        qk_norm=False,
        sliding_window=None,
        sliding_window_pattern=0,
        norms_per_layer=2,
        hidden_act="silu",
        softcapping=False,
        sdpa=True,
        attention_bias=False,
        mlp_bias=False,
    )


def _peaks(sim: SimulatedEstimator, ana: AnalyticalEstimator, model: ModelSpec, plan: TrainingPlan):
    gpu = default_catalog().gpu(plan.gpu_id)
    return sim.estimate(model, gpu, plan), ana.estimate(model, gpu, plan)


def run_row(sim: SimulatedEstimator, ana: AnalyticalEstimator, d: dict[str, Any]) -> dict[str, Any]:
    model = model_of(d)
    plan = TrainingPlan(gpu_id="h100-80gb", **{k: tuple(v) if isinstance(v, list) else v for k, v in d["plan"].items()})
    s, a = _peaks(sim, ana, model, plan)
    sa, aa = s.memory.allocated_peak_bytes, a.memory.allocated_peak_bytes
    ts, ta = _peaks(sim, ana, llama_twin(model), plan)
    twin = 100 * (ta.memory.allocated_peak_bytes - ts.memory.allocated_peak_bytes) / ts.memory.allocated_peak_bytes
    terms = ana.plan_terms(model, plan, cpu=False).terms
    return {
        "id": d["id"],
        "model": model.name,
        "model_type": model.model_type or d["base"],
        "base": d["base"],
        "size": d["size"],
        "params_b": round(model.param_count / 1e9, 4),
        "method": plan.method,
        "plan_fields": d["plan"],
        "sliding_window": model.sliding_window,
        "analytical_gib": round(aa / GIB, 4),
        "simulated_gib": round(sa / GIB, 4),
        "simulated_bytes": int(sa),
        "twin_simulated_bytes": int(ts.memory.allocated_peak_bytes),
        "diff_pct": round(100 * (aa - sa) / sa, 2),
        "flag": abs(aa - sa) > TARGET * sa,
        "twin_diff_pct": round(twin, 2),
        "family_diff_pct": round(100 * (aa - sa) / sa - twin, 2),
        "analytical_phase": a.memory.peak_phase,
        "simulated_phase": s.trace.peak_phase,
        "analytical_breakdown_gib": _gib(a.memory.components),
        "analytical_terms_gib": {k: round(v / GIB, 4) for k, v in terms.items() if k in _BYTE_TERMS},
        "simulated_breakdown_gib": _gib(s.memory.components),
        "param_count_traced": s.trace.param_count,
        "param_count_spec": model.param_count,
        "trace_cpu_seconds": round(s.trace.cpu_seconds, 2),
    }


def write(
    rows: list[dict], design: list[dict], cmd: str, seed: int, traces_from: str | None = None
) -> tuple[dict, dict]:
    ok = [r for r in rows if "error" not in r]
    summary = {"all": _stats([r["diff_pct"] for r in ok])}
    # (a re-score without the twin's trace has no twin columns: the own table counts the rows that have them)
    tw = [r for r in ok if r.get("twin_diff_pct") is not None]
    own = {"all": _stats([r["family_diff_pct"] for r in tw]), "twin all": _stats([r["twin_diff_pct"] for r in tw])}
    for v in sorted({r["base"] for r in tw}):
        sel = [r for r in tw if r["base"] == v]
        own[f"base={v}"] = _stats([r["family_diff_pct"] for r in sel])
        own[f"twin base={v}"] = _stats([r["twin_diff_pct"] for r in sel])
    for key in ("base", "method", "size"):
        for v in sorted({r[key] for r in ok}):
            summary[f"{key}={v}"] = _stats([r["diff_pct"] for r in ok if r[key] == v])
    for key, fn in (
        ("ckpt", lambda r: r["plan_fields"]["grad_checkpointing"]),
        ("attention", lambda r: r["plan_fields"]["attention"]),
        (
            "sliding mask",
            lambda r: r["sliding_window"] is not None and r["sliding_window"] <= r["plan_fields"]["seq_len"],
        ),
    ):
        for v in sorted({fn(r) for r in ok}, key=str):
            summary[f"{key}={v}"] = _stats([r["diff_pct"] for r in ok if fn(r) == v])
    doc = {
        "command": cmd,
        "commit": _commit(),
        "traces_from": traces_from or f"{cmd} at {_commit()}",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "versions": library_versions(),
        "seed": seed,
        "bases": {k: {"repo": BASES[k][0], "source": base_spec(k).source} for k in sorted({d["base"] for d in design})},
        "summary": summary,
        "family_own_summary": own,
        "errors": len(rows) - len(ok),
        "design": design,
        "rows": rows,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "simulated_referee_families.json").write_text(json.dumps(doc, indent=1) + "\n")
    v = doc["versions"]
    lines = [
        "# Analytical vs simulated peak memory: the 2025-2026 dense families",
        "",
        f"`{cmd}` at {doc['commit']} · one GPU (h100-80gb), allocated peak (both sides + the same 64 MiB fixed "
        f"buffers) · torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
        f"bitsandbytes {v['bitsandbytes']}",
        "",
        "Design: bench/simulated_referee_families.py (seeded; the rows are in the JSON's `design`), bases: "
        + ", ".join(
            f"{k} = {b['repo']} ({'stored config' if 'fallback' not in b['source'] else 'fallback copy'})"
            for k, b in doc["bases"].items()
        )
        + ". diff = (analytical - simulated) / simulated; target: every family within 2%.",
        "",
        "| slice | n | within 2% | median | p90 | worst |",
        "|---|---|---|---|---|---|",
    ]
    lines += slice_rows(summary)
    lines += [
        "",
        "## The family's own difference",
        "",
        "Each row is also traced and estimated as its Llama twin (`llama_twin`: the same widths, vocabulary, heads "
        "and tying as a plain Llama). own = diff - twin diff: the error the family's own modelling adds (qk-norm, "
        "sliding-window masks, sandwich / post norms, fused projections) over the shared Llama-format model's "
        "error on the same shapes (eager attention at long sequences and checkpointing's recomputation moment "
        "are the shared model's open rows: bench/results/simulated_referee_random.md).",
        "",
        "| family | n | diff within 2% | worst diff | n with twin | twin within 2% | twin worst | own within 2% | own median "
        "| own worst |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in [k for k in summary if k.startswith("base=")] + ["all"]:
        st = summary[k]
        name = k[5:] if k != "all" else "**all**"
        if k not in own:
            lines.append(f"| {name} | {st['n']} | {st['within_2pct']:.1%} | {st['worst_pct']:.2f}% | 0 | | | | | |")
            continue
        tw, ow = own[f"twin {k}"], own[k]
        lines.append(
            f"| {name} | {st['n']} | {st['within_2pct']:.1%} | {st['worst_pct']:.2f}% | {ow['n']} | "
            f"{tw['within_2pct']:.1%} | {tw['worst_pct']:.2f}% | {ow['within_2pct']:.1%} | {ow['median_pct']:.2f}% | "
            f"{ow['worst_pct']:.2f}% |"
        )
    flagged = sorted((r for r in ok if r["flag"]), key=lambda r: -abs(r["diff_pct"]))
    lines += [
        "",
        f"## Rows beyond 2% ({len(flagged)})",
        "",
        "| id | model | plan | analytical GiB | simulated GiB | diff | twin diff | phase (ana / sim) | which side, why |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    mismatched = [r for r in ok if r["param_count_traced"] != r["param_count_spec"]]
    if mismatched:
        lines += ["", f"**{len(mismatched)} rows where transformers builds another parameter count than the spec.**"]
    for r in flagged:
        pf = r["plan_fields"]
        desc = (
            f"{pf['method']} {pf['dtype']} {pf['micro_batch']}x{pf['seq_len']} "
            f"{'ckpt' if pf['grad_checkpointing'] else 'no-ckpt'} {pf['optimizer']} {pf['attention']}"
            + (f" window {r['sliding_window']}" if r["sliding_window"] else "")
        )
        lines.append(
            f"| {r['id']} | {r['model']} | {desc} | {r['analytical_gib']:.3f} | {r['simulated_gib']:.3f} | "
            f"{r['diff_pct']:+.2f}% | "
            + (f"{r['twin_diff_pct']:+.2f}%" if r.get("twin_diff_pct") is not None else "(no twin trace)")
            + f" | {r['analytical_phase']} / {r['simulated_phase']} | "
            f"{diagnose(r)} |"
        )
    errs = [r for r in rows if "error" in r]
    if errs:
        lines += ["", "## Rows not traced", "", "| id | model | error |", "|---|---|---|"]
        lines += [f"| {r['id']} | {r['model']} | {r['error'][:160]} |" for r in errs]
    (OUT / "simulated_referee_families.md").write_text("\n".join(lines) + "\n")
    return summary, own


def rescore(cmd: str) -> int:
    """Re-score the committed design's analytical side against its stored traces, without tracing again.

    The simulated side depends only on transformers + peft + bitsandbytes and the trace code, not on the analytical
    model: after a change to the analytical model alone this gives the table a full run would. The twin's simulated
    peak comes from the row (``twin_simulated_bytes``) or, for results written before rows stored it, from the trace
    cache; a row with neither has no twin columns (the own table says how many rows have them)."""
    prev = json.loads((OUT / "simulated_referee_families.json").read_text())
    ana, sim = AnalyticalEstimator(), SimulatedEstimator()
    gpu = default_catalog().gpu("h100-80gb")
    rows = []
    for r, model, plan in stored_rows(prev, gpu.id, model_of):
        if model is None:
            rows.append(r)
            continue
        a = ana.estimate(model, gpu, plan)
        aa = a.memory.allocated_peak_bytes
        sa = r.get("simulated_bytes") or r["simulated_gib"] * GIB
        twin = llama_twin(model)
        ts = r.get("twin_simulated_bytes")
        if ts is None:
            hit = sim.cached(twin, plan)
            ts = sim.memory_from_trace(hit, gpu).allocated_peak_bytes if hit is not None else None
        diff = round(100 * (aa - sa) / sa, 2)
        new = dict(
            r,
            analytical_gib=round(aa / GIB, 4),
            diff_pct=diff,
            flag=abs(aa - sa) > TARGET * sa,
            analytical_phase=a.memory.peak_phase,
            analytical_breakdown_gib=_gib(a.memory.components),
            analytical_terms_gib={
                k: round(v / GIB, 4) for k, v in ana.plan_terms(model, plan).terms.items() if k in _BYTE_TERMS
            },
            twin_simulated_bytes=ts,
            twin_diff_pct=None,
            family_diff_pct=None,
        )
        if ts:
            ta = ana.estimate(twin, gpu, plan).memory.allocated_peak_bytes
            new["twin_diff_pct"] = round(100 * (ta - ts) / ts, 2)
            new["family_diff_pct"] = round(100 * (aa - sa) / sa - 100 * (ta - ts) / ts, 2)
        rows.append(new)
    traces_from = prev.get("traces_from") or f"{prev['command']} at {prev['commit']}"
    summary, own = write(rows, prev["design"], f"{cmd} (traces from {traces_from})", prev["seed"], traces_from)
    print("all", json.dumps(summary["all"]), "own:", json.dumps(own.get("all")))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-type", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--types", default=",".join(BASES))
    ap.add_argument("--only", default="", help="comma-separated design row ids (debugging; nothing is written)")
    ap.add_argument(
        "--rescore",
        action="store_true",
        help="re-score the committed design's analytical side against its stored traces (no tracing)",
    )
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    cmd = "python -m bench.simulated_referee_families" + (f" {' '.join(argv)}" if argv else "")
    if args.rescore:
        return rescore(cmd)
    design = draw(args.per_type, args.seed, args.types.split(","))
    only = {int(x) for x in args.only.split(",") if x}
    sim, ana = SimulatedEstimator(), AnalyticalEstimator()
    rows = []
    for d in design:
        if only and d["id"] not in only:
            continue
        t0 = time.perf_counter()
        try:
            r = run_row(sim, ana, d)
        except Exception as exc:  # a plan the trace or the estimator refuses is a result, not a crash
            r = {"id": d["id"], "model": d["base"], "error": f"{type(exc).__name__}: {exc}"}
            print(f"{d['id']:4d} {d['base']:16s} ERROR {r['error'][:200]}", flush=True)
        else:
            pf = d["plan"]
            print(
                f"{d['id']:4d} {r['model']:44s} {pf['method']:5s} {'ckpt' if pf['grad_checkpointing'] else '----'} "
                f"{pf['attention']:5s} {pf['micro_batch']}x{pf['seq_len']:<5d} w={r['sliding_window']} "
                f"ana {r['analytical_gib']:8.4f} sim {r['simulated_gib']:8.4f} {r['diff_pct']:+7.2f}% "
                f"{time.perf_counter() - t0:5.1f}s",
                flush=True,
            )
        rows.append(r)
    if only:
        return 0
    summary, own = write(rows, design, cmd, args.seed)
    for k, st in summary.items():
        if k.startswith("base=") or k == "all":
            print(k, json.dumps(st), "own:", json.dumps(own[k]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
