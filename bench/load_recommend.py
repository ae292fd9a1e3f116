"""Load test of the REST service on loopback: N concurrent clients for a bounded time, per scenario.

Starts `advisor serve` as a subprocess on 127.0.0.1 (a free port, a temp data dir), warms it up, then
drives it with wrk (Debian package `wrk`; C, so the generator steals little CPU from the server) or,
where wrk is missing, an async httpx generator. Reports requests/s, p50/p90/p99/max latency, client
errors and non-2xx answers, and cross-checks the server's own Prometheus counts (no 5xx).

    python bench/load_recommend.py                      # 64 clients x 30 s per scenario
    python bench/load_recommend.py --duration 5 --scenario recommend_catalog

Results: bench/results/load_recommend.json and .md (with the command and commit that made them).
Nothing but 127.0.0.1 is ever contacted; every run stops by itself after --duration seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

SCENARIOS: dict[str, tuple[str, dict[str, Any]]] = {
    # the target: a recommend over the full catalog (no GPU named: all catalog GPUs)
    "recommend_catalog": ("/v1/recommend", {"model": "meta-llama/Llama-2-7b-hf"}),
    # the minimal body of the README: one GPU
    "recommend_one_gpu": ("/v1/recommend", {"model": "meta-llama/Llama-2-7b-hf", "gpu": "rtx-4090"}),
    "estimate": (
        "/v1/estimate",
        {"model": "meta-llama/Llama-2-7b-hf", "gpu": "rtx-4090", "plan": {"method": "qlora", "micro_batch": 4}},
    ),
}

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [==[%s]==]
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_s": %%.3f, "errors_connect": %%d, "errors_read": %%d, ' ..
    '"errors_write": %%d, "errors_timeout": %%d, "non_2xx": %%d, "p50_ms": %%.3f, "p90_ms": %%.3f, ' ..
    '"p99_ms": %%.3f, "max_ms": %%.3f, "mean_ms": %%.3f}\\n',
    summary.requests, summary.duration / 1e6, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout, summary.errors.status,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3, latency.mean / 1e3))
end
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class Server:
    """`advisor serve` in a subprocess on 127.0.0.1; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, workers: int, access_log: bool) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data = tempfile.TemporaryDirectory(prefix="advisor-load-")
        self.log = open(Path(self.data.name) / "server.log", "w")  # noqa: SIM115 (closed in __exit__)
        cmd = [sys.executable, "-m", "advisor.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--data-dir", self.data.name, "--workers", str(workers), "--log-level", "warning"]
        cmd += ["--access-log" if access_log else "--no-access-log"]
        env = dict(os.environ)
        if workers > 1:  # Prometheus counters summed over the worker processes
            env["PROMETHEUS_MULTIPROC_DIR"] = str(Path(self.data.name) / "prom")
            Path(env["PROMETHEUS_MULTIPROC_DIR"]).mkdir()
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become healthy in 60 s")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        self.data.cleanup()


def run_wrk(url: str, body: dict[str, Any], connections: int, duration: int, threads: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT % json.dumps(body))
        script = f.name
    try:
        cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "30s", "-s", script, url]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    finally:
        os.unlink(script)
    line = next(x for x in out.splitlines() if x.startswith("WRKJSON "))
    r = json.loads(line[len("WRKJSON ") :])
    r["errors"] = r["errors_connect"] + r["errors_read"] + r["errors_write"] + r["errors_timeout"]
    r["requests_per_s"] = r["requests"] / r["duration_s"]
    return r


async def _httpx_load(url: str, body: dict[str, Any], connections: int, duration: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    non_2xx = 0
    stop = time.monotonic() + duration
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def worker() -> None:
            nonlocal errors, non_2xx
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, json=body)
                    await r.aread()
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                if not 200 <= r.status_code < 300:
                    non_2xx += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else [0.0] * 99
    return {
        "requests": len(latencies),
        "duration_s": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "errors": errors,
        "non_2xx": non_2xx,
        "p50_ms": q[49] * 1e3,
        "p90_ms": q[89] * 1e3,
        "p99_ms": q[98] * 1e3,
        "max_ms": max(latencies, default=0) * 1e3,
        "mean_ms": statistics.fmean(latencies) * 1e3 if latencies else 0.0,
    }


