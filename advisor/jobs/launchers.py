"""Launchers: where a job's training process runs. The I/O seam between the reconciler and the world.

A launcher starts ``python -m advisor.jobs.train --job-dir DIR`` (under ``accelerate launch`` for
several GPUs), reports whether it still runs, and stops it. It returns a JSON-serialisable *handle*
the store keeps, so a restarted server can find the process again (``adopt``).

- LocalLauncher: one subprocess per job in its own session (a server restart does not kill it),
  GPU slots (``CUDA_VISIBLE_DEVICES``; a job waits in ``queued`` until enough are free), output to
  ``DIR/train.log``, SIGTERM to the process group on cancel, SIGKILL after the grace period. A
  re-adopted process is recognised by pid *and* kernel start time, so a recycled pid is never
  mistaken for our job.
- RayLauncher: a Ray Train ``TorchTrainer`` per job (``advisor.jobs.ray_train``: one worker per GPU of the
  plan, across nodes), submitted through the Ray Jobs REST API (``/api/jobs/``) of a cluster's dashboard;
  our job id is Ray's submission id, Ray's states map back; inputs and outputs go through a
  ``storage_path`` (shared directory or object store) and are mirrored back into the job directory.

Commands are argv lists built from a validated JobSpec. The Ray Jobs API takes one entrypoint
string: it is ``shlex.join`` of an argv list built the same way (every element quoted), never a template.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from advisor.jobs.spec import JOB_ID, JobSpec

LOG = "train.log"
#: quiet, offline training processes unless the job may download
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}

PENDING, RUNNING, EXITED, LOST = "pending", "running", "exited", "lost"


@dataclass(frozen=True)
class ProcessState:
    """What a launcher knows about a job's process. `exit_code` None: unknown (e.g. re-adopted)."""

    state: str  # pending | running | exited | lost
    exit_code: int | None = None
    detail: str = ""


class LaunchError(RuntimeError):
    """The launcher could not start the job (the job fails with code `launcher`)."""


