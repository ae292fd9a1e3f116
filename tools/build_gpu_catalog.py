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
    ("a10g", "A10G", "NVIDIA A10G", "datacenter", 22888, 31.2, 32, ["A10G", "a10g-24gb"]),
    ("a10", "A10", "NVIDIA A10", "datacenter", 23028, 31.2, 32, ["A10", "a10-24gb"]),
    ("a40", "A40", "NVIDIA A40", "datacenter", 46068, 37.4, 32, ["A40", "a40-48gb"]),
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
        ["A100", "A100 40GB", "A100-SXM4-40GB", "a100-40"],
    ),
    (
        "a100-80gb",
        "A100-80GB",
        "NVIDIA A100 80GB (SXM4)",
        "datacenter",
        81920,
        19.5,
        600,
        ["A100-80GB", "A100 80GB", "A100-SXM4-80GB", "a100-80"],
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
    (
        "a100-40gb-pcie",
        "A100-40GB-PCIe",
        "NVIDIA A100 40GB (PCIe)",
        "datacenter",
        40960,
        19.5,
        32,
        ["A100-PCIE-40GB", "A100 40GB PCIe"],
    ),
    (
        "a100-80gb-pcie",
        "A100-80GB-PCIe",
        "NVIDIA A100 80GB (PCIe)",
        "datacenter",
        81920,
        19.5,
        32,
        ["A100-PCIE-80GB", "A100 80GB PCIe"],
    ),
    ("h100-nvl", "H100-NVL", "NVIDIA H100 NVL (94GB)", "datacenter", 95830, 60.0, 64, ["H100 NVL", "H100-NVL"]),
    ("gh200", "GH200", "NVIDIA GH200 (96GB HBM3)", "datacenter", 97280, 67.0, 64, ["GH200", "GH200 480GB"]),
    ("b200", "B200", "NVIDIA B200 (HGX, 180GB)", "datacenter", 183296, 80.0, 1800, ["B200", "HGX B200"]),
    ("h100-pcie", "H100-PCIe", "NVIDIA H100 80GB (PCIe)", "datacenter", 81559, 51.0, 64, ["H100 PCIe"]),
    ("h200", "H200", "NVIDIA H200 (SXM, 141GB)", "datacenter", 143771, 67.0, 900, ["H200", "H200 141GB"]),
    ("l40s", "L40S", "NVIDIA L40S", "datacenter", 46068, 91.6, 32, ["L40S", "NVIDIA L40S"]),
    ("l40", "L40", "NVIDIA L40", "datacenter", 46068, 90.5, 32, ["L40", "l40-48gb"]),
    (
        "rtx-6000-ada",
        "RTX6000-Ada",
        "NVIDIA RTX 6000 Ada Generation",
        "datacenter",
        49140,
        91.1,
        32,
        ["RTX 6000 Ada", "RTX6000-Ada", "RTX 6000 Ada Generation"],
    ),
    ("rtx-4080", "RTX4080", "NVIDIA GeForce RTX 4080", "consumer", 16376, 48.7, 32, ["RTX 4080", "4080", "rtx4080"]),
    ("rtx-5090", "RTX5090", "NVIDIA GeForce RTX 5090", "consumer", 32607, 104.8, 64, ["RTX 5090", "5090", "rtx5090"]),
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
    ("mi325x", "MI325X", "AMD Instinct MI325X", "datacenter", 262128, 163.4, 896, ["MI325X", "AMD MI325X"]),
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
    "rtx-4080": "FP16 tensor 390 TFLOPS with sparsity (Tom's Hardware table at holynerdvana.com, read 2026-11-30) = 194.9 "
    "dense with FP16 accumulate; 97.5 with FP32 accumulate is the GeForce half rate as the Ada whitepaper's Appendix A "
    "gives it (that whitepaper was not opened)",
    "rtx-5090": "FP16 tensor 838.4 TFLOPS with sparsity (spheron.network RTX 5090 spec table, read 2026-11-30) = 419 dense "
    "with FP16 accumulate; 209.5 with FP32 accumulate is the GeForce half rate as the RTX Blackwell whitepaper gives it "
    "(that whitepaper was not opened)",
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
    "mi325x": (
        304,
        "nvlink",
        "304 CUs (unanswered.io MI325X guide, read 2026-11-30); seven Infinity Fabric links per OAM GPU "
        "(wiaix.com MI325X page, read 2026-11-30); the 896 GB/s peer figure is the MI300X's, not read for the MI325X",
    ),
    "a10": (
        72,
        "pcie",
        "72 SMs / 9216 CUDA cores (sysrqmts.com A10 PCIe table, TechPowerUp-derived, read 2026-11-30); PCIe Gen4 x16, "
        "no NVLink",
    ),
    "a40": (
        84,
        "pcie",
        "NVIDIA A40 datasheet as reproduced at ecer.com (read 2026-11-30): 10,752 CUDA cores, 84 RT cores (= 84 SMs), "
        "PCIe Gen4 x16, NVLink bridge 112.5 GB/s (pairs only)",
    ),
    "a100-40gb-pcie": (
        108,
        "pcie",
        "108 SMs (glennklockwood.com/garden/processors/A100, read 2026-11-30); PCIe Gen4 x16 (NVLink bridge: "
        "pairs only)",
    ),
    "a100-80gb-pcie": (
        108,
        "pcie",
        "108 SMs (glennklockwood.com/garden/processors/A100, read 2026-11-30); PCIe Gen4 x16 (NVLink bridge: "
        "pairs only)",
    ),
    "h100-nvl": (
        132,
        "pcie",
        "132 SMs as cudaGetDeviceProperties reports an H100 NVL (public benchmark notes, stored file id "
        "65910594837, read 2026-11-30); PCIe Gen5 x16, NVLink bridge 600 GB/s pairs only (H100 datasheet NVL column, same notes)",
    ),
    "gh200": (
        132,
        "pcie",
        "132 compute units in an OpenCL printout of a GH200 480GB (mredenti/PowerCapping "
        "configuration/OpenCL_benchmark.md, read 2026-11-30); NVLink-C2C 900 GB/s to its Grace CPU (GH200 datasheet table in "
        "atineoSE/coding-model-seeks-gpu gh200_specs.md); one GPU per node (GPU-to-GPU NVLink only in NVL systems)",
    ),
    "b200": (148, "nvlink", "NVIDIA Blackwell B200: 148 SMs; HGX B200 NVLink 5 1.8 TB/s per GPU (NVSwitch)"),
    "l40": (
        142,
        "pcie",
        "NVIDIA L40 datasheet as reproduced at mullet.se (read 2026-11-30): 18,176 CUDA cores, 142 RT cores (= 142 "
        "SMs), PCIe Gen4 x16, no NVLink",
    ),
    "rtx-6000-ada": (
        142,
        "pcie",
        "NVIDIA RTX 6000 Ada datasheet table in atineoSE/coding-model-seeks-gpu "
        "rtx6000ada_specs.md (read 2026-11-30): 18,176 CUDA cores, 142 RT cores (= 142 SMs), PCIe 4.0 x16, NVLink: No; "
        "PCIe P2P on this professional card is assumed, not read",
    ),
    "rtx-4080": (
        76,
        "pcie-host",
        "76 SMs / 9728 cores (Tom's Hardware table at holynerdvana.com, read 2026-11-30); GeForce 40-series: "
        "P2P disabled",
    ),
    "rtx-5090": (
        170,
        "pcie-host",
        "170 SMs / 21,760 shaders (pocketmags.com RTX 5090 review spec box and "
        "spheron.network spec table, read 2026-11-30); PCIe Gen5 x16; GeForce: no P2P",
    ),
}

