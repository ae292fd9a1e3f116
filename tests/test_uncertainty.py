"""Error bands: the band arithmetic, the fall-back to coarser cells, the three-way verdict, the search's
handling of risky plans, and the generator over present and missing bench files."""

from __future__ import annotations

import json

import pytest

from advisor.estimators import uncertainty as unc
from advisor.recommend import Constraints
from advisor.service import AdvisorService, RecommendRequest

GIB = 2**30


def table(cells: dict, min_rows: int = 5) -> unc.BandTable:
    return unc.BandTable.from_dict({"format": unc.TABLE_FORMAT, "min_rows": min_rows, "cells": cells})


def test_band_bounds_invert_the_signed_error():
    b = unc.ErrorBand(20.0, 10, "x")
    # measured = predicted / (1 + e): an estimate 20% high means the run is 1/1.2 of it, 20% low 1/0.8
    assert b.low(100.0) == pytest.approx(100 / 1.2) and b.high(100.0) == pytest.approx(125.0)
    huge = unc.ErrorBand(500.0, 10, "x")
    assert huge.high(1.0) == pytest.approx(1 / (1 - unc.MAX_P90))  # capped: finite
    none = unc.ErrorBand(None, 0, "no bench")
    assert none.low(5.0) == none.high(5.0) == 5.0


def test_a_thin_cell_falls_back_to_a_coarser_one_and_says_why():
    t = table(
        {
            "analytical|memory|lora|hf|1gpu": {"n": 3, "p90_pct": 2.0},  # too few rows
            "analytical|memory|lora|hf|gpu": {"n": 12, "p90_pct": 9.0, "from": "accuracy.json"},
            "analytical|memory|*|*|gpu": {"n": 50, "p90_pct": 20.0},
            "analytical|memory|*|*|cpu": {"n": 40, "p90_pct": 3.0},
        }
    )
    b = t.band("analytical", "memory", "lora", "hf", "1gpu")
    assert b.p90_pct == 9.0 and b.n == 12 and "one GPU and several" in b.basis
    b = t.band("analytical", "memory", "full", "litgpt", "multigpu")
    assert b.p90_pct == 20.0 and "too few like this plan" in b.basis
    # a CPU device never borrows a GPU band, nor a GPU a CPU one
    assert t.band("analytical", "memory", "lora", "hf", "cpu").p90_pct == 3.0
    assert (
        table({"analytical|memory|*|*|cpu": {"n": 40, "p90_pct": 3.0}})
        .band("analytical", "memory", "lora", "hf", "1gpu")
        .p90_pct
        is None
    )
    # a source without rows borrows the analytical band and says so; no rows at all: no band, said so
    b = t.band("calibrated:cpu-x-20260101", "memory", "lora", "hf", "1gpu")
    assert b.p90_pct == 9.0 and "no bench rows of calibrated" in b.basis
    b = t.band("simulated", "step_time", "lora", "hf", "1gpu")
    assert b.p90_pct is None and "no bench measures" in b.basis


def test_verdict_is_three_way():
    band = unc.ErrorBand(20.0, 10, "x")  # upper end = 1.25 x the estimate
    assert unc.verdict(10 * GIB, 24 * GIB, band)[0] == unc.FITS
    v, why = unc.verdict(20 * GIB, 24 * GIB, band)  # 20 fits, 25 does not
    assert v == unc.BAND_CROSSES and "crosses" in why and "25.00" in why
    v, why = unc.verdict(26 * GIB, 24 * GIB, band)
    assert v == unc.DOES_NOT_FIT and "might fit" in why  # its low end 21.7 is under the card
    assert unc.verdict(20 * GIB, 24 * GIB, unc.ErrorBand(None, 0, "none"))[0] == unc.FITS


def test_every_estimate_carries_bands_from_the_committed_table():
    svc = AdvisorService()
    res = svc.recommend(RecommendRequest(model="llama-2-7b", gpus=("rtx-4090",)))
    for r in res.recommendation.plans:
        m, s = r.candidate.estimate.memory, r.candidate.estimate.speed
        assert m.band is not None and s.band is not None and m.band.basis and s.band.basis
        assert m.low_bytes <= m.device_total_bytes <= m.high_bytes


def test_search_prefers_safe_plans_and_ranks_risky_ones_last(monkeypatch):
    """With a 30% band, a plan over 1/1.43 = 70% of the card is risky: each group keeps a safe plan where it
    has one (a smaller micro-batch), and risky plans rank after every safe one."""
    monkeypatch.setattr(unc, "band_for", lambda *a, **k: unc.ErrorBand(30.0, 99, "test band"))
    svc = AdvisorService()
    res = svc.recommend(
        RecommendRequest(model="llama-2-7b", gpus=("rtx-4090",), constraints=Constraints(max_gpus=1), limit=100)
    )
    rec = res.recommendation
    verdicts = [r.candidate.estimate.memory.verdict for r in rec.plans]
    assert unc.FITS in verdicts
    assert verdicts == sorted(verdicts, key=lambda v: v != unc.FITS), "risky plans after every safe one"
    assert all(
        r.candidate.estimate.memory.high_bytes <= r.candidate.estimate.memory.device_bytes
        for r in rec.plans
        if r.candidate.estimate.memory.verdict == unc.FITS
    )
    assert rec.n_risky > 0 and any("band" in n for n in rec.notes)
    risky = [r for r in rec.plans if r.candidate.estimate.memory.verdict == unc.BAND_CROSSES]
    assert all(r.why.count("RISKY") == 1 for r in risky)


def test_generator_tolerates_missing_files_and_names_cells_without_data(tmp_path):
    from bench import uncertainty as gen

    rows = [
        {"method": "lora", "framework": "litgpt", "num_gpus": 1, "analytical_memory_error_pct": e}
        for e in (1.0, -2.0, 3.0, -4.0, 10.0, 5.0)
    ]
    (tmp_path / "accuracy.json").write_text(json.dumps({"commit": "abc", "rows": rows}))
    out = tmp_path / "uncertainty.json"
    report = gen.generate(results=tmp_path, table_path=out, write_report=False)
    cell = report["cells"]["analytical|memory|lora|litgpt|1gpu"]
    assert cell["n"] == 6 and cell["worst_pct"] == 10.0 and 5.0 < cell["p90_pct"] <= 10.0
    assert any("throughput.json: not present" in x for x in report["no_data"])
    assert any(x.startswith("calibrated step_time: no bench rows") for x in report["no_data"])
    t = unc.BandTable.from_dict(json.loads(out.read_text()))
    assert t.band("analytical", "memory", "lora", "litgpt", "1gpu").p90_pct == cell["p90_pct"]
    # throughput errors become step-time errors: +25% throughput = a step 20% shorter
    (tmp_path / "throughput.json").write_text(
        json.dumps({"rows": [{"method": "lora", "num_gpus": 1, "analytical_throughput_error_pct": 25.0}] * 5})
    )
    report = gen.generate(results=tmp_path, table_path=out, write_report=False)
    assert report["cells"]["analytical|step_time|lora|hf|1gpu"]["mean_signed_pct"] == pytest.approx(-20.0)
    # a trace alone (the referee) makes no band: it is silent on the allocator and the device
    (tmp_path / "simulated_referee_x.json").write_text(
        json.dumps({"rows": [{"method": "dora", "num_gpus": 1, "diff_pct": 1.0}] * 9})
    )
    report = gen.generate(results=tmp_path, table_path=out, write_report=False)
    assert report["cells"]["analytical|memory|dora|hf|1gpu"]["p90_pct"] is None
