"""A local Ray cluster for the tests, fenced to loopback: every Ray process in a network namespace of its own.

Why a namespace, and not flags alone: ``ray start`` has flags for most listeners (``--node-ip-address``,
``--dashboard-host``, the ports), but in this Ray the GCS, the raylet's node and object managers, the dashboard
agent's gRPC server and the metrics exporter bind every interface (``0.0.0.0`` / ``::``) whatever they are told,
and Ray has no authentication unless token auth is turned on. So the cluster runs inside a network namespace
whose only interface is ``lo`` (``unshare --net``): a socket bound to every interface there is still reachable
from loopback only, and from nothing outside the namespace. The flags are passed anyway (they fence what they
can, and they are what a production node gets). The test process reaches the dashboard (the Jobs API) through
a forwarder: a listener on the host's 127.0.0.1 whose connections are dialled from a thread that entered the
namespace (``setns``; a socket keeps the namespace it was made in).

Cleanup never uses ``ray stop`` (it stops every Ray process on the machine, other tests' and users' too): the
processes to stop are exactly those in our namespace, SIGTERM then SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

CLONE_NEWNET = 0x40000000
RAY = shutil.which("ray")


def netns_unavailable() -> str | None:
    """Why a network namespace cannot be made here (None: it can)."""
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "unshare/nsenter not installed"
    try:
        r = subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if r.returncode != 0:
        return f"no network namespaces here (unshare --net: {r.stderr.decode(errors='replace').strip()[:200]})"
    return None


def _netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


class Forwarder:
    """127.0.0.1:port on the host -> 127.0.0.1:target inside the namespace of `ns_pid` (threads, no processes)."""

    def __init__(self, ns_pid: int, target: int):
        self.ns_pid, self.target = ns_pid, target
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(64)
        self.port = int(self.server.getsockname()[1])
        self._stop = threading.Event()
        self._queue: list[socket.socket] = []
        self._cv = threading.Condition()
        threading.Thread(target=self._accept, daemon=True).start()
        threading.Thread(target=self._dial, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with self._cv:
                self._queue.append(conn)
                self._cv.notify()

    def _dial(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/proc/{self.ns_pid}/ns/net", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:  # this thread only: its sockets live in the namespace
                raise OSError(ctypes.get_errno(), "setns failed")
        finally:
            os.close(fd)
        while not self._stop.is_set():
            with self._cv:
                while not self._queue and not self._stop.is_set():
                    self._cv.wait(0.5)
                if self._stop.is_set():
                    return
                conn = self._queue.pop(0)
            try:
                up = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            except OSError:
                conn.close()
                continue
            up.settimeout(None)
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._stop.set()
        self.server.close()


@dataclass
class RayCluster:
    """A head and `nodes - 1` worker nodes (``ray start --address``), each with `cpus` CPUs, in one namespace."""

    tmp: Path
    nodes: int = 2
    cpus: int = 1
    holder: subprocess.Popen | None = None
    forwarder: Forwarder | None = None
    gcs_port: int = 0
    dashboard_port: int = 0
    logs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The dashboard (Jobs API) as the host sees it: through the forwarder."""
        assert self.forwarder is not None
        return f"http://127.0.0.1:{self.forwarder.port}"

    def _in_ns(self, argv: list[str]) -> list[str]:
        assert self.holder is not None
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", "--", *argv]

    @staticmethod
    def node_ip(i: int) -> str:
        """Node i's address: 127.0.0.<i+1>, a loopback address of its own, so Ray (and Ray Train's node ranks,
        which group workers by IP) see as many hosts as nodes."""
        return f"127.0.0.{i + 1}"

    def node_flags(self, i: int) -> list[str]:
        """Every listener ``ray start`` can place, on loopback and on ports of its own (node i's range)."""
        base = 20000 + 1000 * i  # inside the namespace every port is free: fixed, distinct per node
        return [
            f"--node-ip-address={self.node_ip(i)}",
            f"--node-manager-port={base + 1}",
            f"--object-manager-port={base + 2}",
            f"--min-worker-port={base + 100}",
            f"--max-worker-port={base + 199}",
            f"--dashboard-agent-listen-port={base + 3}",
            f"--dashboard-agent-grpc-port={base + 4}",
            f"--runtime-env-agent-port={base + 5}",
            f"--metrics-export-port={base + 6}",
            f"--num-cpus={self.cpus}",
            "--num-gpus=0",
            "--disable-usage-stats",
            f"--temp-dir={self.tmp / 'ray'}",
        ]

    def start(self, timeout: float = 150.0) -> None:
        if RAY is None:
            raise RuntimeError("the ray CLI is not on PATH")
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.holder = subprocess.Popen(
            ["unshare", "--net", "--", "sh", "-c", "ip link set lo up && exec sleep 100000"],
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while _netns_inode(self.holder.pid) == _netns_inode(os.getpid()) or not self._lo_up():
            if self.holder.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the network namespace did not come up")
            time.sleep(0.05)
        self.gcs_port, self.dashboard_port = 6380, 8265
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        head = [
            RAY, "start", "--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", "--ray-client-server-port=10001", *self.node_flags(0),
        ]  # fmt: skip
        self._run(head, env, "head")
        self.forwarder = Forwarder(self.holder.pid, self.dashboard_port)
        for i in range(1, self.nodes):
            self._run([RAY, "start", f"--address=127.0.0.1:{self.gcs_port}", *self.node_flags(i)], env, f"node{i}")
        while True:  # every node up, as the Jobs API sees the cluster
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                r = httpx.get(f"{self.url}/nodes?view=summary", timeout=5)
                alive = [n for n in r.json()["data"]["summary"] if n.get("raylet", {}).get("state") == "ALIVE"]
                if len(alive) >= self.nodes:
                    return
            if time.monotonic() > deadline + timeout:
                raise RuntimeError(f"the Ray cluster did not come up: {self.log_tail()}")
            time.sleep(0.5)

    def _lo_up(self) -> bool:
        assert self.holder is not None
        r = subprocess.run(self._in_ns(["ip", "-o", "link", "show", "lo"]), capture_output=True, text=True)
        return "UP" in r.stdout

    def _run(self, argv: list[str], env: dict[str, str], name: str) -> None:
        log = self.tmp / f"ray-start-{name}.log"
        self.logs.append(log)
        with log.open("wb") as f:
            r = subprocess.run(self._in_ns(argv), stdout=f, stderr=subprocess.STDOUT, env=env, timeout=180)
        if r.returncode != 0:
            raise RuntimeError(f"ray start ({name}) failed: {log.read_text()[-3000:]}")

    def log_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in self.logs if p.exists())

    def pids(self) -> list[int]:
        """Every process in the cluster's namespace (the holder aside): exactly the Ray processes we started."""
        if self.holder is None:
            return []
        ns = _netns_inode(self.holder.pid)
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) != self.holder.pid and ns is not None and _netns_inode(int(d)) == ns:
                out.append(int(d))
        return out

    def addresses(self) -> set[str]:
        """The IP addresses configured in the namespace (loopback only, by construction)."""
        r = subprocess.run(self._in_ns(["ip", "-o", "addr", "show"]), capture_output=True, text=True, check=True)
        return {line.split()[3].split("/")[0] for line in r.stdout.splitlines()}

    def listeners(self) -> list[tuple[int, str, int]]:
        """(pid, local address, port) of every listening TCP socket of the cluster's processes, from
        /proc/<pid>/net/tcp{,6} (the namespace's table) and /proc/<pid>/fd (which socket is whose)."""
        pids = self.pids()
        if not pids:
            return []
        inode_pid: dict[str, int] = {}
        for pid in pids:
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        link = os.readlink(f"/proc/{pid}/fd/{fd}")
                        if link.startswith("socket:["):
                            inode_pid[link[8:-1]] = pid
        out = []
        for table, v6 in (("tcp", False), ("tcp6", True)):
            with contextlib.suppress(OSError), open(f"/proc/{pids[0]}/net/{table}") as f:
                for line in list(f)[1:]:
                    parts = line.split()
                    if parts[3] != "0A":  # LISTEN
                        continue
                    pid = inode_pid.get(parts[9])
                    if pid is None:
                        continue
                    host, port = parts[1].split(":")
                    out.append((pid, _decode_ip(host, v6), int(port, 16)))
        return out

    def stop(self) -> None:
        if self.forwarder is not None:
            self.forwarder.close()
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):  # all ours: no long grace
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.2)
        if self.holder is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.holder.pid, signal.SIGKILL)
            self.holder.wait(10)


