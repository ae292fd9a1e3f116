"""`advisor serve` and `advisor openapi`: the CLI edges of the HTTP service.

FastAPI, uvicorn and pydantic-settings are imported inside the commands, so the other subcommands
start as fast as before. Flags override ``ADVISOR_*`` environment variables; API keys come from
the environment only (a flag would show them in `ps`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

#: Settings field -> flag (fields without a flag are named by their environment variable)
SERVE_FLAGS = {
    "host": "--host",
    "port": "--port",
    "workers": "--workers",
    "data_dir": "--data-dir",
    "database_url": "--database-url",
    "gpu_files": "--gpu-file",
    "price_file": "--price-file",
    "lock_advice": "--lock-advice",
    "max_body_bytes": "--max-body-bytes",
    "log_level": "--log-level",
    "access_log": "--access-log",
}


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the REST service (settings: ADVISOR_* environment variables, flags win)")
    p.add_argument("--host", default=None, help="interface to bind (default 127.0.0.1; 0.0.0.0 in the container)")
    p.add_argument("--port", type=int, default=None, help="default 8000")
    p.add_argument("--workers", type=int, default=None, help="uvicorn worker processes (default 1)")
    p.add_argument("--data-dir", default=None, help="service state (default ~/.local/share/tuneadvisor)")
    p.add_argument("--database-url", default=None, help="SQLAlchemy URL of the store (default SQLite in data dir)")
    p.add_argument("--gpu-file", action="append", default=None, help="extra/overriding GPUs (JSON); repeatable")
    p.add_argument("--price-file", default=None, help="price overrides (JSON)")
    p.add_argument(
        "--lock-advice", action=argparse.BooleanOptionalAction, default=None, help="require API keys for advice too"
    )
    p.add_argument("--max-body-bytes", type=int, default=None, help="bigger request bodies get 413 (default 1 MiB)")
    p.add_argument("--log-level", default=None, choices=("debug", "info", "warning", "error", "critical"))
    p.add_argument(
        "--access-log", action=argparse.BooleanOptionalAction, default=None, help="JSON line per request (default on)"
    )

    p = sub.add_parser("openapi", help="write openapi/openapi.json from the app (--check: fail on drift)")
    p.add_argument("--output", default="openapi/openapi.json", help="default openapi/openapi.json")
    p.add_argument("--check", action="store_true", help="exit 1 if the file differs from the code's document")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings fields given as flags (argparse's dest is the flag's name: --gpu-file -> gpu_file)."""
    out = {}
    for field, flag in SERVE_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            out[field] = value
    return out


def _env_value(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from advisor.api.settings import Settings

    overrides = _overrides(args)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for e in exc.errors():
            field = str(e["loc"][0]) if e["loc"] else "settings"
            where = SERVE_FLAGS[field] if field in overrides else f"ADVISOR_{field.upper()}"
            print(f"advisor serve: error: {where}: {e['msg']}", file=sys.stderr)
        return 2

    import uvicorn

    from advisor.api.app import create_app
    from advisor.api.observability import configure_logging
    from advisor.api.slowclients import HeadTimeoutH11Protocol

    app = create_app(settings)  # fails here, once, on a bad catalog file (before any worker starts)
    configure_logging(settings.log_level)
    try:
        settings.resolved_data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"advisor serve: warning: cannot create data dir {settings.data_dir}: {exc}", file=sys.stderr)
    common = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # ours is structured (advisor.access); uvicorn's would double every line
        server_header=False,
        timeout_graceful_shutdown=10,
        http=HeadTimeoutH11Protocol,  # closes connections whose request head never completes (slowloris)
    )
    if settings.workers > 1:
        # each worker builds its own app from the environment: hand the flags over through it
        for field, value in overrides.items():
            os.environ[f"ADVISOR_{field.upper()}"] = _env_value(value)
        from advisor.api.workers import run_workers

        run_workers("advisor.api.app:app_from_env", settings.workers, **common)
    else:
        uvicorn.run(app, **common)
    return 0


def cmd_openapi(args: argparse.Namespace) -> int:
    from advisor.api import openapi

    path = Path(args.output)
    if args.check:
        problem = openapi.drift(path)
        if problem:
            print(f"advisor openapi: {problem}; run `advisor openapi` and commit it", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    openapi.write(path)
    print(f"wrote {path}")
    return 0
