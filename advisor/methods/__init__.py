"""The training methods, one module each, and their registry.

To add a method: write ``advisor/methods/<name>.py`` with a ``METHOD`` (a ``Method`` or a subclass
overriding the hooks whose physics differs), add it to ``_MODULES`` below, and test it (estimate,
recommend, the simulated trace, a calibration trial and a job build from the same hooks: see
docs/architecture.md). Nothing else in the tree compares method names.
"""

from __future__ import annotations

from advisor.errors import InvalidInputError
from advisor.methods import dora, full, lora, qlora
from advisor.methods.base import ALL_LINEAR, LORA_SHAPES, Method

_MODULES = (full, lora, qlora, dora)

#: every method by name, in the order they are shown
METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in _MODULES}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
#: what the recommend search tries when the request names no methods
DEFAULT_SEARCH: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.searched_by_default)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise InvalidInputError(
            f"unknown method {name!r}: use one of {', '.join(METHOD_NAMES)}", field="method"
        ) from None


__all__ = ["ALL_LINEAR", "DEFAULT_SEARCH", "LORA_SHAPES", "METHODS", "METHOD_NAMES", "Method", "get_method"]
