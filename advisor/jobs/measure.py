"""What a job's training process measures (``advisor.jobs.train``, from its Trainer callback): step times and memory peaks, written
as result.json's ``measured`` and as measurement.json (a calibration record, advisor.stack.outcomes.TrialResult).

Memory is measured the way calibration trials measure it, so a finished job can join a calibration fit
(``calibration.feedback``): the second optimiser step (the first steady-state one) is measured on its
own, after a reset that follows the first. On the CPU both steps run under the live-tensor meter
(``advisor.stack.meters.LiveTensorMeter``, slower: that step is left out of the median step time);
on CUDA the allocator's peak statistics are reset after the first step. ``measured["memory_meters"]``
names every meter (CPU: live tensors and the process RSS; CUDA: allocated and reserved), and a
single-threaded CPU job times its steps by process CPU time, like the trials.

torch is imported inside functions only (the job manager imports train.py, which imports this, at module level).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from advisor.jobs.spec import JobSpec
from advisor.stack.outcomes import CPU_LIVE_METER, CPU_RSS_METER, CUDA_ALLOCATED_METER, CUDA_RESERVED_METER


class JobMeter:
    """One run's measurements: the step times on two clocks and the memory peaks of the steady-state step.
    `device` is set once the run has one (None until then: a run that failed before has no memory readings)."""

    def __init__(self, world: int = 1):
        self.world = world
        self.device: Any = None
        self.step_times: list[float] = []  # on the step-time meter's clock (``step_time_meter``)
        self.step_walls: list[float] = []  # the same steps on the wall clock
        self.metered_steps: set[int] = set()  # indices of steps run under the (slow) live-tensor meter
        self.step_time_meter: str | None = None
        self.threads: int | None = None
        self.live_peak: int | None = None  # CPU: live tensor bytes, peak of the steady-state step
        self.cuda_steady: dict[str, int] = {}  # CUDA: allocated / reserved peaks of the steady-state step
        self._cuda_before: tuple[int, int] = (0, 0)  # CUDA: whole-run peaks up to that step's reset

    def record_step(self, index: int, step_time: float, wall: float, metered: bool) -> None:
        """Step `index` (0-based) took `step_time` on the step-time meter's clock, `wall` on the wall clock."""
        if metered:
            self.metered_steps.add(index)
        self.step_times.append(step_time)
        self.step_walls.append(wall)

    def live_meter(self, model: Any) -> Any:
        """CPU, one process: a live-tensor meter holding `model` (calibration.trial's meter).
        None elsewhere (CUDA has the allocator's statistics; DDP replicas are not what trials measure)."""
        if self.device.type != "cpu" or self.world > 1:
            return None
        from advisor.stack.meters import LiveTensorMeter

        meter = LiveTensorMeter()
        meter.track_module(model)
        return meter

    def after_step(self, step: int, optimizer: Any, live: Any) -> Any:
        """After the first step (`step` counts the steps done): optimiser states tracked and the peak reset
        (CPU), the allocator's peak statistics reset (CUDA). After the second: its peaks kept, the CPU meter
        dropped (returns the meter still in use, or None)."""
        if step == 1:
            if live is not None:
                live.track_optimizer(getattr(optimizer, "optimizer", optimizer))  # accelerate wraps it
                live.reset_peak()
            elif self.device.type == "cuda":
                from advisor.stack.meters import cuda_reset

                self._cuda_before = self.cuda_peaks()
                cuda_reset(self.device)
            return live
        if step == 2:
            if live is not None:
                self.live_peak = int(live.peak_bytes)
            elif self.device.type == "cuda":
                import torch

                torch.cuda.synchronize(self.device)
                self.cuda_steady = {
                    CUDA_ALLOCATED_METER: int(torch.cuda.max_memory_allocated(self.device)),
                    CUDA_RESERVED_METER: int(torch.cuda.max_memory_reserved(self.device)),
                }
            return None
        return live

    def cuda_peaks(self) -> tuple[int, int]:
        """(allocated, reserved) peaks of the whole run, across the reset after the first step."""
        import torch

        return (
            max(self._cuda_before[0], int(torch.cuda.max_memory_allocated(self.device))),
            max(self._cuda_before[1], int(torch.cuda.max_memory_reserved(self.device))),
        )

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return self.cuda_peaks()[0]
        from advisor.stack.outcomes import rss_peak_bytes

        return rss_peak_bytes()

    def memory_meters(self) -> dict[str, int]:
        """meter name -> peak bytes: the steady-state step's readings where it ran (the trials' meters),
        and on the CPU the process' peak RSS (whole run)."""
        if self.device is None:
            return {}
        if self.device.type == "cuda":
            return dict(self.cuda_steady)
        from advisor.stack.outcomes import rss_peak_bytes

        out = {CPU_RSS_METER: rss_peak_bytes()}
        if self.live_peak is not None:
            out[CPU_LIVE_METER] = self.live_peak
        return out

    def steady_times(self) -> list[float]:
        """Step times the median is taken from: after the first step, without the metered one (slower),
        unless nothing else is left."""
        unmetered = [t for i, t in enumerate(self.step_times) if i >= 1 and i not in self.metered_steps]
        return unmetered or self.step_times[1:] or self.step_times

    def measured(
        self,
        *,
        spec_device: str,
        steps: int,
        total_steps: int,
        losses: list[float],
        trained_tokens: int,
        build_s: float | None,
        t0: float,
    ) -> dict[str, Any]:
        """result.json's ``measured``."""
        steady = self.steady_times()
        step_time = statistics.median(steady) if steady else None
        tokens_per_step = trained_tokens / steps if steps else 0
        peak = self.peak_bytes() if self.device is not None else None
        return {
            "steps": steps,
            "total_steps": total_steps,
            "step_time_s": step_time,
            "tokens_per_s": tokens_per_step / step_time if step_time else None,
            "peak_memory_gib": peak / 2**30 if peak is not None else None,
            "memory_meter": (CUDA_ALLOCATED_METER if spec_device == "cuda" else CPU_RSS_METER),
            "memory_meters": self.memory_meters(),
            "step_time_meter": self.step_time_meter,
            "threads": self.threads,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "trained_tokens": trained_tokens,
            "build_s": build_s,
            "wall_s": time.time() - t0,
        }


