"""Pre-quantized bases: a checkpoint published already quantised (GPTQ, AWQ, FP8, bitsandbytes 4/8-bit).

Such a repo's ``config.json`` carries a ``quantization_config`` and its safetensors hold packed integer
weights with their scales and zeros, not the bf16 matrices the architecture describes. Training on it
means adapters on the frozen quantised weights: what transformers loads is what the checkpoint stores.
This module reads that into the spec (``ModelSpec.prequantized``) and answers, for the methods' hooks
(advisor/methods), what a plan on such a base holds and moves:

- storage: the checkpoint's own bytes (safetensors metadata: elements per dtype x bytes per element),
  where it was read; else the config's bits and group size applied to the architecture's linears, and
  every note says which;
- the parameter count stays the architecture's (unpacked): 4-bit GPTQ stores eight weights per int32
  element, so the checkpoint's element count is not the model's parameter count;
- what can train on it (peft 0.21 / transformers 5.x): LoRA on GPTQ and AWQ (gptqmodel's torch kernels),
  on fine-grained FP8 (transformers' FP8Linear backward) and on bitsandbytes 4/8-bit (a bnb 4-bit
  checkpoint IS QLoRA, with the checkpoint's quant type and double quantisation); DoRA on bitsandbytes
  only (peft's GPTQ/AWQ LoRA layers raise "does not support DoRA yet"); never full fine-tuning (the packed
  integers are not trainable parameters) nor QLoRA on top of another quantiser (bitsandbytes cannot
  re-quantise packed weights); fbgemm FP8 and compressed-tensors checkpoints load for inference only
  (their transformers quantizers are not trainable) and are refused with what to do instead;
- the dequantisation each quantiser really does in a training step (see ``DEQUANT``).

Pure computation: no torch, no huggingface_hub (local safetensors headers are read as JSON).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from advisor.errors import InvalidInputError
from advisor.units import GIB

if TYPE_CHECKING:
    from advisor.families.layout import Linear
    from advisor.plans import TrainingPlan
    from advisor.specs import ModelSpec

__all__ = [
    "ST_DTYPE_BYTES",
    "Prequantized",
    "attach",
    "check_plan",
    "describe",
    "local_checkpoint_dtypes",
    "plan_refusal",
    "quantization_config",
    "with_local_checkpoint",
]

#: bytes per element of each safetensors dtype (the format's names, as the headers and the Hub's summary use them)
ST_DTYPE_BYTES: dict[str, int] = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_TORCH_TO_ST = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "half": "F16", "float": "F32"}

#: quant_method values transformers can put LoRA on (the rest are refused with a reason)
TRAINABLE = ("gptq", "awq", "fp8", "bitsandbytes")
#: quantisers left to their family: gpt-oss's MXFP4 experts are dequantised on load (advisor/families/moe.py)
LEFT_TO_FAMILY = ("mxfp4",)

#: What each quantiser does with a weight in a training step (the ``DEQUANT`` kinds):
#: "saved": gptqmodel's torch kernels (TorchQuantLinear._forward, AwqTorchLinear.forward, the training path of
#:   GPTQ and AWQ checkpoints in transformers 5) dequantise the whole weight to the input's dtype and call
#:   ``torch.matmul(x, weight)``: autograd keeps that dequantised weight for the input gradient, so every
#:   quantised linear holds a compute-dtype copy of its weight from its forward to its backward;
#: "backward": transformers' FP8Linear (integrations/finegrained_fp8.py, FP8LinearFunction) runs the forward in
#:   FP8 and saves the FP8 weight and its scales; backward dequantises one weight at a time;
#: "every-pass": bitsandbytes (MatMul4Bit / MatMul8bitLt) dequantises in forward and again in backward,
#:   one layer at a time, keeping nothing.
DEQUANT = {"gptq": "saved", "awq": "saved", "fp8": "backward", "bitsandbytes": "every-pass"}

_SUFFIX_RE = re.compile(
    r"[-_.](?:unsloth[-_])?(?:gptq|awq|fp8|fbgemm[-_]fp8|bnb|int4|int8|w4a16|w8a8|w8a16|4bit|8bit|dynamic)"
    r"(?:[-_.].*)?$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Prequantized:
    """A checkpoint's own quantisation, as published (config.json ``quantization_config``) and stored."""

    method: str  # quant_method: gptq | awq | fp8 | bitsandbytes | fbgemm_fp8 | compressed-tensors | ...
    bits: int  # bits per stored weight (4 or 8)
    group_size: int | None  # weights per scale along the input features (None: per output row / per block)
    storage_bytes: int  # every tensor of the checkpoint, as stored (or as the config implies: see source)
    quantized_bytes: int  # of which the quantised linears' tensors (packed weights, scales, zeros, indices)
    quantized_params: int  # the weights those tensors encode (the architecture's count, unpacked)
    source: str  # "checkpoint": safetensors metadata | "config": bits and group size applied to the architecture
    basis: str  # one line: where the numbers come from
    float_dtype: str = ""  # the stored dtype of the unquantised tensors (embeddings, norms, head): BF16, F16
    quant_type: str = ""  # bitsandbytes 4-bit: nf4 | fp4; fp8: e4m3; gptq/awq: sym | asym
    double_quant: bool = False  # bitsandbytes 4-bit: absmax quantised again
    block_size: tuple[int, ...] = ()  # fine-grained FP8: (rows, cols) of weights per scale
    quant_storage: str = ""  # bitsandbytes 4-bit: the dtype the packed weights are stored in (uint8 usually)
    refusal: str = ""  # set: nothing trains on this checkpoint through transformers (why, and what to do)
    base_hint: str = ""  # the unquantised model to name for full fine-tuning or QLoRA ("" when unknown)
    base_hint_source: str = ""  # where base_hint comes from (the config's _name_or_path, or the repo's name)

    def __post_init__(self) -> None:
        errors = []
        if not self.method:
            errors.append("method must be set")
        if not 1 <= int(self.bits) <= 32:
            errors.append(f"bits must be between 1 and 32, got {self.bits!r}")
        if self.group_size is not None and self.group_size <= 0:
            errors.append(f"group_size must be positive or null, got {self.group_size!r}")
        for name in ("storage_bytes", "quantized_bytes", "quantized_params"):
            if int(getattr(self, name)) < 0:
                errors.append(f"{name} must be >= 0")
        if self.source not in ("checkpoint", "config"):
            errors.append(f"source must be checkpoint or config, got {self.source!r}")
        if errors:
            raise InvalidInputError("invalid prequantized spec: " + "; ".join(errors), field="model")

    @property
    def label(self) -> str:
        """GPTQ 4-bit, group 128 / bitsandbytes NF4 4-bit (double quant) / FP8 e4m3, blocks 128x128."""
        name = {"bitsandbytes": "bitsandbytes", "fp8": "FP8"}.get(self.method, self.method.upper())
        kind = f" {self.quant_type.upper()}" if self.method == "bitsandbytes" and self.quant_type else ""
        text = f"{name}{kind} {self.bits}-bit"
        if self.block_size:
            text += f", blocks {'x'.join(str(b) for b in self.block_size)}"
        elif self.group_size:
            text += f", group {self.group_size}"
        if self.double_quant:
            text += " (double quant)"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "storage_bytes": self.storage_bytes,
            "storage_gib": round(self.storage_bytes / GIB, 3),
            "quantized_bytes": self.quantized_bytes,
            "quantized_params": self.quantized_params,
            "source": self.source,
            "basis": self.basis,
            "float_dtype": self.float_dtype,
            "quant_type": self.quant_type,
            "double_quant": self.double_quant,
            "block_size": list(self.block_size),
            "quant_storage": self.quant_storage,
            "refusal": self.refusal,
            "base_hint": self.base_hint,
            "base_hint_source": self.base_hint_source,
        }


