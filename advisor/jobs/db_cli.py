"""`advisor db ...`: the job database's schema and backups, for operators.

- ``advisor db status``: the schema revision and whether the service would start on it;
- ``advisor db upgrade``: migrate an older schema (or one from before migrations) to this advisor's;
- ``advisor db backup FILE``: a consistent copy while the server runs (SQLite's online backup API; for
  PostgreSQL it says to use ``pg_dump``, which is the right tool there);
- ``advisor db reset --confirm``: move a damaged or emptied SQLite file aside and start an empty one
  (the job directories and uploaded files stay on disk).

Why here and not in the server: migrating and restoring are decisions for whoever deploys, taken
once, while every replica is stopped or tolerant; the server only refuses (advisor.jobs.schema).
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("db", help="the job database: status, upgrade (migrations), backup, reset")
    p.add_argument("action", choices=["status", "upgrade", "backup", "reset"])
    p.add_argument("file", nargs="?", help="backup: the file to write")
    p.add_argument("--data-dir", default=None, help="service state (default: ADVISOR_DATA_DIR or the default)")
    p.add_argument("--database-url", default=None, help="SQLAlchemy URL (default: ADVISOR_DATABASE_URL or SQLite)")
    p.add_argument("--confirm", action="store_true", help="reset: really move the database file aside")


def _target(args: argparse.Namespace) -> tuple[str, Path]:
    from advisor.api.settings import Settings

    overrides: dict[str, Any] = {}
    if args.data_dir:
        overrides["data_dir"] = Path(args.data_dir)
    if args.database_url:
        overrides["database_url"] = args.database_url
    s = Settings(**overrides)
    return s.resolved_database_url, s.resolved_data_dir


def cmd_db(args: argparse.Namespace) -> int:
    from sqlalchemy.engine import make_url  # here, not at import: `advisor --help` stays light

    from advisor.jobs import schema
    from advisor.jobs.store import Store

    url, data_dir = _target(args)
    shown = make_url(url).render_as_string(hide_password=True)
    sqlite_file = make_url(url).database if make_url(url).get_backend_name() == "sqlite" else None

    if args.action == "reset":
        if not sqlite_file or sqlite_file == ":memory:":
            print("advisor db reset: only for an SQLite file (restore PostgreSQL with pg_restore)", file=sys.stderr)
            return 2
        db = Path(sqlite_file).expanduser()
        if not args.confirm:
            print(f"advisor db reset: would move {db} aside and create an empty schema; add --confirm", file=sys.stderr)
            return 2
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            src = db.with_name(db.name + suffix)
            if src.exists():
                src.rename(db.with_name(f"{db.name}.damaged-{stamp}{suffix}"))
        print(f"moved {db.name} aside as {db.name}.damaged-{stamp}")
        args.action = "upgrade"
        damage = None  # a fresh file now: the job directories on disk are known to be orphans
    else:
        damage = schema.damage_report(url, data_dir)
    if damage and args.action != "backup":
        print(f"advisor db {args.action}: {damage}. To recover: {schema.recovery_hint(url)}", file=sys.stderr)
        return 1

    if args.action == "backup":
        if not args.file:
            print("advisor db backup: name the file to write", file=sys.stderr)
            return 2
        if not sqlite_file:
            print(
                "advisor db backup: for PostgreSQL use its own tools: pg_dump --format=custom --file=FILE "
                f"'{make_url(url).set(drivername='postgresql').render_as_string(hide_password=True)}' (restore: pg_restore --clean --dbname=URL FILE)",
                file=sys.stderr,
            )
            return 2
        if damage:
            print(f"advisor db backup: {damage}: nothing trustworthy to back up", file=sys.stderr)
            return 1
        out = Path(args.file).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        src = sqlite3.connect(f"file:{Path(sqlite_file).expanduser()}?mode=ro", uri=True)
        dst = sqlite3.connect(out)
        try:
            src.backup(dst)  # SQLite's online backup: consistent while the server writes
        finally:
            dst.close()
            src.close()
        print(f"backed up {shown} to {out} ({out.stat().st_size} bytes)")
        return 0

    store = Store(url)
    try:
        if args.action == "status":
            with store.engine.connect() as c:
                st = schema.state(c)
            print(f"{shown}: {st.summary}")
            return 0 if st.current == st.head or st.empty else 1
        try:
            before, after = schema.upgrade(store.engine)
        except schema.SchemaError as exc:
            print(f"advisor db upgrade: {exc}", file=sys.stderr)
            return 1
        if before.current == after.current:
            print(f"{shown}: already at {after.current}")
        else:
            print(f"{shown}: upgraded from {before.current or 'no revision'} to {after.current}")
        return 0
    finally:
        store.close()
