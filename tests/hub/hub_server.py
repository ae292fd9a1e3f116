"""A local HTTP server that speaks the parts of the Hugging Face Hub protocol huggingface_hub 2.4 uses to
resolve a model: file resolution (HEAD/GET ``/{repo}/resolve/{revision}/{filename}``, with the headers
``hf_hub_download`` and ``get_hf_file_metadata`` require), LFS redirects to a "CDN" on another origin,
range requests on safetensors files (``get_safetensors_metadata``), the model info API
(``/api/models/{repo}[/revision/{rev}]``, ``expand=safetensors``) and the Hub's error codes
(``X-Error-Code: RepoNotFound / RevisionNotFound / EntryNotFound / GatedRepo``).

The protocol is read from huggingface_hub's own source (file_download.py: ``get_hf_file_metadata``,
``_get_metadata_or_catch_error``, ``http_get``; hf_api.py: ``model_info``, ``file_exists``,
``parse_safetensors_file_metadata``; utils/_http.py: ``hf_raise_for_status``,
``_httpx2_follow_hub_redirects_with_backoff``). huggingface_hub itself is not mocked: tests point it
here with ``HF_ENDPOINT`` (a subprocess) or the ``endpoint`` argument.

Weights are never served: a safetensors file is its real header (tensor names, dtypes, shapes and
offsets of the real architecture) followed by a data section that is only ever addressed by range
requests for the header; a GET beyond the header is refused loudly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    """The ETag the Hub sends for a regular (non-LFS) file: the git blob id."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class SafetensorsFile:
    """A safetensors file as the Hub stores it: 8-byte little-endian header length, JSON header, data."""

    header: dict[str, Any]
    data_bytes: int

    @property
    def head(self) -> bytes:
        raw = json.dumps(self.header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
        return struct.pack("<Q", len(raw)) + raw

    @property
    def size(self) -> int:
        return len(self.head) + self.data_bytes

    @property
    def sha256(self) -> str:
        # stands for the LFS object id: stable for a given header and size
        return hashlib.sha256(self.head + str(self.data_bytes).encode()).hexdigest()

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end] (inclusive, as HTTP ranges), only inside the header."""
        head = self.head
        if end >= len(head):
            raise ValueError(f"range {start}-{end} reaches the weights: the test hub serves headers only")
        return head[start : end + 1]


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes | SafetensorsFile]


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, Commit]  # by sha
    refs: dict[str, str]  # branch/tag -> sha
    gated_token: str | None = None  # set: files need "Authorization: Bearer <gated_token>"
    api_safetensors: bool = True  # the model info reports the safetensors summary (a mirror may not)

    def commit(self, revision: str) -> Commit | None:
        sha = self.refs.get(revision, revision)
        return self.commits.get(sha)


def make_repo(
    repo_id: str,
    files: dict[str, bytes | SafetensorsFile],
    *,
    branches: dict[str, dict[str, bytes | SafetensorsFile]] | None = None,
    gated_token: str | None = None,
    api_safetensors: bool = True,
) -> Repo:
    """A repo whose main branch holds `files`; `branches` adds other refs with their own files."""
    commits: dict[str, Commit] = {}
    refs: dict[str, str] = {}
    for ref, fs in {"main": files, **(branches or {})}.items():
        sha = hashlib.sha1(f"{repo_id}@{ref}".encode()).hexdigest()
        commits[sha] = Commit(sha, fs)
        refs[ref] = sha
    return Repo(repo_id, commits, refs, gated_token, api_safetensors)


def safetensors_summary(files: dict[str, bytes | SafetensorsFile]) -> dict[str, Any] | None:
    """The model info's ``safetensors`` field: parameters per dtype and their total, from the headers."""
    counts: dict[str, int] = {}
    for f in files.values():
        if not isinstance(f, SafetensorsFile):
            continue
        for name, t in f.header.items():
            if name == "__metadata__":
                continue
            n = 1
            for d in t["shape"]:
                n *= d
            counts[t["dtype"]] = counts.get(t["dtype"], 0) + n
    if not counts:
        return None
    return {"parameters": counts, "total": sum(counts.values())}


@dataclass
class HubState:
    repos: dict[str, Repo] = field(default_factory=dict)
    stall_s: float = 0.0  # > 0: requests wait this long before answering (a stalled Hub)
    stall_only: str = ""  # set: only requests whose path contains it stall (e.g. "/resolve/")
    requests: list[str] = field(default_factory=list)  # "METHOD path" of every request, for assertions
    release: threading.Event = field(default_factory=threading.Event)

    def add(self, repo: Repo) -> Repo:
        self.repos[repo.repo_id] = repo
        return repo


#: the token the test hub's gated repos accept
GATED_TOKEN = "hf_testhub_gated_access_token_0123"


@dataclass
class HubHandle:
    """A running test hub: its endpoint URL and its state (repos, the requests it saw)."""

    url: str
    state: HubState

    def requests_since(self, mark: int) -> list[str]:
        return self.state.requests[mark:]


