"""Unit helpers: bytes inside, GiB/GB at the edges (the unit always in the field name)."""

from __future__ import annotations

GIB = 1024**3
MIB = 1024**2
GB = 10**9

#: Storage bytes per element of each training dtype we model.
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2}
DTYPES = tuple(DTYPE_BYTES)


def gib(n_bytes: float) -> float:
    return n_bytes / GIB


def to_bytes_gib(value_gib: float) -> int:
    return round(value_gib * GIB)


def round_gib(n_bytes: float, ndigits: int = 2) -> float:
    return round(n_bytes / GIB, ndigits)
