"""Derive the error bands every estimate carries from the bench results: ``python -m bench.uncertainty``.

Reads the committed bench results (each optional: a missing file is listed, not an error), collects every
row's signed relative error ``(predicted - measured) / measured`` by source (analytical / calibrated /
simulated), quantity (memory / step time) and kind of plan (method x stack x device scale), and writes

- ``advisor/catalog/data/uncertainty.json``: the band table the estimators read
  (``advisor.estimators.uncertainty``), with its provenance (each input file, its commit and date, n per cell);
- ``bench/results/uncertainty.{json,md}``: the same cells as tables (n, median, p90, worst, share within
  10%), the band each common kind of plan gets and through which fallback, and the cells with no data.

A cell with traced rows only (the referee) is not used: a trace is exact about the stack's tensors and
silent about the allocator and the device, so a band needs real runs; traced rows can widen a cell
that has real ones. A cell's p90 is the widest p90 among its inputs that have at least ``MIN_ROWS`` rows there (different
truths, e.g. published GPU runs and real CPU runs, are not averaged into each other: the band is the
widest error any of them saw); with no such input, the p90 of the pooled rows when they reach
``MIN_ROWS``; else the cell is not used and the lookup falls back to a coarser one.

Throughput errors are turned into step-time errors: step time is 1/throughput, so
``e_step = 1 / (1 + e_throughput) - 1``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from advisor.estimators import uncertainty as unc
from advisor.methods import METHOD_NAMES

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MIN_ROWS = 5
QUANTITY_ALIASES = {"memory": "memory", "step_time": "step_time", "throughput": "throughput"}


@dataclass(frozen=True)
class Input:
    """One bench result file: where its rows are, what truth they measure, which errors to take."""

    pattern: str  # glob under bench/results
    truth: str
    list_paths: tuple[str, ...]  # dotted paths of row lists, the first present is used ("" = the top level)
    cpu: bool = False  # rows are real runs on a CPU device
    #: legacy error keys of this file -> (source, quantity); the generic "<source>_<quantity>_error_pct" keys
    #: are always read
    legacy: tuple[tuple[str, str, str], ...] = ()
    sources: tuple[str, ...] = unc.SOURCES  # sources taken from this file (another file scores the others)
    real: bool = True  # measured on real runs (False: a simulated trace, which alone cannot make a band)
    superseded_by: str | None = None  # read only when this file is absent


INPUTS = (
    Input(
        "accuracy.json",
        "published real runs (GPU peak memory)",
        ("rows", "scored"),
        legacy=(("error_pct", "analytical", "memory"),),
        sources=("analytical",),
    ),
    Input(
        "throughput.json",
        "published real runs (GPU throughput)",
        ("rows", "scored"),
        legacy=(("error_pct", "analytical", "throughput"),),
        sources=("analytical",),
    ),
    Input(
        "cpu_truth.json",
        "real fp32 training steps on this CPU, outside the calibration design",
        ("rows", "cases", "trials"),
        cpu=True,
    ),
    Input(
        "gpu/*.json",
        "real steps on a CUDA GPU (python -m bench.gpu_check): allocated peak and step time",
        ("rows",),
    ),
    Input(
        "simulated_referee*.json",
        "full-size steps traced under FakeTensorMode (allocated peak)",
        ("rows",),
        legacy=(("diff_pct", "analytical", "memory"),),
        sources=("analytical",),
        real=False,
    ),
    Input(
        "simulated_published.json",
        "published real runs (GPU peak memory), simulated source",
        ("rows",),
        legacy=(("simulated_pct", "simulated", "memory"),),
        sources=("simulated",),
    ),
    Input(
        "calibration_cpu.json",
        "real CPU trials outside the calibration's fitted range (calibration bench)",
        ("extrapolation.trials", "real_size.trials"),
        cpu=True,
        legacy=(("memory_error_pct", "calibrated", "memory"), ("step_time_error_pct", "calibrated", "step_time")),
        sources=("calibrated",),
        superseded_by="cpu_truth.json",
    ),
)


@dataclass(frozen=True)
class Row:
    source: str
    quantity: str  # memory | step_time
    method: str
    framework: str
    scale: str
    error_pct: float
    origin: str  # file name
    real: bool  # a real run (not a trace)


def _get(d: Any, dotted: str) -> Any:
    for part in [p for p in dotted.split(".") if p]:
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def _plan(row: dict) -> dict:
    for k in ("plan_fields", "plan"):
        if isinstance(row.get(k), dict):
            return row[k]
    return {}


def _method(row: dict) -> str | None:
    m = row.get("method") or _plan(row).get("method")
    if m is None and isinstance(row.get("trial_id"), str):  # calibration trials: ".../lora-s512-b1-ckpt"
        m = row["trial_id"].rsplit("/", 1)[-1].split("-", 1)[0]
    return m if m in METHOD_NAMES else None


def _error_keys(row: dict, inp: Input) -> list[tuple[str, str, float]]:
    """(source, quantity, signed error in %) of a row: generic keys first, the file's legacy keys where
    the generic ones are absent."""
    out: dict[tuple[str, str], float] = {}
    for key, value in row.items():
        if not key.endswith("_error_pct") or not isinstance(value, (int, float)):
            continue
        head = key[: -len("_error_pct")]
        for s in unc.SOURCES:
            if head.startswith(s + "_") and head[len(s) + 1 :] in QUANTITY_ALIASES:
                out[(s, QUANTITY_ALIASES[head[len(s) + 1 :]])] = float(value)
    for key, s, q in inp.legacy:
        if (s, q) not in out and isinstance(row.get(key), (int, float)):
            out[(s, q)] = float(row[key])
    rows = []
    for (s, q), e in out.items():
        if s not in inp.sources or not np.isfinite(e):
            continue
        if q == "throughput":  # step time = 1 / throughput
            if e <= -100:
                continue
            q, e = "step_time", (1.0 / (1.0 + e / 100.0) - 1.0) * 100.0
        rows.append((s, q, e))
    return rows


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def read_inputs(results: Path = RESULTS) -> tuple[list[Row], list[dict[str, Any]]]:
    """Every row of every present input, and one provenance entry per input (present or not)."""
    rows: list[Row] = []
    prov: list[dict[str, Any]] = []
    for inp in INPUTS:
        files = sorted(results.glob(inp.pattern))
        if inp.superseded_by and (results / inp.superseded_by).exists():
            prov.append(
                {
                    "file": f"bench/results/{inp.pattern}",
                    "present": True,
                    "truth": inp.truth,
                    "rows": 0,
                    "not_used": f"superseded by {inp.superseded_by}",
                }
            )
            continue
        if not files:
            prov.append({"file": f"bench/results/{inp.pattern}", "present": False, "truth": inp.truth, "rows": 0})
            continue
        for f in files:
            data = json.loads(f.read_text())
            found = [p for p in inp.list_paths if isinstance(_get(data, p), list)]
            n_before, skipped, used = len(rows), 0, 0
            for path in found if inp.cpu else found[:1]:  # CPU files may hold several trial lists
                for row in _get(data, path):
                    if not isinstance(row, dict):
                        continue
                    method = _method(row)
                    errors = _error_keys(row, inp)
                    if method is None or not errors:
                        skipped += bool(errors) or bool(method)
                        continue
                    fw = row.get("framework") or row.get("stack") or _plan(row).get("framework") or "hf"
                    ngpu = int(row.get("num_gpus") or _plan(row).get("num_gpus") or 1)
                    cpu = inp.cpu or str(row.get("device", "")).startswith("cpu")
                    scale = unc.scale_of(ngpu, cpu)
                    rows.extend(Row(s, q, method, str(fw), scale, e, f.name, inp.real) for s, q, e in errors)
                    used += 1
            rel = f.relative_to(ROOT) if f.is_relative_to(ROOT) else f
            prov.append(
                {
                    "file": str(rel),
                    "present": True,
                    "truth": inp.truth,
                    "row_lists": found,
                    "rows": used,
                    "errors": len(rows) - n_before,
                    "rows_without_method_or_error": skipped,
                    "commit": data.get("commit") if isinstance(data, dict) else None,
                    "date": (data.get("date") or data.get("generated_at")) if isinstance(data, dict) else None,
                    "last_commit_of_file": _git("log", "-1", "--format=%h %cI", "--", str(rel)) or None,
                    "uncommitted_changes": bool(_git("status", "--porcelain", "--", str(rel))),
                    "file_mtime": datetime.fromtimestamp(f.stat().st_mtime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
            )
    return rows, prov


def _stats(errors: list[float]) -> dict[str, Any]:
    a = np.abs(np.asarray(errors, dtype=float))
    return {
        "n": int(a.size),
        "median_pct": round(float(np.median(a)), 2),
        "p90_pct": round(float(np.percentile(a, 90)), 2),
        "worst_pct": round(float(a.max()), 2),
        "within_10pct": round(float((a <= 10).mean()), 3),
        "mean_signed_pct": round(float(np.mean(errors)), 2),
    }


def build_cells(rows: list[Row], min_rows: int = MIN_ROWS) -> dict[str, dict[str, Any]]:
    """Every cell at every level of the fallback chain that has rows, with its p90 (see the module doc)."""
    by_cell: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    traced = {r.origin for r in rows if not r.real}
    for r in rows:
        for key, _ in unc.fallback_keys(r.source, r.quantity, r.method, r.framework, r.scale):
            by_cell[key][r.origin].append(r.error_pct)
    cells = {}
    for key in sorted(by_cell):
        origins = by_cell[key]
        pooled = [e for es in origins.values() for e in es]
        real_rows = [e for o, es in origins.items() if o not in traced for e in es]
        per = {o: _stats(es) for o, es in sorted(origins.items())}
        big = {o: s for o, s in per.items() if s["n"] >= min_rows}
        cell = _stats(pooled)
        if len(real_rows) < min_rows:  # a trace is exact about the stack's tensors, silent on allocator and device
            cell["p90_pct"] = None
            cell["from"] = f"{len(real_rows)} real-run rows (< {min_rows}): not used" + (
                " (traced rows alone do not make a band)" if len(pooled) > len(real_rows) else ""
            )
        elif any(o not in traced for o in big):
            widest = max(big, key=lambda o: big[o]["p90_pct"])
            cell["p90_pct"], cell["from"] = big[widest]["p90_pct"], f"widest p90 of its inputs: {widest}"
        else:
            pooled_real = _stats(real_rows)["p90_pct"]
            widest_trace = max((s["p90_pct"] for s in big.values()), default=0.0)
            cell["p90_pct"] = max(pooled_real, widest_trace)
            cell["from"] = "pooled real-run rows of " + ", ".join(o for o in per if o not in traced)
        cell["by_input"] = per
        cells[key] = cell
    return cells


def kinds_report(table: unc.BandTable) -> list[dict[str, Any]]:
    """The band each common kind of plan gets (hf stack), and through which cell."""
    out = []
    for source in unc.SOURCES:
        for q in unc.QUANTITIES:
            for m in METHOD_NAMES:
                for scale in ("1gpu", "multigpu", "cpu"):
                    b = table.band(source, q, m, "hf", scale)
                    out.append({"source": source, "quantity": q, "method": m, "scale": scale, **b.to_dict()})
    return out


def _md(report: dict[str, Any]) -> str:
    lines = [
        "# Error bands (`python -m bench.uncertainty`)",
        "",
        f"Generated {report['generated_at']} at {report['commit']}; a cell needs {report['min_rows']} rows.",
        "Errors are `(predicted - measured) / measured`; the band of an estimate x is "
        "`[x / (1 + p90), x / (1 - p90)]`.",
        "",
        "## Inputs",
        "",
        "| file | present | rows | truth | commit / date |",
        "|---|---|---|---|---|",
    ]
    for p in report["inputs"]:
        when = " ".join(str(x) for x in (p.get("commit"), p.get("date") or p.get("last_commit_of_file")) if x)
        if p.get("uncommitted_changes"):
            when += f" (uncommitted, written {p['file_mtime']})"
        lines.append(f"| {p['file']} | {'yes' if p['present'] else 'NO'} | {p['rows']} | {p['truth']} | {when} |")
    lines += [
        "",
        "## Cells (source | quantity | method | stack | scale)",
        "",
        "| cell | n | median % | p90 % | worst % | within 10% | band p90 % from |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, c in report["cells"].items():
        p90 = "-" if c["p90_pct"] is None else f"{c['p90_pct']:.1f}"
        lines.append(
            f"| {key} | {c['n']} | {c['median_pct']:.1f} | {p90} | {c['worst_pct']:.1f} | "
            f"{c['within_10pct']:.0%} | {c['from']} |"
        )
    lines += ["", "## No data", ""]
    lines += [f"- {x}" for x in report["no_data"]] or ["- (none)"]
    lines += [
        "",
        "## The band each kind of plan gets (hf stack)",
        "",
        "| source | quantity | method | scale | p90 % | n | basis |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in report["kinds"]:
        p90 = "none" if k["p90_pct"] is None else f"{k['p90_pct']:.1f}"
        lines.append(
            f"| {k['source']} | {k['quantity']} | {k['method']} | {k['scale']} | {p90} | {k['n']} | {k['basis']} |"
        )
    return "\n".join(lines) + "\n"


def generate(results: Path = RESULTS, table_path: Path = unc.TABLE_PATH, write_report: bool = True) -> dict[str, Any]:
    rows, prov = read_inputs(results)
    cells = build_cells(rows)
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S%z")
    table = {
        "format": unc.TABLE_FORMAT,
        "generated_by": "python -m bench.uncertainty",
        "generated_at": now,
        "commit": commit,
        "min_rows": MIN_ROWS,
        "inputs": prov,
        "cells": {k: {f: c[f] for f in ("n", "median_pct", "p90_pct", "worst_pct", "from")} for k, c in cells.items()},
    }
    table_path.write_text(json.dumps(table, indent=1) + "\n")
    band_table = unc.BandTable.from_dict(table)
    no_data = [
        f"{s} {q}: no bench rows"
        for s in unc.SOURCES
        for q in unc.QUANTITIES
        if not any(r.source == s and r.quantity == q for r in rows)
    ]
    no_data += [f"{k}: {c['from']}" for k, c in cells.items() if c["p90_pct"] is None]
    no_data += [f"input {p['file']}: not present" for p in prov if not p["present"]]
    report = {**table, "cells": cells, "no_data": no_data, "kinds": kinds_report(band_table)}
    if write_report:
        (results / "uncertainty.json").write_text(json.dumps(report, indent=1) + "\n")
        (results / "uncertainty.md").write_text(_md(report))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.uncertainty", description=__doc__.split("\n")[0])
    ap.parse_args(argv)
    report = generate()
    print(f"{'cell':58} {'n':>5} {'median%':>8} {'p90%':>7} {'worst%':>7} {'<=10%':>6}")
    for key, c in report["cells"].items():
        if key.count("*") <= 1:
            p90 = "-" if c["p90_pct"] is None else f"{c['p90_pct']:.1f}"
            print(
                f"{key:58} {c['n']:>5} {c['median_pct']:>8.1f} {p90:>7} {c['worst_pct']:>7.1f} "
                f"{c['within_10pct']:>6.0%}"
            )
    for line in report["no_data"]:
        print(f"no data: {line}")
    print(f"wrote {unc.TABLE_PATH.relative_to(ROOT)} and bench/results/uncertainty.{{json,md}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
