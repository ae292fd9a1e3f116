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
import errno
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from advisor.jobs.errors import FileTooLargeError, FileValidationError, InsufficientStorageError

CHAT, COMPLETION = "chat", "completion"
ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = frozenset({"role", "content", "name", "weight"})
CHUNK = 1 << 16
#: errnos of a full disk, quota or file-size limit: the client is told 507, not 500
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
DISK_FULL_MESSAGE = (
    "the server's disk is full: the upload was not kept. To fix: delete files you no longer need "
    "(DELETE /v1/files/{id}) or ask the operator to free space"
)
#: the longest line (one example) accepted: a 128k-token conversation is well under 2 MiB of JSON, and a
#: bound keeps a hostile one-line file from being held (and parsed) in memory whole
MAX_LINE_BYTES = 8 * 2**20
#: the deepest JSON nesting accepted on a line: an example needs 3 levels (object, messages, message);
#: the bound keeps json.loads and every later reader of the file far from Python's recursion limit
MAX_NESTING = 32
#: a \\uD800-\\uDFFF escape somewhere on the line: only then are its strings checked for lone surrogates
_SURROGATE_ESCAPE = re.compile(rb"\\[uU][dD][89a-fA-F]")


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


def check_structure(obj: Any, line: int, strings: bool) -> None:
    """Nesting at most MAX_NESTING deep and, with `strings`, no lone surrogate in any string (JSON's
    \\ud800 escapes decode to text that is not UTF-8: the job would fail on it later, far from the line).
    Iterative, so a deep value cannot overflow the stack here."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = [*value.keys(), *value.values()] if strings else value.values()
        elif isinstance(value, list):
            children = value
        else:
            if strings and isinstance(value, str):
                _check_text(value, line)
            continue
        if depth > MAX_NESTING:
            raise FileValidationError(f"JSON nested deeper than {MAX_NESTING} levels", line=line)
        stack.extend((child, depth + 1) for child in children)


def _check_text(text: str, line: int) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise FileValidationError(
            f"a string holds a lone surrogate (\\u{ord(text[exc.start]):04x}): not encodable as UTF-8", line=line
        ) from None


class JsonlValidator:
    """Feed bytes as they arrive; raises at the first bad line; `finish()` returns the stats.

    Linear in the input: each chunk is scanned once for newlines and the unfinished line is kept as a
    list of pieces joined once when its newline arrives (appending to one bytes object and re-splitting
    it per chunk made a long line quadratic: 34 s for one 64 MiB line)."""

    def __init__(self, max_bytes: int, max_examples: int, max_line_bytes: int = MAX_LINE_BYTES):
        self.max_bytes = max_bytes
        self.max_examples = max_examples
        self.max_line_bytes = max_line_bytes
        self.size = 0
        self.line = 0
        self.examples = 0
        self.format: str | None = None
        self._parts: list[bytes] = []
        self._pending_bytes = 0
        self._sha = hashlib.sha256()

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise FileTooLargeError(f"file is larger than the {self.max_bytes} byte limit", field="file")
        self._sha.update(data)
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            piece = data[start:end]
            if self._parts:
                self._parts.append(piece)
                piece = b"".join(self._parts)
                self._parts, self._pending_bytes = [], 0
            self._check_length(len(piece))
            self._line(piece)
            start = end + 1
        if start < len(data):
            rest = data[start:]
            self._parts.append(rest)
            self._pending_bytes += len(rest)
            self._check_length(self._pending_bytes)

    def _check_length(self, nbytes: int) -> None:
        if nbytes > self.max_line_bytes:
            raise FileValidationError(
                f"line longer than the {self.max_line_bytes} byte limit (one example per line)", line=self.line + 1
            )

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
        except RecursionError:
            raise FileValidationError(f"JSON nested deeper than {MAX_NESTING} levels", line=self.line) from None
        check_structure(obj, self.line, strings=_SURROGATE_ESCAPE.search(raw) is not None)
        fmt = example_format(obj, self.line)
        if self.format is None:
            self.format = fmt
        elif fmt != self.format:
            raise FileValidationError(f"{fmt} example in a {self.format} file: use one format per file", line=self.line)
        self.examples += 1
        if self.examples > self.max_examples:
            raise FileValidationError(f"more than {self.max_examples} examples", line=self.line)

    def finish(self) -> FileStats:
        if self._parts:
            last = b"".join(self._parts)
            self._parts, self._pending_bytes = [], 0
            self._line(last)
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
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            raise InsufficientStorageError(DISK_FULL_MESSAGE, field="file") from exc
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
