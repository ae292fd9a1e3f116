"""Apps for the API tests: each test gets its own app (own settings, metrics, readiness list)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from advisor.api.app import create_app
from advisor.api.settings import Settings
from advisor.api.testing import serve_in_thread


@pytest.fixture
def make_app(tmp_path: Path) -> Callable[..., FastAPI]:
    """make_app(**settings) -> an app on those settings (data_dir: the test's temp dir unless given)."""

    def make(**overrides: object) -> FastAPI:
        overrides.setdefault("data_dir", tmp_path)
        return create_app(Settings(**overrides))

    return make


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path)


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="session")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real uvicorn server on 127.0.0.1 for the whole session (default settings, temp data dir; CPU-heavy
    simulation off, so fuzzed bodies cannot queue minutes of traces; Hub look-ups off, so fuzzed 'org/name'
    models never leave this machine)."""
    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("live-data"), allow_simulation=False, hub_lookups=False))
    with serve_in_thread(app) as url:
        yield url
