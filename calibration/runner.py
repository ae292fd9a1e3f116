"""Runs a trial design, one child process per trial, and appends each measurement to a JSONL file.

Why this way: a child that runs out of memory, crashes in a native kernel or hangs is recorded as a
measurement (``oom`` / ``error``) and the run goes on; each line is flushed and fsync'ed as it
arrives, so a killed run keeps what it measured, and a re-run in the same directory skips the
trials already there (resume).

Trial processes are forked from a small server interpreter that has imported torch, transformers,
peft and bitsandbytes once (a fresh interpreter pays ~6 s for those imports per trial); the server
never runs a torch op, touches CUDA or starts a thread pool, so each fork starts clean. (Not
multiprocessing: its children re-import the parent's __main__, which breaks under scripts and CLIs.)
The server (and so every trial) gets an allow-listed environment (``trial_env``): the process that
starts a calibration may be the API server, holding API keys and secrets the trials' model code must
not see. A run can be cancelled (``should_stop``): the running trial process is killed at once.

Files in the output directory:
    run.json             device spec, software versions, design, machine load, timings
    measurements.jsonl   one TrialResult per line, in the order they finished
    logs/<trial>.log     each child's stdout and stderr
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from calibration.trial import ERROR, OK, OOM, TrialResult, TrialSpec, child_main, timing_disturbed

MEASUREMENTS = "measurements.jsonl"
RUN_META = "run.json"
PRELOAD = [
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.gpt2.modeling_gpt2",
    "advisor.stack.build",
    "advisor.stack.meters",
    "calibration.trial",
]
#: quiet, offline children: nothing is downloaded, no progress bars in the logs
CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore",
}


#: the server's environment variables a trial process keeps (names, then prefixes); everything else is dropped.
#: Why an allow-list: the API server that starts a calibration holds its API keys, webhook secret, database URL
#: and tokens in its environment, and a trial runs third-party model code that needs none of them
CHILD_ENV_KEEP = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "TEMP",
    "TMP",
    "PYTHONPATH",
    "PYTHONHOME",
    "VIRTUAL_ENV",
    "CONDA_PREFIX",
    "LD_LIBRARY_PATH",
    "LD_PRELOAD",
    "HF_HOME",
    "HF_HUB_CACHE",
    "TRANSFORMERS_CACHE",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
)
CHILD_ENV_KEEP_PREFIXES = (
    *("LC_", "XDG_", "PYTHON", "CONDA_"),  # locale, user dirs, the interpreter's own settings
    *("CUDA_", "NVIDIA_", "PYTORCH_", "TORCH_", "BNB_", "HIP_", "ROCR_", "HSA_"),  # the device and its libraries
    *("OMP_", "KMP_", "GOMP_", "MKL_", "OPENBLAS_", "NVPL_"),  # CPU thread pools and BLAS
)
#: a name like these is dropped even under a kept prefix (a credential is never needed by a trial)
_SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|_KEY$|_KEYS$|^KEY$|AUTH)", re.IGNORECASE)


def trial_env(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    """The environment a trial server (and so every trial process it forks) gets: the allow-listed names of
    `environ`, less anything named like a credential, plus CHILD_ENV's quiet offline defaults and this
    checkout on PYTHONPATH."""
    env = {
        k: v
        for k, v in environ.items()
        if (k in CHILD_ENV_KEEP or k.startswith(CHILD_ENV_KEEP_PREFIXES)) and not _SECRET_NAME.search(k)
    }
    for k, v in CHILD_ENV.items():
        env.setdefault(k, v)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _safe_name(trial_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", trial_id)


class RunCancelled(Exception):
    """The run was cancelled (``run_design``'s `should_stop`): the running trial was killed, no more start."""

    out_dir: Path | None = None  # the run directory (its measurements stay: a later run there resumes)


class TrialServer:
    """A child interpreter that imports the training stack once, then forks one process per trial.

    Protocol (JSON lines): we send {spec_path, result_path, log_path}; it answers {"pid"} at once and
    {"exit": code} when that trial process ends (negative: killed by that signal). We own the trial
    process' pid and kill it on timeout or cancellation. The server never runs a torch op, so forking it is safe.
    """

    #: how often a running trial checks whether its run was cancelled
    POLL_S = 0.2

    def __init__(self, log_path: Path):
        self.current_pid: int | None = None  # the trial process running now
        env = trial_env(os.environ)  # no API keys, secrets or tokens in the trials
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "calibration.runner", "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            text=True,
            bufsize=1,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _read(self, timeout: float | None) -> dict[str, Any] | None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise ConnectionError("trial server exited")
        return json.loads(line)

    def run(
        self,
        spec_path: Path,
        result_path: Path,
        log_path: Path,
        timeout_s: float,
        should_stop: Callable[[], bool] | None = None,
    ) -> tuple[int | None, bool]:
        """Run one trial process; returns (exit code, timed out). `should_stop` is polled every POLL_S while
        the trial runs: once true the trial process is killed and RunCancelled raised."""
        assert self.proc.stdin is not None
        req = {"spec_path": str(spec_path), "result_path": str(result_path), "log_path": str(log_path)}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        started = self._read(120)
        if started is None:
            raise ConnectionError("trial server did not start the trial")
        pid = self.current_pid = int(started["pid"])
        try:
            return self._wait(pid, spec_path, timeout_s, should_stop)
        finally:
            self.current_pid = None

    def _wait(
        self, pid: int, spec_path: Path, timeout_s: float, should_stop: Callable[[], bool] | None
    ) -> tuple[int | None, bool]:
        deadline = time.monotonic() + timeout_s
        done = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            done = self._read(min(left, self.POLL_S) if should_stop is not None else left)
            if done is not None:
                return int(done["exit"]), False
            if should_stop is not None and should_stop():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self._read(60)
                raise RunCancelled(f"cancelled while trial {spec_path.stem.removesuffix('.trial')} ran (killed)")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        done = self._read(60)
        return (int(done["exit"]) if done else None), True

    def close(self) -> None:
        """Stop the server; a trial still running (the run was interrupted) is killed first, not waited for."""
        if self.current_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.current_pid, signal.SIGKILL)
            self.current_pid = None
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def _die_with_parent(sig: int) -> None:
    """Linux: this process gets `sig` when its parent dies (a killed run leaves no orphan trials behind)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def serve() -> None:
    """The server loop (``python -m calibration.runner --serve``)."""
    import importlib

    _die_with_parent(signal.SIGTERM)

    for mod in PRELOAD:
        with contextlib.suppress(Exception):  # a missing optional module only costs its import later
            importlib.import_module(mod)
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the trial process
            code = 1
            _die_with_parent(signal.SIGKILL)
            try:
                fd = os.open(req["log_path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.close(fd)
                sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
                child_main(req["spec_path"], req["result_path"])
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(code)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        out.write(json.dumps({"exit": os.waitstatus_to_exitcode(status)}) + "\n")
        out.flush()


def run_isolated(
    spec: TrialSpec,
    work_dir: Path,
    server: TrialServer | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrialResult:
    """Run one trial in a child process; a crash, a kill or a timeout becomes a failed TrialResult (a
    cancellation raises RunCancelled: the trial measured nothing)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    logs = work_dir / "logs"
    logs.mkdir(exist_ok=True)
    own = server is None
    server = server or TrialServer(logs / "server.log")
    name = _safe_name(spec.id)
    result_path = logs / f"{name}.result.json"
    spec_path = logs / f"{name}.trial.json"
    log_path = logs / f"{name}.log"
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec.to_dict(), indent=1))
    t0 = time.perf_counter()
    try:
        exitcode, timed_out = server.run(spec_path, result_path, log_path, spec.timeout_s, should_stop)
    finally:
        if own:
            server.close()
    wall = time.perf_counter() - t0
    if result_path.exists() and not timed_out:
        data = json.loads(result_path.read_text())
        result_path.unlink()
        return TrialResult(**data)
    status, error = _failure(exitcode, timed_out, spec.timeout_s, log_path)
    return spec.result(status, error=error, wall_s=wall, started_at=time.time() - wall)


