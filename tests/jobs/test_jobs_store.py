"""The store on SQLite and PostgreSQL: one winner per conditional update, idempotency, pages, claims fenced
by the reconciler lease, lease expiry, exactly-once event ingestion, schema versions, a damaged SQLite file."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import MetaData, text

from advisor.jobs import schema
from advisor.jobs import store as S
from advisor.jobs.leases import RECONCILER, Leases, replica_lease
from advisor.jobs.schema import SchemaError
from advisor.jobs.store import Store


def _job(i: int, **kw) -> dict:
    row = {
        "id": f"ftjob-{i:012d}",
        "owner": "key_a",
        "status": S.QUEUED,
        "model": "m",
        "training_file": "file-1",
        "seed": 0,
        "hyperparameters": {},
        "method": {},
        "spec": {},
        "launcher": "local",
    }
    row.update(kw)
    return row


def _store(url: Path | str) -> Store:
    s = Store(url if isinstance(url, str) else f"sqlite:///{url / 'sub' / 'advisor.db'}")
    s.create()
    return s


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    s = _store(tmp_path)
    with s.engine.connect() as c:
        assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    assert s.ping()[0]


def test_exactly_one_conditional_update_wins(store_url: str) -> None:
    s = _store(store_url)
    s.add_job(_job(1))
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def claim() -> None:
        barrier.wait()
        wins.append(s.update_job("ftjob-000000000001", expect=[S.QUEUED], status=S.RUNNING))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]


def test_idempotency_key_race_returns_the_first_job(store_url: str) -> None:
    s = _store(store_url)
    first, created = s.add_job(_job(1, idempotency_key="k", request_hash="h"))
    again, created2 = s.add_job(_job(2, idempotency_key="k", request_hash="h"))
    assert created and not created2 and again["id"] == first["id"]
    other, created3 = s.add_job(_job(3, idempotency_key="k", owner="key_b"))
    assert created3 and other["id"] == "ftjob-000000000003"


def test_pages_follow_creation_order_and_owner(store_url: str) -> None:
    s = _store(store_url)
    for i in range(5):
        s.add_job(_job(i))
    s.add_job(_job(9, owner="key_b"))
    page, more = s.list_jobs("key_a", limit=2)
    assert [r["id"][-1] for r in page] == ["4", "3"] and more
    page, more = s.list_jobs("key_a", after=page[-1]["id"], limit=10)
    assert [r["id"][-1] for r in page] == ["2", "1", "0"] and not more
    assert s.list_jobs("key_a", after="ftjob-unknown")[0] == []

    s.add_events(
        "ftjob-000000000000",
        [{"id": f"ftevent-{i}", "level": "info", "type": "message", "message": str(i)} for i in range(5)],
        offset=123,
    )
    asc, _ = s.list_events("ftjob-000000000000", limit=3, order="asc")
    desc, more = s.list_events("ftjob-000000000000", limit=3)
    assert [e["message"] for e in asc] == ["0", "1", "2"] and [e["message"] for e in desc] == ["4", "3", "2"] and more
    assert s.get_job("ftjob-000000000000")["events_offset"] == 123


def test_any_sqlalchemy_url_in_memory(tmp_path: Path) -> None:
    s = Store("sqlite://")
    s.create()
    s.add_job(_job(1))
    assert s.jobs_with_status([S.QUEUED])[0]["id"] == "ftjob-000000000001"


# ---- replicas: claims, leases, ingestion ---------------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_claims_need_the_reconciler_lease_and_start_a_job_once(store_url: str) -> None:
    s = _store(store_url)
    try:
        for i in range(4):
            s.add_job(_job(i))
        a, b = Leases(s, "replica-a", lease_s=30), Leases(s, "replica-b", lease_s=30)
        assert a.acquire(RECONCILER) and not b.acquire(RECONCILER)
        # b lost the election: its claims fail even on a queued job
        assert not s.claim_job("ftjob-000000000000", "replica-b", "h", 1.0)
        wins: list[tuple[str, int]] = []
        barrier = threading.Barrier(8)

        def claim(i: int) -> None:
            barrier.wait()
            for j in range(4):
                if s.claim_job(f"ftjob-{j:012d}", "replica-a", "host-a", 1.0):
                    wins.append((f"ftjob-{j:012d}", i))

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(j for j, _ in wins) == [f"ftjob-{j:012d}" for j in range(4)]  # each job exactly once
        row = s.get_job("ftjob-000000000001")
        assert row["status"] == S.RUNNING and row["owner_replica"] == "replica-a" and row["owner_host"] == "host-a"
    finally:
        s.close()


def test_a_lease_not_renewed_expires_and_another_replica_takes_it(store_url: str) -> None:
    s = _store(store_url)
    try:
        clock = _Clock()
        a = Leases(s, "replica-a", lease_s=5, host="host-a", clock=clock)
        b = Leases(s, "replica-b", lease_s=5, host="host-b", clock=clock)
        assert a.acquire(RECONCILER) and a.acquire(replica_lease("replica-a"))
        clock.t += 4
        assert a.acquire(RECONCILER) and not b.acquire(RECONCILER)  # renewed in time
        clock.t += 4
        assert not b.acquire(RECONCILER)  # 4 s after the renewal: still a's
        clock.t += 2
        assert b.acquire(RECONCILER) and not a.acquire(RECONCILER)  # a stopped renewing: b holds it, a lost it
        assert b.holder(RECONCILER)["holder"] == "replica-b"
        assert [r["holder"] for r in b.live_replicas()] == []  # a's replica lease expired too
        # a's running job is an orphan for b, taken over exactly once
        s.add_job(_job(1, status=S.RUNNING, owner_replica="replica-a", owner_host="host-a"))
        s.add_job(_job(2, status=S.RUNNING, owner_replica="replica-b", owner_host="host-b"))
        assert [j["id"] for j in b.orphans()] == ["ftjob-000000000001"]
        job = b.orphans()[0]
        assert b.take_over(job) and not b.take_over(job)
        assert b.orphans() == []
    finally:
        s.close()


def test_a_dead_holder_on_this_host_is_replaced_at_once(store_url: str) -> None:
    s = _store(store_url)
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        old = Leases(s, "old", lease_s=300, host="h", pid=dead.pid)
        assert old.acquire(RECONCILER)
        assert not Leases(s, "other-host", lease_s=300, host="elsewhere").acquire(RECONCILER)
        assert Leases(s, "restarted", lease_s=300, host="h").acquire(RECONCILER)
    finally:
        s.close()


def test_events_ingested_once_when_two_readers_race(store_url: str) -> None:
    s = _store(store_url)
    try:
        s.add_job(_job(1))
        results: list[bool] = []
        barrier = threading.Barrier(6)

        def ingest(i: int) -> None:
            barrier.wait()
            items = [
                {"id": f"ftevent-{i}-{k}", "level": "info", "type": "message", "message": "step"} for k in range(3)
            ]
            results.append(s.add_events("ftjob-000000000001", items, offset=100, expect_offset=0))

        threads = [threading.Thread(target=ingest, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False] * 5 + [True]
        assert s.count_events("ftjob-000000000001") == 3 and s.get_job("ftjob-000000000001")["events_offset"] == 100
    finally:
        s.close()


# ---- schema versions -------------------------------------------------------------------------------------
def _legacy(url: str) -> None:
    """Today's tables as `create_all` made them before migrations (no alembic_version), with one job."""
    engine = S.make_engine(url)
    legacy = MetaData()
    for t in S.metadata.sorted_tables:
        if t.name != "ft_leases":
            t.to_metadata(legacy)
    for t in legacy.tables.values():
        for col in ("owner_replica", "owner_host"):
            if col in t.c:
                t._columns.remove(t.c[col])
    legacy.create_all(engine)
    with engine.begin() as c:
        c.execute(
            legacy.tables["ft_jobs"]
            .insert()
            .values(
                **{
                    **_job(7),
                    "created_at": 1,
                    "created_ns": 1,
                    "updated_at": 1.0,
                    "cancel_requested": False,
                    "events_offset": 0,
                }
            )
        )
    engine.dispose()


