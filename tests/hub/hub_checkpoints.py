"""Safetensors headers of real architectures, for the test hub to serve.

The model is built by transformers from the published config.json on the meta device (no memory, no
weights), and its parameters become the header a checkpoint saved by ``save_pretrained`` would have:
names, the config's stored dtype, shapes, byte offsets; tied weights stored once. No number is made up:
the parameter count the test hub reports is transformers' own count of the real architecture.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hub_server import SafetensorsFile

_DTYPES = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4)}


def _stored_dtype(cfg: dict[str, Any]) -> tuple[str, int]:
    name = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")
    return _DTYPES.get(name, ("F32", 4))


def meta_parameters(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter transformers builds for `cfg`, tied ones once, in module order."""
    import torch
    import transformers

    cfg = {k: v for k, v in cfg.items() if k not in ("quantization_config", "auto_map")}
    config = transformers.AutoConfig.for_model(**cfg)
    archs = cfg.get("architectures") or []
    auto = (
        transformers.AutoModelForSeq2SeqLM
        if any(a.endswith("ForConditionalGeneration") for a in archs) and cfg.get("is_encoder_decoder")
        else transformers.AutoModelForCausalLM
    )
    with torch.device("meta"):
        model = auto.from_config(config)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]  # named_parameters drops tied copies


def _mxfp4(params: list[tuple[str, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...], str | None]]:
    """gpt-oss as OpenAI published it: the experts' fused projections in MXFP4, each stored as U8 ``_blocks``
    (two 4-bit values per byte, 32 values per block: [experts, out, in / 32, 16]) and U8 ``_scales``
    ([experts, out, in / 32]); transformers holds them as [experts, in, out]. Everything else stays BF16."""
    out: list[tuple[str, tuple[int, ...], str | None]] = []
    for name, shape in params:
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")) and len(shape) == 3:
            e, n_in, n_out = shape
            out.append((name + "_blocks", (e, n_out, n_in // 32, 16), "U8"))
            out.append((name + "_scales", (e, n_out, n_in // 32), "U8"))
        else:
            out.append((name, shape, None))
    return out


def checkpoint_files(cfg: dict[str, Any], shards: int = 1) -> dict[str, bytes | SafetensorsFile]:
    """``model.safetensors`` (shards == 1) or ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``, as save_pretrained writes them for `cfg` (an MXFP4 checkpoint as
    gpt-oss is published: packed expert weights)."""
    dtype, width = _stored_dtype(cfg)
    quant = (cfg.get("quantization_config") or {}).get("quant_method")
    named = [(n, s, None) for n, s in meta_parameters(cfg)]
    if quant == "mxfp4":
        dtype, width = "BF16", 2
        named = _mxfp4([(n, s) for n, s, _ in named])
    params = named
    groups: list[list[tuple[str, tuple[int, ...], str | None]]] = [[] for _ in range(shards)]
    for i, p in enumerate(params):
        groups[i * shards // len(params)].append(p)
    files: dict[str, bytes | SafetensorsFile] = {}
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for i, group in enumerate(groups):
        name = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for pname, shape, stored in group:
            n = 1
            for d in shape:
                n *= d
            t_dtype, t_width = (stored, 1) if stored else (dtype, width)
            header[pname] = {"dtype": t_dtype, "shape": list(shape), "data_offsets": [offset, offset + n * t_width]}
            offset += n * t_width
            weight_map[pname] = name
        files[name] = SafetensorsFile(header, offset)
        total_bytes += offset
    if shards > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        files["model.safetensors.index.json"] = json.dumps(index, indent=2).encode()
    return files


def parameter_total(files: dict[str, bytes | SafetensorsFile]) -> int:
    total = 0
    for f in files.values():
        if isinstance(f, SafetensorsFile):
            for name, t in f.header.items():
                if name != "__metadata__":
                    n = 1
                    for d in t["shape"]:
                        n *= d
                    total += n
    return total


REFERENCE = Path(__file__).resolve().parents[2] / "reference" / "hub_configs"


def reference_index() -> list[dict[str, Any]]:
    """The published configs helper C collected (reference/hub_configs/INDEX.json), with their sources."""
    return json.loads((REFERENCE / "INDEX.json").read_text())["models"]


def reference_config(repo: str) -> dict[str, Any]:
    row = next(r for r in reference_index() if r["repo"] == repo)
    return json.loads((REFERENCE / row["config"]).read_text())


def architecture_total(cfg: dict[str, Any]) -> int:
    """Parameters of the architecture as transformers builds it (unpacked), tied ones once."""
    total = 0
    for _, shape in meta_parameters(cfg):
        n = 1
        for d in shape:
            n *= d
        total += n
    return total
