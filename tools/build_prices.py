"""Writes advisor/catalog/data/prices.json from reference/gpu_prices_research.csv: one offer per GPU per
provider (and region where the provider prices by region), on-demand and spot $/GPU-hour where published,
each with the source it was read from and the date. Instance prices are divided by the instance's GPUs.
"""

import csv
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESEARCH = ROOT / "reference" / "gpu_prices_research.csv"
OUT = ROOT / "advisor" / "catalog" / "data" / "prices.json"


def _per_gpu(text: str, gpus: int) -> float | None:
    return round(float(text) / gpus, 6) if text.strip() else None


def main() -> None:
    offers = []
    for r in csv.DictReader(RESEARCH.open()):
        n = int(r["gpus_per_instance"])
        offers.append(
            {
                "gpu": r["gpu_id"],
                "provider": r["provider"],
                "region": r["region"],
                "instance": r["instance"],
                "gpus_per_instance": n,
                "on_demand_usd_per_gpu_hour": _per_gpu(r["on_demand_usd_per_instance_hr"], n),
                "spot_usd_per_gpu_hour": _per_gpu(r["spot_usd_per_instance_hr"], n),
                "source": r["source"],
                "date": r["date_read"],
            }
        )
    doc = {
        "schema": "tuneadvisor.prices/1",
        "note": "Published $/GPU-hour per provider (instance price / GPUs in it). The default cost basis is the "
        "cheapest on-demand offer per GPU; pick providers and the basis per request, or bring a price file.",
        "offers": offers,
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {len(offers)} offers to {OUT}")


if __name__ == "__main__":
    main()
