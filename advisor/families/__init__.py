"""Model families: one module per architecture family, registered in `FAMILIES` (pure Python).

A family module holds everything that differs between architectures: which linear layers a block
has (`Family.attention`, `Family.mlp`, `Family.blocks`), how a Hugging Face config.json maps to a
`ModelSpec` (`Family.read_config`, with the transformers config class's own defaults for missing keys
in `CONFIG_DEFAULTS`, one entry per ``model_type`` the family reads), the reverse mapping
(`Family.to_hf_config`, used to rebuild the model in transformers) and its quirks as data (fused qkv,
parallel residual, gelu_new, keep-fp32 modules, Gemma-2's missing SDPA path, ...).

Adding a family:

1. write ``advisor/families/<name>.py``: instantiate `Family` as ``FAMILY`` with its layout as data
   (``attention_layout``, ``mlp_layout``: `LinearRow` tuples) and its config.json mapping
   (``config_flags``, ``dropout_key``, ``hf_keys``, ``hf_constants``), the config class defaults in
   ``CONFIG_DEFAULTS`` and per-family quirks in the ``quirks`` / flag fields; where a rule is not data,
   subclass `Family` and override ``attention``, ``mlp``, ``read_config``, ``to_hf_config`` (or
   ``blocks`` if a model is not one decoder stack);
2. import it in ``_MODULES`` below (its ``model_type`` values then resolve in
   ``advisor.catalog.model_from_config``);
3. add tests to tests/test_families.py (the defaults against the transformers config class, a
   config.json parameter count against the published one, a round trip through `hf_config`) and,
   for a catalog entry, a row in tools/build_model_catalog.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from advisor.errors import InvalidInputError
from advisor.families import gpt2, gpt_neox, llama, moe, phi, phi3, t5
from advisor.families.base import Config, Family
from advisor.families.layout import ROLES, Block, Linear

if TYPE_CHECKING:
    from advisor.specs import ModelSpec

__all__ = [
    "FAMILIES",
    "ROLES",
    "Block",
    "Config",
    "Family",
    "Linear",
    "family_for_model_type",
    "get_family",
    "hf_config",
]

_MODULES = (llama, phi3, gpt2, phi, gpt_neox, t5, moe)

#: family name -> Family, in the order they are documented
FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in _MODULES}

_BY_MODEL_TYPE: dict[str, Family] = {mt: f for f in FAMILIES.values() for mt in f.model_types}


def get_family(name: str) -> Family:
    """The registered family `name`; InvalidInputError naming the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise InvalidInputError(f"family must be one of {', '.join(FAMILIES)}, got {name!r}", field="model") from None


def family_for_model_type(model_type: str) -> Family | None:
    """The family that reads a Hugging Face ``model_type`` (None when no family claims it)."""
    return _BY_MODEL_TYPE.get(model_type.lower())


def hf_config(spec: ModelSpec) -> dict[str, Any]:
    """The Hugging Face config.json the spec stands for: the file itself where the spec was read
    from one, else rebuilt from the spec's numbers (model_type from the family and name)."""
    src = Path(spec.source) if spec.source.endswith(".json") else None
    if src is not None and src.is_file():
        cfg = json.loads(src.read_text())
        cfg.setdefault("model_type", "llama")
        return cfg
    return get_family(spec.family).to_hf_config(spec)