def test_an_older_schema_is_refused_until_upgraded_and_keeps_its_rows(store_url: str) -> None:
    _legacy(store_url)
    s = Store(store_url)
    try:
        with pytest.raises(SchemaError, match="advisor db upgrade") as err:
            s.create()
        assert err.value.status == 503
        before, after = schema.upgrade(s.engine)
        assert before.legacy and after.current == after.head
        s.create()  # at the head now
        assert s.get_job("ftjob-000000000007")["owner_replica"] is None
        assert s.claim_job("ftjob-000000000007", "r", "h", 1.0) is False  # no lease held: fenced
    finally:
        s.close()


def test_a_newer_schema_is_refused(store_url: str) -> None:
    s = _store(store_url)
    try:
        with s.engine.begin() as c:
            c.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
        with pytest.raises(SchemaError, match="newer than this advisor knows"):
            s.create()
        with pytest.raises(SchemaError, match="upgrade the advisor"):
            schema.upgrade(s.engine)
    finally:
        s.close()


# ---- an empty or damaged SQLite file (the data directory says records existed) ----------------------------
def test_damage_report_tells_a_lost_database_from_a_new_one(tmp_path: Path) -> None:
    data = tmp_path / "data"
    url = f"sqlite:///{data / 'advisor.db'}"
    data.mkdir()
    assert schema.damage_report(url, data) is None  # a new deployment
    (data / "advisor.db").write_bytes(b"")
    assert schema.damage_report(url, data) is None  # empty, and nothing on disk either
    (data / "jobs" / "ftjob-abc").mkdir(parents=True)
    (data / "files").mkdir()
    (data / "files" / "file-1.jsonl").write_text("{}")
    msg = schema.damage_report(url, data)
    assert msg and "empty (0 bytes)" in msg and "1 job directories and 1 uploaded files" in msg
    assert str(tmp_path) not in msg  # no paths: /readyz may show it
    (data / "advisor.db").unlink()
    assert "missing" in schema.damage_report(url, data)
    (data / "advisor.db").write_bytes(b"\x00garbage" * 100)
    assert "damaged" in schema.damage_report(url, data)
    good = _store(data / "ok")
    good.close()
    assert schema.damage_report(f"sqlite:///{data / 'ok' / 'sub' / 'advisor.db'}", data) is None


