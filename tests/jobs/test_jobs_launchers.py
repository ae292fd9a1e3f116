"""Launchers: argv lists (never a shell), and the reconciler's slot queue and SIGTERM -> SIGKILL escalation
on real processes (an interpreter stand-in that ignores SIGTERM, the way a hung job would)."""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from advisor.jobs import store as S
from advisor.jobs.config import JobsConfig, host_cpu_spec
from advisor.jobs.launchers import LocalLauncher, RayLauncher, proc_start_ticks, train_argv, train_env
from advisor.jobs.manager import JobManager
from advisor.jobs.spec import JobSpec, ModelSource
from advisor.jobs.store import Store
from advisor.plans import TrainingPlan


def _spec(job_id: str = "ftjob-0123456789ab", n: int = 1, sharding: str = "none", device: str = "cpu") -> JobSpec:
    plan = TrainingPlan(method="lora", gpu_id="cpu", dtype="fp32", num_gpus=n, sharding=sharding, micro_batch=1)
    return JobSpec(
        job_id=job_id,
        model="/m",
        source=ModelSource("local", "/m"),
        plan=plan,
        training_file="/f.jsonl",
        n_epochs=1,
        batch_size=n,
        learning_rate=1e-4,
        device=device,
    )


def test_argv_is_a_list_of_plain_arguments(tmp_path: Path) -> None:
    d = tmp_path / "job dir; rm -rf ~"  # a hostile-looking path stays one argument
    assert train_argv(_spec(), d, "/usr/bin/python3") == [
        "/usr/bin/python3",
        "-m",
        "advisor.jobs.train",
        "--job-dir",
        str(d),
    ]
    ddp = train_argv(_spec(n=2, sharding="ddp"), d, "py", port=29555)
    assert ddp[:3] == ["py", "-m", "accelerate.commands.launch"] and "--multi_gpu" in ddp and ddp[-1] == str(d)
    assert ddp[ddp.index("--num_processes") + 1] == "2" and ddp[ddp.index("--main_process_port") + 1] == "29555"
    fsdp = train_argv(_spec(n=4, sharding="fsdp"), d, "py")
    assert "--use_fsdp" in fsdp and "--multi_gpu" not in fsdp
    assert shlex.split(shlex.join(fsdp)) == fsdp  # what the Ray entrypoint carries parses back to the same argv


def test_env_is_offline_and_pins_devices() -> None:
    env = train_env(_spec(), threads=2)
    assert env["HF_HUB_OFFLINE"] == "1" and env["CUDA_VISIBLE_DEVICES"] == "" and env["OMP_NUM_THREADS"] == "2"
    assert train_env(_spec(n=2, sharding="ddp"), None)["ACCELERATE_USE_CPU"] == "true"
    assert "CUDA_VISIBLE_DEVICES" not in train_env(_spec(device="cuda"), None)


def test_ray_launcher_needs_a_dashboard_url() -> None:
    with pytest.raises(ValueError, match="dashboard"):
        RayLauncher("ray://head:10001")


def test_ray_launcher_maps_an_unreachable_cluster_to_a_launch_error(tmp_path: Path) -> None:
    from advisor.jobs.launchers import LaunchError

    rl = RayLauncher("http://127.0.0.1:9", timeout_s=2, storage_path=str(tmp_path / "storage"))  # nothing listens
    train = tmp_path / "f.jsonl"
    train.write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(LaunchError, match="unreachable"):
        rl.start(replace(_spec(), training_file=str(train)), tmp_path / "jobs" / "ftjob-0123456789ab")
    # the inputs went to the storage path first (where the cluster's workers read them)
    assert (tmp_path / "storage" / "ftjob-0123456789ab" / "inputs" / "training.jsonl").read_text() == train.read_text()
    with pytest.raises(LaunchError, match="Ray storage"):  # a training file that is not there: said so
        RayLauncher("http://127.0.0.1:9", storage_path=str(tmp_path / "s2")).start(_spec(), tmp_path / "j")
    assert rl.poll({"submission_id": "ftjob-0123456789ab"}).state == "running"  # unknown, not ended
    rl.shutdown()


@pytest.fixture
def stubborn_python(tmp_path: Path) -> Path:
    """An executable that takes the training argv, ignores SIGTERM and sleeps (a hung training process)."""
    p = tmp_path / "stubborn-python"
    # writes <itself>.ready once SIGTERM is ignored, so a test never signals it before the trap is set
    p.write_text("#!/bin/sh\ntrap '' TERM\ntouch \"$0.ready\"\nsleep 60 &\nwait\nsleep 60\n")
    p.chmod(0o755)
    return p


def _manager(tmp_path: Path, python: Path, slots: int = 1) -> JobManager:
    cfg = JobsConfig(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'data' / 'advisor.db'}",
        gpu=host_cpu_spec(),
        slots=[f"cpu{i}" for i in range(slots)],
        cancel_grace_s=1.0,
    )
    store = Store(cfg.database_url)
    m = JobManager(cfg, store, LocalLauncher(cfg.slots, python=str(python)))
    store.create()
    cfg.jobs_dir.mkdir(parents=True)
    cfg.files_dir.mkdir(parents=True)
    assert m._try_lead()
    return m


