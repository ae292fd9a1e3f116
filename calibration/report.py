"""Calibration report: predicted-vs-measured plots (memory, step time) and a short markdown summary.

Why held-out predictions in the plots: a point on the diagonal must mean the profile predicted a trial
it was not fitted on (its whole configuration group left out), with the analytical model beside it.

    python -m calibration.report RUN_DIR      # reads profile.json + fit.json, writes the PNGs and report.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from advisor.profiles import Profile, load_profile
from advisor.units import MIB

MEMORY_PNG = "memory_predicted_vs_measured.png"
STEP_PNG = "step_time_predicted_vs_measured.png"
REPORT_MD = "report.md"


def _scatter(ax, rows: list[dict[str, Any]], measured: str, held_out: str, analytical: str, scale: float) -> None:
    pts = [r for r in rows if r.get(measured) and r.get(held_out)]
    if not pts:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    m = [r[measured] / scale for r in pts]
    ax.scatter(m, [r[analytical] / scale for r in pts], s=14, marker="x", color="tab:gray", label="analytical")
    for ckpt, color in ((False, "tab:blue"), (True, "tab:orange")):
        sel = [r for r in pts if bool(r.get("grad_checkpointing")) == ckpt]
        ax.scatter(
            [r[measured] / scale for r in sel],
            [r[held_out] / scale for r in sel],
            s=16,
            color=color,
            label=f"calibrated, held out ({'checkpointing' if ckpt else 'no checkpointing'})",
        )
    lo = min(min(m), *(r[held_out] / scale for r in pts)) * 0.8
    hi = max(max(m), *(r[held_out] / scale for r in pts)) * 1.25
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, which="both", linewidth=0.3)


#: the two plots: file, row key (measured_/held_out_/analytical_ + key), scale, quantity, unit, title
_PLOTS = (
    (MEMORY_PNG, "memory_bytes", MIB, "peak memory", "MiB", "memory"),
    (STEP_PNG, "step_time_s", 1e-3, "step time", "ms", "step time"),
)


def plot(rows: list[dict[str, Any]], profile: Profile, out_dir: Path) -> list[Path]:
    h = profile.held_out
    errors = (h.memory_median_abs_pct_error, h.step_time_median_abs_pct_error)
    paths = []
    for (name, key, scale, quantity, unit, title), err in zip(_PLOTS, errors, strict=True):
        fig, ax = plt.subplots(figsize=(5.5, 5))
        _scatter(ax, rows, f"measured_{key}", f"held_out_{key}", f"analytical_{key}", scale)
        ax.set_xlabel(f"measured {quantity} ({unit})")
        ax.set_ylabel(f"predicted ({unit})")
        ax.set_title(f"{profile.device_name}\n{title}, held-out median error {_fmt(err)}", fontsize=9)
        fig.tight_layout()
        paths.append(out_dir / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _fmt(v: float | None, unit: str = "%") -> str:
    return "-" if v is None else f"{v:.1f}{unit}"


def summary_markdown(profile: Profile, rows: list[dict[str, Any]]) -> str:
    h = profile.held_out
    a = h.analytical
    prov = profile.provenance
    lines = [
        f"# Calibration {profile.id}",
        "",
        f"Device: **{profile.device_name}** ({profile.device_memory_gib:.1f} GiB), {profile.created_at}.",
        "Software: " + ", ".join(f"{k} {v}" for k, v in profile.software.items() if v) + ".",
        f"Trials: {json.dumps(prov.get('trials', {}))}; fitted on {prov.get('trials_fitted_memory')} (memory) and "
        f"{prov.get('trials_fitted_step_time')} (step time; {prov.get('step_time_excluded_disturbed', 0)} left out as "
        f"disturbed by other load), {h.n_groups} configuration groups.",
        f"Machine load average at start / end: {prov.get('load_average_start')} / {prov.get('load_average_end')}.",
        "",
        "Held-out error (leave one configuration group out; absolute relative error per trial):",
        "",
        "| | median memory | max memory | median step time | max step time |",
        "|---|---|---|---|---|",
        f"| calibrated (held out) | {_fmt(h.memory_median_abs_pct_error)} | {_fmt(h.memory_max_abs_pct_error)} | "
        f"{_fmt(h.step_time_median_abs_pct_error)} | {_fmt(h.step_time_max_abs_pct_error)} |",
        f"| analytical only | {_fmt(a.get('memory_median_abs_pct_error'))} | {_fmt(a.get('memory_max_abs_pct_error'))} | "
        f"{_fmt(a.get('step_time_median_abs_pct_error'))} | {_fmt(a.get('step_time_max_abs_pct_error'))} |",
        "",
        f"Meters: peak memory = `{profile.meters.get('peak_memory')}`; step time = {profile.meters.get('step_time')}.",
        "",
        f"![memory]({MEMORY_PNG}) ![step time]({STEP_PNG})",
        "",
        "Worst held-out memory predictions:",
        "",
    ]
    worst = sorted(
        (r for r in rows if r.get("measured_memory_bytes")),
        key=lambda r: -abs(r["held_out_memory_bytes"] / r["measured_memory_bytes"] - 1),
    )[:5]
    for r in worst:
        err = (r["held_out_memory_bytes"] / r["measured_memory_bytes"] - 1) * 100
        lines.append(f"- `{r['trial_id']}`: {r['measured_memory_bytes'] / MIB:.1f} MiB measured, {err:+.1f}%")
    lines.append("")
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    d = Path(run_dir)
    profile = load_profile(d / "profile.json")
    rows = json.loads((d / "fit.json").read_text())["trials"]
    plot(rows, profile, d)
    path = d / REPORT_MD
    path.write_text(summary_markdown(profile, rows))
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m calibration.report RUN_DIR")
    print(write_report(sys.argv[1]))
