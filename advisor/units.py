"""Unit helpers: bytes inside, GiB/GB at the edges (the unit always in the field name)."""

from __future__ import annotations

GIB = 1024**3
MIB = 1024**2
GB = 10**9

#: Storage bytes per element of each training dtype we model.
DTYPE_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2, "bf16": 2}
DTYPES = tuple(DTYPE_BYTES)
