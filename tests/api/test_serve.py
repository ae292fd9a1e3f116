"""`advisor serve`: settings from ADVISOR_* and flags (flags win), errors name the flag or variable."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from advisor.api.settings import Settings
from advisor.cli import main


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ADVISOR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ADVISOR_PORT", "9100")
    monkeypatch.setenv("ADVISOR_LOCK_ADVICE", "true")
    monkeypatch.setenv("ADVISOR_GPU_FILES", "/a.json, /b.json")
    monkeypatch.setenv("ADVISOR_DATABASE_URL", "postgresql://db/advisor")
    s = Settings()
    assert s.data_dir == tmp_path and s.port == 9100 and s.lock_advice
    assert s.gpu_files == [Path("/a.json"), Path("/b.json")]
    assert s.resolved_database_url == "postgresql://db/advisor"
    assert Settings(port=9200).port == 9200, "explicit values (CLI flags) win over the environment"
    monkeypatch.delenv("ADVISOR_DATABASE_URL")
    assert Settings().resolved_database_url == f"sqlite:///{tmp_path / 'advisor.db'}"


def test_bad_settings_exit_2_naming_the_flag_or_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["serve", "--port", "70000", "--data-dir", str(tmp_path)]) == 2
    assert "--port" in capsys.readouterr().err
    monkeypatch.setenv("ADVISOR_MAX_BODY_BYTES", "lots")
    assert main(["serve", "--data-dir", str(tmp_path)]) == 2
    assert "ADVISOR_MAX_BODY_BYTES" in capsys.readouterr().err
    monkeypatch.delenv("ADVISOR_MAX_BODY_BYTES")
    assert main(["serve", "--data-dir", str(tmp_path), "--gpu-file", str(tmp_path / "missing.json")]) == 2
    assert "--gpu-file" in capsys.readouterr().err


def test_serve_runs_the_service(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path / "state"
    env = {**os.environ, "ADVISOR_LOCK_ADVICE": "false"}
    cmd = [sys.executable, "-m", "advisor.cli", "serve", "--port", str(port), "--data-dir", str(data)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "advisor serve did not come up"
            time.sleep(0.1)
        assert data.is_dir(), "serve creates its data directory"
        assert httpx.get(base + "/readyz").json()["status"] == "ready"
        r = httpx.post(base + "/v1/recommend", json={"model": "meta-llama/Llama-2-7b-hf", "gpu": "rtx-4090"})
        assert r.status_code == 200 and r.json()["plans"]
        request_id = r.headers["x-request-id"]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    access = [line for line in out.splitlines() if '"advisor.access"' in line and request_id in line]
    assert len(access) == 1 and '"route": "/v1/recommend"' in access[0] and '"status": 200' in access[0]


def test_worker_sockets_are_tcp_so_nodelay_applies() -> None:
    import socket as _socket

    from advisor.api.workers import TcpConfig

    config = TcpConfig("advisor.api.app:app_from_env", factory=True, host="127.0.0.1", port=0, workers=2)
    sock = config.bind_socket()
    try:
        assert sock.proto == _socket.IPPROTO_TCP and sock.get_inheritable()
    finally:
        sock.close()


def test_serve_with_two_workers_sums_metrics_over_them(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prom = tmp_path / "prom"
    prom.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom)}
    cmd = [sys.executable, "-m", "advisor.cli", "serve", "--port", str(port), "--data-dir", str(tmp_path / "d")]
    proc = subprocess.Popen([*cmd, "--workers", "2", "--no-access-log"], env=env, stdout=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "advisor serve --workers 2 did not come up"
            time.sleep(0.2)
        for _ in range(6):  # new connections: the kernel spreads them over the workers
            assert httpx.get(base + "/v1/gpus/t4").status_code == 200
        text = httpx.get(base + "/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    line = next(
        x for x in text.splitlines() if x.startswith("advisor_http_requests_total{") and "/v1/gpus/{gpu_id}" in x
    )
    assert float(line.rsplit(" ", 1)[1]) == 6
