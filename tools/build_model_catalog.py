"""Writes advisor/catalog/data/models.json from the table in tools/model_table.py (kept as code for readable diffs).

Each row is the architecture block of the model's published config.json on the Hugging Face hub
(source URL per entry); `published_params` is the exact count the model card or the safetensors
index metadata states, which tests/test_catalog.py checks our parameter formula against.
The rows in `HUB_MODELS` are read instead from the published config.json files under
reference/hub_configs/ through advisor.catalog.model_from_config (the path a user's config.json or a
Hub id takes), with the published count, its source and the date read from reference/hub_configs/INDEX.json.
"""

import json
import sys
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: tools/ itself is on sys.path, the repo root is not
    sys.path.insert(0, str(ROOT))

from advisor.catalog import model_from_config  # noqa: E402
from advisor.specs import ModelSpec  # noqa: E402
from tools.model_table import HUB_MODELS, MODELS  # noqa: E402

HUB_CONFIGS = ROOT / "reference" / "hub_configs"

RECORDED = "2026-11-25"
HF = "https://huggingface.co/{}/blob/main/config.json"

CLOSED = {
    "gpt-3.5": "OpenAI GPT-3.5 is served only through OpenAI's API; its weights are not published.",
    "gpt-3.5-turbo": "OpenAI GPT-3.5 is served only through OpenAI's API; its weights are not published.",
    "gpt-4": "OpenAI GPT-4 is served only through OpenAI's API; its weights are not published.",
    "gpt-4o": "OpenAI GPT-4o is served only through OpenAI's API; its weights are not published.",
    "gpt-3": "OpenAI GPT-3 (175B) weights were never released.",
    "claude": "Anthropic Claude models are served only through Anthropic's API; weights are not published.",
    "gemini": "Google Gemini models are served only through Google's API; weights are not published (see Gemma).",
}


# How transformers runs each model, beyond the architecture numbers: the activation from config.json
# (`hidden_act`, `activation_function`, `feed_forward_proj`: "gated-gelu" runs gelu_new), dropout kept
# on in training (`resid_pdrop`, `dropout_rate`), Gemma-2's missing SDPA path (`_supports_sdpa = False`
# in transformers' Gemma2 model: soft-capped logits, `attn_logit_softcapping`/`final_logit_softcapping`)
# and T5's `_keep_in_fp32_modules = ["wo"]`.
GELU_NEW_DROPOUT = dict(hidden_act="gelu_new", dropout=0.1)
T5_RUNTIME = dict(dropout=0.1, keep_fp32_modules=["wo"])
GEMMA = dict(hidden_act="gelu_pytorch_tanh")
GEMMA2_RUNTIME = dict(GEMMA, sdpa=False, softcapping=True)
RUNTIME = {
    "gemma-2b": GEMMA,
    "gemma-7b": GEMMA,
    "gemma-2-2b": GEMMA2_RUNTIME,
    "gemma-2-9b": GEMMA2_RUNTIME,
    "gemma-2-27b": GEMMA2_RUNTIME,
    "phi-1.5": dict(hidden_act="gelu_new"),
    "phi-2": dict(hidden_act="gelu_new"),
    "stablelm-base-alpha-3b": dict(hidden_act="gelu"),
    "gpt2": GELU_NEW_DROPOUT,
    "gpt2-medium": GELU_NEW_DROPOUT,
    "gpt2-large": GELU_NEW_DROPOUT,
    "gpt2-xl": GELU_NEW_DROPOUT,
    "t5-xl": dict(hidden_act="gelu_new", **T5_RUNTIME),
    "flan-t5-xl": dict(hidden_act="gelu_new", **T5_RUNTIME),
    "t0-3b": dict(hidden_act="relu", **T5_RUNTIME),
}


def hub_row(entry: dict, index: dict[str, dict]) -> dict:
    """A catalog row from reference/hub_configs/<hf_id>/config.json read the way a user's config.json is
    (advisor.catalog.model_from_config), the published count and its source from INDEX.json. Only the
    fields that differ from ModelSpec's defaults are written (the row stays readable)."""
    meta = index.get(entry["hf_id"])
    if meta is None:
        raise SystemExit(f"{entry['hf_id']}: not in reference/hub_configs/INDEX.json (add its config.json first)")
    cfg = json.loads((HUB_CONFIGS / meta["config"]).read_text())
    spec = model_from_config(cfg, name=entry["name"])
    row: dict = {}
    for f in fields(ModelSpec):
        value = getattr(spec, f.name)
        # a catalog row is the architecture (trained from its bf16 weights); the Hub id reads the published
        # checkpoint, with its quantisation where it is pre-quantized (DeepSeek-V3's block FP8: advisor.prequant)
        if f.name in ("name", "note", "source", "published_params", "hf_id", "aliases", "prequantized"):
            continue
        if value != f.default:
            row[f.name] = list(value) if isinstance(value, tuple) else value
    active = (
        f"; active parameters per token {meta['active_params']:,} (model card)" if meta.get("active_params") else ""
    )
    return dict(
        name=entry["name"],
        hf_id=entry["hf_id"],
        aliases=list(entry.get("aliases", ())),
        **row,
        published_params=meta["published_params"],
        source=(
            f"{meta['mirrors']} (reference/hub_configs/{meta['config']}: copied key for key from "
            f"{'a public copy of it (INDEX.json note)' if meta['source_url'] == meta['mirrors'] else meta['source_url']}, "
            f"recorded {meta['read']}); published_params: {meta['published_params_source']}{active}; "
            f"released {meta['released']}{'; gated on the Hub' if meta['gated'] else ''}"
        ),
    )


def main() -> None:
    index = {r["repo"]: r for r in json.loads((HUB_CONFIGS / "INDEX.json").read_text())["models"]}
    out = []
    for m in MODELS:
        row = dict(m, **RUNTIME.get(m["name"], {}))
        row["source"] = (
            HF.format(m["hf_id"])
            + f" (architecture fields); published_params from the model card / safetensors metadata; recorded {RECORDED}"
        )
        out.append(row)
    names = {r["name"] for r in out}
    for entry in HUB_MODELS:
        if entry["name"] in names:
            raise SystemExit(f"{entry['name']}: both a hand-written row and a hub_configs row")
        out.append(hub_row(entry, index))
    doc = {
        "schema": "tuneadvisor.models/1",
        "recorded": RECORDED,
        "note": "Architecture numbers copied from each model's config.json; tests check the parameter formula against published_params.",
        "models": out,
        "closed_models": CLOSED,
    }
    path = Path(__file__).resolve().parents[1] / "advisor" / "catalog" / "data" / "models.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {len(out)} models to {path}")


if __name__ == "__main__":
    main()
