"""Prices per provider: which offer prices each GPU of a request (pure).

An ``Offer`` is one provider's published $/GPU-hour for a GPU (on-demand and/or spot), with its region,
instance, source and date (advisor/catalog/data/prices.json, built by tools/build_prices.py). A request
picks providers and a basis; each GPU is then priced by its cheapest matching offer, and the GPU carries
the provider, region, basis and source, so every plan names them. Cost rankings compare like with like:
one basis for all GPUs of a request.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from advisor.errors import InvalidInputError
from advisor.specs import GpuSpec

PRICE_BASES = ("on-demand", "spot")
DEFAULT_BASIS = "on-demand"


@dataclass(frozen=True)
class Offer:
    gpu: str  # catalog GPU id
    provider: str  # aws | gcp | azure | lambda | runpod | vast | ... | user
    region: str
    on_demand: float | None  # $/GPU-hour
    spot: float | None
    source: str
    date: str
    instance: str = ""
    gpus_per_instance: int = 1

    def price(self, basis: str) -> float | None:
        return self.on_demand if basis == "on-demand" else self.spot


def offer_from_row(row: dict[str, Any], field: str = "price_file") -> Offer:
    """One offer from a prices.json / price-file row; a bad row is an error naming `field`."""
    try:
        gpu, provider = str(row["gpu"]), str(row["provider"]).strip().lower()
    except (KeyError, TypeError) as exc:
        raise InvalidInputError(
            f"price offer {row!r} needs 'gpu' and 'provider'. To fix: add both", field=field
        ) from exc
    prices = {}
    for key in ("on_demand_usd_per_gpu_hour", "spot_usd_per_gpu_hour"):
        v = row.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            raise InvalidInputError(
                f"{key} of the {gpu} offer at {provider} must be a number >= 0 or null", field=field
            )
        prices[key] = None if v is None else float(v)
    if prices["on_demand_usd_per_gpu_hour"] is None and prices["spot_usd_per_gpu_hour"] is None:
        raise InvalidInputError(
            f"the {gpu} offer at {provider} has no price. To fix: give on_demand_usd_per_gpu_hour or "
            "spot_usd_per_gpu_hour",
            field=field,
        )
    return Offer(
        gpu=gpu,
        provider=provider,
        region=str(row.get("region", "")),
        on_demand=prices["on_demand_usd_per_gpu_hour"],
        spot=prices["spot_usd_per_gpu_hour"],
        source=str(row.get("source", "price file")),
        date=str(row.get("date", "")),
        instance=str(row.get("instance", "")),
        gpus_per_instance=int(row.get("gpus_per_instance", 1) or 1),
    )


def check_request(
    providers: Sequence[str] | None, basis: str, offers: Iterable[Offer], field: str = "providers"
) -> tuple[str, ...] | None:
    """Normalised providers (None: every provider), checked against the offers' providers."""
    if basis not in PRICE_BASES:
        raise InvalidInputError(
            f"price_basis must be one of {', '.join(PRICE_BASES)}, got {basis!r}", field="price_basis"
        )
    if not providers:
        return None
    known = sorted({o.provider for o in offers})
    wanted = tuple(dict.fromkeys(p.strip().lower() for p in providers if p.strip()))
    bad = [p for p in wanted if p not in known]
    if bad or not wanted:
        raise InvalidInputError(
            f"unknown provider(s) {', '.join(bad) or '(none)'}. To fix: one or more of {', '.join(known)}, "
            "or bring a price file with your provider's offers",
            field=field,
        )
    return wanted


def best_offer(gpu_id: str, offers: Iterable[Offer], providers: Sequence[str] | None, basis: str) -> Offer | None:
    """The cheapest offer for `gpu_id` on `basis` among `providers` (None: all); ties go to the first listed."""
    best: Offer | None = None
    for o in offers:
        if o.gpu != gpu_id or (providers and o.provider not in providers):
            continue
        p = o.price(basis)
        if p is not None and (best is None or p < best.price(basis)):  # type: ignore[operator]
            best = o
    return best


def price_gpus(
    gpus: Sequence[GpuSpec], offers: Sequence[Offer], providers: Sequence[str] | None, basis: str
) -> tuple[GpuSpec, ...]:
    """Each GPU priced by its best offer (provider, region, basis, source, date on the GPU); a GPU no chosen
    provider offers on that basis has no price (its cost is unknown, never another provider's price). A GPU
    priced by the user (price_basis 'user') keeps that price."""
    out = []
    for g in gpus:
        if g.price_basis == "user":
            out.append(g)
            continue
        o = best_offer(g.id, offers, providers, basis)
        if o is None:
            who = ", ".join(providers) if providers else "any listed provider"
            out.append(
                replace(
                    g,
                    price_usd_per_hour=None,
                    price_source=f"no {basis} price for {g.id} from {who} in the price list",
                    price_date="",
                    price_provider="",
                    price_region="",
                    price_basis=basis,
                )
            )
            continue
        inst = f"{o.instance}, " if o.instance else ""
        per = f" / {o.gpus_per_instance} GPUs" if o.gpus_per_instance > 1 else ""
        out.append(
            replace(
                g,
                price_usd_per_hour=o.price(basis),
                price_source=f"{o.provider} {inst}{o.region}{per}: {o.source}",
                price_date=o.date,
                price_provider=o.provider,
                price_region=o.region,
                price_basis=basis,
            )
        )
    return tuple(out)


def price_label(g: GpuSpec) -> str:
    """'$2.99/GPU-h on-demand at lambda (us-east-1)' or 'no price ...' for a plan line."""
    if g.price_usd_per_hour is None:
        return g.price_source or "no price"
    where = f" at {g.price_provider}" + (f" ({g.price_region})" if g.price_region else "") if g.price_provider else ""
    return f"${g.price_usd_per_hour:,.4g}/GPU-h {g.price_basis or 'listed'}{where}"
