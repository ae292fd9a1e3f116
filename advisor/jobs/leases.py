"""Leases in the job database: which replicas live, and which one reconciles.

Why leases in the database and not a lock file: replicas on several hosts share only the database.
Each replica renews a row ``replica:<id>`` (liveness), and one holds ``reconciler`` (it validates,
schedules, follows and finishes jobs). A lease is an expiry time: a replica that stops renewing (killed,
partitioned, frozen) loses it after `lease_s`, and another takes it with one conditional UPDATE, so
two replicas never both believe they hold it after a renewal. A holder on *this* host whose pid is gone
is known dead at once (a restarted single server does not wait for its own old lease).

Claims are fenced by the lease: ``Store.claim_job`` only moves a job to ``running`` while the claiming
replica holds an unexpired ``reconciler`` lease, in the same statement.

Clocks: expiry compares wall clocks of the replicas (``time.time``); keep them synchronised (NTP),
with skew well under `lease_s`.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import and_, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from advisor.jobs import store as S

RECONCILER = "reconciler"


def replica_lease(replica_id: str) -> str:
    return f"replica:{replica_id}"


def default_replica_id() -> str:
    """host-pid-random: unique per process start, readable in events and /readyz."""
    return f"{socket.gethostname()[:64]}-{os.getpid()}-{secrets.token_hex(2)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Leases:
    """One replica's view of the lease table."""

    store: S.Store
    replica_id: str = field(default_factory=default_replica_id)
    lease_s: float = 30.0
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    clock: Callable[[], float] = time.time

    def acquire(self, name: str) -> bool:
        """Take or renew lease `name` for this replica; True while this replica holds it."""
        now = self.clock()
        t = S.leases
        values = {
            "holder": self.replica_id,
            "host": self.host,
            "pid": self.pid,
            "renewed_at": now,
            "expires_at": now + self.lease_s,
        }
        with self.store.engine.begin() as c:
            ours = c.execute(update(t).where(t.c.name == name, t.c.holder == self.replica_id).values(**values)).rowcount
            if ours:
                return True
            row = c.execute(select(t).where(t.c.name == name)).mappings().first()
            if row is None:
                try:
                    with c.begin_nested():
                        c.execute(insert(t).values(name=name, acquired_at=now, **values))
                    return True
                except IntegrityError:
                    return False  # another replica inserted it first
            dead_here = row["host"] == self.host and row["pid"] != self.pid and not _pid_alive(int(row["pid"]))
            if row["expires_at"] >= now and not dead_here:
                return False
            taken = c.execute(
                update(t)
                .where(t.c.name == name, t.c.holder == row["holder"], t.c.renewed_at == row["renewed_at"])
                .values(acquired_at=now, **values)
            ).rowcount
            return taken == 1

    def release(self, name: str) -> None:
        with self.store.engine.begin() as c:
            c.execute(delete(S.leases).where(S.leases.c.name == name, S.leases.c.holder == self.replica_id))

    def holder(self, name: str) -> dict | None:
        """The row of lease `name` (holder, host, expires_at...), or None."""
        with self.store.engine.begin() as c:
            row = c.execute(select(S.leases).where(S.leases.c.name == name)).mappings().first()
        return dict(row) if row else None

    def live_replicas(self) -> list[dict]:
        """Replica leases not yet expired."""
        t = S.leases
        q = select(t).where(t.c.name.like("replica:%"), t.c.expires_at >= self.clock()).order_by(t.c.name)
        with self.store.engine.begin() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def orphans(self) -> list[dict]:
        """Running or cancelling jobs this replica does not own: the reconciler takes them over (only the
        reconciler follows jobs, so a job owned by any other replica has nobody following it)."""
        j = S.jobs
        q = (
            select(j)
            .where(
                j.c.status.in_([S.RUNNING, S.CANCELLING]),
                or_(j.c.owner_replica.is_(None), j.c.owner_replica != self.replica_id),
            )
            .order_by(j.c.created_ns)
        )
        with self.store.engine.begin() as c:
            return [dict(r) for r in c.execute(q).mappings()]

    def take_over(self, job: dict) -> bool:
        """Make this replica the job's owner, unless someone else changed the owner meanwhile."""
        j = S.jobs
        prev = job.get("owner_replica")
        cond = j.c.owner_replica.is_(None) if prev is None else j.c.owner_replica == prev
        with self.store.engine.begin() as c:
            n = c.execute(
                update(j)
                .where(and_(j.c.id == job["id"], cond, j.c.status.in_([S.RUNNING, S.CANCELLING])))
                .values(owner_replica=self.replica_id, owner_host=self.host)
            ).rowcount
        return n == 1
