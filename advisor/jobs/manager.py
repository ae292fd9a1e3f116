"""The reconciler: moves every job from ``validating_files`` to a terminal state, and survives restarts.

Why a reconciler and not callbacks: the API only *records* intent (a new job, a cancel request) in
the store; one loop compares that with the world (files on disk, training processes, their event
files) and acts. Any number of API workers can write, one process reconciles (a file lock elects
it), and after a restart the loop simply finds the jobs where they were:

- ``running``/``cancelling`` jobs are re-adopted: a process that still runs is followed again (its
  events file is read on from the stored offset), one that ended is finished from its result.json,
  one that vanished without a result fails with code ``lost``;
- ``queued`` and ``validating_files`` jobs go on as if nothing happened;
- a ``paused`` job waits, without a process, until resumed (back to ``queued``; its run resumes from its
  last checkpoint).

How a process ended is reported as what it was: our cancel -> ``cancelled``; a SIGTERM from outside ->
failed ``terminated``; a SIGKILL -> ``killed``, or ``oom`` only where the cgroup's oom_kill counter
rose while it ran; a full disk -> ``output``. A job that trained a step has its measurement even when
its process could not write one (rebuilt from the step metrics it logged).

Each terminal job adds its measurement (calibration's record shape) to
``<data_dir>/measurements/jobs.jsonl`` and, when configured, a signed webhook delivery.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

from advisor.jobs import store as S
from advisor.jobs.config import JobsConfig
from advisor.jobs.errors import JobsError
from advisor.jobs.files import check_file
from advisor.jobs.launchers import EXITED, LOST, Launcher, LaunchError, LocalLauncher, RayLauncher
from advisor.jobs.leases import RECONCILER, Leases, default_replica_id, replica_lease
from advisor.jobs.measure import measurement_from_events
from advisor.jobs.spec import JobSpec, new_id
from advisor.jobs.train import CHECKPOINTS, EVENTS, MEASUREMENT, OUTPUT, PAUSE, RESULT
from advisor.jobs.webhooks import WebhookSender

log = logging.getLogger("advisor.jobs")
MAX_EVENT_BYTES = 4 << 20  # read at most this much of an events file per tick
PAUSED = S.PAUSED
ERROR_LOG_EVERY_S = 300.0  # the same reconciler error is logged again at most this often


def oom_kill_count() -> int | None:
    """The kernel's OOM kills in this process' memory cgroup (v2 memory.events, v1 memory.oom_control),
    which a locally launched training process shares; None where no counter is readable."""
    candidates: list[Path] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                candidates.append(Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.events")
            elif "memory" in controllers.split(","):
                candidates.append(Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.oom_control")
    candidates.append(Path("/sys/fs/cgroup/memory/memory.oom_control"))  # a container's own v1 view
    for path in candidates:
        with contextlib.suppress(OSError, ValueError):
            for line in path.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    return None


def make_launcher(cfg: JobsConfig) -> Launcher:
    if cfg.launcher == "ray":
        if not cfg.ray_address:
            raise ValueError("ADVISOR_JOB_LAUNCHER=ray needs ADVISOR_RAY_ADDRESS (the dashboard URL)")
        return RayLauncher(
            cfg.ray_address,
            python=cfg.ray_python,
            threads=cfg.train_threads,
            storage_path=cfg.ray_storage_path,
            auth_token=cfg.ray_auth_token,
        )
    return LocalLauncher(cfg.slots, python=cfg.train_python or sys.executable, threads=cfg.train_threads)


def append_measurement(path: Path, record: dict[str, Any]) -> None:
    """One line per job, flushed and fsync'ed (calibration's measurements.jsonl convention).

    Idempotent per job (a record whose `trial_id` is already there is not written again), so a finish
    retried after a failed write never duplicates one; a failed write (a full disk) is cut back to the
    file's previous end, so no half line is left, and the OSError is raised for the caller to retry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record)
    trial = record.get("trial_id")
    with path.open("a+") as f:
        if trial is not None:
            f.seek(0)
            key = json.dumps({"trial_id": trial})[1:-1]  # '"trial_id": "<id>"' as json.dumps writes it
            if any(key in existing for existing in f):
                return
        f.seek(0, os.SEEK_END)
        start = f.tell()
        try:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                f.truncate(start)
            raise


