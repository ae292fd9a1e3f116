"""One calibration trial: a short real fine-tune of one architecture under one plan, measured.

Why a separate process per trial: an out-of-memory error or a crash in a native kernel must become a
measurement (``status: oom | error``), not the end of the calibration run. The runner starts each
trial in a fresh child process (see ``runner.py``); this module is what that child runs, top to
bottom like a recipe:

1. build the model and optimiser with ``advisor.stack.build`` (the code real jobs use);
2. warm-up steps (optimiser states appear, kernels and caches warm);
3. memory: the peak over one steady-state step (CUDA allocator statistics, or the live-tensor
   meter on the CPU, which is left off while timing because it slows every op);
4. time: ``timed_steps`` steps, synchronised on CUDA, median step time (more steps, up to 4x, while
   the last ones disagree by more than 25%: other processes sharing a CPU make single steps slow); a
   single-threaded CPU trial is timed by its process CPU time, and the minimum of that window is kept.

    python -m calibration.trial trial.json result.json     # run one trial by hand
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from advisor.stack.outcomes import ERROR, OK, OOM, TrialResult, classify

__all__ = [
    "ERROR",
    "OK",
    "OOM",
    "TrialResult",
    "TrialSpec",
    "child_main",
    "classify",
    "run_trial",
    "timing_disturbed",
]

QUIET_SPREAD = 1.25
#: a step time measured while other processes took more than this share of the CPU, or whose quiet
#: window still spread more than MAX_SPREAD, describes the neighbours rather than the device
MAX_CONTENTION = 0.25
MAX_SPREAD = 1.5


@dataclass(frozen=True)
class TrialSpec:
    """What to run: an architecture (HF config dict), a plan (TrainingPlan dict) and how to measure."""

    id: str
    group: str  # the configuration group (architecture) for leave-one-group-out validation
    arch: dict[str, Any]  # HF config.json-style dict with model_type
    plan: dict[str, Any]  # advisor.plans.TrainingPlan.to_dict()
    device: str = "cpu"  # "cpu" or "cuda[:i]"
    warmup_steps: int = 1
    timed_steps: int = 3
    threads: int | None = None  # torch intra-op threads on the CPU (None: torch's default)
    seed: int = 0
    # CPU: caps the child's address space to this many bytes beyond what it holds when the trial
    # starts; CUDA: caps the caching allocator (set_per_process_memory_fraction). How to run a trial
    # "on a smaller device", and how tests provoke a real out-of-memory.
    memory_limit_bytes: int | None = None
    timeout_s: float = 600.0
    max_timing_s: float = 20.0  # stop looking for a quiet window of steps after this long
    weights_cache: str | None = None  # QLoRA: directory for the random checkpoints it loads (one per group)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialSpec:
        return cls(**d)

    def result(self, status: str, **kw: Any) -> TrialResult:
        """A result of this trial: what it ran, `status` and the measured fields in `kw`."""
        return TrialResult(
            trial_id=self.id, group=self.group, status=status, arch=self.arch, plan=self.plan, device=self.device, **kw
        )


def timing_disturbed(result: dict[str, Any]) -> bool:
    """True when a measured step time is not usable (see MAX_CONTENTION, MAX_SPREAD); process CPU time
    (single-threaded CPU trials) is not stretched by neighbours, so only its spread counts."""
    contention = result.get("cpu_contention")
    if result.get("step_time_meter") == "process_cpu_time":
        contention = None
    spread = result.get("timing_spread")
    return (contention is not None and contention > MAX_CONTENTION) or (spread is not None and spread > MAX_SPREAD)


def _limit_address_space(extra_bytes: int) -> None:
    """Soft limit only, so that the trial can lift it again to report its own out-of-memory."""
    with open("/proc/self/statm") as f:
        vm_now = int(f.read().split()[0]) * resource.getpagesize()
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm_now + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def _lift_address_space_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


def run_trial(spec: TrialSpec) -> TrialResult:
    """Run one trial in this process and return what was measured (never raises for trial failures)."""
    t_start = time.perf_counter()
    res = spec.result(ERROR, started_at=time.time())
    try:
        _measure(spec, res)
        res.status = OK
    except BaseException as exc:  # OOM, crashes in Python-level code, bad configs: all are measurements
        if isinstance(exc, KeyboardInterrupt):
            raise
        if spec.memory_limit_bytes is not None and not spec.device.startswith("cuda"):
            _lift_address_space_limit()
        res.status = classify(exc)
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        res.error = f"{type(exc).__name__}: {str(exc)[:500]}\n" + "".join(tb[-3:])[-1500:]
    res.wall_s = time.perf_counter() - t_start
    return res


def _measure(spec: TrialSpec, res: TrialResult) -> None:
    import torch

    from advisor.methods import get_method
    from advisor.plans import TrainingPlan
    from advisor.stack import meters
    from advisor.stack.build import build

    if spec.threads:
        torch.set_num_threads(spec.threads)
    res.threads = torch.get_num_threads()
    device = torch.device(spec.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    plan = TrainingPlan.from_dict(spec.plan)
    if spec.memory_limit_bytes is not None:
        if cuda:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, spec.memory_limit_bytes / total), device)
        else:
            _limit_address_space(spec.memory_limit_bytes)
    rss_baseline = meters.rss_now_bytes()
    gen = torch.Generator().manual_seed(spec.seed)

    # 1. build (under the CPU meter, so every weight and quantisation constant is counted)
    source = (
        _cached_weights(spec, plan, device) if get_method(plan.method).quantized and spec.weights_cache else spec.arch
    )
    meter = None if cuda else meters.LiveTensorMeter()
    t0 = time.perf_counter()
    if meter is not None:
        with meter:
            built = build(source, plan, device, seed=spec.seed)
        meter.track_module(built.model)
    else:
        built = build(source, plan, device, seed=spec.seed)
    res.build_s = time.perf_counter() - t0
    res.trainable_params = built.trainable_params
    res.lora_modules = list(built.lora_modules)
    batch = built.random_batch(gen)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    # 2. warm-up, 3. memory
    if meter is not None:
        with meter:
            built.train_step(batch)  # optimiser states are created here, under the meter
            meter.track_optimizer(built.optimizer)
            meter.reset_peak()
            built.train_step(batch)  # the steady-state step whose peak is measured
        for _ in range(max(0, spec.warmup_steps - 1)):
            built.train_step(batch)
    else:
        for _ in range(max(1, spec.warmup_steps)):
            built.train_step(batch)
        meters.cuda_reset(device)

    # 4. time: steps until the last `timed_steps` agree within 25% (other processes sharing the
    # cores make single steps slow), at most 4x timed_steps or max_timing_s; the median of that window.
    # A single-threaded CPU trial is timed by the CPU time its process spent per step: without idle
    # waits that is the wall time it takes on an idle machine, and neighbours cannot stretch it.
    cpu_clock = not cuda and torch.get_num_threads() == 1
    res.step_time_meter = "process_cpu_time" if cpu_clock else ("cuda_synchronized_wall" if cuda else "wall")
    times: list[float] = []
    walls: list[float] = []
    loss = 0.0
    window = max(1, spec.timed_steps)
    contention = meters.CpuContention()
    for _ in range(4 * window):
        sync()
        t, c = time.perf_counter(), time.process_time()
        loss = built.train_step(batch)
        sync()
        walls.append(time.perf_counter() - t)
        times.append(time.process_time() - c if cpu_clock else walls[-1])
        last = times[-window:]
        if len(times) >= window and (max(last) <= QUIET_SPREAD * min(last) or sum(walls) > spec.max_timing_s):
            break
    last = times[-window:]
    reading = meters.cuda_reading(device, rss_baseline) if cuda else meters.cpu_reading(meter, rss_baseline)
    res.memory = reading.to_dict()
    res.step_times_s = [round(t, 6) for t in times]
    res.step_wall_times_s = [round(t, 6) for t in walls]
    # process CPU time can only be inflated by neighbours (cache and memory-bandwidth contention), never
    # deflated: its minimum over the quiet window is the least disturbed figure; wall clocks keep the median
    res.step_time_s = (min(last) if cpu_clock else statistics.median(last)) if last else None
    res.timing_spread = round(max(last) / min(last), 3) if last else None
    others = contention.stolen_fraction(torch.get_num_threads())
    res.cpu_contention = None if others is None else round(others, 3)
    res.warmup_steps = spec.warmup_steps
    res.timed_steps = len(times)
    res.loss = float(loss)
    if not torch.isfinite(torch.tensor(res.loss)):
        raise FloatingPointError(f"loss is {res.loss}: the trial diverged")


def _cached_weights(spec: TrialSpec, plan, device) -> Path:
    """QLoRA loads through from_pretrained: one random checkpoint per architecture and dtype, reused."""
    from advisor.stack.build import TORCH_DTYPES, load_config, save_random_model

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.group)
    path = Path(spec.weights_cache) / f"{safe}-{plan.dtype}"
    if not (path / "config.json").exists():
        tmp = path.with_name(path.name + ".partial")
        save_random_model(load_config(spec.arch), tmp, spec.seed, TORCH_DTYPES[plan.dtype], device)
        os.replace(tmp, path)
    return path


def child_main(spec_path: str, result_path: str) -> None:
    """Entry point of the trial process: read the spec, run it, write the result atomically."""
    spec = TrialSpec.from_dict(json.loads(Path(spec_path).read_text()))
    result = run_trial(spec)
    tmp = Path(result_path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result.to_dict()))
    os.replace(tmp, result_path)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m calibration.trial TRIAL.json RESULT.json")
    child_main(sys.argv[1], sys.argv[2])