def describe(pq: Prequantized) -> str:
    """One line for the answer: what the checkpoint stores and where that number comes from."""
    where = "read from the checkpoint's safetensors metadata" if pq.source == "checkpoint" else "from the config"
    size = (
        f"{pq.storage_bytes / GIB:.2f} GiB" if pq.storage_bytes >= GIB / 10 else f"{pq.storage_bytes / 2**20:.2f} MiB"
    )
    return f"pre-quantized {pq.label}: {size} stored ({where}: {pq.basis})"


# ---- reading the config --------------------------------------------------------------------------------
def quantization_config(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """The config's ``quantization_config`` where it describes a pre-quantized checkpoint this module handles
    (None: none, or MXFP4, which gpt-oss's family dequantises on load)."""
    qc = cfg.get("quantization_config")
    if not isinstance(qc, Mapping):
        return None
    method = str(qc.get("quant_method") or "").strip().lower()
    if not method or method in LEFT_TO_FAMILY:
        return None
    return {**qc, "quant_method": method}


def _int(v: Any, default: int | None = None) -> int | None:
    if isinstance(v, bool) or v is None:
        return default
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def _base_hint(cfg: Mapping[str, Any], repo: str) -> tuple[str, str]:
    """(id, source) of the unquantised model behind a quantised repo: the config's ``_name_or_path`` where it
    names another Hub id, else the repo's name without its quantisation suffix (Qwen2.5-7B-Instruct-GPTQ-Int4 ->
    Qwen2.5-7B-Instruct), said as a guess; ("", "") when neither gives one."""
    named = str(cfg.get("_name_or_path") or "").strip()
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", named) and named.lower() != repo.lower():
        return named, "the config's _name_or_path"
    org, _, name = repo.rpartition("/")
    base = _SUFFIX_RE.sub("", name)
    if base and base != name:
        return f"{org + '/' if org else ''}{base}", "guessed from the repo's name without its quantisation suffix"
    return "", ""


def _settings(qc: Mapping[str, Any]) -> dict[str, Any]:
    """method, bits, group_size, quant_type, double_quant, block_size, quant_storage, refusal from the config."""
    method = qc["quant_method"]
    out: dict[str, Any] = {
        "method": method,
        "bits": 4,
        "group_size": None,
        "quant_type": "",
        "double_quant": False,
        "block_size": (),
        "quant_storage": "",
        "refusal": "",
    }
    if method == "gptq":
        out["bits"] = _int(qc.get("bits"), 4)
        g = _int(qc.get("group_size"), 128)
        out["group_size"] = g if g and g > 0 else None
        out["quant_type"] = "sym" if qc.get("sym", True) else "asym"
    elif method == "awq":
        out["bits"] = _int(qc.get("bits", qc.get("w_bit")), 4)
        g = _int(qc.get("group_size", qc.get("q_group_size")), 128)
        out["group_size"] = g if g and g > 0 else None
        out["quant_type"] = "asym" if qc.get("zero_point", True) else "sym"
    elif method in ("fp8", "fbgemm_fp8"):
        out["bits"] = 8
        out["quant_type"] = str(qc.get("fmt") or "e4m3")
        block = qc.get("weight_block_size")
        if isinstance(block, (list, tuple)) and all(_int(b) for b in block):
            out["block_size"] = tuple(int(b) for b in block)
        if method == "fbgemm_fp8":
            out["refusal"] = (
                "transformers loads fbgemm FP8 checkpoints for inference only (its FbgemmFp8 quantizer is not "
                "trainable)"
            )
    elif method == "bitsandbytes":
        eight = bool(qc.get("load_in_8bit") or qc.get("_load_in_8bit"))
        out["bits"] = 8 if eight else 4
        if not eight:
            out["group_size"] = 64  # bitsandbytes' 4-bit blocksize: one absmax per 64 weights
            out["quant_type"] = str(qc.get("bnb_4bit_quant_type") or "fp4")
            out["double_quant"] = bool(qc.get("bnb_4bit_use_double_quant", False))
            out["quant_storage"] = str(qc.get("bnb_4bit_quant_storage") or "uint8")
    elif method == "compressed-tensors":
        groups = qc.get("config_groups") if isinstance(qc.get("config_groups"), Mapping) else {}
        weights = next((g.get("weights") for g in groups.values() if isinstance(g, Mapping)), None) or {}
        out["bits"] = _int(weights.get("num_bits"), 8) if isinstance(weights, Mapping) else 8
        g = _int(weights.get("group_size")) if isinstance(weights, Mapping) else None
        out["group_size"] = g if g and g > 0 else None
        out["quant_type"] = str(weights.get("type") or "") if isinstance(weights, Mapping) else ""
        out["refusal"] = (
            "compressed-tensors checkpoints are not modelled for training (transformers' compressed-tensors "
            "quantizer trains only without its FP8 kernels, on weights it decompresses on load)"
        )
    else:
        bits = _int(qc.get("bits", qc.get("nbits", qc.get("weight_bits"))), 4)
        out["bits"] = bits if bits and 1 <= bits <= 32 else 4
        out["refusal"] = f"quant_method {method!r} is not modelled for training"
    return out


# ---- storage --------------------------------------------------------------------------------------------
def _converted(spec: ModelSpec, method: str) -> list[tuple[int, Linear]]:
    """(blocks, linear) of the layers a quantiser converts: the blocks' nn.Linear layers (bitsandbytes: not its
    kept-fp32 modules) and, except under bitsandbytes (which converts nn.Linear only), an MoE's expert weights,
    which GPTQ, AWQ and FP8 checkpoints store quantised; embeddings, norms, routers and the head stay unquantised
    (GPTQ, AWQ, FP8 and bitsandbytes all skip lm_head by default)."""
    keep = set(spec.keep_fp32_modules) if method == "bitsandbytes" else set()
    return [
        (b.count, lin)
        for b in spec.blocks
        for lin in b.linears
        if (lin.is_linear and lin.name.split(".")[-1] not in keep)
        or (lin.kind == "experts" and method != "bitsandbytes")
    ]


def _quantized_linears(spec: ModelSpec, method: str) -> list[tuple[int, int, int]]:
    """(matrices, in_features, out_features) of the converted layers (an expert tensor: one per expert)."""
    return [(count * lin.experts, lin.in_features, lin.out_features) for count, lin in _converted(spec, method)]


def _config_bytes(spec: ModelSpec, s: Mapping[str, Any]) -> float:
    """The quantised linears' bytes the config implies (the formats as the quantisers write them):

    * GPTQ: qweight (in x out x bits/8, int32-packed), qzeros (groups x out x bits/8), scales (groups x out, F16),
      g_idx (in, I32);
    * AWQ: qweight and qzeros packed along the outputs (same bytes), scales (groups x out, F16), no g_idx;
    * FP8: one byte per weight, an F32 scale per block (or one per tensor);
    * bitsandbytes 4-bit: half a byte per weight, an absmax per 64 (F32, or U8 plus an F32 per 256 blocks when
      double-quantised); 8-bit: one byte per weight and an F32 scale per output row (SCB)."""
    bits, g = s["bits"], s["group_size"]
    total = 0.0
    for count, fin, fout in _quantized_linears(spec, s["method"]):
        n = fin * fout
        if s["method"] in ("gptq", "awq"):
            groups = math.ceil(fin / g) if g else 1
            b = n * bits / 8 + groups * fout * (bits / 8 + 2)
            if s["method"] == "gptq":
                b += fin * 4
        elif s["method"] in ("fp8", "fbgemm_fp8"):
            block = s["block_size"]
            if s["method"] == "fbgemm_fp8":
                scales = fout
            elif len(block) == 2:
                scales = math.ceil(fout / block[0]) * math.ceil(fin / block[1])
            else:
                scales = 1
            b = n + 4 * scales
        elif s["method"] == "bitsandbytes" and bits == 4:
            blocks = n / 64
            b = n / 2 + (blocks + blocks / 256 * 4 if s["double_quant"] else blocks * 4)
        elif s["method"] == "bitsandbytes":
            b = n + 4 * fout
        else:
            b = n * bits / 8
        total += count * b
    return total


def _float_dtype(cfg: Mapping[str, Any], dtypes: Mapping[str, int]) -> str:
    """The stored dtype of the unquantised tensors: the config's torch_dtype where the checkpoint has it, else
    the float dtype holding the most elements."""
    named = _TORCH_TO_ST.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "").replace("torch.", ""), "")
    if named and (not dtypes or named in dtypes):
        return named
    floats = [(n, d) for d, n in dtypes.items() if d in ("BF16", "F16", "F32")]
    return max(floats)[1] if floats else (named or "BF16")


