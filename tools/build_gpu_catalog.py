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

CORRECTED = "2026-11-30"
MATMUL_RECORDED = "2026-11-30"

# The research table's dense_fp16_tflops of GeForce cards is the FP16-*accumulate* tensor rate. PyTorch runs
# half-precision matmuls with FP32 accumulation (cuBLAS CUBLAS_COMPUTE_32F), which GeForce cards execute at
# half that rate: the same rate as BF16 (always FP32-accumulate), which the research table lists. The
# professional / datacenter cards (RTX A6000, L40S, L4, A10G, T4) run FP32 accumulation at full rate: their
# datasheets' dense FP16 figures stand.
FP16_FP32_ACCUMULATE = {
    "rtx-3060-12gb": "GA106 derivation in the research row (112 tensor cores x 1.777 GHz: 51 FP16-accumulate, "
    "half of it with FP32 accumulate, the BF16 rate)",
    "rtx-3090": "NVIDIA Ampere GA102 whitepaper, Appendix A: Peak FP16 Tensor TFLOPS with FP32 Accumulate 71 "
    "(142 with FP16 accumulate)",
    "rtx-4090": "NVIDIA Ada Lovelace (AD102) whitepaper, Appendix A: Peak FP16 Tensor TFLOPS with FP32 Accumulate "
    "165.2 (330.3 with FP16 accumulate)",
}

# Streaming multiprocessors (compute units on AMD) and the peer link between GPUs of one machine:
# nvlink (NVLink / NVSwitch / Infinity Fabric on SXM or OAM boards), pcie (PCIe with peer-to-peer DMA), or
# pcie-host (no peer-to-peer: NCCL stages every transfer through host memory; NVIDIA's GeForce drivers do not
# enable P2P on GeForce 30/40-series cards).
TOPOLOGY = {
    "t4": (40, "pcie", "NVIDIA T4 datasheet: 40 SMs (2560 CUDA cores), PCIe Gen3 x16, no NVLink"),
    "l4": (58, "pcie", "NVIDIA L4 datasheet: 58 SMs (7424 CUDA cores), PCIe Gen4 x16, no NVLink"),
    "a10g": (80, "pcie", "AWS G5 (A10G): 80 SMs as deviceQuery reports the board, PCIe Gen4 x16, no NVLink"),
    "v100-16gb": (80, "nvlink", "NVIDIA V100 datasheet: 80 SMs, NVLink 300 GB/s (SXM2)"),
    "v100-32gb": (80, "nvlink", "NVIDIA V100 datasheet: 80 SMs, NVLink 300 GB/s (SXM2)"),
    "a100-40gb": (108, "nvlink", "NVIDIA A100 datasheet / whitepaper: 108 SMs, NVLink 600 GB/s (SXM4)"),
    "a100-80gb": (108, "nvlink", "NVIDIA A100 datasheet / whitepaper: 108 SMs, NVLink 600 GB/s (SXM4)"),
    "h100-sxm": (132, "nvlink", "NVIDIA H100 datasheet / whitepaper: 132 SMs (SXM5), NVLink 900 GB/s"),
    "h100-pcie": (114, "pcie", "NVIDIA H100 whitepaper: 114 SMs (PCIe), PCIe Gen5 x16 (NVLink bridge optional)"),
    "h200": (132, "nvlink", "NVIDIA H200 datasheet: GH100 with 132 SMs (SXM), NVLink 900 GB/s"),
    "l40s": (142, "pcie", "NVIDIA L40S datasheet: 142 SMs (18176 CUDA cores), PCIe Gen4 x16, no NVLink"),
    "rtx-3060-12gb": (28, "pcie-host", "NVIDIA GA106 (3584 CUDA cores / 128 = 28 SMs); GeForce: no P2P"),
    "rtx-3090": (82, "pcie-host", "NVIDIA Ampere GA102 whitepaper: 82 SMs; GeForce: no PCIe P2P"),
    "rtx-4090": (128, "pcie-host", "NVIDIA Ada AD102 whitepaper: 128 SMs; GeForce 40-series: P2P disabled"),
    "rtx-a6000": (84, "pcie", "NVIDIA RTX A6000 datasheet: 84 SMs (10752 CUDA cores), PCIe Gen4 x16 with P2P"),
    "mi300x": (304, "nvlink", "AMD MI300X datasheet: 304 CUs, Infinity Fabric 896 GB/s peer bandwidth (OAM)"),
}

