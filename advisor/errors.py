"""One error tree for the pure core.

Every error names the input `field` it is about, so the CLI can name the flag and the API the JSON
path, and may carry close-match `suggestions`:

- AdvisorError                 base class; never raised itself
  - InvalidInputError          a value is malformed or out of range (CLI exit 2, HTTP 422)
  - UnknownModelError          no catalog model/alias matches (HTTP 404), with suggestions
  - UnknownGpuError            no catalog GPU/alias matches (HTTP 404), with suggestions
  - ClosedModelError           the weights are not available for local fine-tuning (HTTP 422)
  - NoFeasiblePlanError        nothing fits; `reasons` says why and what to change (HTTP 409 in the API)
"""

from __future__ import annotations


class AdvisorError(Exception):
    """Base of all advisor errors; `field` names the offending input."""

    def __init__(self, message: str, *, field: str | None = None, suggestions: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        self.suggestions = list(suggestions or [])

    def __str__(self) -> str:
        text = self.message
        if self.suggestions:
            text += " Did you mean: " + ", ".join(self.suggestions) + "?"
        return text


class InvalidInputError(AdvisorError):
    pass


class UnknownModelError(AdvisorError):
    pass


class UnknownGpuError(AdvisorError):
    pass


class ClosedModelError(AdvisorError):
    pass


class NoFeasiblePlanError(AdvisorError):
    def __init__(self, message: str, *, field: str | None = None, reasons: list[str] | None = None):
        super().__init__(message, field=field)
        self.reasons = list(reasons or [])
