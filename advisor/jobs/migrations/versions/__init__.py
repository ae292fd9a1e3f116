"""Alembic revisions of the job store, oldest first (0001 is the schema before migrations existed)."""