# Sustained dense half-precision matmul TFLOP/s measured on the card (GpuSpec.matmul_tflops_measured): bf16 torch.mm
# (fp16 on the T4, which has no bf16 tensor cores). Rule: the large-shape figure (8192^3) where the source lists
# sizes (a power-limited card boosts through a short small-shape burst, then settles), else the source's best shape
# (MAMF: a sweep of shapes, mean of 100 iterations after 50 warm-up). A GPU hardware measurement, not a fine-tuning
# figure. Cards without a published measurement keep None (the speed model then uses the datasheet peak times the
# median measured/datasheet share of the cards below: advisor.estimators.device.DEFAULT_MATMUL_SHARE).
MAMF = (
    "stas00/ml-engineering compute/accelerator/README.md @b9e29720, 'Maximum Achievable Matmul FLOPS comparison "
    "table', BF16 v2"
)
ZZC = "zzc0721/torch-performance-test-data"
MATMUL = {
    "a100-40gb": (271.2, f"{MAMF}: NVIDIA A100 SXM 271.2 (best shape 1024x10240x5120, torch 2.6.0+cu126)"),
    "a100-80gb": (271.2, f"{MAMF}: NVIDIA A100 SXM 271.2 (best shape 1024x10240x5120, torch 2.6.0+cu126)"),
    "h100-sxm": (794.5, f"{MAMF}: NVIDIA H100 SXM 794.5 (best shape 2048x2048x13312, torch 2.7.0+cu126)"),
    "mi300x": (668.4, f"{MAMF}: AMD MI300X 668.4 (torch 2.5.1 ROCm 6.3, PYTORCH_TUNABLEOP_ENABLED=1)"),
    "l4": (
        59.4,
        f"{ZZC} issue #120 (2026-01-12, torch 2.9.0+cu128, bare metal): bf16 torch.mm 8192^3 59.40 "
        "(10240^3 56.90; 2048^3 70.89 in a short burst): the 72 W power limit holds the clock below the "
        "datasheet's 2040 MHz boost",
    ),
    "rtx-4090": (
        160.2,
        f"{ZZC} issue #78 (2025-10-17, torch 2.7.0+cu128): bf16 torch.mm 8192^3 160.17 (database.md: other "
        "RTX 4090 24GB boards 162-173 at their best shape)",
    ),
    "rtx-3090": (
        76.3,
        f"{ZZC} database.md @bbb8e247: RTX 3090 24GB bf16 torch.mm best square shape 76.34 (bare metal, torch "
        "2.6.0; a second board 76.68): GeForce boards boost above the rated clock of the 71 TFLOP/s datasheet rate",
    ),
    "t4": (
        41.9,
        f"{ZZC} database.md @bbb8e247: Tesla T4 fp16 torch.mm best square shape 41.91 (Colab, torch 2.8.0; "
        "datasheet 65, 70 W power limit)",
    ),
}


def main() -> None:
    rows = {r["gpu"]: r for r in csv.DictReader(RESEARCH.open())}
    gpus = []
    for gid, key, name, cls, mib, fp32, peer, aliases in EXTRA:
        r = rows[key]
        bf16 = r["bf16_supported"].strip().lower() == "true"
        fp16 = float(r["dense_fp16_tflops"])
        spec_source = f"{r['spec_source']} via reference/gpu_catalog_research.csv"
        if gid in FP16_FP32_ACCUMULATE:
            fp16 = float(r["dense_bf16_tflops"])
            spec_source += (
                f"; fp16 corrected {CORRECTED} to the FP32-accumulate rate PyTorch runs "
                f"({FP16_FP32_ACCUMULATE[gid]}), not the research row's FP16-accumulate {r['dense_fp16_tflops']}"
            )
        sms, link, link_source = TOPOLOGY[gid]
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
                "fp16_tflops": fp16,
                "fp32_tflops": fp32,
                "memory_bandwidth_gbps": float(r["mem_bw_gbps"]),
                "bf16_supported": bf16,
                "interconnect_gbps": float(peer),
                "price_usd_per_hour": float(r["price_usd_per_gpu_hr"]),
                "price_date": RECORDED,
                "price_source": f"{r['price_basis']} [{r['price_source']}] via reference/gpu_catalog_research.csv",
                "spec_source": f"{spec_source}; usable memory {mib} MiB "
                "as the driver reports the board; FP32 non-tensor and peer bandwidth from the vendor datasheet",
                "sm_count": sms,
                "peer_link": link,
                "link_source": f"{link_source} (recorded {CORRECTED})",
                "matmul_tflops_measured": MATMUL[gid][0] if gid in MATMUL else None,
                "matmul_source": f"{MATMUL[gid][1]} (recorded {MATMUL_RECORDED})" if gid in MATMUL else "",
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