class _Handler(BaseHTTPRequestHandler):
    server: _HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows failures, not access logs
        pass

    # ---- plumbing ----------------------------------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        hdrs = {"Content-Length": str(len(body)), **(headers or {})}
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, head: bool, extra: dict[str, str] | None = None):
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, head)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

    def _stall(self) -> None:
        if self.state.stall_s > 0 and self.state.stall_only in self.path:
            self.state.release.wait(self.state.stall_s)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def _dispatch(self, head: bool) -> None:
        self.state.requests.append(f"{self.command} {self.path}")
        self._stall()
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        if parts[:2] == ["api", "models"]:
            return self._model_info(parts[2:], parse_qs(url.query), head)
        if parts[:1] == ["lfs-cdn"] and len(parts) == 2:
            return self._cdn(parts[1], head)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), head)
        self._error(404, None, f"no route {url.path}", head)

    # ---- the Hub endpoints -------------------------------------------------------------------------
    def _repo(self, repo_id: str, head: bool, needs_access: bool) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        token = self._token()
        if repo is None:
            # the Hub answers 401 to an anonymous caller (a private repo looks the same), 404 otherwise
            self._error(401 if token is None else 404, "RepoNotFound", "Repository not found", head)
            return None
        if needs_access and repo.gated_token is not None and token != repo.gated_token:
            status = 401 if token is None else 403
            msg = (
                f"Access to model {repo_id} is restricted. You must have access to it and be authenticated to access it."
                if token is None
                else f"Access to model {repo_id} is restricted and you are not in the authorized list."
            )
            self._error(status, "GatedRepo", msg, head)
            return None
        return repo

    def _resolve(self, repo_id: str, revision: str, filename: str, head: bool) -> None:
        repo = self._repo(repo_id, head, needs_access=True)
        if repo is None:
            return
        commit = repo.commit(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
            return
        f = commit.files.get(filename)
        base = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        if f is None:
            self._error(404, "EntryNotFound", f"{filename} does not exist on {revision}", head, base)
            return
        if isinstance(f, SafetensorsFile):
            # LFS: a redirect to a signed URL on another origin, the file's identity in X-Linked-* headers
            port = self.server.server_address[1]
            location = f"http://localhost:{port}/lfs-cdn/{f.sha256}?repo={repo_id}&file={filename}"
            self._send(
                302,
                b"",
                {
                    **base,
                    "ETag": f'"{git_blob_sha1(f.sha256.encode())}"',
                    "X-Linked-Etag": f'"{f.sha256}"',
                    "X-Linked-Size": str(f.size),
                    "Location": location,
                },
                head,
            )
            return
        headers = {**base, "ETag": f'"{git_blob_sha1(f)}"', "Content-Type": "application/json"}
        self._send(200, f, headers, head)

    def _cdn(self, sha256: str, head: bool) -> None:
        for repo in self.state.repos.values():
            for commit in repo.commits.values():
                for f in commit.files.values():
                    if isinstance(f, SafetensorsFile) and f.sha256 == sha256:
                        return self._ranged(f, head)
        self._send(404, b"NoSuchKey", {"Content-Type": "text/plain"}, head)

    def _ranged(self, f: SafetensorsFile, head: bool) -> None:
        rng = self.headers.get("Range")
        if rng is None:
            if head:
                self._send(200, b"", {"Content-Length": str(f.size), "ETag": f'"{f.sha256}"'}, head=True)
            else:  # a full download of the weights: never part of resolving a model
                self._send(501, b"the test hub serves safetensors headers only", {"Content-Type": "text/plain"})
            return
        spec = rng.split("=", 1)[1]
        start_s, end_s = spec.split("-", 1)
        start = int(start_s)
        end = min(int(end_s) if end_s else f.size - 1, f.size - 1, len(f.head) - 1)
        body = f.read(start, end)
        self._send(
            206,
            body,
            {"Content-Range": f"bytes {start}-{start + len(body) - 1}/{f.size}", "Content-Type": "binary/octet-stream"},
            head,
        )

    def _model_info(self, rest: list[str], query: dict[str, list[str]], head: bool) -> None:
        if len(rest) < 2:
            self._error(404, None, "no route", head)
            return
        repo_id = f"{rest[0]}/{rest[1]}"
        revision = "main"
        if len(rest) >= 4 and rest[2] == "revision":
            revision = "/".join(rest[3:])
        elif len(rest) != 2:
            self._error(404, None, "no route", head)
            return
        repo = self._repo(repo_id, head, needs_access=False)  # a gated repo's card and info are public
        if repo is None:
            return
        commit = repo.commit(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
            return
        info: dict[str, Any] = {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "sha": commit.sha,
            "private": False,
            "gated": "manual" if repo.gated_token else False,
            "disabled": False,
            "siblings": [{"rfilename": name} for name in sorted(commit.files)],
        }
        summary = safetensors_summary(commit.files) if repo.api_safetensors else None
        if summary is not None:
            info["safetensors"] = summary
        expand = query.get("expand")
        if expand:  # only the properties asked for (the id always comes back)
            info = {k: v for k, v in info.items() if k in {"_id", "id", *expand}}
        self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)


class _HubServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, state: HubState):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out and closed its socket is expected here; anything else is printed."""
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


@contextmanager
def serve_hub(state: HubState) -> Iterator[str]:
    """The hub on 127.0.0.1 on a free port, in a thread; yields its endpoint URL."""
    server = _HubServer(state)
    thread = threading.Thread(target=server.serve_forever, name="test-hub", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        state.release.set()  # wake stalled handlers
        server.shutdown()
        server.server_close()
        thread.join(5)
