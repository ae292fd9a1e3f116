"""Training files: validated while written, 4xx naming the first bad line, nothing half-written left."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from jobs_helpers import AUTH, OTHER_AUTH, upload

from advisor.jobs.errors import FileTooLargeError, FileValidationError
from advisor.jobs.files import JsonlValidator, save_upload

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
COMPLETION = {"prompt": "a", "completion": "b"}


def _lines(*rows: object) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


@pytest.mark.parametrize(
    ("blob", "line", "words"),
    [
        (_lines(CHAT, CHAT, b"{not json"), 3, "not valid JSON"),
        (_lines(CHAT, [1, 2]), 2, "JSON object"),
        (_lines({"messages": [{"role": "user", "content": "x"}]}), 1, "no assistant message"),
        (_lines({"messages": [{"role": "wizard", "content": "x"}]}), 1, "role must be one of"),
        (_lines({"messages": [{"role": "assistant", "content": 3}]}), 1, "content must be a string"),
        (_lines({"messages": [{"role": "assistant", "content": "x", "tool_calls": []}]}), 1, "unsupported keys"),
        (_lines({"messages": [{"role": "assistant", "content": "x", "weight": 2}]}), 1, "weight must be 0 or 1"),
        (_lines(CHAT, COMPLETION), 2, "one format per file"),
        (_lines({"prompt": "a"}), 1, "`completion` must be a string"),
        (_lines({"text": "a"}), 1, "needs `messages`"),
        (_lines(CHAT) + b'{"prompt": "\xff"}\n', 2, "not UTF-8"),
    ],
)
def test_first_bad_line_is_named(blob: bytes, line: int, words: str) -> None:
    v = JsonlValidator(1 << 20, 1000)
    with pytest.raises(FileValidationError) as e:
        v.feed(blob)
        v.finish()
    assert e.value.line == line and words in str(e.value) and str(e.value).startswith(f"line {line}:")


def test_validation_does_not_depend_on_chunk_boundaries() -> None:
    blob = _lines(CHAT, b"", CHAT, CHAT)[:-1]  # no final newline
    v = JsonlValidator(1 << 20, 1000)
    for i in range(len(blob)):
        v.feed(blob[i : i + 1])
    stats = v.finish()
    assert (stats.examples, stats.format, stats.bytes) == (3, "chat", len(blob))


def test_limits() -> None:
    with pytest.raises(FileTooLargeError):
        JsonlValidator(10, 100).feed(_lines(CHAT))
    v = JsonlValidator(1 << 20, 2)
    with pytest.raises(FileValidationError, match="line 3: more than 2 examples"):
        v.feed(_lines(CHAT, CHAT, CHAT))
    with pytest.raises(FileValidationError, match="no examples"):
        JsonlValidator(100, 100).finish()


def test_a_refused_upload_leaves_nothing_on_disk(tmp_path: Path) -> None:
    dest = tmp_path / "files" / "file-1.jsonl"
    with pytest.raises(FileValidationError):
        save_upload(io.BytesIO(_lines(CHAT) * 1000 + b"oops\n"), dest, 1 << 30, 10**6)
    assert list(dest.parent.iterdir()) == []
    stats = save_upload(io.BytesIO(_lines(CHAT, CHAT)), dest, 1 << 30, 10**6)
    assert stats.examples == 2 and dest.read_bytes() == _lines(CHAT, CHAT)
    assert [p.name for p in dest.parent.iterdir()] == ["file-1.jsonl"]


# ---- over HTTP ------------------------------------------------------------------------------------------
def test_upload_list_get_content_delete(client, tiny_root: Path) -> None:
    f = upload(client, tiny_root / "train.jsonl")
    assert f["object"] == "file" and f["purpose"] == "fine-tune" and f["status"] == "processed"
    assert f["examples"] == 64 and f["format"] == "chat" and f["bytes"] == (tiny_root / "train.jsonl").stat().st_size
    listed = client.get("/v1/files", headers=AUTH).json()
    assert listed["object"] == "list" and [x["id"] for x in listed["data"]] == [f["id"]]
    assert client.get(f"/v1/files/{f['id']}", headers=AUTH).json() == f
    content = client.get(f"/v1/files/{f['id']}/content", headers=AUTH)
    assert content.content == (tiny_root / "train.jsonl").read_bytes()
    r = client.delete(f"/v1/files/{f['id']}", headers=AUTH)
    assert r.json() == {"id": f["id"], "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{f['id']}", headers=AUTH).status_code == 404
    assert client.delete(f"/v1/files/{f['id']}", headers=AUTH).status_code == 404


def test_bad_upload_is_a_400_naming_the_line_and_leaves_no_file(client, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(_lines(CHAT, CHAT, {"messages": []}))
    with bad.open("rb") as fh:
        r = client.post("/v1/files", headers=AUTH, files={"file": ("bad.jsonl", fh)}, data={"purpose": "fine-tune"})
    assert r.status_code == 400
    body = r.json()["error"]
    assert body["code"] == "invalid_file" and body["line"] == 3 and body["param"] == "file"
    assert "line 3" in body["message"] and body["type"] == "invalid_request_error"
    files_dir = Path(client.app.state.settings.data_dir) / "files"
    assert list(files_dir.iterdir()) == []
    assert client.get("/v1/files", headers=AUTH).json()["data"] == []


def test_upload_limits_and_purpose(make_client, tmp_path: Path, tiny_root: Path) -> None:
    c = make_client(max_file_bytes=2048, max_file_examples=10)
    with (tiny_root / "train.jsonl").open("rb") as fh:
        r = c.post("/v1/files", headers=AUTH, files={"file": ("t.jsonl", fh)}, data={"purpose": "fine-tune"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    small = tmp_path / "eleven.jsonl"
    small.write_bytes(_lines(*[COMPLETION] * 11))
    with small.open("rb") as fh:
        r = c.post("/v1/files", headers=AUTH, files={"file": ("e.jsonl", fh)}, data={"purpose": "fine-tune"})
    assert r.status_code == 400 and r.json()["error"]["line"] == 11
    with small.open("rb") as fh:
        r = c.post("/v1/files", headers=AUTH, files={"file": ("e.jsonl", fh)}, data={"purpose": "assistants"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"


def test_files_need_an_api_key_and_are_per_key(client, tiny_root: Path) -> None:
    assert client.get("/v1/files").status_code == 401
    assert client.get("/v1/files", headers={"Authorization": "Bearer wrong-key-wrong-key"}).status_code == 401
    f = upload(client, tiny_root / "train.jsonl")
    assert client.get(f"/v1/files/{f['id']}", headers=OTHER_AUTH).status_code == 404
    assert client.get("/v1/files", headers=OTHER_AUTH).json()["data"] == []
    assert client.delete(f"/v1/files/{f['id']}", headers=OTHER_AUTH).status_code == 404


def test_uploads_may_exceed_the_service_wide_body_limit(client, tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    big.write_bytes(_lines(CHAT) * 30_000)
    assert big.stat().st_size > client.app.state.settings.max_body_bytes
    f = upload(client, big)
    assert f["examples"] == 30_000 and f["bytes"] == big.stat().st_size
    assert (
        client.post("/v1/recommend", content=b"x" * (2 << 20), headers={"content-type": "application/json"}).status_code
        == 413
    )