NEW_RECORDED = "2026-11-30"
# usable memory of the cards added on NEW_RECORDED where no driver printout was read: derived (stated in the
# spec source). B200: 179 GB as nvidia-smi reports it on an HGX B200 (docs.vultr.com inference-cookbook hardware
# overview, updated 2026-03-11); GH200: 96 GB less the 361 MiB an H100 80GB board keeps (81920 - 81559);
# MI325X: 256 GiB less the 16 MiB rocm-smi keeps on the MI300X (196608 - 196592).
USABLE_DERIVED = {
    "b200": "179 GiB as nvidia-smi reports an HGX B200 (docs.vultr.com NVIDIA HGX B200 hardware overview)",
    "mi325x": "256 GiB less the 16 MiB rocm-smi keeps on an MI300X (derived, not read from a driver)",
}

# Usable MiB of the cards added on NEW_RECORDED with where the figure was read (2026-11-30), or a plain statement that it
# was not read: a figure that no printout backs says so instead of claiming to be the driver's.
VAST9 = "skypilot-org/skypilot-catalog catalogs/v9/vast/vms.csv @a5be5386 GpuInfo"
USABLE_SOURCE = {
    "h100-nvl": f"nvidia-smi on an H100 NVL in public benchmark notes (stored file id 65910594837) and {VAST9} 1x-H100_NVL 95830",
    "gh200": "OpenCL global memory of a GH200 480GB, driver 555.42.06 (mredenti/PowerCapping configuration/OpenCL_benchmark.md: "
    "97280 MB VRAM); nvidia-smi's total was not read",
    "rtx-5090": f"{VAST9} 1x-RTX_5090 32607",
    "rtx-6000-ada": f"{VAST9} 2x-RTX_6000Ada 98280 = 2 x 49140",
    "a100-40gb-pcie": f"{VAST9} 2x-A100_PCIE 81920 = 2 x 40960",
    "a100-80gb-pcie": "80 GiB nominal, as the catalogs list an A100 80GB (no PCIe-card driver printout read)",
    "a10": "NOT read: no A10 driver printout found (Lambda's catalog lists 24576 nominal); kept from the first entry, unverified",
    "a40": "NOT read: the L40S's nvidia-smi total, assumed for this 48 GB GDDR6 card, unverified",
    "l40": "NOT read: the L40S's nvidia-smi total, assumed for this 48 GB GDDR6 card, unverified",
    "rtx-4080": "NOT read: no RTX 4080 driver printout found; unverified",
}

