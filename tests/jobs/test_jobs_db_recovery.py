"""An emptied or damaged advisor.db (issue 14): job routes refuse with a recovery command, advice serves.

The fixtures are real data directories: job directories and uploaded files on disk (what a server leaves
behind) next to a zero-byte or garbage database file, as a failed copy or a truncation leaves it."""

from __future__ import annotations

from pathlib import Path

import pytest
from jobs_helpers import AUTH

from advisor.cli import main

JOBS = "/v1/fine_tuning/jobs"


def _leftovers(data: Path, db: bytes) -> Path:
    (data / "jobs" / "ftjob-000000000001").mkdir(parents=True)
    (data / "jobs" / "ftjob-000000000001" / "events.jsonl").write_text('{"message": "step 1"}\n')
    (data / "files").mkdir()
    (data / "files" / "file-abc.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (data / "advisor.db").write_bytes(db)
    return data


@pytest.mark.parametrize(
    ("content", "says"),
    [(b"", "empty (0 bytes)"), (b"\x13garbage, not SQLite" * 64, "damaged (not an SQLite database)")],
)
def test_a_lost_database_stops_the_job_routes_not_the_advice(
    make_client, tmp_path: Path, content: bytes, says: str
) -> None:
    data = _leftovers(tmp_path / "data", content)
    client = make_client(data_dir=data)
    r = client.get(JOBS, headers=AUTH)
    assert r.status_code == 503, r.text
    msg = r.json()["error"]["message"]
    assert says in msg and "advisor db reset --confirm" in msg and "advisor db backup" in msg
    assert (
        client.post(
            "/v1/files", headers=AUTH, files={"file": ("t.jsonl", b"{}")}, data={"purpose": "fine-tune"}
        ).status_code
        == 503
    )
    assert client.get("/v1/gpus").status_code == 200  # the advice routes keep serving
    ready = client.get("/readyz")
    assert ready.status_code == 503
    check = next(c for c in ready.json()["checks"] if c["name"] == "job_store")
    assert not check["ok"] and says in check["detail"] and str(tmp_path) not in check["detail"]
    assert (data / "advisor.db").read_bytes() == content  # never written over


def test_reset_moves_the_damaged_file_aside_and_the_server_starts_empty(make_client, tmp_path: Path, capsys) -> None:
    data = _leftovers(tmp_path / "data", b"")
    assert main(["db", "status", "--data-dir", str(data)]) == 1
    assert "records were lost" in capsys.readouterr().err
    assert main(["db", "reset", "--data-dir", str(data)]) == 2  # needs --confirm
    assert main(["db", "reset", "--data-dir", str(data), "--confirm"]) == 0
    assert [p.name for p in data.glob("advisor.db.damaged-*")]
    assert main(["db", "backup", str(tmp_path / "backup.db"), "--data-dir", str(data)]) == 0
    assert (tmp_path / "backup.db").read_bytes()[:16] == b"SQLite format 3\x00"
    client = make_client(data_dir=data)
    assert client.get(JOBS, headers=AUTH).json()["data"] == []
