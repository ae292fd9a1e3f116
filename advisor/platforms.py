"""What a plan on a non-CUDA GPU (ROCm) must say: the GPU's caveat on every plan, and no CUDA-only wording.

Pure. The estimators word their notes for CUDA (the platform they were calibrated on); a plan on an AMD
card runs PyTorch on ROCm (HIP), where the same feature has another name or needs another build. The
caveat itself lives with the GPU (``GpuSpec.caveat``, from the catalog build, with its source).
"""

from __future__ import annotations

from advisor.specs import GpuSpec

#: CUDA-specific wording -> the wording that holds on ROCm (HIP)
_ROCM_WORDING = (
    ("CUDA unified memory", "HIP managed memory (ROCm)"),
    ("cudaMallocManaged", "hipMallocManaged"),
    ("CUDA caching allocator", "HIP caching allocator"),
    ("CUDA context", "HIP context"),
    ("CUDA ", "ROCm "),
)


def platform_of(gpu: GpuSpec) -> str:
    """cuda | rocm | cpu (GpuSpec.platform; a GPU file that leaves it out is read by vendor)."""
    if gpu.gpu_class == "cpu":
        return "cpu"
    if gpu.platform and gpu.platform != "cuda":
        return gpu.platform
    return "rocm" if gpu.vendor == "amd" else "cuda"


def platform_notes(gpu: GpuSpec, notes: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The notes of a plan on `gpu`: CUDA-only wording rewritten on a ROCm card, the GPU's caveat added
    (once: the function is idempotent)."""
    out = list(notes)
    if platform_of(gpu) == "rocm":
        for i, n in enumerate(out):
            for cuda, rocm in _ROCM_WORDING:
                n = n.replace(cuda, rocm)
            out[i] = n
    if gpu.caveat and gpu.caveat not in out:
        out.append(gpu.caveat)
    return tuple(out)