class JobManager:
    """Owns the reconciler thread (when this process holds the lock) and the webhook sender."""

    def __init__(
        self,
        cfg: JobsConfig,
        store: S.Store,
        launcher: Launcher | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.cfg = cfg
        self.store = store
        self.launcher = launcher or make_launcher(cfg)
        self.clock = clock
        self.webhooks = (
            WebhookSender(store, cfg.webhook_url, cfg.webhook_secret, backoff_scale=cfg.webhook_backoff_scale)
            if cfg.webhook_url
            else None
        )
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # leases in the job database (advisor.jobs.leases): this replica's liveness and the reconciler role
        self.leases = Leases(store, cfg.replica_id or default_replica_id(), cfg.lease_s)
        self._renewed_at = 0.0
        self._lead_lock = threading.Lock()  # the lease thread and the reconciler loop both call _try_lead
        self.leader = False
        self.started = False
        self.last_error: str | None = None
        self._logged_error: tuple[str, float] | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Create tables and directories, take the reconciler lock if free, recover, start threads."""
        if self.started:
            return
        self.store.create()
        for d in (self.cfg.files_dir, self.cfg.jobs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._stop.clear()
        self._try_lead()
        self._threads = [
            threading.Thread(target=self._loop, name="advisor-jobs-reconciler", daemon=True),
            threading.Thread(target=self._lease_loop, name="advisor-jobs-leases", daemon=True),
        ]
        if self.webhooks is not None:
            self._threads.append(threading.Thread(target=self._webhook_loop, name="advisor-webhooks", daemon=True))
        for t in self._threads:
            t.start()
        self.started = True

    def stop(self) -> None:
        """Stop the threads; training processes keep running (a restarted server re-adopts them)."""
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(30)
        self._threads = []
        shutdown = getattr(self.launcher, "shutdown", None)
        if shutdown is not None:
            shutdown()
        with contextlib.suppress(Exception):  # a graceful stop hands the role over at once
            if self.leader:
                self.leases.release(RECONCILER)
            self.leases.release(replica_lease(self.leases.replica_id))
        self.leader = False
        self.started = False

    def wake(self) -> None:
        self._wake.set()

    def _try_lead(self) -> bool:
        """Hold the `reconciler` lease in the job database (renewed every lease_s / 3); on winning it,
        take over what other replicas owned (``recover``). A leader that fails to renew steps down."""
        with self._lead_lock:
            now = time.time()
            if self.leader and now - self._renewed_at < self.leases.lease_s / 3:
                return True
            try:
                self.leases.acquire(replica_lease(self.leases.replica_id))
                held = self.leases.acquire(RECONCILER)
            except Exception as exc:  # database unreachable: hold on until the lease would have expired
                log.warning("lease renewal failed: %s", exc)
                held = self.leader and now - self._renewed_at < self.leases.lease_s
                if not held:
                    self.leader = False
                return held
            if held:
                self._renewed_at = now
            if held and not self.leader:
                log.info("replica %s reconciles the jobs", self.leases.replica_id)
                self.recover()  # before `leader` is set: no tick runs alongside the takeover
                self.leader = True
            elif not held and self.leader:
                self.leader = False
                log.warning("replica %s lost the reconciler lease: another replica reconciles", self.leases.replica_id)
            return held

    def _lease_loop(self) -> None:
        """Renew the leases every lease_s / 3 on a thread of their own: a long tick (many launches, a slow
        disk) must not let the lease lapse."""
        while not self._stop.wait(self.leases.lease_s / 3):
            self._try_lead()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._try_lead():  # renews the lease (throttled to lease_s / 3), or steps down
                try:
                    self.tick()
                    if self.last_error is not None:
                        log.warning("reconciler recovered after: %s", self.last_error)
                    self.last_error = self._logged_error = None
                except Exception as exc:  # a bad row or a full disk must not end the loop
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    # once per distinct error (and every few minutes while it lasts), not every tick
                    now = time.monotonic()
                    if self._logged_error is None or (
                        self._logged_error[0] != self.last_error or now - self._logged_error[1] > ERROR_LOG_EVERY_S
                    ):
                        log.exception("reconciler tick failed (retried every tick, logged once)")
                        self._logged_error = (self.last_error, now)
            self._wake.wait(self.cfg.poll_interval_s)
            self._wake.clear()

    def _webhook_loop(self) -> None:
        assert self.webhooks is not None
        while not self._stop.is_set():
            if self.leader:
                try:
                    self.webhooks.send_due()
                except Exception:
                    log.exception("webhook delivery failed")
            self._stop.wait(max(0.05, min(1.0, self.cfg.webhook_backoff_scale)))

    # ---- recovery -------------------------------------------------------------------------------------
    def recover(self) -> None:
        """On becoming the reconciler (a start, or a dead replica's lease expired): take over the running
        jobs of other replicas (``_take_over``); the next tick finishes the ones that ended."""
        for job in self.leases.orphans():
            try:
                self._take_over(job)
            except Exception:  # a full disk or a bad row must not stop the takeover of the others
                log.exception("taking over job %s failed: the next tick follows it on", job.get("id"))

    def _take_over(self, job: dict[str, Any]) -> None:
        """Own `job` (a conditional update: one taker) and re-attach to its process.

        A job claimed but never launched is queued again. A Ray job is re-attached wherever it runs. A
        local process is re-adopted when it runs on this host (same pid and start time: replicas sharing
        a data directory on one host, or this server restarted); a local process on another host cannot
        be followed from here, so the job fails with code ``replica_lost`` instead of staying running."""
        if not self.leases.take_over(job):
            return
        me, prev = self.leases.replica_id, job.get("owner_replica")
        who = f"replica {prev} on {job.get('owner_host')}" if prev else "the server"
        handle = job.get("handle")
        if not handle:  # claimed but never launched (the server died in between): launch again
            self.store.update_job(job["id"], expect=[S.RUNNING], status=S.QUEUED)
            self.event(job["id"], f"{who} stopped before the job was launched: queued again")
            return
        local = handle.get("launcher") == "local"
        if local and job.get("owner_host") not in (None, self.leases.host):
            self.finish(
                job,
                S.FAILED,
                {
                    "code": "replica_lost",
                    "message": f"{who} stopped renewing its lease; its local training process cannot be followed "
                    f"from replica {me} on {self.leases.host} (use the Ray launcher for replicas on several hosts)",
                },
            )
            return
        self.launcher.adopt(handle)
        state = self.launcher.poll(handle)
        self.event(
            job["id"],
            f"Taken over by replica {me} ({who} stopped): "
            + (
                f"re-attached to the running training process ({_where(handle)})"
                if state.state not in (EXITED, LOST)
                else "the training process ended while nobody followed it"
            ),
        )

    # ---- the tick ---------------------------------------------------------------------------------------
    def tick(self) -> None:
        self._validate()
        self._cancel()
        self._pause()
        self._follow()
        self._schedule()

    def _validate(self) -> None:
        for job in self.store.jobs_with_status([S.VALIDATING]):
            spec = JobSpec.from_dict(job["spec"])
            self.event(job["id"], f"Validating training file: {job['training_file']}")
            try:
                for fid, path in (
                    (job["training_file"], spec.training_file),
                    (job["validation_file"], spec.validation_file),
                ):
                    if fid is None or path is None:
                        continue
                    if self.store.get_file(fid) is None or not Path(path).is_file():
                        raise JobsError(f"file {fid} was deleted before the job started", field="training_file")
                    check_file(path, self.cfg.max_file_bytes, self.cfg.max_file_examples)
            except (JobsError, OSError) as exc:
                self.finish(job, S.FAILED, {"code": "data", "message": str(exc), "param": "training_file"})
                continue
            if self.store.update_job(job["id"], expect=[S.VALIDATING], status=S.QUEUED):
                self.event(job["id"], "Files validated, moving job to queued state")

    def _cancel(self) -> None:
        for job in self.store.jobs_with_status([S.CANCELLING]):
            handle = job.get("handle")
            if not handle:
                continue  # launched this very moment; the next tick has the handle
            sent = handle.get("cancel_sent_at")
            now = self.clock()
            if sent is None:
                self.launcher.cancel(handle)
                handle = {**handle, "cancel_sent_at": now}
                self.store.update_job(job["id"], handle=handle)
                self.event(job["id"], "Cancelling: SIGTERM sent to the training process", level="warn")
            elif now - sent > self.cfg.cancel_grace_s and not handle.get("killed"):
                self.launcher.cancel(handle, force=True)
                self.store.update_job(job["id"], handle={**handle, "killed": True})
                self.event(
                    job["id"], f"Still running {self.cfg.cancel_grace_s:g} s after SIGTERM: SIGKILL sent", level="warn"
                )

    def _pause(self) -> None:
        """A pause request (JobService.pause: the job's `pause` file and handle["pause_requested"]): SIGTERM,
        on which the run checkpoints and ends `paused` (SIGKILL after the grace period, like a cancel)."""
        for job in self.store.jobs_with_status([S.RUNNING]):
            handle = job.get("handle") or {}
            if not handle.get("pause_requested"):
                continue
            sent, now = handle.get("pause_sent_at"), self.clock()
            if sent is None:
                # a launcher with its own pause (Ray: a `pause` file in storage, as the job dir's is not the
                # workers'); the local one: SIGTERM, read with the job dir's PAUSE file as "checkpoint and pause"
                pause = getattr(self.launcher, "pause", None)
                (pause or self.launcher.cancel)(handle)
                self.store.update_job(job["id"], expect=[S.RUNNING], handle={**handle, "pause_sent_at": now})
                self.event(job["id"], "Pausing: the run checkpoints, then stops")
            elif now - sent > self.cfg.cancel_grace_s + 60 and not handle.get("killed"):
                self.launcher.cancel(handle, force=True)
                self.store.update_job(job["id"], handle={**handle, "killed": True})
                self.event(job["id"], "Still running long after the pause request: SIGKILL sent", level="warn")

    def _follow(self) -> None:
        for job in self.store.jobs_with_status([S.RUNNING, S.CANCELLING]):
            handle = job.get("handle")
            if not handle:
                continue
            self.ingest(job)
            state = self.launcher.poll(handle)
            if state.state in (EXITED, LOST):
                job = self.store.get_job(job["id"]) or job
                self.ingest(job)  # the last lines written before the exit
                self._finish_from_process(self.store.get_job(job["id"]) or job, state)

    def _schedule(self) -> None:
        for job in self.store.jobs_with_status([S.QUEUED]):
            if job["cancel_requested"]:
                continue
            spec = JobSpec.from_dict(job["spec"])
            fits = getattr(self.launcher, "fits_at_all", None)
            if fits is not None and not fits(spec):
                n = len(getattr(self.launcher, "slots", []))
                self.finish(
                    job,
                    S.FAILED,
                    {"code": "launcher", "message": f"needs {spec.plan.num_gpus} devices; this deployment has {n}"},
                )
                continue
            if not self.launcher.can_start(spec):
                continue  # waits in `queued` until its devices are free
            if not self.store.claim_job(job["id"], self.leases.replica_id, self.leases.host, self.clock()):
                continue
            job_dir = self.cfg.jobs_dir / job["id"]
            try:
                job_dir.mkdir(parents=True, exist_ok=True)
                for stale in (RESULT, MEASUREMENT, PAUSE):
                    (job_dir / stale).unlink(missing_ok=True)
                (job_dir / "job.json").write_text(json.dumps(spec.to_dict(), indent=1))
                oom_kills = oom_kill_count()
                handle = self.launcher.start(spec, job_dir)
                handle = {**handle, "oom_kills_at_start": oom_kills}
            except (LaunchError, OSError) as exc:
                self.finish(self.store.get_job(job["id"]) or job, S.FAILED, {"code": "launcher", "message": str(exc)})
                continue
            self.store.update_job(job["id"], handle=handle)
            self.event(job["id"], f"Fine-tuning job started ({_where(handle)})", data={"launcher": handle["launcher"]})

    # ---- events ----------------------------------------------------------------------------------------
    def event(self, job_id: str, message: str, level: str = "info", type_: str = "message", data: Any = None) -> None:
        self.store.add_events(
            job_id, [{"id": new_id("ftevent"), "level": level, "type": type_, "message": message, "data": data}]
        )

    def ingest(self, job: dict[str, Any]) -> int:
        """Read new complete lines of the job's events.jsonl into the store; returns how many."""
        path = self.cfg.jobs_dir / job["id"] / EVENTS
        offset = int(job.get("events_offset") or 0)
        try:
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read(MAX_EVENT_BYTES)
        except FileNotFoundError:
            return 0
        end = chunk.rfind(b"\n")
        if end < 0:
            return 0
        items: list[dict[str, Any]] = []
        saved: list[dict[str, Any]] = []  # checkpoint lines: recorded once the events are (below)
        progress = dict(job.get("progress") or {})
        for raw in chunk[: end + 1].splitlines():
            try:
                doc = json.loads(raw)
            except json.JSONDecodeError:
                continue
            data = doc.get("data") or None
            kind = doc.get("type", "message")
            items.append(
                {
                    "id": new_id("ftevent"),
                    "created_at": int(doc.get("ts") or self.clock()),
                    "level": doc.get("level", "info"),
                    "type": kind if kind in ("message", "metrics") else "message",
                    "message": str(doc.get("message", ""))[:4000],
                    "data": data,
                }
            )
            if kind == "metrics" and data:
                progress.update({k: data.get(k) for k in _PROGRESS_KEYS if k in data})
            elif kind == "checkpoint" and data:
                saved.append(data)
        if not self.store.add_events(
            job["id"], items, offset=offset + end + 1, job_values={"progress": progress or None}, expect_offset=offset
        ):
            return 0  # another replica ingested these lines first (a takeover in flight)
        for data in saved:
            self._checkpoint(job, data)
        return len(items)

    def _checkpoint(self, job: dict[str, Any], data: dict[str, Any]) -> None:
        """A checkpoint event -> its row (and the rows of the checkpoints the run rotated out).

        The run names its checkpoints by paths in its own job directory, which is not the service's where the run
        trained elsewhere (a Ray worker's node-local scratch directory, another each run after a pause): a row is
        stored where the service finds the checkpoint (the job's storage prefix for a Ray job, else its job
        directory) and rotated rows are matched by the checkpoint's name, which every run of a job shares."""
        removed = {PurePath(str(p)).name for p in data.get("removed") or []}
        if removed:
            rows, _ = self.store.list_checkpoints(job["id"], limit=1000)
            self.store.delete_checkpoints([r["id"] for r in rows if PurePath(r["path"]).name in removed])
        self.store.add_checkpoint(
            {
                "id": new_id("ftckpt"),
                "job_id": job["id"],
                "step": int(data.get("step") or 0),
                "metrics": data.get("metrics"),
                "path": self.checkpoint_location(job, PurePath(str(data.get("path"))).name),
            }
        )

    def checkpoint_location(self, job: dict[str, Any], name: str) -> str:
        """Where the service reaches checkpoint `name` of `job`: under the Ray job's storage prefix (the workers
        upload their checkpoints there), else in the job's directory."""
        storage = (job.get("handle") or {}).get("storage")
        if storage:
            return f"{str(storage).rstrip('/')}/{CHECKPOINTS}/{name}"
        return str(self.checkpoints_dir(job["id"]) / name)

    # ---- the end of a job --------------------------------------------------------------------------------
    def _finish_from_process(self, job: dict[str, Any], state: Any) -> None:
        job_dir = self.cfg.jobs_dir / job["id"]
        result: dict[str, Any] | None = None
        with contextlib.suppress(OSError, json.JSONDecodeError):
            result = json.loads((job_dir / RESULT).read_text())
        handle = job.get("handle") or {}
        pausing = bool(handle.get("pause_requested")) and not job["cancel_requested"]
        if pausing and (result or {}).get("status") in ("paused", "cancelled"):
            self._paused(job, result)
            return
        if result is not None:
            status = result.get("status", S.FAILED)
            error = result.get("error")
            if status == S.CANCELLED and not job["cancel_requested"]:  # a SIGTERM that was not our cancel
                status, error = S.FAILED, {"code": "terminated", "message": _TERMINATED}
        elif job["cancel_requested"]:
            status, error = S.CANCELLED, None
        elif state.state == LOST:
            status, error = S.FAILED, {"code": "lost", "message": state.detail}
        elif state.exit_code == -9:
            status, error = S.FAILED, _sigkill_error(handle, self.launcher.log_tail(handle, 800))
        elif state.exit_code == -15:
            tail = self.launcher.log_tail(handle, 800)
            status, error = S.FAILED, {"code": "terminated", "message": f"{_TERMINATED}\n{tail}"}
        else:
            tail = self.launcher.log_tail(handle, 800)
            status, error = (
                S.FAILED,
                {"code": "crashed", "message": f"the training process ended without a result ({state.detail})\n{tail}"},
            )
        if job["cancel_requested"] and status != S.SUCCEEDED:
            status, error = S.CANCELLED, {"code": "cancelled", "message": "cancelled by request"}
        self.finish(job, status, error, result)

    def _paused(self, job: dict[str, Any], result: dict[str, Any] | None) -> None:
        """The run checkpointed and stopped on a pause request: `paused`, without a process."""
        handle = job.get("handle") or {}
        if not self.store.update_job(job["id"], expect=[S.RUNNING], status=PAUSED):
            return
        self.launcher.release(handle)
        (self.cfg.jobs_dir / job["id"] / PAUSE).unlink(missing_ok=True)
        step = ((job.get("progress") or {}).get("step")) or 0
        self.event(job["id"], f"The job was paused at step {step}; resume continues from its last checkpoint")

    def finish(
        self,
        job: dict[str, Any],
        status: str,
        error: dict[str, Any] | None,
        result: dict[str, Any] | None = None,
        expect: tuple[str, ...] = S.ACTIVE,
    ) -> bool:
        """Move a job to a terminal state (once: a conditional update); events, measurement, webhook.

        The measurement is appended first: on a full disk the OSError leaves the job where it was, and the
        next tick finishes it once space returns (append_measurement is idempotent per job), so no
        measurement is lost to a terminal state recorded without it."""
        spec = JobSpec.from_dict(job["spec"])
        record_path = self.cfg.jobs_dir / job["id"] / MEASUREMENT
        record: dict[str, Any] | None = None
        with contextlib.suppress(OSError, json.JSONDecodeError):
            record = json.loads(record_path.read_text())
        if record is None:  # killed, crashed or out of disk before it could write one: from its step metrics
            rows, _ = self.store.list_events(job["id"], limit=100_000, order="asc")
            record = measurement_from_events(spec, rows, status, error, started_at=job.get("started_at"))
            if record is not None:
                with contextlib.suppress(OSError):
                    record_path.write_text(json.dumps(record))
        if record is not None:
            append_measurement(self.cfg.measurements_path, record)
        measured = dict((result or {}).get("measured") or {}) or None
        if measured and job.get("estimate"):
            measured["vs_estimate"] = _compare(job["estimate"], measured)
        values: dict[str, Any] = {
            "status": status,
            "finished_at": int(self.clock()),
            "error": ({"param": None, **error} if error else None),
            "measured": measured,
            "trained_tokens": (result or {}).get("trained_tokens"),
        }
        if status == S.SUCCEEDED:
            values["fine_tuned_model"] = spec.fine_tuned_model
            values["result_files"] = self._result_files(job)
        if not self.store.update_job(job["id"], expect=expect, **values):
            return False  # someone else finished it, or it moved on
        if job.get("handle"):
            self.launcher.release(job["handle"])
        messages = {
            S.SUCCEEDED: [
                f"New fine-tuned model created: {spec.fine_tuned_model}",
                "The job has successfully completed",
            ],
            S.CANCELLED: ["The job was cancelled"],
            S.FAILED: [f"The job failed ({(error or {}).get('code')}): {str((error or {}).get('message', ''))[:1000]}"],
        }[status]
        for m in messages:
            self.event(job["id"], m, level="error" if status == S.FAILED else "info")
        if self.webhooks is not None:
            self.webhooks.enqueue(self.store.get_job(job["id"]) or {**job, **values})
        return True

    def _result_files(self, job: dict[str, Any]) -> list[str]:
        """OpenAI's result file: per-step metrics as CSV, registered as a `fine-tune-results` file."""
        rows, _ = self.store.list_events(job["id"], limit=100_000, order="asc")
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["step", "train_loss", "valid_loss", "learning_rate", "tokens_per_s", "peak_memory_gib"])
        n = 0
        for e in rows:
            d = e.get("data") or {}
            if e["type"] == "metrics" and "step" in d:
                w.writerow(
                    [
                        d.get("step"),
                        d.get("train_loss"),
                        d.get("full_valid_loss", ""),
                        d.get("learning_rate"),
                        d.get("tokens_per_s"),
                        d.get("peak_memory_gib"),
                    ]
                )
                n += 1
        blob = buf.getvalue().encode()
        fid = new_id("file")
        path = self.cfg.jobs_dir / job["id"] / "step_metrics.csv"
        path.write_bytes(blob)
        self.store.add_file(
            {
                "id": fid,
                "owner": job["owner"],
                "filename": "step_metrics.csv",
                "purpose": "fine-tune-results",
                "bytes": len(blob),
                "examples": n,
                "format": "csv",
                "sha256": hashlib.sha256(blob).hexdigest(),
                "path": str(path),
            }
        )
        return [fid]

    def output_dir(self, job_id: str) -> Path:
        return self.cfg.jobs_dir / job_id / OUTPUT

    def checkpoints_dir(self, job_id: str) -> Path:
        return self.cfg.jobs_dir / job_id / CHECKPOINTS


_PROGRESS_KEYS = (
    "step",
    "total_steps",
    "epoch",
    "train_loss",
    "tokens_per_s",
    "peak_memory_gib",
    "elapsed_s",
    "step_time_s",
)


_TERMINATED = "the training process was stopped by a SIGTERM from outside the service (not a cancel request)"


def _sigkill_error(handle: dict[str, Any], tail: str) -> dict[str, str]:
    """SIGKILL: `oom` only where the cgroup's oom_kill counter rose while the job ran, else `killed`."""
    before, now = handle.get("oom_kills_at_start"), oom_kill_count()
    if before is not None and now is not None and now > before:
        return {
            "code": "oom",
            "message": f"killed by the kernel's OOM killer (cgroup oom_kill {before} -> {now})\n{tail}",
        }
    why = (
        "the cgroup's oom_kill counter did not change: not the OOM killer"
        if before is not None and now is not None
        else "no OOM-kill counter is readable here: whether the OOM killer did it is unknown"
    )
    return {"code": "killed", "message": f"killed by SIGKILL ({why})\n{tail}"}


def _where(handle: dict[str, Any]) -> str:
    if handle.get("launcher") == "ray":
        return f"Ray submission {handle.get('submission_id')}"
    slots = ",".join(handle.get("slots", []))
    return f"pid {handle.get('pid')}, slots {slots}"


def _compare(estimate: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    """Measured / predicted, where both exist."""
    out: dict[str, Any] = {}
    for key, est_key in (
        ("peak_memory_gib", "allocated_peak_gib"),
        ("tokens_per_s", "tokens_per_s"),
        ("step_time_s", "step_time_s"),
    ):
        m, e = measured.get(key), estimate.get(est_key)
        if isinstance(m, (int, float)) and isinstance(e, (int, float)) and e:
            out[f"{key}_ratio"] = round(m / e, 4)
    if measured.get("memory_meter", "").startswith("cpu"):
        out["note"] = "CPU peak is the process RSS (interpreter and libraries included), not tensor bytes"
    return out