def _add(m: JobManager, job_id: str) -> None:
    spec = _spec(job_id)
    m.store.add_job(
        {
            "id": job_id,
            "owner": "k",
            "status": S.QUEUED,
            "model": "/m",
            "training_file": "file-1",
            "seed": 0,
            "hyperparameters": {},
            "method": {},
            "spec": json.loads(json.dumps(spec.to_dict())),
            "launcher": "local",
        }
    )


def test_slots_queue_and_cancel_escalates_to_sigkill(tmp_path: Path, stubborn_python: Path) -> None:
    m = _manager(tmp_path, stubborn_python)
    try:
        _add(m, "ftjob-000000000001")
        _add(m, "ftjob-000000000002")
        m.tick()
        first, second = m.store.get_job("ftjob-000000000001"), m.store.get_job("ftjob-000000000002")
        assert first["status"] == S.RUNNING and second["status"] == S.QUEUED  # one slot
        pid = first["handle"]["pid"]
        assert proc_start_ticks(pid) == first["handle"]["start_ticks"]
        ready = Path(f"{stubborn_python}.ready")
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the stubborn process never set its SIGTERM trap"

        assert m.store.update_job(first["id"], expect=[S.RUNNING], status=S.CANCELLING, cancel_requested=True)
        m.tick()  # SIGTERM: ignored
        time.sleep(0.3)
        m.tick()  # within the grace period: nothing more
        assert m.store.get_job(first["id"])["status"] == S.CANCELLING
        assert proc_start_ticks(pid) == first["handle"]["start_ticks"]
        time.sleep(0.9)
        m.tick()  # past the grace period: SIGKILL
        deadline = time.monotonic() + 10
        while m.store.get_job(first["id"])["status"] != S.CANCELLED and time.monotonic() < deadline:
            time.sleep(0.1)
            m.tick()
        job = m.store.get_job(first["id"])
        assert job["status"] == S.CANCELLED and job["handle"]["killed"]
        msgs = [e["message"] for e in m.store.list_events(first["id"], limit=100, order="asc")[0]]
        assert any("SIGTERM sent" in x for x in msgs) and any("SIGKILL sent" in x for x in msgs)
        assert proc_start_ticks(pid) is None or proc_start_ticks(pid) != first["handle"]["start_ticks"]
        # the slot is free again: the queued job starts
        assert m.store.get_job(second["id"])["status"] == S.RUNNING
    finally:
        for j in m.store.jobs_with_status([S.RUNNING, S.CANCELLING]):
            m.launcher.cancel(j["handle"], force=True)
        m.stop()


def test_a_process_that_exits_without_a_result_fails_with_its_log(tmp_path: Path) -> None:
    crash = tmp_path / "crash-python"
    crash.write_text("#!/bin/sh\necho 'Segmentation fault (pretend)' >&2\nexit 139\n")
    crash.chmod(0o755)
    m = _manager(tmp_path, crash)
    try:
        _add(m, "ftjob-000000000001")
        deadline = time.monotonic() + 10
        while m.store.get_job("ftjob-000000000001")["status"] not in S.TERMINAL and time.monotonic() < deadline:
            m.tick()
            time.sleep(0.05)
        job = m.store.get_job("ftjob-000000000001")
        assert job["status"] == S.FAILED and job["error"]["code"] == "crashed"
        assert "exit code 139" in job["error"]["message"] and "Segmentation fault (pretend)" in job["error"]["message"]
    finally:
        m.stop()


def test_launcher_identifies_processes_by_pid_and_start_time() -> None:
    import os

    assert proc_start_ticks(os.getpid()) is not None
    launcher = LocalLauncher(["cpu0"], python=sys.executable)
    gone = {"pid": os.getpid(), "start_ticks": -1, "slots": ["cpu0"]}  # a recycled pid: not our job
    assert launcher.poll(gone).state == "exited"