def server_counts(base: str, route: str) -> dict[str, float]:
    """Requests the server itself counted for `route`, by status (its Prometheus counter)."""
    text = httpx.get(base + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "advisor_http_requests_total" and s.labels.get("route") == route:
                out[s.labels["status"]] = out.get(s.labels["status"], 0) + s.value
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="default: all")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--duration", type=int, default=30, help="seconds per scenario")
    p.add_argument("--unloaded-duration", type=int, default=10, help="seconds of the single-client run first")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.add_argument("--generator", choices=("auto", "wrk", "httpx"), default="auto")
    p.add_argument("--no-access-log", action="store_true", help="default: the JSON access log is on, as deployed")
    p.add_argument("--output", default=str(RESULTS / "load_recommend"), help="path stem for .json and .md")
    args = p.parse_args(argv)
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "httpx"
    names = args.scenario or list(SCENARIOS)
    command = "python bench/load_recommend.py " + " ".join(argv if argv is not None else sys.argv[1:])

    load_before = os.getloadavg()
    results = []
    with Server(args.workers, access_log=not args.no_access_log) as server:
        for name in names:
            route, body = SCENARIOS[name]
            url = server.url + route
            for _ in range(20):  # warm-up: first requests build per-model tables
                httpx.post(url, json=body, timeout=60).raise_for_status()
            before = server_counts(server.url, route)
            # one client first: the latency of a request on its own (service time, no queueing) ...
            if generator == "wrk":
                alone = run_wrk(url, body, 1, args.unloaded_duration, threads=1)
            else:
                alone = asyncio.run(_httpx_load(url, body, 1, args.unloaded_duration))
            # ... then the load: `connections` clients, each sending its next request on the last answer
            if generator == "wrk":
                r = run_wrk(url, body, args.connections, args.duration, threads=2)
            else:
                r = asyncio.run(_httpx_load(url, body, args.connections, args.duration))
            after = server_counts(server.url, route)
            r["single_client"] = {
                k: alone[k] for k in ("requests", "requests_per_s", "p50_ms", "p90_ms", "p99_ms", "errors", "non_2xx")
            }
            r["errors"] += alone["errors"]
            r["non_2xx"] += alone["non_2xx"]
            seen = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            r.update(scenario=name, route=route, body=body, server_counted_by_status=seen)
            r["server_5xx"] = sum(v for k, v in seen.items() if k.startswith("5"))
            results.append(r)
            print(
                f"{name:18s} {r['requests_per_s']:8.1f} req/s  p50 {r['p50_ms']:7.2f} ms  p90 {r['p90_ms']:7.2f} ms  "
                f"p99 {r['p99_ms']:7.2f} ms  max {r['max_ms']:7.1f} ms  errors {r['errors']}  non-2xx {r['non_2xx']}  "
                f"server 5xx {r['server_5xx']:.0f} | one client: p50 {alone['p50_ms']:.2f} ms, p99 {alone['p99_ms']:.2f} ms",
                flush=True,
            )

    doc = {
        "command": command,
        "commit": _git("rev-parse", "HEAD"),
        "worktree_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "cpu": _cpu_model(), "python": platform.python_version()},
        # other work on the machine competes for the same cores: the 1-minute load average around the run
        "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "generator": generator,
        "connections": args.connections,
        "duration_s": args.duration,
        "workers": args.workers,
        "access_log": not args.no_access_log,
        "target": "p50 under 20 ms for a recommend over the full catalog, zero errors",
        "results": results,
    }
    stem = Path(args.output)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    rows = [
        f"| scenario | {args.connections} clients: req/s | p50 ms | p90 ms | p99 ms | max ms | errors | non-2xx "
        "| server 5xx | 1 client: req/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows += [
        f"| {r['scenario']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | "
        f"{r['max_ms']:.1f} | {r['errors']} | {r['non_2xx']} | {r['server_5xx']:.0f} | "
        f"{r['single_client']['requests_per_s']:.1f} | {r['single_client']['p50_ms']:.2f} | "
        f"{r['single_client']['p99_ms']:.2f} |"
        for r in results
    ]
    md = [
        "# Load: the REST service on loopback",
        "",
        f"`{command}` at commit `{doc['commit'][:12]}`{' (uncommitted changes in tracked files)' if doc['worktree_dirty'] else ''}, "
        f"{doc['recorded']}.",
        f"{args.connections} concurrent connections for {args.duration} s per scenario, generator {generator}, "
        f"{args.workers} uvicorn worker(s), JSON access log {'on' if doc['access_log'] else 'off'}; "
        f"{doc['machine']['cpus']} CPUs ({doc['machine']['cpu']}) shared by the server and the generator; "
        f"1-minute load average {doc['load_average_1m']['before']} before, {doc['load_average_1m']['after']} after.",
        "",
        *rows,
        "",
        "Target: " + doc["target"] + ".",
        "",
        "Under N closed-loop clients a request waits for the ones ahead of it: latency is about",
        "N / throughput (Little's law), so the loaded p50 is set by requests/s, and the one-client",
        "p50 is the time a request takes on its own.",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    failed = any(r["errors"] or r["non_2xx"] or r["server_5xx"] for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
