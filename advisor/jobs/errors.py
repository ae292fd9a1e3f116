"""Errors of the job layer, each with the HTTP status and code the API answers with.

They subclass AdvisorError (so anything that already handles the core's errors handles these). Each
kind is one line: its data (``status``, ``code``) are class keywords of the base, JobsError, and the API
answers every one of them at one place (advisor.api.errors) from that data: `code` is the body's
``code`` and the ``type`` of its field error, ``extra`` joins the body.
"""

from __future__ import annotations

from typing import Any, ClassVar

from advisor.errors import AdvisorError


class JobsError(AdvisorError):
    """A request the job layer refuses; `status` and `code` are what the API answers, `extra` more body fields."""

    status: ClassVar[int] = 422
    code: ClassVar[str] = "invalid_input"

    def __init_subclass__(cls, *, status: int | None = None, code: str | None = None, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.status = cls.status if status is None else status
        cls.code = cls.code if code is None else code

    def __init__(self, message: str, *, field: str | None = None, extra: dict[str, Any] | None = None):
        super().__init__(message, field=field)
        self.extra = dict(extra or {})


class NotFoundError(JobsError, status=404, code="not_found"):
    """A job, file or plan the caller does not have."""


class ConflictError(JobsError, status=409, code="conflict"):
    """The request contradicts the object's state (e.g. cancelling a finished job)."""


class FileTooLargeError(JobsError, status=413, code="file_too_large"):
    """A training file over ADVISOR_MAX_FILE_BYTES."""


class PlanDoesNotFitError(JobsError, status=409, code="plan_does_not_fit"):
    """The estimator says the plan will not fit the target device; `extra['estimate']` has the breakdown."""


class ModelSourceError(JobsError, status=422, code="invalid_model_source"):
    """A model that is neither a known Hugging Face id nor a directory under the allowed roots."""


class UnavailableError(JobsError, status=503, code="unavailable"):
    """The job layer cannot run right now (e.g. the data directory does not exist yet)."""


class FileValidationError(JobsError, status=400, code="invalid_file"):
    """A training file that is not valid JSONL in a supported format; `line` (1-based) joins the body."""

    def __init__(self, message: str, *, line: int | None = None, field: str = "file"):
        text = f"line {line}: {message}" if line else message
        super().__init__(text, field=field, extra={"line": line} if line else None)
        self.line = line


class InsufficientStorageError(JobsError, status=507, code="insufficient_storage"):
    """The server's disk (or quota) is full: the write was refused and nothing half-written was kept."""