def test_a_recommended_plan_id_fits_the_job_row_after_an_upgrade(store_url: str) -> None:
    """A plan id encodes its plan (~150 characters): the baseline's VARCHAR(64) refused it on PostgreSQL, so
    launching a recommended plan by id was a 500 there. A database made at 0002 takes it after `advisor db upgrade`."""
    from alembic import command

    from advisor.catalog import default_catalog
    from advisor.plans import make_plan

    knobs = dict(
        micro_batch=16, seq_len=1024, lora_r=64, lora_alpha=128, lora_dropout=0.1, optimizer="paged-adamw-8bit"
    )
    plan_id = make_plan("qlora", default_catalog().gpu("t4"), lora_targets=("q", "k", "v", "o"), **knobs).id
    assert len(plan_id) > 64
    engine = Store(store_url).engine
    with engine.begin() as c:  # the schema as the previous release left it
        command.upgrade(schema._config(c), "0002_replica_leases")
    s = Store(store_url)
    try:
        with pytest.raises(SchemaError, match="advisor db upgrade"):
            s.create()
        schema.upgrade(s.engine)
        s.create()
        s.add_job({**_job(9), "plan_id": plan_id})
        assert s.get_job("ftjob-000000000009")["plan_id"] == plan_id
    finally:
        s.close()
        engine.dispose()