def _trial_status(status: str, error: dict[str, Any] | None) -> str:
    """A job's end as a calibration trial's status: anything but `failed` measured fine; a failure is an
    out-of-memory trial only when coded `oom`."""
    from advisor.stack.outcomes import ERROR, OK, OOM

    if status != "failed":
        return OK
    return OOM if (error or {}).get("code") == "oom" else ERROR


def measurement_record(
    meter: JobMeter,
    spec: JobSpec,
    *,
    status: str,
    error: dict[str, Any] | None,
    measured: dict[str, Any],
    arch: dict[str, Any],
    build_s: float | None,
    trainable_params: int | None,
    lora_modules: list[str],
    t0: float,
) -> dict[str, Any]:
    """The run as a calibration record (measurement.json): TrialResult.to_dict(). Needs `meter.device`."""
    import torch

    from advisor.stack.outcomes import MemoryReading, rss_peak_bytes

    device = meter.device
    cuda = device.type == "cuda"
    # the trials' meter where the steady-state step was measured: CUDA allocated, CPU live tensors
    if cuda:
        name = CUDA_ALLOCATED_METER
        peak, reserved = meter.cuda_peaks()
        if meter.cuda_steady:
            peak, reserved = meter.cuda_steady[CUDA_ALLOCATED_METER], meter.cuda_steady[CUDA_RESERVED_METER]
    elif meter.live_peak is not None:
        name, peak, reserved = CPU_LIVE_METER, meter.live_peak, None
    else:  # no steady-state step (e.g. out of memory in the first): the process RSS
        name, peak, reserved = CPU_RSS_METER, rss_peak_bytes(), None
    reading = MemoryReading(
        meter=name,
        peak_bytes=peak,
        reserved_bytes=reserved,
        device_total_bytes=None,
        device_total_meter=None,
        rss_peak_bytes=rss_peak_bytes(),
        rss_baseline_bytes=0,
    )
    return _record(
        spec,
        status,
        error,
        arch=arch,
        device=f"{device.type}" + (f":{torch.cuda.get_device_name(device)}" if cuda else ""),
        memory=reading,
        step_times=meter.step_times,
        step_walls=meter.step_walls,
        step_time_s=measured["step_time_s"],
        step_time_meter=meter.step_time_meter,
        threads=torch.get_num_threads(),
        build_s=build_s,
        wall_s=measured["wall_s"],
        trainable_params=trainable_params,
        lora_modules=lora_modules,
        loss=measured["final_loss"],
        started_at=t0,
    )


