"""Run a trace in a child process, so that a deadline is a hard bound (the child is killed).

The parent imports no torch; the child imports the trace when it starts (spawn). Inside the API every
trace goes through `run_trace`, which takes a slot of the request's bounded pool (advisor.tracepool)
and kills the child at the request's deadline or as soon as its client goes away.
"""

from __future__ import annotations

from collections.abc import Callable

from advisor.plans import TrainingPlan
from advisor.simulated.results import TraceResult
from advisor.tracepool import SimulationCancelled, bounds

#: how often a waiting parent looks at the cancellation flag
POLL_S = 0.2


def run_trace(config: dict, plan: TrainingPlan, targets: list[str], timeout_s: float | None) -> TraceResult:
    """The trace of `plan`: under the current request's bounds when the API set them (pool slot, deadline,
    cancellation; always a child process), else as before (in this process without a timeout)."""
    b = bounds.get()
    if b is None:
        if timeout_s is None:
            from advisor.simulated.trace import trace_step  # torch from here on

            return trace_step(config, plan, targets)
        return trace_in_subprocess(config, plan, targets, timeout_s)
    with b.pool.slot(b.cancel.is_set, max_wait_s=b.left_s()):
        limit = b.left_s() if timeout_s is None else min(timeout_s, b.left_s())
        if limit <= 0:
            raise TimeoutError("the request's simulation deadline passed")
        return trace_in_subprocess(config, plan, targets, limit, cancelled=b.cancel.is_set)


def _trace_worker(config: dict, plan_d: dict, targets: list[str], conn) -> None:
    try:
        from advisor.simulated.trace import trace_step

        res = trace_step(config, TrainingPlan.from_dict(plan_d), targets)
        conn.send(("ok", res.to_dict()))
    except BaseException as exc:  # the parent turns it into a clear error
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def trace_in_subprocess(
    config: dict,
    plan: TrainingPlan,
    targets: list[str],
    timeout_s: float,
    cancelled: Callable[[], bool] = lambda: False,
) -> TraceResult:
    """Run the trace in a child process so a deadline is a hard bound (the child is killed), as is a
    cancellation (`cancelled()` turning true: SimulationCancelled)."""
    import multiprocessing as mp
    import time

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_trace_worker, args=(config, plan.to_dict(), targets, child), daemon=True)
    proc.start()
    child.close()
    try:
        give_up = time.monotonic() + timeout_s
        while not parent.poll(max(0.0, min(POLL_S, give_up - time.monotonic()))):
            if cancelled():
                raise SimulationCancelled("the client went away: the simulation was stopped")
            if time.monotonic() >= give_up:
                raise TimeoutError(f"simulation did not finish within {timeout_s:.0f} s")
        try:
            status, payload = parent.recv()
        except EOFError:  # the child died before answering (killed, out of memory, failed to start)
            proc.join(5)
            raise RuntimeError(f"simulation process ended without a result (exit code {proc.exitcode})") from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
    if status != "ok":
        raise RuntimeError(f"simulation failed: {payload}")
    return TraceResult.from_dict(payload)
