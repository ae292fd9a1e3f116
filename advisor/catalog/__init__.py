"""Catalog facade: model and GPU data files loaded once, queried by pure functions.

Models resolve three ways (``resolve_model``): a catalog name / Hugging Face id / alias
(case-insensitive), a local ``config.json`` (the file or a directory holding it), or a bare size
such as ``13B`` (a Llama-shaped architecture of that size, flagged ``assumed``).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from advisor import prequant
from advisor.catalog import gpu_names, prices
from advisor.errors import ClosedModelError, InvalidInputError, UnknownGpuError, UnknownModelError
from advisor.families import family_for_model_type, get_family
from advisor.hub import HubOptions, parse_hub_id, resolve_hub_model
from advisor.specs import GpuSpec, ModelSpec

DATA_DIR = Path(__file__).parent / "data"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bBmM])\s*$")


def _norm_model_key(name: str) -> str:
    key = name.strip().lower()
    for prefix in ("https://huggingface.co/", "hf.co/", "hf://"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key.rstrip("/")


def _norm_gpu_key(name: str) -> str:
    key = name.strip().lower()
    for word in ("nvidia", "geforce", "tesla", "amd", "instinct"):
        key = key.replace(word, "")
    return re.sub(r"[^a-z0-9]", "", key)


def _model_from_row(row: dict[str, Any]) -> ModelSpec:
    row = dict(row)
    row["aliases"] = tuple(row.get("aliases", ()))
    row["keep_fp32_modules"] = tuple(row.get("keep_fp32_modules", ()))
    return ModelSpec(**row)


def _gpu_from_row(row: dict[str, Any]) -> GpuSpec:
    row = dict(row)
    row["aliases"] = tuple(row.get("aliases", ()))
    return GpuSpec(**row)


@dataclass(frozen=True, eq=False)
class Catalog:
    models: tuple[ModelSpec, ...]
    gpus: tuple[GpuSpec, ...]
    closed_models: dict[str, str]
    #: published prices per provider (data/prices.json, plus a price file's offers): advisor.catalog.prices
    offers: tuple[prices.Offer, ...] = ()

    # ---- indexes ---------------------------------------------------------------------------
    @property
    def _model_index(self) -> dict[str, ModelSpec]:
        return _model_index(self)

    @property
    def _gpu_index(self) -> dict[str, GpuSpec]:
        return _gpu_index(self)

    # ---- queries -----------------------------------------------------------------------------
    def model(self, name: str) -> ModelSpec:
        """A catalog model by name, Hugging Face id or alias; raises with close matches."""
        key = _norm_model_key(name)
        spec = self._model_index.get(key)
        if spec is not None:
            return spec
        closed = self._closed_reason(key)
        if closed:
            raise ClosedModelError(f"{name!r} cannot be fine-tuned locally: {closed}", field="model")
        raise UnknownModelError(
            f"unknown model {name!r}: not in the catalog, not a config.json path, not a size like '13B'.",
            field="model",
            suggestions=_close(key, self._model_index, lambda s: s.name),
        )

    def gpu(self, name: str) -> GpuSpec:
        """One card by SkyPilot name (``A100`` = 40 GB, ``A100-80GB``, ``A10`` not ``A10G``), catalog id, name
        or alias (advisor.catalog.gpu_names); a name two cards share is an error listing both."""
        return gpu_names.lookup(name, self.gpus)

    def gpus_for(self, text: str, field: str = "gpu") -> tuple[list[GpuSpec], int | None]:
        """The cards one ``--gpu`` value names (``A100:8``, ``80GB+``, ``L4``) and its GPU count (None: any)."""
        q = gpu_names.parse(text, field)
        return gpu_names.resolve(q, self.gpus, field), q.count

    def _closed_reason(self, key: str) -> str | None:
        for prefix, reason in self.closed_models.items():
            tail = key.split("/")[-1]
            if tail == prefix or tail.startswith(prefix + "-") or key == prefix:
                return reason
        return None

    def with_gpus(self, extra: Iterable[GpuSpec]) -> Catalog:
        """A catalog where `extra` GPUs replace same-id entries and new ids are appended."""
        by_id = {g.id: g for g in self.gpus}
        for g in extra:
            by_id[g.id] = g
        return replace(self, gpus=tuple(by_id.values()))

    def priced(self, providers: tuple[str, ...] | list[str] | None = None, basis: str = "on-demand") -> Catalog:
        """Every GPU priced by its cheapest offer among `providers` (None: all) on `basis` (on-demand | spot);
        the GPU then names the provider, region, basis and source of its price."""
        chosen = prices.check_request(providers, basis, self.offers)
        return replace(self, gpus=prices.price_gpus(self.gpus, self.offers, chosen, basis))

    def with_offers(self, offers: Iterable[prices.Offer]) -> Catalog:
        """Offers added to the price list; one for the same GPU, provider and region replaces it."""
        by_key = {(o.gpu, o.provider, o.region): o for o in self.offers}
        known = {g.id for g in self.gpus}
        for o in offers:
            if o.gpu not in known:
                raise UnknownGpuError(
                    f"price offer for unknown GPU {o.gpu!r}.",
                    field="price_file",
                    suggestions=difflib.get_close_matches(o.gpu, sorted(known), n=3),
                )
            by_key[(o.gpu, o.provider, o.region)] = o
        return replace(self, offers=tuple(by_key.values()))

    def with_prices(self, prices: dict[str, dict[str, Any]]) -> Catalog:
        """Override $/h per GPU id: {"a100-80gb": {"price_usd_per_hour": 1.5, "price_date": ..., "price_source": ...}}."""
        gpus = []
        known = {g.id for g in self.gpus}
        for gid in prices:
            if gid not in known:
                raise UnknownGpuError(
                    f"price override for unknown GPU {gid!r}.",
                    field="prices",
                    suggestions=difflib.get_close_matches(gid, sorted(known), n=3),
                )
        for g in self.gpus:
            p = prices.get(g.id)
            if p is None:
                gpus.append(g)
                continue
            price = p.get("price_usd_per_hour")
            if not isinstance(price, (int, float)) or price < 0:
                raise InvalidInputError(f"price_usd_per_hour for {g.id} must be a non-negative number", field="prices")
            gpus.append(
                replace(
                    g,
                    price_usd_per_hour=float(price),
                    price_date=str(p.get("price_date", "")),
                    price_source=str(p.get("price_source", "user override")),
                    price_provider=str(p.get("provider", "user")),
                    price_region=str(p.get("region", "")),
                    price_basis="user",
                )
            )
        return replace(self, gpus=tuple(gpus))


@cache
def _model_index(cat: Catalog) -> dict[str, ModelSpec]:
    index: dict[str, ModelSpec] = {}
    for m in cat.models:
        for key in (m.name, m.hf_id or "", *m.aliases):
            if key:
                index.setdefault(_norm_model_key(key), m)
                index.setdefault(_norm_model_key(key.split("/")[-1]), m)
    return index


@cache
def _gpu_index(cat: Catalog) -> dict[str, GpuSpec]:
    index: dict[str, GpuSpec] = {}
    for g in cat.gpus:
        for key in (g.id, g.name, *g.aliases):
            index.setdefault(_norm_gpu_key(key), g)
    return index


def _close(key: str, index: dict, label) -> list[str]:
    matches = difflib.get_close_matches(key, list(index), n=8, cutoff=0.5)
    out: list[str] = []
    for m in matches:
        lab = label(index[m])
        if lab not in out:
            out.append(lab)
    return out[:3]


# ---- loading ---------------------------------------------------------------------------------
def load_gpu_file(path: str | Path) -> list[GpuSpec]:
    """User GPU file: {"gpus": [ {id, name, memory_gib, ...} ]} (same fields as the built-in file)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
        return [_gpu_from_row(r) for r in doc["gpus"]]
    except InvalidInputError as exc:  # a GPU whose numbers cannot be used: name the file and the field
        raise InvalidInputError(f"GPU file {str(p)!r}: {exc.message}", field="gpu_file") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"cannot read GPU file {str(p)!r}: {exc}", field="gpu_file") from exc


