"""openapi/openapi.json: exported from the app built on default settings, checked for drift.

``advisor openapi`` rewrites it; ``advisor openapi --check`` exits non-zero when the committed file
differs from what the code produces (a test runs the same comparison).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from advisor.api.app import create_app
from advisor.api.settings import default_settings

DEFAULT_PATH = Path("openapi/openapi.json")


def openapi_document() -> dict[str, Any]:
    return create_app(default_settings()).openapi()


def render(doc: dict[str, Any] | None = None) -> str:
    """Stable text: 2-space indent, keys in the app's order, trailing newline (diff-friendly)."""
    return json.dumps(openapi_document() if doc is None else doc, indent=2, ensure_ascii=False) + "\n"


def drift(path: Path = DEFAULT_PATH) -> str | None:
    """None when `path` holds exactly the current document, else why not."""
    if not path.is_file():
        return f"{path} does not exist"
    if path.read_text(encoding="utf-8") != render():
        return f"{path} is out of date with the code"
    return None


def write(path: Path = DEFAULT_PATH) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(), encoding="utf-8")
