"""The job store's schema version: Alembic migrations, and the checks the service runs before it starts.

Why refuse instead of migrating on start: with several replicas, an older replica starting against a
database a newer one migrated would write rows it does not understand, and a newer replica silently
migrating under older ones breaks them. So the service creates the schema only in an empty database;
an older schema asks for ``advisor db upgrade`` (run once, by whoever deploys), a newer one asks for
a newer advisor. Migrations run under a database lock (PostgreSQL advisory lock, SQLite's BEGIN
IMMEDIATE), so replicas starting together on an empty database create it once.

Also here: `damage_report`, which tells an empty or damaged SQLite file apart from a new deployment by
what the data directory holds (uploaded files, job directories): records that existed must not
silently become an empty job list.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.engine import make_url

from advisor.jobs.errors import UnavailableError

MIGRATIONS = Path(__file__).parent / "migrations"
UPGRADE_COMMAND = "advisor db upgrade"
_PG_LOCK = 0x61647669  # pg_advisory_xact_lock key: 'advi'


class SchemaError(UnavailableError):
    """The database's schema is not the one this advisor runs on: the job layer does not start (503)."""


@dataclass(frozen=True)
class SchemaState:
    current: str | None  # the database's Alembic revision (None: none recorded)
    head: str  # the newest revision this advisor knows
    known: bool  # `current` is one of this advisor's revisions
    legacy: bool  # tables made before migrations existed (no revision recorded)
    empty: bool  # no job tables at all

    @property
    def summary(self) -> str:
        if self.empty:
            return f"empty database (this advisor creates schema {self.head})"
        if self.legacy:
            return f"schema from before migrations; `{UPGRADE_COMMAND}` brings it to {self.head}"
        if not self.known:
            return f"schema {self.current} is newer than this advisor knows (newest: {self.head})"
        if self.current != self.head:
            return f"schema {self.current} is older than {self.head}; run `{UPGRADE_COMMAND}`"
        return f"schema {self.head} (current)"


def _config(conn: Connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def _revisions() -> tuple[str, set[str]]:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    script = ScriptDirectory.from_config(cfg)
    head = script.get_current_head()
    assert head is not None
    return head, {r.revision for r in script.walk_revisions()}


def _lock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK})


def state(conn: Connection) -> SchemaState:
    head, known = _revisions()
    tables = set(inspect(conn).get_table_names())
    current = None
    if "alembic_version" in tables:
        current = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    empty = not (tables & {"ft_jobs", "ft_files"})
    return SchemaState(
        current=current,
        head=head,
        known=current is None or current in known,
        legacy=current is None and not empty,
        empty=empty and current is None,
    )


def ensure(engine: Engine) -> SchemaState:
    """Create the schema in an empty database; pass at the head; raise SchemaError otherwise."""
    from alembic import command

    with engine.begin() as conn:
        _lock(conn)
        st = state(conn)
        if st.empty:
            command.upgrade(_config(conn), "head")
            return state(conn)
    if st.current == st.head:
        return st
    raise SchemaError(f"the job database holds {st.summary}", field="database_url")


def upgrade(engine: Engine) -> tuple[SchemaState, SchemaState]:
    """`advisor db upgrade`: a legacy database is stamped at the baseline, then everything migrates to head."""
    from alembic import command

    with engine.begin() as conn:
        _lock(conn)
        before = state(conn)
        if not before.known:
            raise SchemaError(f"the job database holds {before.summary}: upgrade the advisor", field="database_url")
        cfg = _config(conn)
        if before.legacy:
            command.stamp(cfg, "0001_baseline")
        command.upgrade(cfg, "head")
        return before, state(conn)


# ---- an empty or damaged SQLite file ---------------------------------------------------------------------
SQLITE_HEADER = b"SQLite format 3\x00"


def damage_report(database_url: str, data_dir: Path) -> str | None:
    """Why the SQLite job database cannot be trusted, or None.

    Records existed when the data directory holds uploaded files or job directories; then a missing,
    zero-byte or header-less database file means they were lost (a failed copy, a truncation), and
    starting on it would list nothing and accept new jobs over the old directories. No paths in the
    message: /readyz shows it to anyone."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    db = Path(url.database).expanduser()
    evidence = _on_disk(data_dir)
    try:
        with db.open("rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        header = None
    except OSError as exc:
        return f"the job database file cannot be read ({type(exc).__name__})"
    if header is None or header == b"":
        if not evidence:
            return None  # a new deployment
        what = "missing" if header is None else "empty (0 bytes)"
        return f"the job database file is {what} but the data directory holds {evidence}: its records were lost"
    if header != SQLITE_HEADER:
        return "the job database file is damaged (not an SQLite database)"
    return None


def _on_disk(data_dir: Path) -> str:
    """'3 job directories and 5 uploaded files' (what the data directory says existed), or ''."""
    counts = []
    for sub, noun in (("jobs", "job directories"), ("files", "uploaded files")):
        d = data_dir / sub
        n = sum(1 for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else 0
        if n:
            counts.append(f"{n} {noun}")
    return " and ".join(counts)


def recovery_hint(database_url: str) -> str:
    """What an operator does about a damaged SQLite database (the 503's second sentence)."""
    return (
        "stop the server, move advisor.db aside and restore the latest backup "
        "(made with `advisor db backup <file>`), or start empty with `advisor db reset --confirm` "
        "(keeps the damaged file as advisor.db.damaged-<time>)"
    )
