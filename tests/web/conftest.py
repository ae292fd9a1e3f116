"""Fixtures of the browser tests: one real server (uvicorn on loopback) and one headless Debian Chromium.

Chromium is Debian's (``/usr/bin/chromium``, or ``ADVISOR_CHROMIUM``): Playwright's own browser download
cannot reach its host here, so Playwright drives that binary through ``executable_path``. ``.ci/run``
installs it (``tools/install_browser.sh``), so CI never skips; a machine without it skips with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

KEY = "web-test-key-" + "z" * 20


def chromium_path() -> str | None:
    exe = os.environ.get("ADVISOR_CHROMIUM") or "/usr/bin/chromium"
    return exe if Path(exe).exists() else shutil.which("chromium")


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    exe = chromium_path()
    if exe is None:
        pytest.skip("Debian's chromium is not installed (tools/install_browser.sh installs it; .ci/run runs that)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="session")
def web_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's data dir and model root (the job test writes its tiny model under it)."""
    return tmp_path_factory.mktemp("web")


@pytest.fixture(scope="session")
def server(web_root: Path) -> Iterator[str]:
    """The base URL of a real app (jobs on the host CPU, one torch thread) served for the whole session."""
    from advisor.api.app import create_app
    from advisor.api.settings import Settings
    from advisor.api.testing import serve_in_thread

    data = web_root / "data"
    data.mkdir()
    settings = Settings(
        data_dir=data,
        api_keys=[KEY],
        model_roots=[str(web_root / "models")],
        job_gpu="cpu",
        job_cpu_threads=1,
        job_poll_interval_s=0.1,
        cancel_grace_s=5.0,
        access_log=False,
    )
    try:
        with serve_in_thread(create_app(settings)) as url:
            yield url
    finally:
        _kill_jobs(data)


def _kill_jobs(data: Path) -> None:
    """Training processes are their own sessions: kill any the job test left behind, by pid."""
    with contextlib.suppress(ImportError):
        import sys

        sys.path.insert(0, str(Path(__file__).parents[1] / "jobs"))
        from jobs_helpers import kill_job_processes

        kill_job_processes(data)


@pytest.fixture(scope="session")
def api_key() -> str:
    return KEY


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh browser context (own sessionStorage and history) and page; page errors fail the test."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.set_default_timeout(15_000)
    try:
        yield pg
    finally:
        ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