class Launcher(Protocol):
    name: str

    def can_start(self, spec: JobSpec) -> bool: ...

    def start(self, spec: JobSpec, job_dir: Path) -> dict[str, Any]: ...

    def poll(self, handle: dict[str, Any]) -> ProcessState: ...

    def cancel(self, handle: dict[str, Any], force: bool = False) -> None: ...

    def adopt(self, handle: dict[str, Any]) -> None: ...

    def release(self, handle: dict[str, Any]) -> None: ...

    def log_tail(self, handle: dict[str, Any], max_chars: int = 2000) -> str: ...


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_argv(spec: JobSpec, job_dir: Path, python: str = sys.executable, port: int | None = None) -> list[str]:
    """The training command as an argv list; several processes go through `accelerate launch`."""
    tail = ["-m", "advisor.jobs.train", "--job-dir", str(job_dir)]
    n = spec.plan.num_gpus
    if n == 1:
        return [python, *tail]
    argv = [python, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--num_machines", "1"]
    argv += ["--main_process_port", str(port or free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]
    if spec.plan.sharding == "fsdp":
        argv += ["--use_fsdp"]
        for key, value in _fsdp_settings(spec).items():
            argv += [f"--fsdp_{key}", value]
    else:
        argv.append("--multi_gpu")
    return [*argv, *tail]


def accelerate_env(spec: JobSpec) -> dict[str, str]:
    """What ``accelerate launch`` (train_argv's flags) tells each process, as environment variables: a Ray Train
    worker is not started by accelerate, so its Accelerator reads the same settings from here (FSDP and its
    wrapping for fsdp plans; DDP is accelerate's default for a multi-process group)."""
    env = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "no"}
    if spec.plan.num_gpus > 1 and spec.plan.sharding == "fsdp":
        env |= {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}
        env |= {f"FSDP_{key.upper()}": value for key, value in _fsdp_settings(spec).items()}
    return env


def _fsdp_settings(spec: JobSpec) -> dict[str, str]:
    """accelerate's FSDP settings of a job (``--fsdp_<key>`` flags, ``FSDP_<KEY>`` variables): one table for both
    launchers, so a Ray worker gets exactly what ``accelerate launch`` gives a local process.

    FULL_SHARD with the decoder layers as FSDP units; use_orig_params: frozen and trainable parameters may share
    a unit (the HF Trainer also wraps each trainable LoRA leaf on its own, peft's ``fsdp_auto_wrap_policy``, and
    for QLoRA runs FSDP in the 4-bit storage dtype: both are in-process settings, not launch flags).
    cpu_ram_efficient_loading / sync_module_states: ``accelerate launch``'s defaults (rank 0's weights broadcast
    at wrapping; transformers loads the others empty where it can, not for a quantised model) on GPUs; off on a
    CPU, where accelerate's FSDP plugin has no accelerator device to re-initialise modules on and refuses them."""
    on_gpu = "true" if spec.device == "cuda" else "false"
    return {
        "sharding_strategy": "FULL_SHARD",
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "use_orig_params": "true",
        "cpu_ram_efficient_loading": on_gpu,
        "sync_module_states": on_gpu,
    }


def train_env(spec: JobSpec, threads: int | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(QUIET_ENV)
    if not spec.allow_download:
        env.update(OFFLINE_ENV)
    if threads:
        env["ADVISOR_TRAIN_THREADS"] = str(threads)
        env["OMP_NUM_THREADS"] = str(threads)
    if spec.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        if spec.plan.num_gpus > 1:
            env["ACCELERATE_USE_CPU"] = "true"  # accelerate: gloo DDP across CPU processes
    env.update(extra or {})
    return env


# ---- local ------------------------------------------------------------------------------------------
def proc_start_ticks(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


class LocalLauncher:
    """A subprocess per job on this machine, with a fixed set of device slots.

    `slots`: GPU indices ("0", "1", ...) on a GPU machine; on a CPU-only machine, names of process
    slots ("cpu0", ...), so CPU jobs also wait their turn instead of fighting over the cores.
    """

    name = "local"

    def __init__(
        self,
        slots: list[str],
        python: str = sys.executable,
        threads: int | None = None,
        extra_env: dict[str, str] | None = None,
    ):
        if not slots:
            raise ValueError("LocalLauncher needs at least one slot")
        self.slots = list(slots)
        self.busy: dict[str, str] = {}  # slot -> job id
        self.python = python
        self.threads = threads
        self.extra_env = dict(extra_env or {})
        self._procs: dict[int, subprocess.Popen] = {}

    @property
    def gpu(self) -> bool:
        return not self.slots[0].startswith("cpu")

    def free_slots(self) -> list[str]:
        return [s for s in self.slots if s not in self.busy]

    def can_start(self, spec: JobSpec) -> bool:
        return len(self.free_slots()) >= spec.plan.num_gpus

    def fits_at_all(self, spec: JobSpec) -> bool:
        return spec.plan.num_gpus <= len(self.slots)

    def start(self, spec: JobSpec, job_dir: Path) -> dict[str, Any]:
        if not JOB_ID.match(spec.job_id):
            raise LaunchError(f"invalid job id {spec.job_id!r}")
        free = self.free_slots()
        if len(free) < spec.plan.num_gpus:
            raise LaunchError(f"needs {spec.plan.num_gpus} slots, {len(free)} free")
        slots = free[: spec.plan.num_gpus]
        argv = train_argv(spec, job_dir, self.python)
        # the server's own settings (API keys, webhook secret) are not the training process' business
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("ADVISOR_")}
        env = {**inherited, **train_env(spec, self.threads, self.extra_env)}
        if self.gpu:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(slots)
        log_path = job_dir / LOG
        try:
            with log_path.open("ab") as log:
                proc = subprocess.Popen(
                    argv,
                    cwd=job_dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # own process group: survives the server, killed as a group
                    close_fds=True,
                )
        except OSError as exc:
            raise LaunchError(f"cannot start the training process: {exc}") from exc
        self._procs[proc.pid] = proc
        for s in slots:
            self.busy[s] = spec.job_id
        return {
            "launcher": self.name,
            "job_id": spec.job_id,
            "pid": proc.pid,
            "start_ticks": proc_start_ticks(proc.pid),
            "slots": slots,
            "log": str(log_path),
            "argv": argv,
            "started_at": time.time(),
        }

    def poll(self, handle: dict[str, Any]) -> ProcessState:
        pid = int(handle["pid"])
        proc = self._procs.get(pid)
        if proc is not None:
            code = proc.poll()
            if code is None:
                return ProcessState(RUNNING)
            self._procs.pop(pid, None)
            return ProcessState(EXITED, code, _exit_detail(code))
        # not our child (re-adopted after a restart): identify it by pid and start time
        ticks = proc_start_ticks(pid)
        if ticks is None or ticks != handle.get("start_ticks") or proc_state(pid) in ("Z", "X"):
            return ProcessState(EXITED, None, "the process has ended (exit status unknown to this server)")
        return ProcessState(RUNNING)

    def cancel(self, handle: dict[str, Any], force: bool = False) -> None:
        pid = int(handle["pid"])
        if self.poll(handle).state != RUNNING:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL if force else signal.SIGTERM)

    def adopt(self, handle: dict[str, Any]) -> None:
        for s in handle.get("slots", []):
            if s in self.slots:
                self.busy[s] = handle.get("job_id", "adopted")

    def release(self, handle: dict[str, Any]) -> None:
        for s in handle.get("slots", []):
            self.busy.pop(s, None)
        proc = self._procs.pop(int(handle.get("pid", -1)), None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1)

    def log_tail(self, handle: dict[str, Any], max_chars: int = 2000) -> str:
        return _tail(Path(handle.get("log", "")), max_chars)

    def shutdown(self) -> None:
        """Forget children without killing them (they outlive the server by design); reap finished ones."""
        for proc in list(self._procs.values()):
            proc.poll()


def _run_status(handle: dict[str, Any]) -> str | None:
    """How the run of a Ray job ended, from the result.json mirrored into the service's job directory."""
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        return str(json.loads((Path(handle["job_dir"]) / "result.json").read_text()).get("status"))
    return None


def _exit_detail(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _tail(path: Path, max_chars: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_chars))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


# ---- Ray ----------------------------------------------------------------------------------------------
#: Ray job status -> our process state
RAY_STATES = {"PENDING": PENDING, "RUNNING": RUNNING, "STOPPED": EXITED, "SUCCEEDED": EXITED, "FAILED": EXITED}
#: seconds between two mirrorings of one job's files from storage (an object store is not polled 10x a second)
MIRROR_S = 1.0


def ray_train_argv(spec: JobSpec, storage: str, python: str = "python", cpus_per_worker: float = 1.0) -> list[str]:
    """The Ray job's entrypoint: the Ray Train driver of ``advisor.jobs.ray_train`` for this job."""
    return [
        python, "-m", "advisor.jobs.ray_train", "--job-id", spec.job_id, "--storage", storage,
        "--cpus-per-worker", f"{cpus_per_worker:g}",
    ]  # fmt: skip


class RayLauncher:
    """Jobs on a Ray cluster as Ray Train ``TorchTrainer`` runs, submitted through the Ray Jobs REST API of the
    cluster's dashboard (``http://head:8265``); see ``advisor.jobs.ray_train`` for the driver and the workers.

    Why the Jobs API and not a driver in the service: the service holds no Ray connection (a restart of either
    side loses nothing), Ray queues jobs itself (so `can_start` is always true), and stop / status / logs stay
    Ray's. Our job id is Ray's submission id, so a resubmission after a crash adopts the running job
    (a job started again after its run ended, e.g. resumed, is submitted as ``<job id>-<n>``).

    `storage_path`: a directory every node and the service share, or an object-store URI (``s3://bucket/prefix``):
    the launcher puts the job's spec and data files there before submitting, the workers put events, result,
    measurement, checkpoints and output there, and `poll` mirrors them back into the service's job directory
    (where the manager reads them as for a local job). Default: ``<data dir>/ray-storage`` (single machine, or a
    data directory on shared storage). `python` is the interpreter on the cluster's nodes (the advisor package
    must be installed there); a local model directory must exist at the same path on every node.
    `auth_token`: Ray's token authentication (``RAY_AUTH_MODE=token``), sent as the dashboard expects it.
    """

    name = "ray"

    def __init__(
        self,
        address: str,
        python: str = "python",
        threads: int | None = None,
        timeout_s: float = 30.0,
        extra_env: dict[str, str] | None = None,
        client: httpx.Client | None = None,
        storage_path: str | None = None,
        cpus_per_worker: float = 1.0,
        auth_token: str | None = None,
    ):
        if not address.startswith(("http://", "https://")):
            raise ValueError("the Ray address must be the dashboard's http(s):// URL (Jobs API), e.g. http://head:8265")
        if cpus_per_worker <= 0:
            raise ValueError("cpus_per_worker must be positive")
        self.address = address.rstrip("/")
        self.python = python
        self.threads = threads
        self.extra_env = dict(extra_env or {})
        self.storage_path = storage_path
        self.cpus_per_worker = cpus_per_worker
        headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else None
        self.http = client or httpx.Client(base_url=self.address, timeout=timeout_s, headers=headers)
        self._mirrored: dict[str, float] = {}

    def can_start(self, spec: JobSpec) -> bool:
        return True

    def fits_at_all(self, spec: JobSpec) -> bool:
        return True

    def storage_for(self, job_dir: Path) -> str:
        """The storage_path a job uses: the configured one, else ``<data dir>/ray-storage`` (job_dir is
        ``<data dir>/jobs/<id>``)."""
        return self.storage_path or str(job_dir.parent.parent / "ray-storage")

    def start(self, spec: JobSpec, job_dir: Path) -> dict[str, Any]:
        from advisor.jobs import ray_train as rt

        storage = self.storage_for(job_dir)
        job_uri = rt.join(storage, spec.job_id)
        try:  # what the workers need, where they can reach it; no stop request or end of an earlier run
            rt.clear_markers(job_uri)  # (a resumed job: its checkpoints and event log stay, the run continues them)
            rt.put_text(json.dumps(spec.to_dict(), indent=1), rt.join(job_uri, "job.json"))
            rt.put_file(Path(spec.training_file), rt.join(job_uri, rt.INPUTS, "training.jsonl"))
            if spec.validation_file is not None:
                rt.put_file(Path(spec.validation_file), rt.join(job_uri, rt.INPUTS, "validation.jsonl"))
        except (OSError, ValueError) as exc:
            raise LaunchError(f"cannot write the job's inputs to the Ray storage {storage!r}: {exc}") from exc
        argv = ray_train_argv(spec, storage, self.python, self.cpus_per_worker)
        body: dict[str, Any] = {
            "entrypoint": shlex.join(argv),
            "submission_id": spec.job_id,
            "runtime_env": {"env_vars": {**accelerate_env(spec), **train_env(spec, self.threads, self.extra_env)}},
            "metadata": {"advisor_job_id": spec.job_id, "model": spec.model[:200]},
            # the driver only waits on the trainer: it takes no CPU a training worker could use
            "entrypoint_num_cpus": 0,
        }
        submission = self._submit(body, spec.job_id)
        return {
            "launcher": self.name,
            "submission_id": submission,
            "address": self.address,
            "storage": job_uri,
            "job_dir": str(job_dir),
            "log": str(job_dir / LOG),
            "argv": argv,
            "started_at": time.time(),
        }

    def _submit(self, body: dict[str, Any], job_id: str) -> str:
        """Submit under our job id; where Ray already has it: adopt it while it is active (a resubmission after
        a service crash), else (a resumed job: the earlier run ended) submit as ``<job id>-<n>``."""
        for attempt in range(1, 100):
            sid = job_id if attempt == 1 else f"{job_id}-{attempt}"
            try:
                r = self.http.post("/api/jobs/", json={**body, "submission_id": sid})
            except httpx.HTTPError as exc:
                raise LaunchError(f"Ray Jobs API at {self.address} unreachable: {exc}") from exc
            if r.status_code < 400:
                return sid
            if "already exists" not in r.text:
                raise LaunchError(f"Ray refused the job: HTTP {r.status_code}: {r.text[:500]}")
            try:
                info = self._info({"submission_id": sid})
            except httpx.HTTPError as exc:
                raise LaunchError(f"Ray Jobs API at {self.address} unreachable: {exc}") from exc
            if info is not None and RAY_STATES.get(str(info.get("status", "")).upper()) != EXITED:
                return sid
        raise LaunchError(f"Ray holds 99 ended submissions of {job_id}")

    def _info(self, handle: dict[str, Any]) -> dict[str, Any] | None:
        r = self.http.get(f"/api/jobs/{handle['submission_id']}")
        if r.status_code == 404:
            return None
        r.raise_for_status()
        return r.json()

    def mirror(self, handle: dict[str, Any], final: bool = False) -> None:
        """Copy the job's events (and, once it ended, result, measurement and output) from storage into the
        service's job directory, where the manager reads them. At most every MIRROR_S unless final."""
        from advisor.jobs import ray_train as rt
        from advisor.jobs.train import OUTPUT

        job_uri, job_dir = handle.get("storage"), handle.get("job_dir")
        if not job_uri or not job_dir:
            return  # a handle of the former single-entrypoint launcher: its job dir was the shared one
        key = handle["submission_id"]
        now = time.monotonic()
        if not final and now - self._mirrored.get(key, 0.0) < MIRROR_S:
            return
        self._mirrored[key] = now
        names = rt.MIRRORED if final else rt.MIRRORED[:1]
        with contextlib.suppress(OSError, ValueError):
            for name in names:
                rt.get_file(rt.join(job_uri, name), Path(job_dir) / name)
            if final:
                rt.get_dir(rt.join(job_uri, OUTPUT), Path(job_dir) / OUTPUT)

    def poll(self, handle: dict[str, Any]) -> ProcessState:
        try:
            info = self._info(handle)
        except httpx.HTTPError as exc:  # the cluster may be briefly away: not an end of the job
            return ProcessState(RUNNING, None, f"Ray unreachable: {exc}")
        if info is None:
            self.mirror(handle, final=True)
            return ProcessState(LOST, None, "Ray does not know this job (cluster restarted?)")
        status = str(info.get("status", "")).upper()
        state = RAY_STATES.get(status, RUNNING)
        self.mirror(handle, final=state == EXITED)
        code = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": -int(signal.SIGTERM)}.get(status)
        detail = f"Ray {status}" + (f": {info.get('message')}" if info.get("message") else "")
        if status == "SUCCEEDED":  # the driver exits 0 on a cancel or pause honoured: the run's own code
            ended = _run_status(handle)
            if ended in ("cancelled", "paused"):
                from advisor.jobs.train import EXIT_CANCELLED, EXIT_PAUSED

                code = EXIT_PAUSED if ended == "paused" else EXIT_CANCELLED
                detail += f" (the run ended {ended})"
        return ProcessState(state, code if state == EXITED else None, detail)

    def cancel(self, handle: dict[str, Any], force: bool = False) -> None:
        """Graceful: a `cancel` file in storage (the workers stop together and write a cancelled result);
        forced (after the grace period), or for a handle without storage: Ray's job stop."""
        from advisor.jobs.ray_train import CANCEL

        if force or not self._mark(handle, CANCEL, "cancel requested\n"):
            self._ray_stop(handle)

    def pause(self, handle: dict[str, Any]) -> None:
        """A `pause` file in storage: every rank creates its run's PAUSE file, they stop together after a step,
        checkpoint, and rank 0 uploads the checkpoints and a `paused` result; the driver then exits 0 and `poll`
        reports the run's EXIT_PAUSED (no Ray stop). A handle without storage (the former launcher, whose training
        process shared the service's job directory and sees its PAUSE file), or storage that cannot be written:
        Ray's job stop, a SIGTERM (in the second case the run ends without a `paused` result: the job fails)."""
        from advisor.jobs.ray_train import PAUSE_MARKER

        if not self._mark(handle, PAUSE_MARKER, "pause requested\n"):
            self._ray_stop(handle)

    @staticmethod
    def _mark(handle: dict[str, Any], marker: str, text: str) -> bool:
        """Write a stop request (`marker`) under the job's storage prefix, which its workers watch; False where
        the handle has no storage or the file cannot be written."""
        job_uri = handle.get("storage")
        if not job_uri:
            return False
        from advisor.jobs import ray_train as rt

        try:
            rt.put_text(text, rt.join(job_uri, marker))
        except (OSError, ValueError):
            return False
        return True

    def _ray_stop(self, handle: dict[str, Any]) -> None:
        """Ray's job stop (a SIGTERM to the driver, then a kill): the forced path."""
        with contextlib.suppress(httpx.HTTPError):
            self.http.post(f"/api/jobs/{handle['submission_id']}/stop")

    def adopt(self, handle: dict[str, Any]) -> None:
        return None

    def release(self, handle: dict[str, Any]) -> None:
        self._mirrored.pop(str(handle.get("submission_id")), None)

    def log_tail(self, handle: dict[str, Any], max_chars: int = 2000) -> str:
        try:
            r = self.http.get(f"/api/jobs/{handle['submission_id']}/logs")
            if r.status_code == 200:
                return str(r.json().get("logs", ""))[-max_chars:]
        except (httpx.HTTPError, ValueError):
            pass
        return _tail(Path(handle.get("log", "")), max_chars)

    def shutdown(self) -> None:
        self.http.close()
