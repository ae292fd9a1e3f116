"""Errors of the job layer, each with the HTTP status and code the API answers with.

They subclass AdvisorError (so anything that already handles the core's errors handles these), and
carry ``status``/``code`` so the routes translate them at one place without a table to keep in step.
"""

from __future__ import annotations

from typing import Any

from advisor.errors import AdvisorError


class JobsError(AdvisorError):
    """A request the job layer refuses; `status` and `code` are what the API answers."""

    status = 422
    code = "invalid_input"

    def __init__(self, message: str, *, field: str | None = None, extra: dict[str, Any] | None = None):
        super().__init__(message, field=field)
        self.extra = dict(extra or {})


class NotFoundError(JobsError):
    status = 404
    code = "not_found"


class ConflictError(JobsError):
    status = 409
    code = "conflict"


class FileValidationError(JobsError):
    """A training file that is not valid JSONL in a supported format; `line` is 1-based."""

    status = 400
    code = "invalid_file"

    def __init__(self, message: str, *, line: int | None = None, field: str = "file"):
        super().__init__(f"line {line}: {message}" if line else message, field=field)
        self.line = line


class FileTooLargeError(JobsError):
    status = 413
    code = "file_too_large"


class PlanDoesNotFitError(JobsError):
    """The estimator says the plan will not fit the target device; `extra['estimate']` has the breakdown."""

    status = 409
    code = "plan_does_not_fit"


class ModelSourceError(JobsError):
    """A model that is neither a known Hugging Face id nor a directory under the allowed roots."""

    status = 422
    code = "invalid_model_source"


class UnavailableError(JobsError):
    """The job layer cannot run right now (e.g. the data directory does not exist yet)."""

    status = 503
    code = "unavailable"