def build(
    spec: ModelSpec,
    cfg: Mapping[str, Any],
    repo: str,
    dtypes: Iterable[tuple[str, int]] | None,
    basis: str,
) -> Prequantized | None:
    """The spec's Prequantized from its config and (where read) the checkpoint's elements per dtype."""
    qc = quantization_config(cfg)
    if qc is None:
        return None
    s = _settings(qc)
    counts = {str(d): int(n) for d, n in (dtypes or ())}
    qparams = sum(c * i * o for c, i, o in _quantized_linears(spec, s["method"]))
    hint, hint_source = _base_hint(cfg, repo)
    float_dtype = _float_dtype(cfg, counts)
    fb = ST_DTYPE_BYTES.get(float_dtype, 2)
    other = spec.param_count - qparams
    unknown = sorted(d for d in counts if d not in ST_DTYPE_BYTES)
    source, why = "config", ""
    if counts and not unknown:
        storage = sum(n * ST_DTYPE_BYTES[d] for d, n in counts.items())
        quantized = storage - other * fb
        # a checkpoint whose linears are not smaller than their float weights is not what the config says
        if 0 < quantized < qparams * fb:
            source = "checkpoint"
            stored = ", ".join(f"{d} {n:,}" for d, n in sorted(counts.items(), key=lambda kv: -kv[1]))
            basis = f"{stored} elements, from {basis}"
        else:
            why = f"the checkpoint's {storage:,} bytes do not fit a quantised model of this architecture"
    elif unknown:
        why = f"dtype(s) {', '.join(unknown)} of unknown width in the checkpoint"
    else:
        why = basis or "the safetensors metadata was not read"
    if source == "config":
        quantized = round(_config_bytes(spec, s))
        storage = quantized + other * fb
        basis = f"bits {s['bits']} and group size {s['group_size'] or 'none'} applied to the architecture ({why})"
    return Prequantized(
        method=s["method"],
        bits=int(s["bits"]),
        group_size=s["group_size"],
        storage_bytes=int(storage),
        quantized_bytes=int(quantized),
        quantized_params=qparams,
        source=source,
        basis=basis,
        float_dtype=float_dtype,
        quant_type=s["quant_type"],
        double_quant=s["double_quant"],
        block_size=s["block_size"],
        quant_storage=s["quant_storage"],
        refusal=s["refusal"],
        base_hint=hint,
        base_hint_source=hint_source,
    )


