"""Moved to ``advisor.stack.device`` (torch side) and ``advisor.devices`` (no torch); re-exported for
the calibration API route."""

from advisor.stack.device import describe, resolve_device

__all__ = ["describe", "resolve_device"]
