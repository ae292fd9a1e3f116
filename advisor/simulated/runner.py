"""Run a trace in a child process, so that a deadline is a hard bound (the child is killed).

The parent imports no torch; the child imports the trace when it starts (spawn).
"""

from __future__ import annotations

from advisor.plans import TrainingPlan
from advisor.simulated.results import TraceResult


def _trace_worker(config: dict, plan_d: dict, targets: list[str], conn) -> None:
    try:
        from advisor.simulated.trace import trace_step

        res = trace_step(config, TrainingPlan.from_dict(plan_d), targets)
        conn.send(("ok", res.to_dict()))
    except BaseException as exc:  # the parent turns it into a clear error
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def trace_in_subprocess(config: dict, plan: TrainingPlan, targets: list[str], timeout_s: float) -> TraceResult:
    """Run the trace in a child process so a deadline is a hard bound (the child is killed)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_trace_worker, args=(config, plan.to_dict(), targets, child), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout_s):
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