def measurement_from_events(
    spec: JobSpec,
    events: list[dict[str, Any]],
    status: str,
    error: dict[str, Any] | None,
    started_at: float | None = None,
) -> dict[str, Any] | None:
    """The measurement of a run whose process could not write one (SIGKILL, a crash, a full disk), rebuilt
    by the manager from the per-step metrics events it logged; None when it trained no step. Memory is the
    process' peak (the run's last logged `peak_memory_gib`: RSS on the CPU, allocated on CUDA), step times
    are wall-clock, so the record says which meters those were."""
    import json
    from pathlib import Path

    from advisor.stack.outcomes import MemoryReading

    steps = [e["data"] for e in events if e.get("type") == "metrics" and (e.get("data") or {}).get("step")]
    if not steps:
        return None
    times = [float(d["step_time_s"]) for d in steps if isinstance(d.get("step_time_s"), (int, float))]
    steady = times[1:] or times
    peak = max((float(d.get("peak_memory_gib") or 0.0) for d in steps), default=0.0)
    arch: dict[str, Any] = {}
    if spec.source.kind == "local":
        try:
            arch = json.loads((Path(spec.source.ref) / "config.json").read_text())
        except (OSError, ValueError):
            arch = {}
    cuda = spec.device == "cuda"
    reading = MemoryReading(
        meter=CUDA_ALLOCATED_METER if cuda else CPU_RSS_METER,
        peak_bytes=int(peak * 2**30),
        reserved_bytes=None,
        device_total_bytes=None,
        device_total_meter=None,
        rss_peak_bytes=0 if cuda else int(peak * 2**30),
        rss_baseline_bytes=0,
    )
    last = steps[-1]
    return _record(
        spec,
        status,
        error,
        arch=arch,
        device=spec.device,
        memory=reading,
        step_times=times,
        step_walls=times,
        step_time_s=statistics.median(steady) if steady else None,
        step_time_meter="wall",
        threads=None,
        wall_s=float(last["elapsed_s"]) if isinstance(last.get("elapsed_s"), (int, float)) else None,
        loss=float(last["train_loss"]) if isinstance(last.get("train_loss"), (int, float)) else None,
        started_at=started_at,
    )


def _record(
    spec: JobSpec,
    status: str,
    error: dict[str, Any] | None,
    *,
    memory: Any,
    step_times: list[float],
    step_walls: list[float],
    **measured: Any,
) -> dict[str, Any]:
    """A job's run as a calibration record (TrialResult.to_dict()): what the spec, the end state and the step
    times say the same way whether the run wrote it or the manager rebuilt it, plus the `measured` fields."""
    from advisor.stack.outcomes import TrialResult

    return TrialResult(
        trial_id=spec.job_id,
        group=spec.model,
        status=_trial_status(status, error),
        plan=spec.plan.to_dict(),
        error=None if error is None else f"{error.get('code')}: {error.get('message')}",
        memory=memory.to_dict(),
        step_times_s=[round(t, 6) for t in step_times[:1000]],
        step_wall_times_s=[round(t, 6) for t in step_walls[:1000]],
        warmup_steps=1 if len(step_times) > 1 else 0,  # the first step is the warm-up, as in the trials
        timed_steps=max(0, len(step_times) - 1),
        **measured,
    ).to_dict()
