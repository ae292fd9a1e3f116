"""The disk cache of traces: one JSON file per (HF config, plan, library versions) hash (no torch)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from advisor.plans import TrainingPlan
from advisor.simulated.results import TraceResult

#: Bump when the trace changes what it counts: old cache entries stop matching.
SIM_VERSION = 3
#: Bump when the trace changes what it counts for paged optimisers only (their entries stop matching):
#: 2 = paged state buffers never counted live, not even between their creation and mark_paged
PAGED_VERSION = 2
#: Bump when the trace changes what it counts for T5-style models under SDPA only (their entries stop matching):
#: 1 = an additive bias that requires grad runs CUDA's memory-efficient kernel (out + logsumexp kept), not the math path
BIAS_SDPA_VERSION = 1
#: model types whose attention passes an additive position bias to SDPA
BIAS_SDPA_MODEL_TYPES = ("t5", "mt5", "umt5")
CACHE_ENV = "TUNEADVISOR_SIMULATED_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/tuneadvisor/simulated")


def unavailable_reason() -> str | None:
    """None when the train extra is installed; else why the simulated source cannot run."""
    import importlib.util

    missing = [m for m in ("torch", "transformers", "peft", "bitsandbytes") if importlib.util.find_spec(m) is None]
    if missing:
        return f"the simulated source needs the train extra (pip install 'tuneadvisor[train]'): missing {', '.join(missing)}"
    return None


@functools.cache
def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"simulator": str(SIM_VERSION)}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def _plan_key(plan: TrainingPlan) -> dict:
    """The plan fields that change the trace (not the GPU: memory is per device, not per model)."""
    d = asdict(plan)
    for k in ("gpu_id", "notes"):
        d.pop(k, None)
    d["lora_targets"] = list(plan.lora_targets)
    # fields added after traces were cached enter the key only when set, so older entries still match
    if not d.get("modules_to_save"):
        d.pop("modules_to_save", None)
    else:
        d["modules_to_save"] = list(plan.modules_to_save)
    return d


def cache_key(config: dict, plan: TrainingPlan, versions: dict[str, str] | None = None) -> str:
    versions = dict(versions or library_versions())
    if plan.optimizer.startswith("paged"):
        versions["paged"] = str(PAGED_VERSION)
    if plan.attention == "sdpa" and config.get("model_type") in BIAS_SDPA_MODEL_TYPES:
        versions["bias_sdpa"] = str(BIAS_SDPA_VERSION)
    blob = json.dumps(
        {"config": config, "plan": _plan_key(plan), "versions": versions},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


class TraceCache:
    """One JSON file per (config, plan, library versions) hash."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> TraceResult | None:
        p = self.path(key)
        try:
            return TraceResult.from_dict(json.loads(p.read_text())["trace"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, trace: TraceResult, config: dict, plan: TrainingPlan) -> None:
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".{os.getpid()}.tmp")
        doc = {"trace": trace.to_dict(), "config": config, "plan": _plan_key(plan)}
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True, default=str))
        tmp.replace(p)
