"""Reads reference/published_measurements.csv (vendored; see reference/README.md) into comparable cases.

A row becomes a `Case` (a model from our catalog, a TrainingPlan in the row's stack, the statistic
the source printed, in its unit) when it states enough of its set-up; otherwise it is kept with the
reason it cannot be scored. Nothing here is tuned per row: each field maps from the row's own
columns and notes by one rule per source.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from advisor.catalog import default_catalog
from advisor.errors import AdvisorError
from advisor.plans import TrainingPlan
from advisor.specs import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "reference" / "published_measurements.csv"

GPU_MAP = {
    "rtx 4090": "rtx-4090",
    "a6000": "rtx-a6000",
    "a100": "a100-80gb",
    "a100 80gb": "a100-80gb",
    "a100-sxm4-40gb": "a100-40gb",
    "a100-sxm4-40gb (per resource-tables.md)": "a100-40gb",
    "a10g": "a10g",
    "nvidia l40s": "l40s",
}


@dataclass
class Case:
    row: int
    model: ModelSpec | None
    plan: TrainingPlan | None
    measured_gib: float | None
    statistic: str  # allocated | reserved | active
    kind: str  # measured | measured (OOM) | estimated ...
    source: str
    framework: str
    skip: str | None  # reason the row cannot be scored
    raw: dict


def _num(text: str) -> float | None:
    m = re.search(r"\d+(?:\.\d+)?", text or "")
    return float(m.group()) if m else None


def _framework(source: str) -> str:
    s = source.lower()
    if "litgpt" in s:
        return "litgpt"
    if "torchtune" in s:
        return "torchtune"
    return "hf"


def _targets(text: str) -> tuple[str, ...]:
    """LoRA target roles from the row's wording ("q,v", "Q and V only", "q,k,v,proj,mlp,head", ...)."""
    words = set(re.findall(r"[a-z_]+", text.lower()))
    if not words:
        return ("q", "v")  # litgpt 8641822 and torchtune 7B_lora defaults, per the rows' notes
    if "all" in words and "layers" in words:
        return ("q", "k", "v", "o", "gate", "up", "down")
    roles = []
    for role, names in (
        ("q", {"q", "q_proj"}),
        ("k", {"k", "k_proj"}),
        ("v", {"v", "v_proj"}),
        ("o", {"o", "o_proj", "output_proj", "proj"}),
        ("gate", {"mlp", "gate_proj"}),
        ("up", {"mlp", "up_proj"}),
        ("down", {"mlp", "down_proj"}),
    ):
        if words & names:
            roles.append(role)
    return tuple(roles) or ("q", "v")


def _optimizer(text: str) -> tuple[str | None, str | None]:
    t = text.lower()
    if "offload" in t or "optimizer_in_bwd" in t:
        return None, "optimiser in backward / CPU offload is not modelled"
    if "paged" in t and "8bit" in t:
        return "paged-adamw-8bit", None
    if "paged" in t:
        return "paged-adamw-32bit", None
    if "8bit" in t:
        return "adamw-8bit", None
    return "adamw", None


def load_cases(path: Path = CSV) -> list[Case]:
    cat = default_catalog()
    out: list[Case] = []
    with path.open() as fh:
        for i, r in enumerate(csv.DictReader(fh)):
            out.append(_case(i, r, cat))
    return out


def _case(i: int, r: dict, cat) -> Case:
    kind = r["measured_or_estimated"]
    fw = _framework(r["source"])
    notes = r["notes"]
    stat = "reserved" if "reserved" in notes.lower() else ("active" if "active" in notes.lower() else "allocated")
    unit_gb = "1e9" in notes or fw == "litgpt" or "bytes" in notes  # litgpt divides by 1e9; peft reports bytes
    value = _num(r["peak_mem_gb"])
    measured_gib = None if value is None else (value * 1e9 / 1024**3 if unit_gb else value)

    def skip(reason: str) -> Case:
        return Case(i, None, None, measured_gib, stat, kind, r["source"], fw, reason, r)

    if not kind.startswith("measured"):
        return skip(f"not a measurement ({kind})")
    if value is None and "OOM" not in kind:
        return skip("no peak memory figure")
    try:
        model = cat.model(r["model"].split(" (")[0])
    except AdvisorError:
        return skip(f"model {r['model']!r} not in the catalog")
    method = r["method"]
    if method not in ("full", "lora", "qlora"):
        return skip(f"method {method} not modelled")
    low = notes.lower()
    for marker, why in (
        ("activation offloading", "activation offloading (cumulative step) is not modelled"),
        ("optimizer_in_bwd", "optimiser step fused into backward is not modelled"),
        ("step: baseline", "unpacked variable-length baseline: sequence length not stated"),
        ("cpu offload", "CPU offload is not modelled"),
    ):
        if marker in low and not (
            marker == "activation offloading" and "step: + activation offloading" not in low and r["method"] == "full"
        ):
            return skip(why)
    if "method_comparison" in r["source"]:
        return skip("peak includes eval generation (batch 50) and is 'minus init': not a training-step peak")
    seq = _num(r["seq_len"])
    longest = re.search(r"longest sample (\d+) tokens", notes)
    if seq is None and longest:
        seq = float(longest.group(1))  # litgpt pads each batch to its longest sample
    mb = _num(r["micro_batch"])
    if seq is None or mb is None:
        return skip("sequence length or micro-batch not stated")
    gpu_id = GPU_MAP.get(r["gpu"].strip().lower())
    if gpu_id is None:
        return skip(f"GPU {r['gpu']!r} not stated or not in the catalog")
    opt, why = _optimizer(r["optimizer"] or "adamw")
    if opt is None:
        return skip(why or "optimiser not modelled")
    ckpt_text = r["grad_checkpointing"].lower()
    if ckpt_text.startswith("yes"):
        ckpt = True
    elif ckpt_text.startswith("no"):
        ckpt = False
    elif fw == "litgpt":
        ckpt = False  # litgpt's single-device LoRA/QLoRA/full scripts do not checkpoint activations
    else:
        return skip("gradient checkpointing unknown")
    n = int(_num(r["num_gpus"]) or 1)
    if fw == "litgpt" and "All runs are single-GPU" in notes:
        n = 1
    sharding = "none" if n == 1 else "fsdp"
    if fw == "litgpt" and n > 1:
        return skip(
            "litgpt multi-GPU run: its FSDP strategy's handling of frozen weights is not a plan we express "
            "(per-GPU peak stays near the single-GPU weights while activations are checkpointed)"
        )
    try:
        plan = TrainingPlan(
            method=method,
            gpu_id=gpu_id,
            dtype="bf16",
            micro_batch=int(mb),
            seq_len=int(seq),
            grad_checkpointing=ckpt,
            optimizer=opt,
            num_gpus=n,
            sharding=sharding,
            lora_r=int(_num(r["lora_r"]) or 8),
            lora_alpha=2 * int(_num(r["lora_r"]) or 8),
            lora_dropout=0.05 if fw != "hf" else 0.0,
            lora_targets=_targets(r["lora_targets"]) if method != "full" else ("all-linear",),
            master_weights=False,  # every scored stack trains full models in pure bf16 (bf16-true / dtype=bf16)
            double_quant="double" in r["quant"] or fw == "torchtune",
            framework=fw,
            chunked_loss=fw == "litgpt" or "chunked cross entropy" in low or "bd2a0fc7" in r["source"],
        )
    except AdvisorError as exc:
        return skip(f"plan not expressible: {exc}")
    return Case(i, model, plan, measured_gib, stat, kind, r["source"], fw, None, r)
