"""Alembic migrations of the job store (``advisor db upgrade``); see advisor.jobs.schema."""
