"""How far an estimate may be from the real run: an error band per source and kind of plan, from the benches.

Every estimate carries a band: the p90 of the absolute relative error that the benches measured for
estimates of the same source (analytical / calibrated / simulated) and kind of plan (method x stack x
device scale), memory and step time apart. The table is committed data
(``advisor/catalog/data/uncertainty.json``), written by ``python -m bench.uncertainty`` from the bench
results (published real runs, real CPU runs, simulated traces, calibration trials); it records for each
cell its row count, p50 / p90 / worst, which bench files they came from and their commits and dates.

Errors are signed as the benches sign them, ``e = (predicted - measured) / measured``. If |e| <= p (the
p90) then ``measured = predicted / (1 + e)`` lies in ``[predicted / (1 + p), predicted / (1 - p)]``:
that interval is the band (asymmetric: an estimate 20% too low means the real run is 25% above it).
p is capped at ``MAX_P90`` so the upper end stays finite.

A cell with fewer than the table's ``min_rows`` usable rows is not trusted on its own: the lookup falls
back to a coarser key (one GPU and several together, then any stack, then any method; a CPU device and
GPUs never share a cell) and says so in ``basis``.
A source with no bench rows falls back to the analytical band, with the reason. Where no bench
measures anything like the plan, the band is ``None`` and the verdict uses the point estimate alone
(``basis`` says so).

Pure: stdlib only (the recommend search reads the bounds as numpy columns, built once per table).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

#: the committed band table
TABLE_PATH = Path(__file__).resolve().parent.parent / "catalog" / "data" / "uncertainty.json"
TABLE_FORMAT = "tuneadvisor.uncertainty/1"
SOURCES = ("analytical", "calibrated", "simulated")
QUANTITIES = ("memory", "step_time")
#: a p90 above 90% would put the upper end of the band past 10x the estimate: cap it there
MAX_P90 = 0.9
ANY = "*"

#: the three verdicts of a memory estimate against the device's memory
FITS = "fits"
BAND_CROSSES = "band_crosses_limit"
DOES_NOT_FIT = "does_not_fit"
VERDICTS = (FITS, BAND_CROSSES, DOES_NOT_FIT)


@dataclass(frozen=True)
class ErrorBand:
    """The p90 relative error that applies to one estimate, and where it comes from."""

    p90_pct: float | None  # None: no bench measures this kind of plan (the band is the point estimate)
    n: int  # bench rows behind p90_pct
    basis: str  # the cell, its bench files, and why a coarser cell was used when it was

    @property
    def fraction(self) -> float | None:
        return None if self.p90_pct is None else min(self.p90_pct / 100.0, MAX_P90)

    def low(self, value: float) -> float:
        """The smallest real value consistent with an error of at most p90: value / (1 + p)."""
        f = self.fraction
        return value if f is None else value / (1.0 + f)

    def high(self, value: float) -> float:
        """The largest real value consistent with an error of at most p90: value / (1 - p)."""
        f = self.fraction
        return value if f is None else value / (1.0 - f)

    def to_dict(self) -> dict[str, Any]:
        return {"p90_pct": self.p90_pct, "n": self.n, "basis": self.basis}


def source_kind(source: str) -> str:
    """'calibrated:<profile id>' -> 'calibrated'; the others are their own kind."""
    return source.split(":", 1)[0]


def scale_of(num_gpus: int, cpu: bool) -> str:
    """The device scale of a plan: a CPU device, one GPU, or several (communication, sharding)."""
    return "cpu" if cpu else ("1gpu" if num_gpus <= 1 else "multigpu")


def cell_key(source: str, quantity: str, method: str, framework: str, scale: str) -> str:
    return f"{source}|{quantity}|{method}|{framework}|{scale}"


def device_class(scale: str) -> str:
    """'gpu' for one or several GPUs, 'cpu' for a CPU device: the classes never share a band (a CPU run
    measures neither a GPU's allocator and context nor its kernels' efficiency)."""
    return "cpu" if scale == "cpu" else "gpu"


def fallback_keys(source: str, quantity: str, method: str, framework: str, scale: str) -> list[tuple[str, str]]:
    """The cells tried in order, each with what it drops (finest first), never leaving the device class."""
    cls = device_class(scale)
    keys = [(cell_key(source, quantity, method, framework, scale), "")]
    if cls != scale:
        keys.append((cell_key(source, quantity, method, framework, cls), f"one GPU and several (too few {scale} rows)"))
    keys += [
        (cell_key(source, quantity, method, ANY, cls), f"any stack (too few {framework} rows)"),
        (cell_key(source, quantity, ANY, framework, cls), f"any method (too few {method} rows)"),
        (
            cell_key(source, quantity, ANY, ANY, cls),
            f"every {source} {quantity} row on a {cls} (too few like this plan)",
        ),
    ]
    return keys


@dataclass(frozen=True)
class BandTable:
    """The committed table: cells keyed 'source|quantity|method|framework|scale' ('*' = any)."""

    cells: dict[str, dict[str, Any]]
    min_rows: int
    provenance: str  # one line: which generator, when, at which commit

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BandTable:
        if d.get("format") != TABLE_FORMAT:
            raise ValueError(f"band table format {d.get('format')!r} is not {TABLE_FORMAT!r}")
        prov = f"{d.get('generated_by', '?')} at {d.get('commit', '?')} on {d.get('generated_at', '?')}"
        return cls(cells=dict(d.get("cells", {})), min_rows=int(d.get("min_rows", 5)), provenance=prov)

    def _cell(self, key: str) -> dict[str, Any] | None:
        c = self.cells.get(key)
        return c if c is not None and c.get("p90_pct") is not None and c.get("n", 0) >= self.min_rows else None

    def _find(self, source: str, quantity: str, method: str, framework: str, scale: str) -> ErrorBand | None:
        for key, dropped in fallback_keys(source, quantity, method, framework, scale):
            c = self._cell(key)
            if c is not None:
                how = f"; coarser cell: {dropped}" if dropped else ""
                basis = f"p90 of |error| over {c['n']} bench rows of {key} ({c.get('from', '?')}){how}"
                return ErrorBand(p90_pct=float(c["p90_pct"]), n=int(c["n"]), basis=basis)
        return None

    def band(self, source: str, quantity: str, method: str, framework: str, scale: str) -> ErrorBand:
        """The band of one estimate: its own source's finest usable cell, else the analytical band (the
        simulated estimator's speed is the analytical model's; a source no bench measured is not
        trusted more than the analytical model), else no band, said so."""
        kind = source_kind(source)
        found = self._find(kind, quantity, method, framework, scale)
        if found is not None:
            return found
        if kind != "analytical":
            found = self._find("analytical", quantity, method, framework, scale)
            if found is not None:
                why = (
                    "the simulated estimator's speed is the analytical model's"
                    if kind == "simulated" and quantity == "step_time"
                    else f"no bench rows of {kind} {quantity} estimates"
                )
                return ErrorBand(found.p90_pct, found.n, f"{why}: the analytical band: {found.basis}")
        return ErrorBand(None, 0, f"no bench measures {kind} {quantity} estimates of {method} ({framework}, {scale})")


@lru_cache(maxsize=1)
def table() -> BandTable:
    """The committed band table (read once). Missing: an empty table, so every band says 'no bench'."""
    if not TABLE_PATH.exists():
        return BandTable(cells={}, min_rows=5, provenance=f"no band table at {TABLE_PATH.name}")
    return BandTable.from_dict(json.loads(TABLE_PATH.read_text()))


@lru_cache(maxsize=4096)
def band_for(source: str, quantity: str, method: str, framework: str, num_gpus: int, cpu: bool) -> ErrorBand:
    """The band of an estimate of `source` for a plan of this kind (cached: a handful of kinds per search)."""
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity must be one of {QUANTITIES}")
    return table().band(source, quantity, method, framework, scale_of(num_gpus, cpu))


def verdict(total_bytes: int, limit_bytes: int, band: ErrorBand | None) -> tuple[str, str]:
    """Fits / the band crosses the limit / does not fit, with the reason in one sentence.

    Does not fit: the estimate itself is over the limit. Band crosses: the estimate fits but the band's
    upper end (the real peak if the error is as large as the p90 the benches saw) does not. Fits: the
    whole band is under the limit."""
    gib = 2**30
    lim = f"{limit_bytes / gib:.2f} GiB"
    if band is None or band.p90_pct is None:
        if total_bytes > limit_bytes:
            return DOES_NOT_FIT, f"estimate {total_bytes / gib:.2f} GiB is over {lim} (no error band: {_why(band)})"
        return FITS, f"estimate {total_bytes / gib:.2f} GiB is under {lim} (no error band: {_why(band)})"
    lo, hi = band.low(total_bytes), band.high(total_bytes)
    span = f"band {lo / gib:.2f}-{hi / gib:.2f} GiB (p90 error {band.p90_pct:.1f}%, n={band.n})"
    if total_bytes > limit_bytes:
        tail = "; the band's low end is under it: it might fit" if lo <= limit_bytes else ""
        return DOES_NOT_FIT, f"estimate {total_bytes / gib:.2f} GiB is over {lim}; {span}{tail}"
    if hi > limit_bytes:
        return BAND_CROSSES, (
            f"estimate {total_bytes / gib:.2f} GiB is under {lim} but the {span} crosses it: the run may run out of memory"
        )
    return FITS, f"the whole {span} is under {lim}"


def _why(band: ErrorBand | None) -> str:
    return "no band" if band is None else band.basis