def _decode_ip(hexaddr: str, v6: bool) -> str:
    raw = bytes.fromhex(hexaddr)
    if not v6:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))  # four host-order 32-bit words
    return socket.inet_ntop(socket.AF_INET6, words)


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
WILDCARD = {"0.0.0.0", "::"}


def exposure(cluster: RayCluster) -> list[str]:
    """Every way a cluster listener is reachable beyond loopback ([] = fenced): a listener bound to an address
    that is not loopback, or bound to every interface while the namespace has one that is not loopback."""
    extra = cluster.addresses() - LOOPBACK
    bad = []
    for pid, host, port in cluster.listeners():
        if host in LOOPBACK or host.startswith("127."):
            continue
        if host in WILDCARD and not extra:
            continue
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            name = "?"
        bad.append(f"{name} (pid {pid}) listens on {host}:{port}" + (f"; interfaces {sorted(extra)}" if extra else ""))
    return bad


def dump(cluster: RayCluster) -> str:
    return json.dumps([[p, h, port] for p, h, port in cluster.listeners()])


@contextlib.contextmanager
def fenced_cluster(root: Path, nodes: int, cpus: int) -> Iterator[RayCluster]:
    """A started RayCluster fenced to loopback (skips the test where the ray CLI or network namespaces are
    missing), stopped at exit whatever happened."""
    import pytest

    if RAY is None:
        pytest.skip("the ray CLI is not on PATH")
    why = netns_unavailable()
    if why:
        pytest.skip(f"Ray is only started fenced to loopback: {why}")
    cluster = RayCluster(root, nodes=nodes, cpus=cpus)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