# Non-CUDA platforms: what differs there, with its source; shown on every plan on such a card.
BNB_ROCM = (
    "bitsandbytes installation guide v0.50.0 (huggingface.co/docs/bitsandbytes/v0.50.0/installation, read "
    "2026-11-30): 'official support for NVIDIA GPUs, AMD GPUs, Intel XPUs, Apple Silicon, and Intel Gaudi' "
    "(v0.48.1 still called AMD ROCm experimental)"
)
ROCM_CAVEAT = (
    "ROCm, not CUDA: PyTorch runs on AMD's ROCm/HIP stack. QLoRA (4-bit NF4) and 8-bit optimisers need "
    "bitsandbytes >= 0.50, the first release with official AMD GPU support (ROCm 6.1+; 4-bit blocks of 128, not 64); "
    "paged optimisers use HIP managed memory and are not separately documented for ROCm; CUDA-only kernels "
    "(flash-attn CUDA wheels, Liger, Unsloth) need their ROCm builds; speed is calibrated on NVIDIA cards "
    "(bitsandbytes v0.50.0 installation guide, read 2026-11-30)"
)
PLATFORM = {"mi300x": ("rocm", ROCM_CAVEAT), "mi325x": ("rocm", ROCM_CAVEAT)}

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
                "vendor": "amd" if gid in PLATFORM else "nvidia",
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
                "price_usd_per_hour": float(r["price_usd_per_gpu_hr"]) if r["price_usd_per_gpu_hr"] else None,
                # no research-table price: the date is when that was recorded (the offers in prices.json carry their own dates)
                "price_date": RECORDED if r["price_usd_per_gpu_hr"] else NEW_RECORDED,
                "price_source": f"{r['price_basis']} [{r['price_source']}] via reference/gpu_catalog_research.csv"
                if r["price_usd_per_gpu_hr"]
                else "no price in the research table: advisor/catalog/data/prices.json lists the offers",
                "spec_source": f"{spec_source}; usable memory {mib} MiB "
                + (
                    f"({USABLE_DERIVED[gid]}); recorded {NEW_RECORDED}"
                    if gid in USABLE_DERIVED
                    else f"({USABLE_SOURCE[gid]}); recorded {NEW_RECORDED}"
                    if gid in USABLE_SOURCE
                    else "as the driver reports the board"
                )
                + (
                    "; FP32 non-tensor from the spec source above; peer link: see link_source"
                    if gid in USABLE_SOURCE or gid in USABLE_DERIVED
                    else "; FP32 non-tensor and peer bandwidth from the vendor datasheet"
                ),
                "platform": PLATFORM.get(gid, ("cuda", ""))[0],
                "caveat": PLATFORM.get(gid, ("cuda", ""))[1],
                "sm_count": sms,
                "peer_link": link,
                "link_source": f"{link_source} (recorded {CORRECTED})",
                "matmul_tflops_measured": MATMUL[gid][0] if gid in MATMUL else None,
                "matmul_source": f"{MATMUL[gid][1]} (recorded {MATMUL_RECORDED})" if gid in MATMUL else "",
                "note": r["notes"] + (f"; caveat source: {BNB_ROCM}" if gid in PLATFORM else ""),
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
