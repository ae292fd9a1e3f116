"""The reference data the benches and the GPU catalog are built from lives in the repository.

A fresh clone has no `../shared`: every reader points at `reference/`, the GPU catalog rebuilds
byte for byte from the vendored research table, and answers cite the study by its name.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "reference"
VENDORED = (
    "published_measurements.csv",
    "published_measurements_2.csv",
    "gpu_catalog_research.csv",
    "lora-vs-qlora-study.txt",
    "README.md",
)
SCANNED = ("advisor", "bench", "tools", "calibration")
OUTSIDE = re.compile(r"\.\./shared|shared/data|shared/reference")
#: Files that still mention the old location and belong to another engineer; each entry must still
#: match (the second test fails once it is fixed, so the exemption is removed with the fix).
PENDING: dict[str, str] = {}


def _offenders() -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts or path.suffix in {".pyc", ".sqlite", ".db"}:
                continue
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                continue
            lines = [i for i, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
            if lines:
                found[str(path.relative_to(ROOT))] = lines
    return found


def test_nothing_in_the_code_reads_or_cites_a_path_outside_the_repository():
    offenders = {p: lines for p, lines in _offenders().items() if p not in PENDING}
    assert not offenders, f"these files reference ../shared (use reference/): {offenders}"


def test_pending_exemptions_are_still_needed():
    found = _offenders()
    stale = [p for p in PENDING if p not in found]
    assert not stale, f"fixed: remove from PENDING: {stale}"


@pytest.mark.parametrize("name", VENDORED)
def test_reference_files_are_vendored(name):
    path = REFERENCE / name
    assert path.is_file() and path.stat().st_size > 0
    if name != "README.md":
        assert f"`{name}`" in (REFERENCE / "README.md").read_text(), f"reference/README.md does not describe {name}"


def test_readers_point_inside_the_repository():
    from bench import published

    assert published.CSV == REFERENCE / "published_measurements.csv"
    cases = published.load_cases()
    assert len(cases) > 100 and any(c.skip is None for c in cases)
    tool = _load_tool("build_gpu_catalog")
    assert tool.RESEARCH == REFERENCE / "gpu_catalog_research.csv"


def test_gpu_catalog_rebuilds_byte_identical(tmp_path, monkeypatch):
    tool = _load_tool("build_gpu_catalog")
    (tmp_path / "advisor" / "catalog" / "data").mkdir(parents=True)
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    tool.main()
    rebuilt = (tmp_path / "advisor" / "catalog" / "data" / "gpus.json").read_bytes()
    assert rebuilt == (ROOT / "advisor" / "catalog" / "data" / "gpus.json").read_bytes()


def test_answers_cite_the_study_by_name_not_by_path():
    from advisor.study import STUDY

    assert "/" not in STUDY and "shared" not in STUDY
    assert "LoRA" in STUDY and "QLoRA" in STUDY
    study = (REFERENCE / "lora-vs-qlora-study.txt").read_text()
    # the claims the advisor checks are the study's own words
    for quote in ("QLoRA\n12GB", "7B models: RTX 3060", "13B models: RTX 3090", "20-30% more training steps"):
        assert quote in study


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
