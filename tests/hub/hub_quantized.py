"""Safetensors headers of pre-quantized checkpoints (GPTQ, AWQ, FP8, bitsandbytes 4-bit), for the test hub.

The architecture is transformers' own (``hub_checkpoints.meta_parameters``: built from the config on the meta
device); each decoder linear's weight is replaced by the tensors its quantiser writes, with the shapes and
dtypes those formats have (tests/hub/data/README.md lists them; the bitsandbytes layout is the one a real
``save_pretrained`` of a quantised model writes, checked in tests/test_prequantized.py). Everything else
(embeddings, norms, the head, biases) keeps the config's stored dtype, as the quantisers leave them.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from hub_checkpoints import _stored_dtype, meta_parameters
from hub_server import SafetensorsFile

from advisor.prequant import ST_DTYPE_BYTES

#: a decoder linear's weight (what GPTQ, AWQ, FP8 and bitsandbytes convert; lm_head is left alone)
_LINEAR = re.compile(r"\.layers\.\d+\.(?:self_attn|mlp)\.\w+_proj\.weight$")


def _quantized(method: str, qc: dict[str, Any], name: str, out_f: int, in_f: int) -> list[tuple[str, list[int], str]]:
    """The tensors (name, shape, dtype) one quantised linear weight [out, in] is stored as."""
    mod = name[: -len(".weight")]
    g = int(qc.get("group_size") or 128)
    bits = int(qc.get("bits") or 4)
    pack = 32 // bits
    if method == "gptq":
        return [
            (f"{mod}.qweight", [in_f // pack, out_f], "I32"),
            (f"{mod}.qzeros", [math.ceil(in_f / g), out_f // pack], "I32"),
            (f"{mod}.scales", [math.ceil(in_f / g), out_f], "F16"),
            (f"{mod}.g_idx", [in_f], "I32"),
        ]
    if method == "awq":
        return [
            (f"{mod}.qweight", [in_f, out_f // pack], "I32"),
            (f"{mod}.qzeros", [math.ceil(in_f / g), out_f // pack], "I32"),
            (f"{mod}.scales", [math.ceil(in_f / g), out_f], "F16"),
        ]
    if method == "fp8":
        br, bc = qc.get("weight_block_size") or (128, 128)
        return [
            (f"{mod}.weight", [out_f, in_f], "F8_E4M3"),
            (f"{mod}.weight_scale_inv", [math.ceil(out_f / br), math.ceil(in_f / bc)], "F32"),
        ]
    if method == "bitsandbytes":
        n = out_f * in_f
        blocks = math.ceil(n / 64)
        state = json.dumps(
            {
                "quant_type": qc.get("bnb_4bit_quant_type", "nf4"),
                "blocksize": 64,
                "dtype": "bfloat16",
                "shape": [out_f, in_f],
                "nested_blocksize": 256,
                "nested_offset": 0.0123,
                "nested_dtype": "float32",
            }
        )
        return [
            (f"{mod}.weight", [n // 2, 1], "U8"),
            (f"{mod}.weight.absmax", [blocks], "U8"),
            (f"{mod}.weight.nested_absmax", [math.ceil(blocks / 256)], "F32"),
            (f"{mod}.weight.nested_quant_map", [256], "F32"),
            (f"{mod}.weight.quant_map", [16], "F32"),
            (f"{mod}.weight.quant_state.bitsandbytes__{qc.get('bnb_4bit_quant_type', 'nf4')}", [len(state)], "U8"),
        ]
    raise ValueError(f"no layout for {method}")


def quantized_checkpoint_files(cfg: dict[str, Any]) -> dict[str, bytes | SafetensorsFile]:
    """``model.safetensors`` of the pre-quantized checkpoint `cfg` describes (its quantization_config)."""
    qc = cfg["quantization_config"]
    method = qc["quant_method"]
    dtype, _ = _stored_dtype(cfg)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for pname, shape in meta_parameters(cfg):
        if _LINEAR.search(pname) and len(shape) == 2:
            tensors = _quantized(method, qc, pname, shape[0], shape[1])
        else:
            tensors = [(pname, list(shape), dtype)]
        for tname, tshape, tdtype in tensors:
            size = math.prod(tshape) * ST_DTYPE_BYTES[tdtype]
            header[tname] = {"dtype": tdtype, "shape": tshape, "data_offsets": [offset, offset + size]}
            offset += size
    return {"model.safetensors": SafetensorsFile(header, offset)}


def stored_bytes(files: dict[str, bytes | SafetensorsFile]) -> int:
    """Bytes of every tensor the headers list (their data offsets)."""
    return sum(
        t["data_offsets"][1] - t["data_offsets"][0]
        for f in files.values()
        if isinstance(f, SafetensorsFile)
        for name, t in f.header.items()
        if name != "__metadata__"
    )