def attach(
    spec: ModelSpec,
    cfg: Mapping[str, Any],
    repo: str,
    dtypes: Iterable[tuple[str, int]] | None,
    basis: str,
) -> ModelSpec:
    """`spec` with its Prequantized (None where the config has no quantization_config) and a note saying what is
    stored and where that number came from. Idempotent: called again (say with the checkpoint's dtypes after a
    config-only reading) it replaces the earlier reading and its note."""
    pq = build(spec, cfg, repo, dtypes, basis)
    if pq is None:
        return spec
    notes = [n for n in spec.note.split("; ") if n and not n.startswith(("checkpoint stores ", "pre-quantized "))]
    line = describe(pq) + f"; estimates use the architecture's {spec.param_count:,} parameters (unpacked)"
    if spec.checkpoint_params is not None and spec.checkpoint_params != spec.param_count:
        line += f", not the checkpoint's {spec.checkpoint_params:,} stored elements (packed)"
    notes.append(line)
    return replace(spec, prequantized=pq, note="; ".join(notes))


# ---- local checkpoints ---------------------------------------------------------------------------------
def _header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 1024 * 1024:
            raise ValueError(f"header of {n} bytes")
        doc = json.loads(f.read(n))
    if not isinstance(doc, dict):
        raise ValueError("header is not a JSON object")
    return doc


