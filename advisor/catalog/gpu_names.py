"""GPU names as SkyPilot and the clouds write them: ``A100`` (the 40 GB card), ``A100-80GB``, ``H100``,
``A10`` (not the A10G), counts ``A100:8`` / ``L4:4``, and memory filters ``80GB+``.

Pure: a name is read into a ``GpuQuery`` and resolved against a sequence of ``GpuSpec``. A name that
means several cards (``RTX 6000``, ``MI300``, ``A100-PCIE``) is an error listing the choices, never a
silent pick: the card is the largest single term of the estimate (memory, speed and price).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from advisor.errors import InvalidInputError, UnknownGpuError
from advisor.specs import GpuSpec

#: SkyPilot accelerator names (``sky show-gpus``; skypilot-catalog catalogs/v7/common/accelerators.csv and the
#: clouds' vms.csv AcceleratorName column) -> catalog id. These win over any alias: ``A100`` is the 40 GB
#: card on AWS p4d, GCP a2-highgpu and Lambda gpu_1x_a100, the 80 GB one is ``A100-80GB``; ``H100`` is the
#: 80 GB SXM5 board of AWS p5 / GCP a3 / Azure ND H100 v5; ``A10`` is Azure's / Lambda's A10, AWS's g5 card
#: is ``A10G``; ``V100`` is the 16 GB board, the 32 GB one ``V100-32GB``. (recorded 2026-11-30)
SKYPILOT_NAMES: dict[str, str] = {
    "A100": "a100-40gb",
    "A100-80GB": "a100-80gb",
    "A100-40GB-PCIE": "a100-40gb-pcie",
    "A100-80GB-PCIE": "a100-80gb-pcie",
    "H100": "h100-sxm",
    "H100-MEGA": "h100-sxm",
    "H100-SXM": "h100-sxm",
    "H100-PCIE": "h100-pcie",
    "H100-NVL": "h100-nvl",
    "H200": "h200",
    "GH200": "gh200",
    "B200": "b200",
    "L4": "l4",
    "L40": "l40",
    "L40S": "l40s",
    "A10": "a10",
    "A10G": "a10g",
    "A40": "a40",
    "T4": "t4",
    "V100": "v100-16gb",
    "V100-32GB": "v100-32gb",
    "A6000": "rtx-a6000",
    "RTXA6000": "rtx-a6000",
    "RTX6000-ADA": "rtx-6000-ada",
    "RTX3060": "rtx-3060-12gb",
    "RTX3090": "rtx-3090",
    "RTX4080": "rtx-4080",
    "RTX4090": "rtx-4090",
    "RTX5090": "rtx-5090",
    "MI300X": "mi300x",
    "MI325X": "mi325x",
}

#: Names people use for more than one card: an error that lists these, whatever the catalog holds.
AMBIGUOUS: dict[str, tuple[str, ...]] = {
    "RTX6000": ("rtx-6000-ada", "rtx-a6000"),  # and the 2018 Quadro RTX 6000 (24 GB), not in the catalog
    "RTX 6000": ("rtx-6000-ada", "rtx-a6000"),
    "A100-PCIE": ("a100-40gb-pcie", "a100-80gb-pcie"),
    "A100-SXM4": ("a100-40gb", "a100-80gb"),
    "MI300": ("mi300x", "mi325x"),
    "V100-SXM2": ("v100-16gb", "v100-32gb"),
}

_COUNT_RE = re.compile(r"^(?P<name>.+?)\s*:\s*(?P<count>\d+)$")
_MEMORY_RE = re.compile(r"^(?P<gb>\d+(?:\.\d+)?)\s*(?:gb|g)\s*\+$", re.IGNORECASE)
MAX_COUNT = 1024


@dataclass(frozen=True)
class GpuQuery:
    """One ``--gpu`` / API ``gpu`` value: a name (or a memory filter) and an optional count."""

    text: str
    name: str | None  # None for a memory filter
    count: int | None = None
    min_memory_gb: float | None = None


def norm(name: str) -> str:
    """Lower case, vendor words and punctuation dropped: 'NVIDIA A100-SXM4 80GB' -> 'a100sxm480gb'."""
    key = name.strip().lower()
    for word in ("nvidia", "geforce", "tesla", "amd", "instinct"):
        key = key.replace(word, "")
    return re.sub(r"[^a-z0-9]", "", key)


_SKY = {norm(k): v for k, v in SKYPILOT_NAMES.items()}
_AMBIG = {norm(k): v for k, v in AMBIGUOUS.items()}


def parse(text: str, field: str = "gpu") -> GpuQuery:
    """'A100:8' -> name A100, count 8; '80GB+' -> every GPU with at least 80 GB; 'L4' -> name L4."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError(
            "a GPU name must be a non-empty string. To fix: e.g. A100, A100-80GB:8, 80GB+", field=field
        )
    raw = text.strip()
    count = None
    m = _COUNT_RE.match(raw)
    if m:
        raw, count = m.group("name").strip(), int(m.group("count"))
        if not 1 <= count <= MAX_COUNT:
            raise InvalidInputError(
                f"GPU count in {text!r} must be between 1 and {MAX_COUNT}. To fix: e.g. A100:8", field=field
            )
    elif ":" in raw:
        raise InvalidInputError(
            f"{text!r}: a count after ':' must be a whole number. To fix: NAME:COUNT, e.g. A100:8", field=field
        )
    mm = _MEMORY_RE.match(raw)
    if mm:
        return GpuQuery(text=text, name=None, count=count, min_memory_gb=float(mm.group("gb")))
    return GpuQuery(text=text, name=raw, count=count)