def load_price_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """The old price-file format: {"prices": {"a100-80gb": {"price_usd_per_hour": 1.5, ...}}} ({} if the file
    has only offers)."""
    return _read_price_file(path)[0]


def load_price_offers(path: str | Path) -> list[prices.Offer]:
    """The provider format of a price file: {"offers": [{"gpu", "provider", "region", "on_demand_usd_per_gpu_hour",
    "spot_usd_per_gpu_hour", "source", "date"}]} (the shape of data/prices.json); [] if it has none."""
    return _read_price_file(path)[1]


def _read_price_file(path: str | Path) -> tuple[dict[str, dict[str, Any]], list[prices.Offer]]:
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
        if not isinstance(doc, dict) or ("prices" not in doc and "offers" not in doc):
            raise KeyError("the file needs 'prices' (per GPU id) or 'offers' (per GPU and provider)")
        flat = doc.get("prices", {})
        if not isinstance(flat, dict):
            raise TypeError("'prices' must be an object keyed by GPU id")
        rows = doc.get("offers", [])
        if not isinstance(rows, list):
            raise TypeError("'offers' must be a list of offers")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"cannot read price file {str(p)!r}: {exc}", field="price_file") from exc
    return flat, [prices.offer_from_row(r) if isinstance(r, dict) else prices.offer_from_row({}) for r in rows]