def local_checkpoint_dtypes(directory: str | Path) -> tuple[tuple[tuple[str, int], ...], str] | None:
    """Elements per dtype of a local checkpoint's safetensors files (their headers, read as the format defines
    them: an 8-byte length, then JSON), and the basis; None where the folder has no safetensors file."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        return None
    counts: dict[str, int] = {}
    for path in files:
        try:
            for name, t in _header(path).items():
                if name == "__metadata__" or not isinstance(t, Mapping):
                    continue
                counts[str(t["dtype"])] = counts.get(str(t["dtype"]), 0) + math.prod(int(d) for d in t["shape"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidInputError(
                f"cannot read the safetensors header of {str(path)!r}: {exc}. To fix: check the file "
                "(a complete save_pretrained output), or pass the folder's config.json alone",
                field="model",
            ) from None
    ordered = tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return ordered, f"the safetensors headers of {len(files)} local file{'s' if len(files) > 1 else ''}"


def with_local_checkpoint(spec: ModelSpec, cfg: Mapping[str, Any], directory: str | Path) -> ModelSpec:
    """A spec read from a local folder, with its pre-quantisation (if any) measured on the folder's safetensors."""
    if quantization_config(cfg) is None:
        return spec
    read = local_checkpoint_dtypes(directory)
    dtypes, basis = read if read is not None else ((), "no safetensors file in the folder")
    return attach(spec, cfg, Path(directory).name, dtypes or None, basis)


