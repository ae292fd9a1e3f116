"""Load test of two `advisor serve` replicas sharing one PostgreSQL database and one data directory.

Starts both replicas on 127.0.0.1 (free ports, a fresh database on the local PostgreSQL, dropped after),
seeds a few jobs, then drives both at once (clients alternate between the replicas, as a load balancer
would) with an async httpx generator. Scenarios: a recommend (advice: no database), listing jobs and
reading one job (the job store on PostgreSQL). Reports requests/s, latency percentiles, transport
errors and non-2xx answers, per scenario and per replica.

    python bench/load_replicas.py                       # 32 clients x 15 s per scenario
    python bench/load_replicas.py --duration 5 --pg postgresql+psycopg://postgres@127.0.0.1:5432/test

Results: bench/results/load_replicas.json and .md. Nothing but 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.load_recommend import _cpu_model, _free_port, _git  # noqa: E402

RESULTS = REPO / "bench" / "results"
KEY = "bench-key-" + "z" * 24
AUTH = {"Authorization": f"Bearer {KEY}"}


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = "advisor_bench_" + secrets.token_hex(4)
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def replica(name: str, data_dir: Path, db_url: str) -> Iterator[str]:
    port = _free_port()
    env = {
        **os.environ,
        "ADVISOR_API_KEYS": KEY,
        "ADVISOR_DATABASE_URL": db_url,
        "ADVISOR_REPLICA_ID": name,
        "ADVISOR_JOB_GPU": "cpu",
        "ADVISOR_MODEL_ROOTS": str(data_dir / "models"),
    }
    cmd = [sys.executable, "-m", "advisor.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--data-dir", str(data_dir), "--log-level", "warning", "--no-access-log"]
    log = open(data_dir / f"{name}.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {(data_dir / f'{name}.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


async def drive(urls: list[str], method: str, path: str, body: Any, connections: int, duration: int) -> dict[str, Any]:
    lat: dict[str, list[float]] = {u: [] for u in urls}
    errors = non_2xx = 0
    stop = time.monotonic() + duration
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=30, headers=AUTH) as client:

        async def worker(i: int) -> None:
            nonlocal errors, non_2xx
            base = urls[i % len(urls)]
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    r = await client.request(method, base + path, json=body)
                    await r.aread()
                except httpx.HTTPError:
                    errors += 1
                    continue
                lat[base].append(time.perf_counter() - t0)
                if not 200 <= r.status_code < 300:
                    non_2xx += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(connections)))
        elapsed = time.perf_counter() - t0
    every = [x for v in lat.values() for x in v]
    q = statistics.quantiles(every, n=100, method="inclusive") if len(every) > 1 else [0.0] * 99
    return {
        "requests": len(every),
        "duration_s": round(elapsed, 3),
        "requests_per_s": round(len(every) / elapsed, 1),
        "per_replica_requests": [len(lat[u]) for u in urls],
        "errors": errors,
        "non_2xx": non_2xx,
        "p50_ms": round(q[49] * 1e3, 2),
        "p90_ms": round(q[89] * 1e3, 2),
        "p99_ms": round(q[98] * 1e3, 2),
        "max_ms": round(max(every, default=0) * 1e3, 2),
    }


def seed(url: str, data_dir: Path, jobs: int) -> str:
    """Create `jobs` jobs for a tiny local model (advisor.jobs.tiny) and cancel each at once, so rows exist to
    list and read while no training competes with the servers for the CPU. Returns one job id."""
    from advisor.jobs.tiny import counting_examples, save_tiny_model, write_jsonl

    model = data_dir / "models" / "tiny"
    save_tiny_model(model)
    write_jsonl(data_dir / "train.jsonl", counting_examples(32, seed=0))
    c = httpx.Client(base_url=url, headers=AUTH, timeout=30)
    with (data_dir / "train.jsonl").open("rb") as fh:
        f = c.post("/v1/files", files={"file": ("train.jsonl", fh)}, data={"purpose": "fine-tune"}).json()
    ids = []
    for _ in range(jobs):
        r = c.post("/v1/fine_tuning/jobs", json={"model": str(model), "training_file": f["id"]})
        r.raise_for_status()
        ids.append(r.json()["id"])
        c.post(f"/v1/fine_tuning/jobs/{ids[-1]}/cancel")
    c.close()
    return ids[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--pg", default=os.environ.get("ADVISOR_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
    )
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--duration", type=int, default=15, help="seconds per scenario")
    p.add_argument("--output", default=str(RESULTS / "load_replicas"))
    args = p.parse_args(argv)
    out: dict[str, Any] = {
        "command": "python bench/load_replicas.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "replicas": 2,
        "database": "postgresql (local, one fresh database)",
        "connections": args.connections,
        "duration_s": args.duration,
        "scenarios": {},
    }
    with fresh_database(args.pg) as db, tempfile.TemporaryDirectory(prefix="advisor-replicas-") as tmp:
        data = Path(tmp)
        (data / "models").mkdir()
        with replica("replica-a", data, db) as a, replica("replica-b", data, db) as b:
            job = seed(a, data, 20)
            scenarios = {
                "recommend_one_gpu": (
                    "POST",
                    "/v1/recommend",
                    {"model": "meta-llama/Llama-2-7b-hf", "gpu": "rtx-4090"},
                ),
                "jobs_list": ("GET", "/v1/fine_tuning/jobs?limit=20", None),
                "job_get": ("GET", f"/v1/fine_tuning/jobs/{job}", None),
            }
            for name, (method, path, body) in scenarios.items():
                r = asyncio.run(drive([a, b], method, path, body, args.connections, args.duration))
                out["scenarios"][name] = r
                print(name, json.dumps(r), flush=True)
    stem = Path(args.output)
    stem.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    lines = [
        "# Two replicas on PostgreSQL: REST load",
        "",
        f"`{out['command']}` at {out['commit']}; {out['cpu']}, {out['cores']} cores (client and both servers "
        f"share them); {args.connections} clients alternating over 2 replicas, {args.duration} s per scenario.",
        "",
        "| scenario | req/s | p50 ms | p90 ms | p99 ms | max ms | errors | non-2xx | requests A / B |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in out["scenarios"].items():
        a_n, b_n = r["per_replica_requests"]
        lines.append(
            f"| {name} | {r['requests_per_s']} | {r['p50_ms']} | {r['p90_ms']} | {r['p99_ms']} | {r['max_ms']} "
            f"| {r['errors']} | {r['non_2xx']} | {a_n} / {b_n} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    bad = sum(r["errors"] + r["non_2xx"] for r in out["scenarios"].values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