@cache
def default_catalog() -> Catalog:
    models_doc = json.loads((DATA_DIR / "models.json").read_text())
    gpus_doc = json.loads((DATA_DIR / "gpus.json").read_text())
    prices_doc = json.loads((DATA_DIR / "prices.json").read_text())
    cat = Catalog(
        models=tuple(_model_from_row(r) for r in models_doc["models"]),
        gpus=tuple(_gpu_from_row(r) for r in gpus_doc["gpus"]),
        closed_models=dict(models_doc.get("closed_models", {})),
        offers=tuple(prices.offer_from_row(r, field="prices") for r in prices_doc["offers"]),
    )
    # the default cost basis: each GPU at its cheapest published on-demand offer, named on every plan
    return cat.priced(None, prices.DEFAULT_BASIS)


def build_catalog(gpu_files: Iterable[str | Path] = (), price_file: str | Path | None = None) -> Catalog:
    cat = default_catalog()
    extra: list[GpuSpec] = []
    for f in gpu_files:
        extra.extend(load_gpu_file(f))
    if extra:
        cat = cat.with_gpus(extra)
    if price_file:
        flat, offers = _read_price_file(price_file)
        if offers:
            cat = cat.with_offers(offers).priced(None, prices.DEFAULT_BASIS)
        if flat:
            cat = cat.with_prices(flat)
    return cat


# ---- models from config.json or size -----------------------------------------------------------
_UNSUPPORTED_TYPES: dict[str, str] = {}
#: config.json keys that make a model a mixture of experts: an unknown type with them is not Llama-format
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def model_from_config(cfg: dict[str, Any], name: str = "custom") -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json dict (any Llama-format config, GPT-2, NeoX, Phi, T5).

    The family that claims the config's ``model_type`` (advisor.families) reads it, with the
    transformers config class defaults for missing keys; an unknown type is read as Llama-format."""
    mtype = str(cfg.get("model_type", "llama")).lower()
    if mtype in _UNSUPPORTED_TYPES:
        raise InvalidInputError(f"model_type {mtype!r}: {_UNSUPPORTED_TYPES[mtype]}", field="model")
    family = family_for_model_type(mtype)
    note = ""
    if family is None and any(cfg.get(k) for k in _EXPERT_KEYS):
        raise InvalidInputError(
            f"model_type {mtype!r} is a mixture-of-experts model of an architecture not modelled. To fix: use one of "
            "the modelled MoE types (mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss, deepseek_v2, deepseek_v3)",
            field="model",
        )
    if family is None:
        family = get_family("llama")
        note = f"model_type {mtype!r} read as a Llama-format config"
    spec = ModelSpec(name=name, source="config.json", note=note, **family.spec_fields(cfg, mtype))
    # a quantization_config (GPTQ, AWQ, FP8, bitsandbytes) makes it a pre-quantized base; no checkpoint read here
    return prequant.attach(spec, cfg, name, None, "an inline config.json: no checkpoint read")


def read_json_object(path: Path, what: str, field: str) -> dict[str, Any]:
    """The JSON object in `path`; InvalidInputError on `field` naming `what` the file was read as otherwise."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"cannot read {what} {str(path)!r}: {exc}", field=field) from exc
    if not isinstance(doc, dict):
        raise InvalidInputError(f"{str(path)!r} is not a JSON object", field=field)
    return doc


def model_from_config_path(path: str | Path) -> ModelSpec:
    p = Path(path).expanduser()
    cfg_path = p / "config.json" if p.is_dir() else p
    cfg = read_json_object(cfg_path, "config", "model")
    name = p.name if p.is_dir() else (p.parent.name or p.stem)
    spec = model_from_config(cfg, name=name)
    spec = prequant.with_local_checkpoint(spec, cfg, cfg_path.parent)  # stored bytes from the folder's safetensors
    return replace(spec, source=str(cfg_path))


