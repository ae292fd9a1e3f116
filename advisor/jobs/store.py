"""The job store: files, jobs, events, checkpoints and webhook deliveries in SQLAlchemy tables.

Why SQLAlchemy Core and one table per object: any SQLAlchemy URL works (SQLite by default, PostgreSQL
for several servers), the rows are what the API returns, and every state change is one conditional
UPDATE (``... WHERE status = 'queued'``), so two actors (an API worker cancelling, the reconciler
starting) can never both win. SQLite runs in WAL mode with ``BEGIN IMMEDIATE`` transactions, so
concurrent writers wait for each other (busy timeout) instead of failing on a lock upgrade.

Rows come back as plain dicts (column -> value); JSON columns hold dicts.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.pool import StaticPool

#: job states (OpenAI's, plus `cancelling` while a running process is being stopped)
VALIDATING, QUEUED, RUNNING, CANCELLING = "validating_files", "queued", "running", "cancelling"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
ACTIVE = (VALIDATING, QUEUED, RUNNING, CANCELLING)
PAUSED = "paused"  # no process, not terminal: resumed back to queued (its files are still needed)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)

metadata = MetaData()

files = Table(
    "ft_files",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("owner", String(64), nullable=False, index=True),
    Column("filename", String(255), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("examples", Integer, nullable=False),
    Column("format", String(16), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("path", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("created_ns", BigInteger, nullable=False),  # creation order for pages (created_at is seconds)
)

jobs = Table(
    "ft_jobs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("owner", String(64), nullable=False, index=True),
    Column("created_at", BigInteger, nullable=False),
    Column("created_ns", BigInteger, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("started_at", Float),
    Column("finished_at", BigInteger),
    Column("status", String(24), nullable=False, index=True),
    Column("model", String(512), nullable=False),
    Column("training_file", String(64), nullable=False),
    Column("validation_file", String(64)),
    Column("suffix", String(64)),
    Column("seed", BigInteger, nullable=False),
    Column("metadata", JSON),
    Column("hyperparameters", JSON, nullable=False),
    Column("method", JSON, nullable=False),
    Column("plan_id", Text),  # a plan id encodes its plan (plan_v2.<base64url>): no fixed length
    Column("spec", JSON, nullable=False),
    Column("estimate", JSON),
    Column("measured", JSON),
    Column("progress", JSON),
    Column("error", JSON),
    Column("fine_tuned_model", String(512)),
    Column("trained_tokens", BigInteger),
    Column("result_files", JSON),
    Column("idempotency_key", String(255)),
    Column("request_hash", String(64)),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("launcher", String(16), nullable=False),
    Column("handle", JSON),
    Column("events_offset", BigInteger, nullable=False, default=0),
    # the replica that started (or took over) the job and follows it; its host (a local process lives there)
    Column("owner_replica", String(128)),
    Column("owner_host", String(255)),
    UniqueConstraint("owner", "idempotency_key", name="uq_ft_jobs_idempotency"),
)

events = Table(
    "ft_events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("job_id", String(64), ForeignKey("ft_jobs.id", ondelete="CASCADE"), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("level", String(8), nullable=False),
    Column("type", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Column("data", JSON),
    Index("ix_ft_events_job_seq", "job_id", "seq"),
)

checkpoints = Table(
    "ft_checkpoints",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("job_id", String(64), ForeignKey("ft_jobs.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("created_at", BigInteger, nullable=False),
    Column("step", Integer, nullable=False),
    Column("metrics", JSON),
    Column("path", Text, nullable=False),
)

webhooks = Table(
    "ft_webhooks",
    metadata,
    Column("id", String(64), primary_key=True),  # the webhook-id header: stable across retries
    Column("job_id", String(64), nullable=False, index=True),
    Column("type", String(64), nullable=False),
    Column("payload", Text, nullable=False),  # the exact bytes that are signed and sent
    Column("status", String(16), nullable=False, index=True),  # pending | delivered | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("last_error", Text),
    Column("created_at", BigInteger, nullable=False),
)


leases = Table(
    "ft_leases",
    metadata,
    # `replica:<id>`: a replica's liveness; `reconciler`: the one replica that schedules and follows jobs
    Column("name", String(160), primary_key=True),
    Column("holder", String(128), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("acquired_at", Float, nullable=False),
    Column("renewed_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False, index=True),
)


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and BEGIN IMMEDIATE transactions."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    memory = u.database in (None, "", ":memory:")
    if not memory:
        Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 30},
        poolclass=StaticPool if memory else None,
    )

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        if not memory:
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _now() -> int:
    return int(time.time())


class Store:
    """All reads and writes of job state. Thread-safe (one engine, short transactions)."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)

    def create(self) -> None:
        """Create the schema in an empty database (Alembic, advisor.jobs.schema); refuse (SchemaError) a
        database whose schema is older (``advisor db upgrade``) or newer than this advisor's."""
        from advisor.jobs.schema import ensure

        for attempt in range(3):
            try:
                ensure(self.engine)
                return
            except OperationalError:  # SQLite: a lock held past the busy timeout while another worker migrates
                if attempt == 2:
                    raise
                time.sleep(0.2)

    def ping(self) -> tuple[bool, str]:
        with self.engine.connect() as c:
            c.execute(text("SELECT 1"))
        return True, f"{self.engine.url.get_backend_name()} store reachable"

    def close(self) -> None:
        self.engine.dispose()

    # ---- files ----------------------------------------------------------------------------------
    def add_file(self, row: dict[str, Any]) -> dict[str, Any]:
        ns = time.time_ns()
        row = {"created_at": ns // 10**9, "created_ns": ns, **row}
        with self.engine.begin() as c:
            c.execute(insert(files).values(**row))
        return row

    def _first(self, q: Any) -> dict[str, Any] | None:
        with self.engine.begin() as c:
            r = c.execute(q).mappings().first()
        return dict(r) if r else None

    def _owned(self, table: Table, row_id: str, owner: str | None) -> dict[str, Any] | None:
        """The row `row_id` of `table`, when `owner` (if given) owns it."""
        q = select(table).where(table.c.id == row_id)
        if owner is not None:
            q = q.where(table.c.owner == owner)
        return self._first(q)

    def get_file(self, file_id: str, owner: str | None = None) -> dict[str, Any] | None:
        return self._owned(files, file_id, owner)

    def list_files(
        self, owner: str, purpose: str | None = None, after: str | None = None, limit: int = 100, order: str = "desc"
    ) -> tuple[list[dict[str, Any]], bool]:
        q = select(files).where(files.c.owner == owner)
        if purpose:
            q = q.where(files.c.purpose == purpose)
        return self._page(q, files, after, limit, order, key=(files.c.created_ns, files.c.id))

    def delete_file(self, file_id: str, owner: str) -> dict[str, Any] | None:
        with self.engine.begin() as c:
            r = c.execute(select(files).where(files.c.id == file_id, files.c.owner == owner)).mappings().first()
            if r is None:
                return None
            c.execute(delete(files).where(files.c.id == file_id))
        return dict(r)

    def file_in_use(self, file_id: str) -> str | None:
        """The id of an active job that trains on `file_id`, if any."""
        q = select(jobs.c.id).where(
            jobs.c.status.in_((*ACTIVE, PAUSED)),
            (jobs.c.training_file == file_id) | (jobs.c.validation_file == file_id),
        )
        with self.engine.begin() as c:
            return c.execute(q.limit(1)).scalar()

    # ---- jobs -----------------------------------------------------------------------------------
    def add_job(self, row: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Insert a job; with an idempotency key already used by this owner, return that job instead.

        Returns (job row, created)."""
        ns = time.time_ns()
        row = {
            "created_at": ns // 10**9,
            "created_ns": ns,
            "updated_at": ns / 1e9,
            "cancel_requested": False,
            "events_offset": 0,
            **row,
        }
        try:
            with self.engine.begin() as c:
                c.execute(insert(jobs).values(**row))
        except IntegrityError:
            key = row.get("idempotency_key")
            if key is None:
                raise
            existing = self.job_by_idempotency_key(row["owner"], key)
            if existing is None:
                raise
            return existing, False
        return self.get_job(row["id"]) or row, True

    def job_by_idempotency_key(self, owner: str, key: str) -> dict[str, Any] | None:
        return self._first(select(jobs).where(jobs.c.owner == owner, jobs.c.idempotency_key == key))

    def get_job(self, job_id: str, owner: str | None = None) -> dict[str, Any] | None:
        return self._owned(jobs, job_id, owner)

    def list_jobs(
        self, owner: str, after: str | None = None, limit: int = 20, metadata_filter: dict[str, str] | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        q = select(jobs).where(jobs.c.owner == owner)
        rows, more = self._page(
            q, jobs, after, limit if not metadata_filter else 10_000, "desc", key=(jobs.c.created_ns, jobs.c.id)
        )
        if metadata_filter:  # JSON filtering differs per database: filter here, the lists are short
            rows = [r for r in rows if all((r.get("metadata") or {}).get(k) == v for k, v in metadata_filter.items())]
            more = len(rows) > limit
            rows = rows[:limit]
        return rows, more

    def jobs_with_status(self, statuses: Sequence[str]) -> list[dict[str, Any]]:
        q = select(jobs).where(jobs.c.status.in_(statuses)).order_by(jobs.c.created_ns, jobs.c.id)
        with self.engine.begin() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def finished_measurements(self, statuses: Sequence[str] = TERMINAL) -> list[dict[str, Any]]:
        """Finished jobs that recorded a measurement (`measured` set), oldest first: what the calibration
        fit reads back (``calibration.feedback``). Read-only.

        `measured` is filtered here, not in SQL: a JSON column stores Python None as JSON ``null`` on some
        backends and as SQL NULL on others."""
        q = (
            select(
                jobs.c.id,
                jobs.c.status,
                jobs.c.model,
                jobs.c.spec,
                jobs.c.measured,
                jobs.c.error,
                jobs.c.finished_at,
            )
            .where(jobs.c.status.in_(tuple(statuses)))
            .order_by(jobs.c.created_ns, jobs.c.id)
        )
        with self.engine.begin() as c:
            return [dict(r) for r in c.execute(q).mappings() if r["measured"]]

    def update_job(self, job_id: str, expect: Iterable[str] | None = None, **values: Any) -> bool:
        """Set `values`; with `expect`, only while the job's status is one of them. True if it changed."""
        q = update(jobs).where(jobs.c.id == job_id)
        if expect is not None:
            q = q.where(jobs.c.status.in_(tuple(expect)))
        with self.engine.begin() as c:
            return c.execute(q.values(updated_at=time.time(), **values)).rowcount == 1

    def claim_job(self, job_id: str, replica: str, host: str, started_at: float, lease: str = "reconciler") -> bool:
        """queued -> running for exactly one caller, recording the owning replica and its host.

        The row is locked first (``FOR UPDATE SKIP LOCKED`` on PostgreSQL: a replica never waits on a row
        another one is claiming, it skips it); the UPDATE holds only while `replica` holds an unexpired
        `lease` (a replica that lost the reconciler lease mid-tick cannot start anything). SQLite has no
        row locks: its BEGIN IMMEDIATE serialises writers, and the conditional UPDATE decides."""
        now = time.time()
        held = (
            select(leases.c.name)
            .where(leases.c.name == lease, leases.c.holder == replica, leases.c.expires_at >= now)
            .exists()
        )
        with self.engine.begin() as c:
            if c.dialect.name == "postgresql":
                locked = c.execute(
                    select(jobs.c.id)
                    .where(jobs.c.id == job_id, jobs.c.status == QUEUED)
                    .with_for_update(skip_locked=True)
                ).first()
                if locked is None:
                    return False
            q = update(jobs).where(
                jobs.c.id == job_id, jobs.c.status == QUEUED, jobs.c.cancel_requested.is_(False), held
            )
            values = {"status": RUNNING, "started_at": started_at, "owner_replica": replica, "owner_host": host}
            return c.execute(q.values(updated_at=now, **values)).rowcount == 1

    # ---- events and checkpoints -------------------------------------------------------------------
    def add_events(
        self,
        job_id: str,
        items: Sequence[dict[str, Any]],
        offset: int | None = None,
        job_values: dict | None = None,
        expect_offset: int | None = None,
    ) -> bool:
        """Append events (and move the job's events-file offset / set job columns) in one transaction.

        With `expect_offset`, only while the stored offset is still that value (else nothing is written
        and False comes back): two replicas reading the same events file can never both insert a line."""
        with self.engine.begin() as c:
            values = dict(job_values or {})
            if offset is not None:
                values["events_offset"] = offset
            if expect_offset is not None:
                q = update(jobs).where(jobs.c.id == job_id, jobs.c.events_offset == expect_offset)
                if c.execute(q.values(updated_at=time.time(), **values)).rowcount != 1:
                    return False
                values = {}
            if items:
                c.execute(insert(events), [{"job_id": job_id, "created_at": _now(), **e} for e in items])
            if values:
                c.execute(update(jobs).where(jobs.c.id == job_id).values(updated_at=time.time(), **values))
        return True

    def list_events(
        self, job_id: str, after: str | None = None, limit: int = 20, order: str = "desc"
    ) -> tuple[list[dict[str, Any]], bool]:
        q = select(events).where(events.c.job_id == job_id)
        return self._page(q, events, after, limit, order, key=(events.c.seq,))

    def add_checkpoint(self, row: dict[str, Any]) -> None:
        with self.engine.begin() as c:
            c.execute(insert(checkpoints).values(created_at=_now(), **row))

    def delete_checkpoints(self, ids: Sequence[str]) -> None:
        if ids:
            with self.engine.begin() as c:
                c.execute(delete(checkpoints).where(checkpoints.c.id.in_(list(ids))))

    def list_checkpoints(
        self, job_id: str, after: str | None = None, limit: int = 10
    ) -> tuple[list[dict[str, Any]], bool]:
        q = select(checkpoints).where(checkpoints.c.job_id == job_id)
        return self._page(q, checkpoints, after, limit, "desc", key=(checkpoints.c.seq,))

    def count_events(self, job_id: str) -> int:
        with self.engine.begin() as c:
            return int(c.execute(select(func.count()).select_from(events).where(events.c.job_id == job_id)).scalar())

    # ---- webhooks --------------------------------------------------------------------------------
    def add_webhook(self, row: dict[str, Any]) -> None:
        with self.engine.begin() as c:
            c.execute(insert(webhooks).values(created_at=_now(), status="pending", attempts=0, **row))

    def due_webhooks(self, now: float, limit: int = 20) -> list[dict[str, Any]]:
        q = (
            select(webhooks)
            .where(webhooks.c.status == "pending", webhooks.c.next_attempt_at <= now)
            .order_by(webhooks.c.next_attempt_at)
            .limit(limit)
        )
        with self.engine.begin() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def webhooks_for(self, job_id: str) -> list[dict[str, Any]]:
        with self.engine.begin() as c:
            return [dict(r) for r in c.execute(select(webhooks).where(webhooks.c.job_id == job_id)).mappings()]

    def update_webhook(self, wid: str, **values: Any) -> None:
        with self.engine.begin() as c:
            c.execute(update(webhooks).where(webhooks.c.id == wid).values(**values))

    # ---- pagination -------------------------------------------------------------------------------
    def _page(
        self, q: Any, table: Table, after: str | None, limit: int, order: str, key: tuple
    ) -> tuple[list[dict[str, Any]], bool]:
        """OpenAI's cursor pages: `after` is the id of the last item of the previous page."""
        desc = order == "desc"
        if after is not None:
            with self.engine.begin() as c:
                anchor = c.execute(select(*key).where(table.c.id == after)).first()
            if anchor is None:
                return [], False
            if len(key) == 1:
                q = q.where(key[0] < anchor[0] if desc else key[0] > anchor[0])
            else:  # (created_at, id) tuples: ties on the timestamp broken by id
                a, b = key
                if desc:
                    q = q.where((a < anchor[0]) | ((a == anchor[0]) & (b < anchor[1])))
                else:
                    q = q.where((a > anchor[0]) | ((a == anchor[0]) & (b > anchor[1])))
        q = q.order_by(*[(k.desc() if desc else k.asc()) for k in key]).limit(limit + 1)
        with self.engine.begin() as c:
            rows = [dict(r) for r in c.execute(q).mappings()]
        return rows[:limit], len(rows) > limit
