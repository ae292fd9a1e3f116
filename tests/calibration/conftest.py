"""A tiny real calibration on the CPU, run once per test session and shared (about 15 s on 2 cores).

Three configuration groups (Llama-, Qwen2- and GPT-2-shaped, width 32, random-initialised from
real transformers configs), LoRA / QLoRA / full with and without checkpointing, plus two trials made
to fail for real: one whose address space is capped (out of memory while building the model), one
whose sequence is longer than GPT-2's learned position table (an indexing error).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from advisor.plans import TrainingPlan

GROUPS = {
    "llama-h32-l2-v256": ("llama", 32, 2, 256, 16),
    "qwen2-h48-l2-v320": ("qwen2", 48, 2, 320, 16),
    "gpt2-h32-l2-v256": ("gpt2", 32, 2, 256, 16),
    "llama-h64-l3-v128": ("llama", 64, 3, 128, 32),
}
PLANS = [
    dict(method="lora", micro_batch=2, seq_len=32, grad_checkpointing=False, lora_r=4, lora_targets=("q", "v")),
    dict(method="qlora", micro_batch=1, seq_len=64, grad_checkpointing=False, lora_r=8),
    dict(method="lora", micro_batch=1, seq_len=64, grad_checkpointing=True, lora_r=8),
    dict(method="full", micro_batch=2, seq_len=32, grad_checkpointing=True),
    dict(method="qlora", micro_batch=2, seq_len=32, grad_checkpointing=True, lora_r=4, lora_targets=("q", "v")),
]
OOM_ID = "llama-h32-l2-v256/oom-capped"
ERROR_ID = "gpt2-h32-l2-v256/error-seq-beyond-positions"


@dataclass
class TinyRun:
    run_dir: Path
    device: object  # GpuSpec of this CPU
    trials: list
    summary: object
    oom_id: str = OOM_ID
    error_id: str = ERROR_ID


def tiny_trials(device_id: str) -> list:
    from calibration.design import scaled_config
    from calibration.trial import TrialSpec

    out = []
    for group, (fam, h, layers, vocab, head_dim) in GROUPS.items():
        cfg = scaled_config(fam, h, layers, vocab, head_dim)
        for i, kw in enumerate(PLANS):
            plan = TrainingPlan(gpu_id=device_id, dtype="fp32", **kw)
            out.append(
                TrialSpec(
                    id=f"{group}/{i}-{plan.method}",
                    group=group,
                    arch=cfg,
                    plan=plan.to_dict(),
                    threads=1,
                    timed_steps=2,
                    max_timing_s=2.0,
                    timeout_s=120,
                )
            )
    lora = TrainingPlan(gpu_id=device_id, dtype="fp32", method="lora", micro_batch=1, seq_len=32)
    full = TrainingPlan(gpu_id=device_id, dtype="fp32", method="full", micro_batch=1, seq_len=32)
    out.append(
        TrialSpec(
            id=OOM_ID,
            group="llama-h32-l2-v256",
            arch=scaled_config("llama", 256, 2, 8192, 64),  # 4M parameters: 16 MiB of weights, 64 MiB to train
            plan=full.to_dict(),
            threads=1,
            memory_limit_bytes=48 * 2**20,  # room for the interpreter's own needs, not for the training state
            timeout_s=120,
        )
    )
    short = dict(scaled_config("gpt2", 32, 2, 256, 16), n_positions=16)
    out.append(
        TrialSpec(id=ERROR_ID, group="gpt2-h32-l2-v256", arch=short, plan=lora.to_dict(), threads=1, timeout_s=120)
    )
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    from advisor.stack.device import describe, software_versions
    from calibration.runner import run_design

    device, raw = describe("cpu", threads=1)
    trials = tiny_trials(device.id)
    run_dir = tmp_path_factory.mktemp("tiny-calibration")
    meta = {
        "device": device.to_dict(),
        "device_raw": raw,
        "software": software_versions(),
        "budget": "test",
        "threads": 1,
    }
    summary = run_design(trials, run_dir, meta=meta, progress=False, retry_disturbed=False)
    return TinyRun(run_dir=run_dir, device=device, trials=trials, summary=summary)