def model_from_size(size: str) -> ModelSpec:
    """A Llama-shaped architecture of roughly `size` parameters ("13B", "350M"); flagged as assumed.

    Shape rule (LLaMA-1/2 proportions): head size 128, layers ~ hidden/128, SwiGLU width
    ceil(8h/3 to 256), vocab 32000, untied head; layers then adjusted to hit the size.
    """
    m = _SIZE_RE.match(size)
    if not m:
        raise InvalidInputError(f"size {size!r} must look like '7B' or '350M'", field="model")
    n = float(m.group(1)) * (1e9 if m.group(2).lower() == "b" else 1e6)
    if not 1e7 <= n <= 2e12:
        raise InvalidInputError(f"size {size!r} out of range (10M to 2000B)", field="model")
    vocab = 32000
    # solve 12 h^3 / 128 + 2 V h = n for h, round to a multiple of 128
    lo, hi = 64.0, 65536.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 12 * mid**3 / 128 + 2 * vocab * mid < n:
            lo = mid
        else:
            hi = mid
    hidden = max(128, round(lo / 128) * 128)
    inter = int(math.ceil(8 * hidden / 3 / 256) * 256)
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((n - 2 * vocab * hidden) / per_layer))
    label = m.group(1) + m.group(2).upper()
    return ModelSpec(
        name=f"llama-shaped-{label}",
        family="llama",
        num_layers=layers,
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=hidden // 128,
        vocab_size=vocab,
        source="derived from size",
        assumed=True,
        note=f"architecture assumed: a Llama-shaped model of about {label} parameters "
        f"(hidden {hidden}, {layers} layers, SwiGLU {inter}, vocab {vocab}); give a config.json for exact numbers",
    )


def resolve_model(
    name: str,
    catalog: Catalog | None = None,
    allow_paths: bool = True,
    *,
    revision: str | None = None,
    hub: HubOptions | None = None,
) -> ModelSpec:
    """A model by name, in this order: a catalog name / alias / Hugging Face id (no network), a size like
    '13B', a path to a config.json or its folder (allow_paths only), then anything shaped like a Hub id
    (``org/name``, ``org/name@revision``) through advisor.hub when `hub` allows look-ups
    (default: ``HubOptions.from_env()``, i.e. on unless ``ADVISOR_HUB_LOOKUPS=0``).

    `revision` (a branch, tag or commit sha) asks the Hub for that checkpoint, also for a catalog model
    with a Hugging Face id. allow_paths=False (the HTTP service) never touches the filesystem: a client
    must not make the server read files it names; it names a Hub id or posts the config inline instead."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidInputError("model must be a non-empty string", field="model")
    if revision is not None and not str(revision).strip():
        raise InvalidInputError("model_revision must be a non-empty branch, tag or commit sha", field="model_revision")
    cat = catalog or default_catalog()
    hub_ref = parse_hub_id(name)
    asks_revision = revision is not None or (hub_ref is not None and hub_ref[1] is not None)
    try:
        spec = cat.model(name)
    except UnknownModelError as exc:
        miss = exc
    else:
        if not asks_revision:
            return spec
        if hub_ref is None and spec.hf_id is None:
            raise InvalidInputError(
                f"{spec.name} has no Hugging Face id, so a revision cannot apply. To fix: leave the revision out",
                field="model_revision",
            )
        if hub_ref is None:
            name, hub_ref = spec.hf_id, (spec.hf_id, None)
    if _SIZE_RE.match(name):
        if revision is not None:
            raise InvalidInputError(
                "a revision applies to Hugging Face ids only, not to a size. To fix: leave the revision out",
                field="model_revision",
            )
        return model_from_size(name)
    if revision is not None and hub_ref is None:
        raise InvalidInputError(
            f"a revision applies to Hugging Face ids (org/name) only, not to {name!r}. To fix: leave the revision out",
            field="model_revision",
        )
    if allow_paths and not asks_revision:
        p = Path(name).expanduser()
        if p.exists():
            return model_from_config_path(p)
    if hub_ref is not None:
        opts = hub if hub is not None else HubOptions.from_env()
        return resolve_hub_model(name.strip(), revision, opts, revision_field="model_revision")
    if allow_paths:
        raise miss
    raise UnknownModelError(
        f"unknown model {name!r}: not in the catalog, not a Hugging Face id (org/name) and not a size like '13B'; "
        "post its config.json inline.",
        field="model",
        suggestions=miss.suggestions,
    ) from None
