"""Writes advisor/catalog/data/gpus.json from reference/gpu_catalog_research.csv plus the few
fields the research table lacks (usable memory as the driver reports it, FP32 non-tensor TFLOP/s,
peer interconnect). Every figure keeps its source in the output file.
"""

import csv
import json
from pathlib import Path

RECORDED = "2026-11-25"
ROOT = Path(__file__).resolve().parents[1]
RESEARCH = ROOT / "reference" / "gpu_catalog_research.csv"

# id, research-row name, display name, class, usable MiB (nvidia-smi / rocm-smi total), fp32 TFLOP/s,
# peer GB/s, aliases. Usable memory: NVIDIA datasheets give GB; the driver shows the MiB below
# (A10G's 22888 MiB is from the research notes; others are the totals nvidia-smi prints for the board).
EXTRA = [
    ("t4", "T4", "NVIDIA T4", "datacenter", 15360, 8.1, 16, ["T4", "Tesla T4", "t4-16gb"]),
    ("l4", "L4", "NVIDIA L4", "datacenter", 23034, 30.3, 32, ["L4", "l4-24gb"]),
    ("a10g", "A10G", "NVIDIA A10G", "datacenter", 22888, 31.2, 32, ["A10G", "a10g-24gb", "A10"]),
    ("v100-16gb", "V100-16GB", "NVIDIA V100 16GB", "datacenter", 16160, 15.7, 300, ["V100", "V100 16GB", "tesla-v100"]),
    ("v100-32gb", "V100-32GB", "NVIDIA V100 32GB", "datacenter", 32510, 15.7, 300, ["V100 32GB"]),
    (
        "a100-40gb",
        "A100-40GB",
        "NVIDIA A100 40GB (SXM4)",
        "datacenter",
        40960,
        19.5,
        600,
        ["A100 40GB", "A100-SXM4-40GB", "a100-40"],
    ),
    (
        "a100-80gb",
        "A100-80GB",
        "NVIDIA A100 80GB (SXM4)",
        "datacenter",
        81920,
        19.5,
        600,
        ["A100", "A100 80GB", "A100-SXM4-80GB", "a100-80"],
    ),
    (
        "h100-sxm",
        "H100-SXM",
        "NVIDIA H100 80GB (SXM5)",
        "datacenter",
        81559,
        67.0,
        900,
        ["H100", "H100 SXM", "H100-SXM5-80GB", "h100-80gb"],
    ),
    ("h100-pcie", "H100-PCIe", "NVIDIA H100 80GB (PCIe)", "datacenter", 81559, 51.0, 64, ["H100 PCIe"]),
    ("h200", "H200", "NVIDIA H200 (SXM, 141GB)", "datacenter", 143771, 67.0, 900, ["H200", "H200 141GB"]),
    ("l40s", "L40S", "NVIDIA L40S", "datacenter", 46068, 91.6, 32, ["L40S", "NVIDIA L40S"]),
    (
        "rtx-3060-12gb",
        "RTX3060-12GB",
        "NVIDIA GeForce RTX 3060 12GB",
        "consumer",
        12288,
        12.7,
        16,
        ["RTX 3060", "3060", "rtx3060"],
    ),
    ("rtx-3090", "RTX3090", "NVIDIA GeForce RTX 3090", "consumer", 24576, 35.6, 32, ["RTX 3090", "3090", "rtx3090"]),
    ("rtx-4090", "RTX4090", "NVIDIA GeForce RTX 4090", "consumer", 24564, 82.6, 32, ["RTX 4090", "4090", "rtx4090"]),
    ("rtx-a6000", "RTXA6000", "NVIDIA RTX A6000", "datacenter", 49140, 38.7, 56, ["A6000", "RTX A6000", "rtxa6000"]),
    ("mi300x", "MI300X", "AMD Instinct MI300X", "datacenter", 196592, 163.4, 896, ["MI300X", "AMD MI300X"]),
]


def main() -> None:
    rows = {r["gpu"]: r for r in csv.DictReader(RESEARCH.open())}
    gpus = []
    for gid, key, name, cls, mib, fp32, peer, aliases in EXTRA:
        r = rows[key]
        bf16 = r["bf16_supported"].strip().lower() == "true"
        gpus.append(
            {
                "id": gid,
                "name": name,
                "vendor": "amd" if gid.startswith("mi") else "nvidia",
                "gpu_class": cls,
                "aliases": aliases,
                "memory_gb": float(r["memory_gb"]),
                "memory_gib": round(mib / 1024, 3),
                "bf16_tflops": float(r["dense_bf16_tflops"]) if bf16 and r["dense_bf16_tflops"] else None,
                "fp16_tflops": float(r["dense_fp16_tflops"]),
                "fp32_tflops": fp32,
                "memory_bandwidth_gbps": float(r["mem_bw_gbps"]),
                "bf16_supported": bf16,
                "interconnect_gbps": float(peer),
                "price_usd_per_hour": float(r["price_usd_per_gpu_hr"]),
                "price_date": RECORDED,
                "price_source": f"{r['price_basis']} [{r['price_source']}] via reference/gpu_catalog_research.csv",
                "spec_source": f"{r['spec_source']} via reference/gpu_catalog_research.csv; usable memory {mib} MiB "
                "as the driver reports the board; FP32 non-tensor and peer bandwidth from the vendor datasheet",
                "note": r["notes"],
            }
        )
    doc = {
        "schema": "tuneadvisor.gpus/1",
        "recorded": RECORDED,
        "note": "Dense (non-sparse) tensor TFLOP/s. Prices are indicative on-demand $/GPU-hour; override them with your own file.",
        "gpus": gpus,
    }
    path = ROOT / "advisor" / "catalog" / "data" / "gpus.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {len(gpus)} GPUs to {path}")


if __name__ == "__main__":
    main()