# ---- plans on a pre-quantized base ---------------------------------------------------------------------
def is_bnb4(model: ModelSpec) -> bool:
    pq = model.prequantized
    return pq is not None and pq.method == "bitsandbytes" and pq.bits == 4


def plan_refusal(model: ModelSpec, plan: TrainingPlan) -> tuple[str, str] | None:
    """(field, one-line message with a "To fix:") where `plan` cannot train on `model`'s pre-quantized
    checkpoint; None where it can (or the model is not pre-quantized)."""
    pq = model.prequantized
    if pq is None:
        return None
    what = f"{model.hf_id or model.name} stores {pq.label} weights (quantization_config.quant_method {pq.method!r})"
    base = (
        f"name the unquantized base ({pq.base_hint}: {pq.base_hint_source})"
        if pq.base_hint
        else "name the unquantized base model"
    )
    if pq.refusal:
        return "model", f"{what}: {pq.refusal}. To fix: {base}"
    from advisor.methods import get_method  # methods import this module

    m = get_method(plan.method)
    if not m.adapter:
        return (
            "method",
            f"full fine-tuning needs the unquantized base: {what}, which train only through adapters (its quantised "
            f"weights are no trainable parameters). To fix: use lora on this checkpoint, or {base} for full",
        )
    if m.quantized and not is_bnb4(model):
        return (
            "method",
            f"qlora quantises an unquantized base with bitsandbytes NF4, but {what}: it cannot be quantised again. "
            f"To fix: use lora (adapters on the stored {pq.label} weights), or {base} for qlora",
        )
    if m.dora and pq.method != "bitsandbytes":
        why = (
            "peft's DoRA reads an FP8Linear's weight as is, without its block scales (peft dequantises only "
            "bitsandbytes, HQQ and torchao weights for the weight norm)"
            if pq.method == "fp8"
            else f"peft's LoRA layer for {pq.method.upper()} raises 'does not support DoRA yet'"
        )
        return "method", f"no DoRA on this checkpoint: {why}; {what}. To fix: use lora, or {base} for dora"
    if plan.sharding == "fsdp" and not (is_bnb4(model) and pq.quant_storage in ("bfloat16", "float16", "float32")):
        storage = f"bnb_4bit_quant_storage {pq.quant_storage}" if is_bnb4(model) else "packed integer weights"
        return (
            "sharding",
            f"FSDP flattens each block's parameters into one tensor of one dtype, but {what} ({storage}). "
            "To fix: sharding ddp (each GPU holds the quantised weights), or one GPU",
        )
    return None


def check_plan(model: ModelSpec, plan: TrainingPlan) -> None:
    """Raise the clear 4xx for a plan that cannot train on `model`'s pre-quantized checkpoint."""
    refusal = plan_refusal(model, plan)
    if refusal is not None:
        raise InvalidInputError(refusal[1], field=refusal[0])


def _other_params(model: ModelSpec) -> int:
    pq = model.prequantized
    return model.param_count - (pq.quantized_params if pq is not None else 0)