def _index(gpus: Sequence[GpuSpec]) -> dict[str, set[str]]:
    """normalised key -> catalog ids it names (more than one: ambiguous)."""
    index: dict[str, set[str]] = {}
    for g in gpus:
        for key in (g.id, g.name, *g.aliases):
            k = norm(key)
            if k:
                index.setdefault(k, set()).add(g.id)
    return index


def lookup(name: str, gpus: Sequence[GpuSpec], field: str = "gpu") -> GpuSpec:
    """One card by SkyPilot name, catalog id, name or alias. Exact catalog ids win (a user GPU file may
    reuse a SkyPilot name as its id); then SkyPilot names; then names and aliases, where a key two cards
    share is an error listing both."""
    by_id = {g.id: g for g in gpus}
    if name.strip() in by_id:
        return by_id[name.strip()]
    key = norm(name)
    if key in _SKY:
        if _SKY[key] in by_id:
            return by_id[_SKY[key]]
        # a SkyPilot name whose card this catalog lacks: never fall through to a look-alike (A10 -> A10G)
        raise UnknownGpuError(
            f"{name!r} is SkyPilot's name for {_SKY[key]!r}, which this catalog does not have. "
            "To fix: add it with a GPU file, or name another card (`advisor gpus`)",
            field=field,
        )
    if key in _AMBIG:
        choices = [c for c in _AMBIG[key] if c in by_id] or list(_AMBIG[key])
        raise _ambiguous(name, choices, by_id, field)
    index = _index(gpus)
    ids = index.get(key, set())
    if len(ids) == 1:
        return by_id[next(iter(ids))]
    if len(ids) > 1:
        raise _ambiguous(name, sorted(ids), by_id, field)
    starts = sorted({i for k, v in index.items() if k.startswith(key) and len(key) >= 2 for i in v})
    if len(starts) > 1:
        raise _ambiguous(name, starts, by_id, field)
    import difflib

    close = difflib.get_close_matches(key, list(index), n=8, cutoff=0.5)
    suggestions = list(dict.fromkeys([*starts, *(sorted(index[c])[0] for c in close)]))[:3]
    raise UnknownGpuError(
        f"unknown GPU {name!r}. To fix: a SkyPilot name (A100, A100-80GB, H100, L4, ...), a catalog id "
        "(`advisor gpus`), or a memory filter like 80GB+",
        field=field,
        suggestions=suggestions,
    )


def _ambiguous(name: str, choices: list[str], by_id: dict[str, GpuSpec], field: str) -> InvalidInputError:
    listed = "; ".join(f"{c} ({by_id[c].name}, {by_id[c].memory_gb:g} GB)" if c in by_id else c for c in choices)
    return InvalidInputError(
        f"GPU name {name!r} is ambiguous: it may mean {listed}. To fix: name one of them", field=field
    )


def resolve(query: GpuQuery, gpus: Sequence[GpuSpec], field: str = "gpu") -> list[GpuSpec]:
    """The cards a query names: one for a name, every card with enough memory for a filter (largest
    memory last, so the list reads small to large)."""
    if query.name is not None:
        return [lookup(query.name, gpus, field)]
    assert query.min_memory_gb is not None
    hits = sorted(
        (g for g in gpus if g.gpu_class != "cpu" and g.memory_gb >= query.min_memory_gb),
        key=lambda g: (g.memory_gb, g.id),
    )
    if not hits:
        largest = max((g.memory_gb for g in gpus), default=0)
        raise InvalidInputError(
            f"no catalog GPU has {query.min_memory_gb:g} GB or more (the largest has {largest:g} GB). "
            "To fix: a smaller filter, or add the card with a GPU file",
            field=field,
        )
    return hits


def skypilot_name(gpu_id: str) -> str | None:
    """The SkyPilot accelerator name of a catalog id (the first listed), for 'launch it as' hints."""
    for name, gid in SKYPILOT_NAMES.items():
        if gid == gpu_id:
            return name
    return None
