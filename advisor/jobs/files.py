"""Training files: JSONL in OpenAI's chat format or prompt/completion, validated while it is written.

Why validate on upload: a job that fails an hour in on line 40 213 wastes a GPU; a 400 that names the
first bad line costs nothing. The upload is streamed to a hidden partial file beside its final name,
checked line by line as it goes, fsync'ed and renamed into place only when every line passed, so a
refused or interrupted upload leaves nothing behind.

Formats (one per file, never mixed):

    {"messages": [{"role": "system"|"user"|"assistant", "content": "...", "weight": 0|1}, ...]}
    {"prompt": "...", "completion": "..."}

A chat example needs at least one assistant message that is trained on (``weight`` absent or 1).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from advisor.jobs.errors import FileTooLargeError, FileValidationError

CHAT, COMPLETION = "chat", "completion"
ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = frozenset({"role", "content", "name", "weight"})
CHUNK = 1 << 16


@dataclass(frozen=True)
class FileStats:
    bytes: int
    examples: int
    format: str  # chat | completion
    sha256: str


def example_format(obj: Any, line: int) -> str:
    """The format of one parsed line, or FileValidationError saying what is wrong with it."""
    if not isinstance(obj, dict):
        raise FileValidationError(f"expected a JSON object, got {type(obj).__name__}", line=line)
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise FileValidationError("`messages` must be a non-empty list", line=line)
        trained = False
        for i, m in enumerate(msgs):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise FileValidationError(f"{where} must be an object", line=line)
            unknown = sorted(set(m) - MESSAGE_KEYS)
            if unknown:
                raise FileValidationError(
                    f"{where} has unsupported keys {unknown} (tool calls are not supported)", line=line
                )
            role = m.get("role")
            if role not in ROLES:
                raise FileValidationError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", line=line)
            if not isinstance(m.get("content"), str):
                raise FileValidationError(f"{where}.content must be a string", line=line)
            weight = m.get("weight", 1)
            if weight not in (0, 1) or isinstance(weight, bool):
                raise FileValidationError(f"{where}.weight must be 0 or 1", line=line)
            if role != "assistant" and "weight" in m:
                raise FileValidationError(f"{where}.weight is only allowed on assistant messages", line=line)
            trained = trained or (role == "assistant" and weight == 1 and m["content"] != "")
        if not trained:
            raise FileValidationError("no assistant message to train on (non-empty, weight 1)", line=line)
        return CHAT
    if "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if not isinstance(obj.get(key), str):
                raise FileValidationError(f"`{key}` must be a string", line=line)
        if not obj["completion"]:
            raise FileValidationError("`completion` is empty", line=line)
        return COMPLETION
    raise FileValidationError("needs `messages` (chat format) or `prompt` and `completion`", line=line)


class JsonlValidator:
    """Feed bytes as they arrive; raises at the first bad line; `finish()` returns the stats."""

    def __init__(self, max_bytes: int, max_examples: int):
        self.max_bytes = max_bytes
        self.max_examples = max_examples
        self.size = 0
        self.line = 0
        self.examples = 0
        self.format: str | None = None
        self._pending = b""
        self._sha = hashlib.sha256()

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise FileTooLargeError(f"file is larger than the {self.max_bytes} byte limit", field="file")
        self._sha.update(data)
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        for raw in lines:
            self._line(raw)

    def _line(self, raw: bytes) -> None:
        self.line += 1
        if not raw.strip():
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FileValidationError(f"not UTF-8 ({exc.reason} at byte {exc.start})", line=self.line) from exc
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FileValidationError(f"not valid JSON ({exc.msg}, column {exc.colno})", line=self.line) from exc
        fmt = example_format(obj, self.line)
        if self.format is None:
            self.format = fmt
        elif fmt != self.format:
            raise FileValidationError(f"{fmt} example in a {self.format} file: use one format per file", line=self.line)
        self.examples += 1
        if self.examples > self.max_examples:
            raise FileValidationError(f"more than {self.max_examples} examples", line=self.line)

    def finish(self) -> FileStats:
        if self._pending:
            self._line(self._pending)
            self._pending = b""
        if not self.examples or self.format is None:
            raise FileValidationError("the file has no examples")
        return FileStats(bytes=self.size, examples=self.examples, format=self.format, sha256=self._sha.hexdigest())


def save_upload(src: BinaryIO, dest: Path, max_bytes: int, max_examples: int) -> FileStats:
    """Copy `src` to `dest` while validating; on any failure nothing is left at or beside `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial")
    validator = JsonlValidator(max_bytes, max_examples)
    try:
        with partial.open("wb") as out:
            while chunk := src.read(CHUNK):
                validator.feed(chunk)
                out.write(chunk)
            stats = validator.finish()
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        raise
    return stats


def read_examples(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a validated file."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, json.loads(line)


def check_file(path: str | Path, max_bytes: int, max_examples: int) -> FileStats:
    """Re-validate a stored file (before a job starts: the disk may have changed since the upload)."""
    validator = JsonlValidator(max_bytes, max_examples)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            validator.feed(chunk)
    return validator.finish()
