"""Fixtures for the job tests: a tiny real model on disk, training files, and apps configured for them.

The model is a real Llama architecture scaled down (hidden 64, 2 layers) with random weights and a
word-level tokenizer trained here, so every job trains for real in seconds on the CPU. Training
processes run with one torch thread (the suite shares two cores). Every fixture that can leave a
training process behind kills it by pid when the test ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# pytest runs with --import-mode=importlib (no sys.path entries per test dir): make the helpers importable
sys.path.insert(0, str(Path(__file__).parent))
from jobs_helpers import job_settings, kill_job_processes

#: the PostgreSQL server the store tests use (CI and dev machines run one: trust auth, database `test`)
PG_URL = os.environ.get("ADVISOR_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one test (dropped after, connections included): its URL.

    Unreachable server: the test fails (CI and our machines run one), unless ADVISOR_TEST_SKIP_PG=1 says
    this machine has none, where it is skipped."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError

    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    name = "advisor_t_" + secrets.token_hex(6)
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        if os.environ.get("ADVISOR_TEST_SKIP_PG") != "1":
            raise
        pytest.skip(f"PostgreSQL at {PG_URL} is not reachable: {str(exc).splitlines()[0]}")
    try:
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A job database URL on each backend: SQLite in tmp_path, PostgreSQL in a database of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sub' / 'advisor.db'}"
    else:
        with pg_database() as url:
            yield url


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database (the replica tests: several servers share it)."""
    with pg_database() as url:
        yield url


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/model (chat template), <root>/model-plain (none), train.jsonl, valid.jsonl, completion.jsonl."""
    pytest.importorskip("torch")
    from advisor.jobs.tiny import counting_examples, save_tiny_model, write_jsonl

    root = tmp_path_factory.mktemp("models")
    save_tiny_model(root / "model", initializer_range=0.2)
    save_tiny_model(root / "model-plain", chat_template=False, initializer_range=0.2)
    write_jsonl(root / "train.jsonl", counting_examples(64, seed=0))
    write_jsonl(root / "valid.jsonl", counting_examples(8, seed=1))
    write_jsonl(root / "completion.jsonl", counting_examples(64, seed=2, fmt="completion"))
    return root


@pytest.fixture
def big_root(tmp_path: Path) -> Path:
    """A root holding llama-7b/: Llama-2-7B's config.json and no weights (enough for the fit check)."""
    d = tmp_path / "big" / "llama-7b"
    d.mkdir(parents=True)
    cfg = {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    }
    (d / "config.json").write_text(json.dumps(cfg))
    return d.parent


@pytest.fixture
def make_client(tmp_path: Path, tiny_root: Path) -> Iterator[Callable[..., Any]]:
    """make_client(**settings) -> a started TestClient on a fresh data dir (closed and cleaned after)."""
    from fastapi.testclient import TestClient

    from advisor.api.app import create_app

    opened: list[tuple[Any, Path]] = []

    def make(roots: list[Path] | None = None, data_dir: Path | None = None, **overrides: Any) -> Any:
        data = data_dir or tmp_path / f"data{len(opened)}"
        data.mkdir(parents=True, exist_ok=True)
        client = TestClient(create_app(job_settings(data, roots or [tiny_root], **overrides)))
        client.__enter__()
        opened.append((client, data))
        return client

    yield make
    for client, data in opened:
        with contextlib.suppress(Exception):
            client.__exit__(None, None, None)
        kill_job_processes(data)


@pytest.fixture
def client(make_client: Callable[..., Any]) -> Any:
    return make_client()
