"""Alembic's environment for the job store: runs on the connection advisor.jobs.schema hands in.

Why no alembic.ini and no URL here: the service, the CLI (``advisor db upgrade``) and the tests all
migrate through advisor.jobs.schema with an engine they already built (SQLite pragmas included), so
there is one way in and no second place that reads the database URL.
"""

from __future__ import annotations

from alembic import context

from advisor.jobs.store import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
