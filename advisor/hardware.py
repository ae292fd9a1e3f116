"""'The GPU in this box': local NVIDIA GPUs (``advisor.devices``' nvidia-smi probe) matched to the catalog."""

from __future__ import annotations

import re
from dataclasses import replace

from advisor.catalog import Catalog, _norm_gpu_key
from advisor.devices import query_nvidia_smi
from advisor.errors import UnknownGpuError
from advisor.specs import GpuSpec

LOCAL_NAMES = ("local", "auto", "this", "here")
__all__ = ["LOCAL_NAMES", "local_gpus", "match_catalog", "query_nvidia_smi"]


def match_catalog(name: str, memory_mib: float, catalog: Catalog) -> GpuSpec:
    """The catalog GPU for a driver-reported name and memory, with the measured memory."""
    try:
        spec = catalog.gpu(name)
    except UnknownGpuError:
        key = _norm_gpu_key(name)
        gib = memory_mib / 1024
        close = [g for g in catalog.gpus if abs(g.memory_gib - gib) / g.memory_gib < 0.06 and _model_token(g.id) in key]
        if "pcie" in key:
            close = [g for g in close if "pcie" in g.id] or close
        else:
            close = [g for g in close if "pcie" not in g.id] or close
        if not close:
            raise UnknownGpuError(
                f"local GPU {name!r} ({gib:.1f} GiB) is not in the catalog: add it with --gpu-file "
                "(memory, TFLOP/s, bandwidth, price) or calibrate it",
                field="gpu",
            ) from None
        spec = close[0]
    return replace(spec, memory_gib=round(memory_mib / 1024, 3), note=f"detected locally: {name}")


def _model_token(gpu_id: str) -> str:
    """'h100-sxm' -> 'h100', 'rtx-3060-12gb' -> 'rtx3060': the part of an id a driver name must contain."""
    return re.sub(r"-(\d+gb|sxm|pcie)$", "", re.sub(r"-(\d+gb|sxm|pcie)$", "", gpu_id)).replace("-", "")


def local_gpus(catalog: Catalog) -> list[GpuSpec]:
    found = query_nvidia_smi()
    if not found:
        raise UnknownGpuError(
            "no NVIDIA GPU found in this box (nvidia-smi is missing or lists none): name a catalog GPU instead",
            field="gpu",
        )
    return [match_catalog(name, mib, catalog) for name, mib in found]
