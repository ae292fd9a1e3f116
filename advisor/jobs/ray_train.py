"""The Ray Train side of a job: the driver the Ray Jobs API runs, and the loop each Ray Train worker runs.

``python -m advisor.jobs.ray_train --job-id ID --storage URI`` is the entrypoint ``RayLauncher`` submits
through Ray's job submission API. Why a submitted driver and not a ``TorchTrainer.fit()`` in the service:
the service then holds no Ray driver (a service restart, upgrade or crash does not kill the training, and the
service needs no ``ray.init`` connection to the cluster's GCS, only the dashboard's HTTP API), Ray queues
and schedules the job itself, and ``stop`` / status / logs are Ray's job API, which survives the service.

The driver builds a ``TorchTrainer`` over the job's plan: ``ScalingConfig(num_workers = plan.num_gpus,
use_gpu = device is cuda, resources_per_worker)``, ``TorchConfig(backend = nccl on GPUs, gloo on CPUs)`` and
``RunConfig(name = job id, storage_path = URI)``, so Ray Train's run state lives under the same storage
prefix as ours. Each worker runs ``advisor.jobs.train.Run(spec, job_dir).run()``, the same code the local
launcher runs, with ``torch.distributed`` already initialised by Ray Train (RANK / WORLD_SIZE / LOCAL_RANK
set).

Storage layout under ``<storage>/<job id>/`` (a shared directory or any URI pyarrow's filesystems read:
``s3://``, ``gs://``, ``hdfs://``, ``file://``), the one place both the service and every node reach:

    job.json, inputs/training.jsonl, inputs/validation.jsonl    written by the launcher before submission
    events.jsonl                                                  rank 0, re-uploaded every SYNC_S while it runs
    result.json, measurement.json, output/, checkpoints/          rank 0, at the end (whatever the end)
    workers/rank-N.json                                           where each rank ran (node id and IP, pid)
    cancel                                                        the launcher's stop request (graceful)
    pause, pause-acks/rank-N                                      the launcher's pause request; each rank's
                                                                  acknowledgement (its local PAUSE file made)

Workers train in a node-local scratch directory and upload; the launcher mirrors events / result /
measurement / output back into the service's job directory, where the manager reads them as for a local job.
Cancel: the launcher writes ``cancel``; rank 0's watcher sets the run's stop flag, every rank leaves at the
same step (the run's step callback all-reduces it), rank 0 writes and uploads a ``cancelled`` result. Ray's job
stop is only the forced path.

Pause: the launcher writes ``pause``; every rank's watcher creates the run's PAUSE file in its scratch directory
and acknowledges under ``pause-acks/``; once every rank has, rank 0's watcher sets the stop flag. The ranks leave
at the same step, all of them with PAUSE present, so all take the checkpoint together (a collective under
DDP/FSDP: a rank without PAUSE would leave while the others save, and hang them). Rank 0 uploads the
checkpoints and a ``paused`` result; the driver exits 0 (a pause honoured is no failure of the Ray job) and the
manager ends the job ``paused`` from the result. A resume is a new Ray job (``<job id>-<n>``): the launcher
clears the markers and the stale result first (``clear_markers``), every worker downloads ``checkpoints/`` and
``Run`` resumes from the last complete checkpoint in it; rank 0 continues the event log it downloads.

Ray and pyarrow are imported inside functions: the launcher imports this module's storage helpers in the
service, which needs neither torch nor a Ray driver.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

#: seconds between uploads of the event log while a run trains
SYNC_S = 1.0
INPUTS = "inputs"
WORKERS = "workers"
CANCEL = "cancel"
#: the launcher's pause request (next to `cancel`), and the directory where each rank acknowledges it
PAUSE_MARKER = "pause"
PAUSE_ACKS = "pause-acks"
#: files the launcher mirrors back from storage (the output directory separately, once the job ended)
MIRRORED = ("events.jsonl", "result.json", "measurement.json")


# ---- storage (service and workers) -------------------------------------------------------------------
def _fs(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for a local path or a filesystem URI."""
    from pyarrow import fs

    if "://" not in uri:
        return fs.LocalFileSystem(), os.path.abspath(uri)
    return fs.FileSystem.from_uri(uri)


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def put_file(local: Path, uri: str) -> None:
    """Copy a local file to `uri` (parents created), written whole: a reader never sees half a file."""
    from pyarrow import fs as pafs

    fs, path = _fs(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.part"
    pafs.copy_files(str(local), tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    fs.move(tmp, path)


def put_dir(local: Path, uri: str) -> None:
    from pyarrow import fs as pafs

    if not local.is_dir():
        return
    fs, path = _fs(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def get_file(uri: str, local: Path) -> bool:
    """Copy `uri` to a local file (atomically); False when it does not exist."""
    from pyarrow import fs as pafs

    fs, path = _fs(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(local.name + ".part")
    pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    os.replace(tmp, local)
    return True


def get_dir(uri: str, local: Path) -> bool:
    from pyarrow import fs as pafs

    fs, path = _fs(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return False
    local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return True


def sync_dir(local: Path, uri: str) -> None:
    """Make the directory at `uri` a copy of `local`: copy everything, then delete the top-level entries
    `local` no longer has (checkpoints the run rotated out). The directory is otherwise opaque: whatever names
    the run gives its checkpoints, storage ends up holding exactly them."""
    from pyarrow import fs as pafs

    if not local.is_dir():
        return
    put_dir(local, uri)
    fs, path = _fs(uri)
    keep = {p.name for p in local.iterdir()}
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.base_name in keep or info.base_name.endswith(".part"):
            continue
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(info.path)


def remove_dir(uri: str) -> None:
    """Delete the directory at `uri` and everything in it, if it is there."""
    from pyarrow import fs as pafs

    fs, path = _fs(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def exists(uri: str) -> bool:
    from pyarrow import fs as pafs

    fs, path = _fs(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def remove(uri: str) -> None:
    """Delete a file at `uri` if it is there (a previous run's result or stop request)."""
    from pyarrow import fs as pafs

    fs, path = _fs(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def put_text(text: str, uri: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f"
        p.write_text(text)
        put_file(p, uri)


def clear_markers(job_uri: str) -> None:
    """Before a run of the job is submitted: no stop or pause request, acknowledgement or result of an earlier
    run (a resumed job would otherwise stop at once, or be read as ended before it started). The event log and
    checkpoints stay: the new run continues them."""
    for name in (CANCEL, PAUSE_MARKER, *MIRRORED[1:]):
        remove(join(job_uri, name))
    remove_dir(join(job_uri, PAUSE_ACKS))


def check_storage(uri: str) -> None:
    """Raise ValueError when `uri` names no filesystem pyarrow can open (checked when the service starts)."""
    try:
        _fs(uri)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError / ValueError by scheme
        raise ValueError(f"ray_storage_path {uri!r}: {exc}") from exc


# ---- the worker loop ---------------------------------------------------------------------------------
def _watch(
    run: Any, job_dir: Path, job_uri: str, local_events: Path | None, done: threading.Event, rank: int, world: int
) -> None:
    """Each rank's companion thread. Rank 0 uploads the event log as it grows and turns a `cancel` file into a
    stop. A `pause` file: every rank creates the run's PAUSE file (``Run._pause_requested``) and acknowledges;
    rank 0 sets the stop flag once all `world` ranks have, so every rank leaves at the same step knowing it is a
    pause (a cancel that comes during a pause waits for the same acknowledgements)."""
    from advisor.jobs.train import PAUSE

    sent, acked = -1, False
    while not done.wait(SYNC_S):
        if local_events is not None:
            with contextlib.suppress(OSError):
                size = local_events.stat().st_size
                if size != sent:
                    put_file(local_events, join(job_uri, "events.jsonl"))
                    sent = size
        with contextlib.suppress(OSError, ValueError):
            pausing = acked or exists(join(job_uri, PAUSE_MARKER))
            if pausing and not acked:
                (job_dir / PAUSE).touch()  # before the ack: a stop never reaches a rank that lacks it
                put_text(f"rank {rank} pausing\n", join(job_uri, PAUSE_ACKS, f"rank-{rank}"))
                acked = True
            if rank != 0:
                continue
            if pausing:
                if all(exists(join(job_uri, PAUSE_ACKS, f"rank-{r}")) for r in range(world)):
                    run.stop_requested = True  # Run: finish the step, checkpoint, end `paused`
            elif exists(join(job_uri, CANCEL)):
                run.stop_requested = True  # all-reduced at each step end by the run: every rank leaves at the same step


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: fetch the inputs, run the job's training code, rank 0 uploads what it wrote."""
    import ray.train

    from advisor.jobs.spec import JobSpec
    from advisor.jobs.train import CHECKPOINTS, EVENTS, OUTPUT, Run

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    job_uri = config["job_uri"]
    spec = JobSpec.from_dict(config["spec"])
    where = {
        "rank": rank,
        "local_rank": ctx.get_local_rank(),
        "node_rank": ctx.get_node_rank(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "pid": os.getpid(),
    }
    put_text(json.dumps(where), join(job_uri, WORKERS, f"rank-{rank}.json"))  # where each rank ran
    scratch = Path(tempfile.mkdtemp(prefix=f"{spec.job_id}-rank{rank}-"))
    try:
        train_file = scratch / INPUTS / "training.jsonl"
        get_file(join(job_uri, INPUTS, "training.jsonl"), train_file)
        valid_file = None
        if spec.validation_file is not None:
            valid_file = scratch / INPUTS / "validation.jsonl"
            get_file(join(job_uri, INPUTS, "validation.jsonl"), valid_file)
        spec = replace(spec, training_file=str(train_file), validation_file=str(valid_file) if valid_file else None)
        # a resumed job (after a pause or a crash) continues from the checkpoints the last run put in storage
        get_dir(join(job_uri, CHECKPOINTS), scratch / CHECKPOINTS)
        if rank == 0:  # the event log grows across runs of one job (the service reads it by offset); fetched
            get_file(join(job_uri, EVENTS), scratch / EVENTS)  # before Run opens it for appending
        run = Run(spec, scratch)
        done = threading.Event()
        events = None
        if rank == 0:
            events = scratch / EVENTS
            events.touch()
        args = (run, scratch, job_uri, events, done, rank, ctx.get_world_size())
        watcher = threading.Thread(target=_watch, args=args, daemon=True)
        watcher.start()
        try:
            code = run.run()
        finally:
            done.set()
            watcher.join(SYNC_S * 5)
            if rank == 0:  # the end state, whatever it was: the service learns it from these files
                put_dir(scratch / OUTPUT, join(job_uri, OUTPUT))
                # whole (whatever the run names its checkpoints), and before the result: a `paused` result in
                # storage means its checkpoint is there for the resume
                sync_dir(scratch / CHECKPOINTS, join(job_uri, CHECKPOINTS))
                for name in reversed(MIRRORED):  # result.json last but one, events last: complete when seen
                    if (scratch / name).is_file():
                        put_file(scratch / name, join(job_uri, name))
        ray.train.report({"exit_code": code, "rank": rank})  # every rank reports: Ray Train's end of the run
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ---- the driver ----------------------------------------------------------------------------------------
def scaling(spec: Any, cpus_per_worker: float) -> dict[str, Any]:
    """ScalingConfig's arguments for a plan: one worker per GPU of the plan (per CPU process on a CPU)."""
    gpu = spec.device == "cuda"
    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if gpu:
        resources["GPU"] = 1
    return {"num_workers": spec.plan.num_gpus, "use_gpu": gpu, "resources_per_worker": resources}


def drive(job_id: str, storage: str, cpus_per_worker: float = 1.0) -> int:
    """Run the job's TorchTrainer to its end; exit status 0 when it succeeded, was cancelled or paused, else 1."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from advisor.jobs.spec import JobSpec

    job_uri = join(storage, job_id)
    with tempfile.TemporaryDirectory() as d:
        if not get_file(join(job_uri, "job.json"), Path(d) / "job.json"):
            print(f"no job.json under {job_uri}", file=sys.stderr)
            return 1
        spec = JobSpec.from_dict(json.loads((Path(d) / "job.json").read_text()))
    ray.init(log_to_driver=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.to_dict(), "job_uri": job_uri},
        scaling_config=ScalingConfig(**scaling(spec, cpus_per_worker)),
        torch_config=TorchConfig(backend="nccl" if spec.device == "cuda" else "gloo"),
        run_config=RunConfig(name=job_id, storage_path=storage if "://" in storage else os.path.abspath(storage)),
    )
    t = time.time()
    try:
        trainer.fit()
    except Exception as exc:  # a worker crashed past Run's own handling (killed, lost node): no result.json
        print(f"Ray Train failed after {time.time() - t:.0f} s: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    code = exit_code(job_uri)
    print(f"Ray Train finished in {time.time() - t:.0f} s: exit code {code}; storage {job_uri}")
    return code


def exit_code(job_uri: str) -> int:
    """The job's exit status from the result rank 0 put in storage (the one record of how the run ended)."""
    from advisor.jobs.train import EXIT_FAILED, EXIT_OK

    with tempfile.TemporaryDirectory() as d:
        if not get_file(join(job_uri, "result.json"), Path(d) / "result.json"):
            return EXIT_FAILED
        status = json.loads((Path(d) / "result.json").read_text()).get("status")
    # a cancel or a pause honoured is not a failure of the Ray job (Ray would list it as FAILED); result.json
    # tells the service which it was (RayLauncher.poll reports the run's own exit code from it)
    return {"succeeded": EXIT_OK, "cancelled": EXIT_OK, "paused": EXIT_OK}.get(status, EXIT_FAILED)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="run one advisor job as a Ray Train TorchTrainer (Ray job entrypoint)")
    p.add_argument("--job-id", required=True)
    p.add_argument("--storage", required=True, help="storage_path: a shared directory or a filesystem URI")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    a = p.parse_args(argv)
    return drive(a.job_id, a.storage, a.cpus_per_worker)


if __name__ == "__main__":
    sys.exit(main())