def frozen_weight_bytes(model: ModelSpec, plan: TrainingPlan, other_bytes: int) -> float:
    """The frozen base in memory: the quantised linears as the checkpoint stores them (transformers keeps their
    packed tensors, scales and zeros as loaded), the rest (embeddings, norms, head) at `other_bytes` each."""
    check_plan(model, plan)
    pq = model.prequantized
    assert pq is not None
    return pq.quantized_bytes + _other_params(model) * other_bytes


def _largest_linear(model: ModelSpec) -> int:
    """Weights of the largest converted matrix (one dequantised at a time; an expert tensor per expert)."""
    pq = model.prequantized
    method = pq.method if pq is not None else ""
    return max((lin.in_features * lin.out_features for _, lin in _converted(model, method)), default=0)


def _block_linears(model: ModelSpec) -> int:
    """Converted weights of the largest block (what one checkpointed block saves dequantised)."""
    pq = model.prequantized
    converted = _converted(model, pq.method if pq is not None else "")
    return max(
        (sum(lin.weight_params for _, lin in converted if lin in b.linears) for b in model.blocks),
        default=0,
    )


def saved_dequantized_bytes(model: ModelSpec, plan: TrainingPlan, e: int) -> float:
    """GPTQ/AWQ without checkpointing: every quantised linear's dequantised weight, kept by autograd from its
    forward to its backward (``torch.matmul(x, dequantised)`` saves its weight operand): the whole model's
    linears in the compute dtype at the end of forward. (With checkpointing see ``dequant_temporaries``.)"""
    pq = model.prequantized
    if pq is None or DEQUANT.get(pq.method) != "saved" or plan.grad_checkpointing:
        return 0.0
    return pq.quantized_params * e


def dequant_temporaries(model: ModelSpec, plan: TrainingPlan, e: int) -> float:
    """Short-lived bytes of dequantisation at a block's moment: one layer's dequantised weight being made (every
    quantiser); GPTQ/AWQ under checkpointing add the recomputed block's dequantised weights, saved by its
    re-run forward for its backward."""
    pq = model.prequantized
    if pq is None:
        return 0.0
    tmp = _largest_linear(model) * e
    if DEQUANT.get(pq.method) == "saved" and plan.grad_checkpointing:
        tmp += _block_linears(model) * e
    return float(tmp)


def dequant_traffic_bytes(model: ModelSpec, plan: TrainingPlan, passes: int, e: int) -> float:
    """Bytes moved per micro-step to dequantise: read the stored weights, write the dequantised copy and read it
    again in the matmul (as QLoRA), for each pass that dequantises: GPTQ/AWQ every forward (backward reuses the
    saved copy), FP8 backward only (its forward runs an FP8 kernel), bitsandbytes every pass."""
    pq = model.prequantized
    if pq is None:
        return 0.0
    kind = DEQUANT.get(pq.method)
    n = {"saved": passes - 1, "backward": 1, "every-pass": passes}.get(kind or "", passes)
    return n * (pq.quantized_bytes + 2 * e * pq.quantized_params)


def notes(model: ModelSpec, plan: TrainingPlan) -> list[str]:
    """What an estimate on a pre-quantized base assumed (where the storage number comes from, the kernels)."""
    pq = model.prequantized
    if pq is None:
        return []
    out = [
        f"frozen base weights: {describe(pq)}; embeddings, norms and head in the compute dtype",
    ]
    kind = DEQUANT.get(pq.method)
    if kind == "saved":
        out.append(
            f"{pq.method.upper()} trains through gptqmodel's torch kernel: each layer dequantises its whole weight "
            "and autograd keeps that copy for backward ("
            + ("the recomputed block's only, under checkpointing)" if plan.grad_checkpointing else "all layers')")
        )
    elif kind == "backward":
        out.append("FP8: forward runs transformers' FP8 kernel; backward dequantises one weight at a time")
    if is_bnb4(model):
        out.append(
            f"bitsandbytes 4-bit checkpoint: this is QLoRA with the checkpoint's settings ({pq.quant_type}, "
            f"double quant {'on' if pq.double_quant else 'off'}), whatever the plan's double_quant"
            + ("" if plan.method == "qlora" else "; no k-bit preparation (method qlora adds its fp32 upcast)")
        )
    return out