def _failure(exitcode: int | None, timed_out: bool, timeout_s: float, log_path: Path) -> tuple[str, str]:
    tail = ""
    if log_path.exists():
        tail = log_path.read_text(errors="replace")[-800:]
    if timed_out:
        return ERROR, f"timeout: no result after {timeout_s:.0f} s (killed)"
    if exitcode is not None and exitcode < 0:
        try:
            sig = signal.Signals(-exitcode).name
        except ValueError:
            sig = str(-exitcode)
        if -exitcode == signal.SIGKILL:
            return OOM, f"child killed by {sig} (the kernel's OOM killer, most likely)\n{tail}"
        return ERROR, f"child died by signal {sig}\n{tail}"
    low = tail.lower()
    if "out of memory" in low or "memoryerror" in low:
        return OOM, f"child exited with code {exitcode}\n{tail}"
    return ERROR, f"child exited with code {exitcode} without a result\n{tail}"


# ---- progress -------------------------------------------------------------------------------------------
class Progress:
    """One status line on a terminal (a line per trial otherwise): done/total, current trial, time left."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True):
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.failed = 0

    def _eta(self) -> str:
        if not self.done:
            return "?"
        left = (time.perf_counter() - self.t0) / self.done * (self.total - self.done)
        return f"{int(left // 60)}:{int(left % 60):02d}"

    def _bar(self, width: int = 24) -> str:
        filled = int(width * self.done / max(1, self.total))
        return "#" * filled + "." * (width - filled)

    def start(self, trial_id: str) -> None:
        if self.enabled and self.tty:
            line = f"\r[{self._bar()}] {self.done}/{self.total} ~{self._eta()} left · running {trial_id}"
            self.stream.write(line[:160].ljust(160))
            self.stream.flush()

    def finish(self, result: TrialResult) -> None:
        self.done += 1
        self.failed += result.status != "ok"
        if not self.enabled:
            return
        what = (
            f"{result.step_time_s * 1000:.0f} ms/step, peak {result.memory['peak_bytes'] / 2**20:.1f} MiB"
            if result.status == "ok" and result.memory and result.step_time_s
            else (result.error or "").splitlines()[0][:80]
        )
        line = f"[{self._bar()}] {self.done}/{self.total} ~{self._eta()} left · {result.status:5} {result.trial_id}: {what}"
        if self.tty:
            self.stream.write("\r" + line[:160].ljust(160) + "\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# ---- the run ---------------------------------------------------------------------------------------------
@dataclass
class RunSummary:
    out_dir: Path
    results: list[TrialResult] = field(default_factory=list)
    skipped: int = 0
    retried: int = 0  # trials measured again because other processes disturbed their timing
    timing_repeats: int = 0  # trials measured again in later timing passes
    wall_s: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            out[r.status] = out.get(r.status, 0) + 1
        return out


def read_measurements(path: str | Path) -> list[dict[str, Any]]:
    """All complete lines of a measurements file (a torn last line from a killed run is skipped)."""
    p = Path(path)
    if p.is_dir():
        p = p / MEASUREMENTS
    out = []
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _end_torn_line(path: Path) -> None:
    """A run killed mid-write leaves a partial last line: end it, so the next record starts on its own line."""
    if path.exists() and path.stat().st_size:
        with path.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_design(
    trials: Iterable[TrialSpec],
    out_dir: str | Path,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    on_result: Callable[[TrialResult, int, int], None] | None = None,
    retry_disturbed: bool = True,
    on_stage: Callable[[str, str | None, int, int], None] | None = None,
    timing_passes: int = 1,
    should_stop: Callable[[], bool] | None = None,
) -> RunSummary:
    """Run every trial not yet in out_dir/measurements.jsonl; return this run's results.

    on_stage(stage, trial id, index, count) is called before each trial; on_result after it.
    `timing_passes` > 1: every trial that succeeded is measured again that many times in all, in later passes
    over the design (their lines are appended; the fit keeps each trial's fastest undisturbed step time).
    `should_stop`: polled before and during each trial; once true the running trial process is killed, run.json
    records the cancellation and RunCancelled is raised (what was measured stays: a later run resumes it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / MEASUREMENTS
    done_ids = {r.get("trial_id") for r in read_measurements(path)}
    _end_torn_line(path)
    cache = out / "weights"
    todo = [t if t.weights_cache else replace(t, weights_cache=str(cache)) for t in trials if t.id not in done_ids]
    summary = RunSummary(out_dir=out, skipped=len(done_ids))
    run_meta = dict(meta or {})
    run_meta.update(started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), load_average_start=load_average())
    run_meta["trials_planned"] = len(todo) + len(done_ids)
    _write_meta(out, run_meta)
    bar = Progress(len(todo), enabled=progress)
    (out / "logs").mkdir(exist_ok=True)
    server: TrialServer | None = None

    def measure(spec: TrialSpec, stage: str, i: int, n: int) -> TrialResult:
        """Run `spec` in the trial server (a fresh one if it died) and append its line."""
        nonlocal server
        if on_stage is not None:
            on_stage(stage, spec.id, i, n)
        if should_stop is not None and should_stop():
            raise RunCancelled(f"cancelled before trial {spec.id}")
        if server is None or not server.alive():
            server = TrialServer(out / "logs" / "server.log")
        result = run_isolated(spec, out, server, should_stop)
        _append(path, result.to_dict())
        return result

    t0 = time.perf_counter()
    try:
        for i, spec in enumerate(todo):
            bar.start(spec.id)
            result = measure(spec, "trials", i, len(todo))
            summary.results.append(result)
            bar.finish(result)
            if on_result is not None:
                on_result(result, i + 1, len(todo))
        if retry_disturbed:
            # once more for the trials whose timing other processes disturbed; the later line wins
            again = {r.trial_id for r in summary.results if r.status == OK and timing_disturbed(r.to_dict())}
            redo = [t for t in todo if t.id in again]
            if redo and progress:
                sys.stderr.write(f"re-measuring {len(redo)} trial(s) whose timing other processes disturbed\n")
            for j, spec in enumerate(redo):
                result = measure(spec, "re-measuring disturbed timings", j, len(redo))
                summary.retried += 1
                summary.results = [result if r.trial_id == spec.id else r for r in summary.results]
        ok_ids = {r.trial_id for r in summary.results if r.status == OK}
        again = [t for t in todo if t.id in ok_ids]
        for k in range(2, timing_passes + 1):
            stage = f"timing pass {k}/{timing_passes}"
            for j, spec in enumerate(again):
                measure(spec, stage, j, len(again))
                summary.timing_repeats += 1
    except RunCancelled as exc:
        _write_meta(out, {"cancelled_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cancelled": str(exc)})
        exc.out_dir = out
        raise
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(cache, ignore_errors=True)  # random weights: large and worthless once measured
    summary.wall_s = time.perf_counter() - t0
    run_meta.update(
        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        load_average_end=load_average(),
        run_wall_s=round(summary.wall_s, 1),
        counts=summary.counts,
        retried_disturbed=summary.retried,
        timing_passes=timing_passes,
    )
    _write_meta(out, run_meta)
    return summary


def update_meta(out: str | Path, meta: dict[str, Any]) -> None:
    """Merge `meta` into out/run.json."""
    _write_meta(Path(out), meta)


def _write_meta(out: Path, meta: dict[str, Any]) -> None:
    previous = {}
    p = out / RUN_META
    if p.exists():
        try:
            previous = json.loads(p.read_text())
        except json.JSONDecodeError:
            previous = {}
    previous.update(meta)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(previous, indent=1, default=str))
    os.replace(tmp, p)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        sys.exit("usage: python -m calibration.runner --serve   (started by run_design)")
