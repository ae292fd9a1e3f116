"""The store: WAL SQLite, one winner per conditional update under concurrency, idempotency, pages."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import text

from advisor.jobs import store as S
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


def _store(tmp_path: Path) -> Store:
    s = Store(f"sqlite:///{tmp_path / 'sub' / 'advisor.db'}")
    s.create()
    return s


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    s = _store(tmp_path)
    with s.engine.connect() as c:
        assert c.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    assert s.ping()[0]


def test_exactly_one_conditional_update_wins(tmp_path: Path) -> None:
    s = _store(tmp_path)
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


def test_idempotency_key_race_returns_the_first_job(tmp_path: Path) -> None:
    s = _store(tmp_path)
    first, created = s.add_job(_job(1, idempotency_key="k", request_hash="h"))
    again, created2 = s.add_job(_job(2, idempotency_key="k", request_hash="h"))
    assert created and not created2 and again["id"] == first["id"]
    other, created3 = s.add_job(_job(3, idempotency_key="k", owner="key_b"))
    assert created3 and other["id"] == "ftjob-000000000003"


def test_pages_follow_creation_order_and_owner(tmp_path: Path) -> None:
    s = _store(tmp_path)
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