def test_the_training_process_does_not_inherit_the_servers_secrets(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ADVISOR_API_KEYS", "secret-key-" + "s" * 20)
    monkeypatch.setenv("ADVISOR_WEBHOOK_SECRET", "whsec_c2VjcmV0")
    dump = tmp_path / "dump-env"
    dump.write_text('#!/bin/sh\nenv > "$4/env.txt"\n')  # argv: python -m advisor.jobs.train --job-dir DIR
    dump.chmod(0o755)
    launcher = LocalLauncher(["cpu0"], python=str(dump), threads=1)
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    handle = launcher.start(_spec(), job_dir)
    deadline = time.monotonic() + 10
    while launcher.poll(handle).state == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    env = dict(line.split("=", 1) for line in (job_dir / "env.txt").read_text().splitlines() if "=" in line)
    assert "ADVISOR_API_KEYS" not in env and "ADVISOR_WEBHOOK_SECRET" not in env
    assert env["ADVISOR_TRAIN_THREADS"] == "1" and env["HF_HUB_OFFLINE"] == "1" and env["CUDA_VISIBLE_DEVICES"] == ""
    launcher.release(handle)
    assert launcher.free_slots() == ["cpu0"]


def test_a_process_killed_by_sigkill_without_a_cancel_is_killed_not_a_guessed_oom(tmp_path: Path) -> None:
    """SIGKILL from outside, no result: `killed` (with why it is not called an OOM), since this cgroup's
    oom_kill counter did not rise; `oom` is kept for a kill the kernel's counter evidences."""
    killed = tmp_path / "killed-python"
    killed.write_text("#!/bin/sh\necho 'allocating...'\nkill -9 $$\n")
    killed.chmod(0o755)
    m = _manager(tmp_path, killed)
    try:
        _add(m, "ftjob-000000000001")
        deadline = time.monotonic() + 10
        while m.store.get_job("ftjob-000000000001")["status"] not in S.TERMINAL and time.monotonic() < deadline:
            m.tick()
            time.sleep(0.05)
        job = m.store.get_job("ftjob-000000000001")
        assert job["status"] == S.FAILED and job["error"]["code"] == "killed", job["error"]
        assert "SIGKILL" in job["error"]["message"] and "OOM" in job["error"]["message"]
    finally:
        m.stop()


def test_a_full_disk_at_the_end_of_a_job_is_logged_once_and_the_end_recorded_when_space_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A finished job whose measurement cannot be written (ENOSPC: the measurements file is /dev/full, a real
    full device) stays `running` while the disk is full, the reconciler logs that once (not every tick), and
    the job ends `succeeded`, its measurement written once, as soon as space returns."""
    script = tmp_path / "done-python"
    script.write_text(
        "#!/bin/sh\n"
        'while [ "$1" != "--job-dir" ]; do shift; done\n'
        'echo \'{"status": "succeeded"}\' > "$2/result.json"\n'
        'echo \'{"meter": "test", "peak_gib": 1.0}\' > "$2/measurement.json"\n'
    )
    script.chmod(0o755)
    m = _manager(tmp_path, script)
    m.cfg = replace(m.cfg, poll_interval_s=0.05)
    full = m.cfg.measurements_path
    full.parent.mkdir(parents=True, exist_ok=True)
    full.symlink_to("/dev/full")
    caplog.set_level("INFO", logger="advisor.jobs")
    try:
        _add(m, "ftjob-000000000003")
        m.start()
        time.sleep(2.0)  # ~40 ticks on a full disk
        assert m.store.get_job("ftjob-000000000003")["status"] == S.RUNNING
        failed = [r for r in caplog.records if "reconciler tick failed" in r.getMessage()]
        assert len(failed) == 1 and "No space left" in (m.last_error or ""), (len(failed), m.last_error)
        full.unlink()  # space returns
        deadline = time.monotonic() + 10
        while m.store.get_job("ftjob-000000000003")["status"] not in S.TERMINAL and time.monotonic() < deadline:
            time.sleep(0.05)
        assert m.store.get_job("ftjob-000000000003")["status"] == S.SUCCEEDED
        assert len(full.read_text().splitlines()) == 1
        assert any("reconciler recovered" in r.getMessage() for r in caplog.records)
    finally:
        m.stop()


@pytest.mark.parametrize("storage", [None, "s3://bucket/jobs/ftjob-000000000003"])
def test_checkpoint_rows_follow_the_checkpoint_across_runs_in_other_directories(
    tmp_path: Path, storage: str | None
) -> None:
    """A Ray run reports checkpoints by paths in its node-local scratch directory, another one after a resume: the
    rows name where the service finds them, and a checkpoint the second run rotated out loses its row."""
    m = _manager(tmp_path, Path(sys.executable))
    try:
        job_id = "ftjob-000000000003"
        _add(m, job_id)
        if storage:
            m.store.update_job(job_id, handle={"storage": storage})
        events = m.cfg.jobs_dir / job_id / "events.jsonl"
        events.parent.mkdir(parents=True)

        def checkpoint(scratch: str, step: int, removed: list[int]) -> None:
            data = {
                "step": step,
                "path": f"{scratch}/checkpoints/checkpoint-{step}",
                "removed": [f"{scratch}/checkpoints/checkpoint-{r}" for r in removed],
            }
            with events.open("a") as f:
                f.write(json.dumps({"ts": 1, "type": "checkpoint", "message": "c", "data": data}) + "\n")
            m.ingest(m.store.get_job(job_id))

        checkpoint("/tmp/ftjob-rank0-aaaa", 2, [])
        checkpoint("/tmp/ftjob-rank0-aaaa", 4, [])
        checkpoint("/tmp/ftjob-rank0-bbbb", 6, [2])  # the resumed run: another scratch directory
        rows, _ = m.store.list_checkpoints(job_id)
        base = f"{storage}/checkpoints" if storage else str(m.cfg.jobs_dir / job_id / "checkpoints")
        assert sorted((r["step"], r["path"]) for r in rows) == [
            (4, f"{base}/checkpoint-4"),
            (6, f"{base}/checkpoint-6"),
        ]
    finally:
        m.stop()
