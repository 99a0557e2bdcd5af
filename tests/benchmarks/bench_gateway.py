"""Benchmark of the Agent Kernel Gateway against raw jupyter_client, in one run.

Starts a real gateway (``python -m gateway serve``) on a free loopback port with a temporary
data directory, and raw kernels from the same kernel spec driven by jupyter_client's
``BlockingKernelClient``, then measures:

1. session create (and delete) latency;
2. the round trip of a trivial ``1+1`` step over HTTP against the same step on a raw kernel,
   interleaved in blocks so that a noisy machine affects both sides alike;
3. the cost of a long recorded trajectory: ``1+1`` in a session with 1,000 steps against a fresh
   session, interleaved;
4. the round trip of the same ``1+1`` as a Jupyter client sends it, an ``execute_request`` over the
   kernel websocket (``/api/kernels/{kernel_id}/channels``) in the default JSON protocol and in the
   ``v1.kernel.websocket.jupyter.org`` binary protocol, interleaved in blocks with the raw kernel;
5. throughput with eight sessions stepping at once, against eight raw kernels: over HTTP, and over
   eight websockets in each protocol;
6. the latency of a step printing 1 MB;
7. the gateway's resident memory with live sessions (and the kernels' for context).

Then the session lifecycle, each part on a gateway of its own (started with the flags it needs,
stopped with SIGTERM, its exit code and leftover kernels checked):

8. ``POST /v1/sessions`` with the warm pool (each create after a pause and once the pool is full
   again; whether a pooled kernel served it is checked), and with ``--pool-size 0`` (cold boot);
9. pause frees memory: a session holding 100 MiB of numpy arrays is paused; its kernel process must
   be gone and the RSS of the gateway and its kernels fall by the kernel's RSS;
10. pause and resume latency of that session and of a small one, the state checked after each resume;
11. many live sessions at once (300; 30 with ``--quick``) created by concurrent clients: time, errors,
    RSS, a ``1+1`` in a sample; then as many with ``--max-live-kernels`` at half of it: no errors,
    and the sessions past the maximum evict (pause) others;
12. 1,000 paused sessions (40 with ``--quick``; as many as fit in 6 minutes), made by creating them with
    ``--max-live-kernels 4``: disk per paused session, no kernel left for them, and the time of
    ``GET /v1/sessions`` with them in the store.

It prints a markdown report (ready for docs/performance.md) and, with ``--json OUT``, writes every
figure to a JSON file. Every process it starts is stopped before it exits. ``--only core`` or
``--only lifecycle`` runs one of the two parts; ``--keep-logs DIR`` keeps the gateways' logs.

    python tests/benchmarks/bench_gateway.py [--quick] [--json OUT] [--only core|lifecycle] [--keep-logs DIR]
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import datetime
import http.client
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import jupyter_client
import psutil
import websocket
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from gateway import __version__ as gateway_version
from gateway.kernels import kernels_dir

TOKEN = "bench-admin-token-" + os.urandom(8).hex()
LISTENING = re.compile(r"listening on http://([^:\s]+):(\d+)")
LOG_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
KERNEL_STARTED = re.compile(r"kernel \S+ started \((?:[^,()]+, )+pid (\d+)\)")
KERNEL_NAME = "python3"
BIG_CODE = 'print("x" * 1_000_000)'
BIG_STDOUT_CHARS = 1_000_001  # the million x's and print's newline
MIB = 1024 * 1024
V1_SUBPROTOCOL = "v1.kernel.websocket.jupyter.org"
WS_PROTOCOLS = ("json", "v1")  # the kernel websocket's default JSON protocol, and the v1 binary one
Runner = Callable[[], None]


@dataclass(frozen=True)
class Plan:
    """How much of everything one run does."""

    mode: str
    sessions: int          # created (and timed) sessions; also the live sessions for the RSS figure
    steps: int             # timed `1+1` steps per side
    warmup: int            # untimed steps before timing
    block: int             # interleaving block size
    long_steps: int        # recorded steps in the "long trajectory" session
    concurrency: int       # sessions (and raw kernels) stepping at once
    duration: float        # seconds of concurrent stepping per side
    rounds: int            # alternating gateway/raw rounds the duration is split into
    big_runs: int          # timed runs of the 1 MB print
    # the lifecycle section
    creates: int           # timed `POST /v1/sessions`, with the warm pool and without (--pool-size 0)
    create_gap: float      # seconds waited before each of them (and until the pool is full again)
    resume_big_runs: int   # pause/resume cycles of a session holding 100 MiB of numpy arrays
    resume_small_runs: int  # pause/resume cycles of a session holding a few small variables
    many_sessions: int     # live sessions created at once (max-live-kernels above it, then at half of it)
    many_clients: int      # concurrent clients creating them
    many_deadline: float   # seconds allowed for creating them (the rest is reported as not reached)
    many_sample: int       # of them, sessions that run a timed `1+1` afterwards
    paused_sessions: int   # sessions created with --max-live-kernels 4, so that all but 4 end up paused
    paused_clients: int    # concurrent clients creating them (fewer than 4, so an idle one is always there to evict)
    paused_deadline: float  # seconds allowed for creating them
    list_calls: int        # timed calls of each GET /v1/sessions variant with them in the store

    @classmethod
    def for_mode(cls, quick: bool) -> "Plan":
        if quick:
            return cls("quick", sessions=5, steps=100, warmup=20, block=50, long_steps=200, concurrency=8,
                       duration=2.0, rounds=2, big_runs=3,
                       creates=5, create_gap=1.5, resume_big_runs=2, resume_small_runs=3, many_sessions=30,
                       many_clients=4, many_deadline=120.0, many_sample=10, paused_sessions=40, paused_clients=2,
                       paused_deadline=120.0, list_calls=20)
        return cls("full", sessions=20, steps=500, warmup=20, block=50, long_steps=1000, concurrency=8,
                   duration=5.0, rounds=2, big_runs=10,
                   creates=20, create_gap=1.5, resume_big_runs=5, resume_small_runs=10, many_sessions=300,
                   many_clients=4, many_deadline=300.0, many_sample=30, paused_sessions=1000, paused_clients=2,
                   paused_deadline=360.0, list_calls=20)


# statistics ---------------------------------------------------------------------------------


def percentile(samples: list[float], pct: float) -> float:
    """Nearest-rank percentile of ``samples`` (``pct`` in 0..100)."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(samples_ms: list[float]) -> dict[str, float]:
    """n, p50, p99, mean, min and max of latencies in milliseconds."""
    return {
        "n": len(samples_ms),
        "p50_ms": round(percentile(samples_ms, 50), 3),
        "p99_ms": round(percentile(samples_ms, 99), 3),
        "mean_ms": round(statistics.fmean(samples_ms), 3),
        "min_ms": round(min(samples_ms), 3),
        "max_ms": round(max(samples_ms), 3),
    }


def timed_ms(run: Runner) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1000


def repeat(run: Runner, times: int) -> None:
    for _ in range(times):
        run()


def interleaved(runners: dict[str, Runner], n: int, block: int) -> dict[str, list[float]]:
    """Time ``n`` calls of every runner, alternating blocks of ``block`` calls between them."""
    samples: dict[str, list[float]] = {name: [] for name in runners}
    while any(len(found) < n for found in samples.values()):
        for name, run in runners.items():
            for _ in range(min(block, n - len(samples[name]))):
                samples[name].append(timed_ms(run))
    return samples


# the gateway process and its HTTP API ----------------------------------------------------------


class GatewayServer:
    """``python -m gateway serve`` on a free loopback port; logs go to files in ``workdir``.

    ``name`` names its data directory and log files (several gateways may run in one ``workdir``);
    ``args`` are extra ``serve`` flags (``--pool-size``, ``--max-live-kernels``, ...). Kernels run
    unisolated (``--sandbox none``, like the raw baseline) unless ``args`` name a profile;
    bench_isolation.py measures what isolation adds."""

    def __init__(self, workdir: Path, name: str = "gateway", args: tuple[str, ...] = ()):
        self.name = name
        self.args = tuple(args)
        self.data_dir = workdir / f"{name}-data"
        self.stdout_path = workdir / f"{name}.stdout.txt"
        self.stderr_path = workdir / f"{name}.stderr.txt"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_GATEWAY_")}
        env["AGENT_GATEWAY_TOKEN"] = TOKEN
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--port", "0", "--data-dir", str(self.data_dir),
                 *(() if "--sandbox" in self.args else ("--sandbox", "none")), *self.args],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        self.kernel_pids: set[int] = set()
        self.exit_code: int | None = None
        self.stop_seconds: float | None = None
        try:
            self.host, self.port = self._wait_for_address(timeout=60)
        except BaseException:
            self.stop()
            raise

    def _wait_for_address(self, timeout: float) -> tuple[str, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = LISTENING.search(self.stdout_path.read_text())
            if match:
                return match.group(1), int(match.group(2))
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited early:\n{self.stderr_path.read_text()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"the gateway did not announce its address within {timeout:g} s")

    @property
    def pid(self) -> int:
        return self.process.pid

    def kernel_processes(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def rss(self) -> tuple[int, int, int]:
        """(gateway RSS, total RSS of its kernels, number of kernel processes), in bytes."""
        kernels = self.kernel_processes()
        self.kernel_pids.update(p.pid for p in kernels)
        total = 0
        for proc in kernels:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        return psutil.Process(self.pid).memory_info().rss, total, len(kernels)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, wait, and return the exit code (killing it if it does not stop in time)."""
        if self.exit_code is not None:
            return self.exit_code
        self.kernel_pids.update(p.pid for p in self.kernel_processes())
        start = time.perf_counter()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            self.exit_code = -signal.SIGKILL
        self.stop_seconds = round(time.perf_counter() - start, 2)
        return self.exit_code

    def log_problems(self) -> list[str]:
        """Lines of the gateway's stderr (its log and its kernels') that report an error."""
        text = self.stderr_path.read_text(errors="replace")
        return [line for line in text.splitlines() if " ERROR " in line or line.startswith("Traceback")]

    def leftover_kernels(self) -> list[int]:
        """Kernel pids seen during the run that are still running (not zombies), and any process still
        running with this gateway's data directory on its command line (a kernel's connection file)."""
        left = set()
        for pid in self.kernel_pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    left.add(pid)
        left.update(proc.pid for proc in self.processes_of_data_dir())
        return sorted(left)

    def processes_of_data_dir(self) -> list[psutil.Process]:
        """Running processes (anywhere, not only children) whose command line names this gateway's data
        directory: its kernels, whose connection files are in ``DATA_DIR/runtime``."""
        marker = os.path.realpath(self.data_dir)
        found = []
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            with contextlib.suppress(psutil.Error):
                if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == self.pid:
                    continue
                if any(marker in part or str(self.data_dir) in part for part in proc.info["cmdline"] or ()):
                    found.append(proc)
        return found

    def log_error_blocks(self, limit: int = 5) -> list[str]:
        """The first ``limit`` ERROR log records and tracebacks of its stderr, each with its following lines
        (up to the next log record), so that the JSON says what went wrong."""
        blocks: list[list[str]] = []
        current: list[str] | None = None
        for line in self.stderr_path.read_text(errors="replace").splitlines():
            if " ERROR " in line or line.startswith("Traceback"):
                current = [line]
                blocks.append(current)
            elif current is not None and not LOG_RECORD.match(line) and len(current) < 40:
                current.append(line)
            else:
                current = None
        return ["\n".join(block) for block in blocks[:limit]]

    def log_warning_kinds(self) -> dict[str, int]:
        """WARNING log records, counted by their text with ids and numbers blanked out."""
        kinds: dict[str, int] = {}
        for line in self.log_lines(" WARNING ", records_only=True):
            text = line.split(" WARNING ", 1)[1]
            text = re.sub(r"\b(s_[A-Za-z0-9]+|[0-9a-f]{8}-[0-9a-f-]{27}|\d+(\.\d+)?)\b", "#", text)
            kinds[text] = kinds.get(text, 0) + 1
        return dict(sorted(kinds.items(), key=lambda item: -item[1]))

    def log_lines(self, marker: str, records_only: bool = False) -> list[str]:
        """Lines of the gateway's stderr containing ``marker`` (e.g. ``" WARNING "``); with ``records_only``,
        only the gateway's own log records (not what its kernels print to the same stderr)."""
        text = self.stderr_path.read_text(errors="replace")
        return [line for line in text.splitlines()
                if marker in line and (not records_only or LOG_RECORD.match(line))]

    def started_kernel_pids(self) -> set[int]:
        """Pids of kernels the gateway logged as started and answering (``kernel ... started (..., pid N)``)."""
        return {int(m) for m in KERNEL_STARTED.findall(self.stderr_path.read_text(errors="replace"))}

    def pool_pids(self) -> tuple[set[int], set[int]]:
        """(pids of the warm pool's kernels, those of them ready): pool kernels run in ``DATA_DIR/pool`` until
        a session takes them; ready ones are those the gateway logged as started."""
        pool_dir = os.path.realpath(self.data_dir / "pool")
        pids = set()
        for proc in self.kernel_processes():
            with contextlib.suppress(psutil.Error):
                if os.path.realpath(proc.cwd()) == pool_dir:
                    pids.add(proc.pid)
        return pids, pids & self.started_kernel_pids()

    def tree_rss(self) -> int:
        """RSS of the gateway and all its kernels, in bytes."""
        gateway, kernels, _ = self.rss()
        return gateway + kernels


class ApiClient:
    """One persistent keep-alive connection to the gateway's agent API (standard library only)."""

    def __init__(self, host: str, port: int):
        self.connection = http.client.HTTPConnection(host, port, timeout=120)
        self.headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        self.last_response_bytes = 0

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, expect: int = 200) -> dict[str, Any]:
        payload = json.dumps(body).encode() if body is not None else None
        self.connection.request(method, path, body=payload, headers=self.headers)
        response = self.connection.getresponse()
        data = response.read()
        self.last_response_bytes = len(data)
        if response.status != expect:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}: {data[:500]!r}")
        return json.loads(data)

    def create_session(self) -> str:
        return self.create_kernel_session()[0]

    def create_kernel_session(self) -> tuple[str, str]:
        """A new session: (session id, id of its kernel under /api/kernels)."""
        session = self.call("POST", "/v1/sessions", {}, expect=201)
        return str(session["id"]), str(session["kernel_id"])

    def delete_session(self, session_id: str) -> None:
        self.call("DELETE", f"/v1/sessions/{session_id}")

    def execute(self, session_id: str, code: str) -> dict[str, Any]:
        execution = self.call("POST", f"/v1/sessions/{session_id}/execute", {"code": code})
        if execution["status"] != "ok":
            raise RuntimeError(f"step {code!r} ended {execution['status']}: {execution['error']}")
        return execution

    def stepper(self, session_id: str) -> Runner:
        """A runner doing one checked `1+1` step in ``session_id``."""
        def step() -> None:
            if self.execute(session_id, "1+1")["result"] != "2":
                raise RuntimeError("the gateway's `1+1` did not return 2")
        return step

    def close(self) -> None:
        self.connection.close()


# raw kernels, no gateway ----------------------------------------------------------------------


class RawKernel:
    """A kernel from the gateway's own spec, driven directly by a ``BlockingKernelClient``."""

    def __init__(self, specs: KernelSpecManager, workdir: Path, label: str):
        self.manager = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs,
                                     connection_file=str(workdir / f"raw-kernel-{label}.json"))
        self.client: Any = None
        try:
            with open(workdir / "raw-kernels.log", "a") as log:
                self.manager.start_kernel(cwd=str(workdir), stdout=log, stderr=log)
            self.client = self.manager.client()
            self.client.start_channels()
            self.client.wait_for_ready(timeout=60)
        except BaseException:
            self.stop()
            raise

    def run(self, code: str, timeout: float = 30) -> dict[str, Any]:
        """Execute ``code``; wait for iopub idle and the shell reply of this request; return the reply."""
        msg_id = self.client.execute(code)
        while True:
            msg = self.client.get_iopub_msg(timeout=timeout)
            if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                    and msg["content"]["execution_state"] == "idle"):
                break
        while True:
            reply = self.client.get_shell_msg(timeout=timeout)
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply["content"]

    def stepper(self) -> Runner:
        """A runner doing one checked `1+1` step on this kernel."""
        def step() -> None:
            if self.run("1+1")["status"] != "ok":
                raise RuntimeError("the raw kernel's `1+1` failed")
        return step

    @property
    def pid(self) -> int | None:
        process = getattr(self.manager.provisioner, "process", None)
        return getattr(process, "pid", None)

    def stop(self) -> None:
        if self.client is not None:
            self.client.stop_channels()
        if self.manager.has_kernel:
            self.manager.shutdown_kernel(now=True)


# kernel websocket clients ----------------------------------------------------------------------


class KernelSocket:
    """One websocket client of a session's kernel, ``/api/kernels/{kernel_id}/channels``, kept lean for timing.

    ``protocol`` is ``"json"`` (the default protocol: text frames of JSON) or ``"v1"`` (the
    ``v1.kernel.websocket.jupyter.org`` subprotocol: binary frames built here with ``struct``). One
    blocking websocket-client connection with TCP_NODELAY, no send lock (``enable_multithread=False``)
    and no UTF-8 validation of text frames (websocket-client does that byte by byte in Python, about
    0.2 ms per message); replies are parsed no further than needed.
    """

    def __init__(self, host: str, port: int, kernel_id: str, protocol: str):
        if protocol not in WS_PROTOCOLS:
            raise ValueError(f"unknown websocket protocol {protocol!r}")
        self.protocol = protocol
        self.session = uuid.uuid4().hex
        self.ws = websocket.create_connection(
            f"ws://{host}:{port}/api/kernels/{kernel_id}/channels", timeout=120,
            header=[f"Authorization: token {TOKEN}"],
            subprotocols=[V1_SUBPROTOCOL] if protocol == "v1" else None,
            enable_multithread=False, skip_utf8_validation=True,
            sockopt=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),))
        if protocol == "v1" and self.ws.getsubprotocol() != V1_SUBPROTOCOL:
            self.ws.close()
            raise RuntimeError(f"the gateway did not accept {V1_SUBPROTOCOL} (got {self.ws.getsubprotocol()!r})")

    def header(self, msg_id: str) -> dict[str, str]:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")
        return {"msg_id": msg_id, "msg_type": "execute_request", "username": "bench", "session": self.session,
                "version": "5.3", "date": now}

    def send_execute(self, msg_id: str, code: str) -> None:
        """An ``execute_request`` of ``code`` on the shell channel, in this client's protocol."""
        content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                   "allow_stdin": False}
        if self.protocol == "json":
            self.ws.send(json.dumps({"channel": "shell", "header": self.header(msg_id), "parent_header": {},
                                     "metadata": {}, "content": content}))
        else:
            self.ws.send_binary(v1_frame("shell", [json.dumps(self.header(msg_id)).encode(), b"{}", b"{}",
                                                   json.dumps(content).encode()]))

    def receive(self, msg_id: str) -> tuple[str, str, Any] | None:
        """The next message: (channel, msg_type, content) if it answers ``msg_id``, else None. The content is
        a dict in the JSON protocol; in v1 it is left as bytes (see ``content_of``), and of the other parts
        only the parent header is decoded, and the header if the parent is ``msg_id``."""
        frame = self.ws.recv()
        if self.protocol == "json":
            msg = json.loads(frame if isinstance(frame, str) else json_part_of_binary_frame(frame))
            if msg["parent_header"].get("msg_id") != msg_id:
                return None
            return msg["channel"], msg["header"]["msg_type"], msg["content"]
        channel, header, parent, content = v1_parts(frame)
        if json.loads(parent).get("msg_id") != msg_id:
            return None
        return channel, json.loads(header)["msg_type"], content

    @staticmethod
    def content_of(content: Any) -> dict[str, Any]:
        return json.loads(content) if isinstance(content, bytes) else content

    def run(self, code: str) -> dict[str, Any]:
        """Execute ``code``; wait for iopub idle and the shell reply of this request; return the reply's content.
        (Timed from the send until both arrived, like ``RawKernel.run``.)"""
        msg_id = uuid.uuid4().hex
        self.send_execute(msg_id, code)
        reply: dict[str, Any] | None = None
        idle = False
        while reply is None or not idle:
            answer = self.receive(msg_id)
            if answer is None:
                continue
            channel, msg_type, content = answer
            if channel == "shell":
                reply = self.content_of(content)
            elif msg_type == "status" and self.content_of(content)["execution_state"] == "idle":
                idle = True
        return reply

    def stepper(self) -> Runner:
        """A runner doing one checked `1+1` step over this websocket."""
        def step() -> None:
            if self.run("1+1")["status"] != "ok":
                raise RuntimeError(f"`1+1` over the {self.protocol} websocket failed")
        return step

    def close(self) -> None:
        self.ws.close()


def v1_frame(channel: str, parts: list[bytes]) -> bytes:
    """A v1 frame: little-endian uint64 count of offsets, the offsets (where the channel name and each part
    start, then the end), the channel name, then ``parts`` (header, parent header, metadata, content)."""
    name = channel.encode("ascii")
    count = 2 + len(parts)
    offsets = [8 * (1 + count), 8 * (1 + count) + len(name)]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    return struct.pack(f"<{count + 1}Q", count, *offsets) + name + b"".join(parts)


def v1_parts(frame: bytes) -> tuple[str, bytes, bytes, bytes]:
    """(channel, header, parent header, content) of a v1 frame, the JSON parts left undecoded."""
    count = struct.unpack_from("<Q", frame)[0]
    offsets = struct.unpack_from(f"<{count}Q", frame, 8)
    return (frame[offsets[0]:offsets[1]].decode("ascii"), frame[offsets[1]:offsets[2]],
            frame[offsets[2]:offsets[3]], frame[offsets[4]:offsets[5]])


def json_part_of_binary_frame(frame: bytes) -> bytes:
    """The JSON of a binary default-protocol frame (a message with buffers): big-endian uint32 count, offsets."""
    count = struct.unpack_from("!I", frame)[0]
    offsets = struct.unpack_from(f"!{count}I", frame, 4)
    return frame[offsets[0]:offsets[1] if count > 1 else len(frame)]


# the measurements ------------------------------------------------------------------------------


def measure_sessions(api: ApiClient, server: GatewayServer, count: int) -> dict[str, Any]:
    """Create ``count`` sessions one after another (timed), take the RSS figures, delete them (timed)."""
    idle_rss, _, _ = server.rss()
    created: list[str] = []
    create_ms, delete_ms = [], []
    try:
        for _ in range(count):
            start = time.perf_counter()
            created.append(api.create_session())
            create_ms.append((time.perf_counter() - start) * 1000)
        time.sleep(0.5)
        gateway_rss, kernels_rss, kernels = server.rss()
    finally:
        while created:
            session_id = created.pop()
            delete_ms.append(timed_ms(lambda: api.delete_session(session_id)))
    return {
        "create": summarize(create_ms), "delete": summarize(delete_ms),
        "rss": {"gateway_idle_bytes": idle_rss, "live_sessions": count, "gateway_bytes": gateway_rss,
                "kernels_total_bytes": kernels_rss, "kernel_processes": kernels},
    }


def measure_step_vs_raw(api: ApiClient, session_id: str, raw: RawKernel, plan: Plan) -> dict[str, Any]:
    """`1+1` over HTTP against `1+1` on a raw kernel, interleaved in blocks."""
    runners = {"gateway": api.stepper(session_id), "raw": raw.stepper()}
    for run in runners.values():
        repeat(run, plan.warmup)
    samples = interleaved(runners, plan.steps, plan.block)
    gateway, baseline = summarize(samples["gateway"]), summarize(samples["raw"])
    return {"gateway": gateway, "raw": baseline,
            "ratio_p50": round(gateway["p50_ms"] / baseline["p50_ms"], 2),
            "overhead_p50_ms": round(gateway["p50_ms"] - baseline["p50_ms"], 3)}


def measure_long_trajectory(api: ApiClient, plan: Plan) -> dict[str, Any]:
    """`1+1` in a session with ``plan.long_steps`` recorded steps against a fresh session, interleaved."""
    long_id, fresh_id = api.create_session(), api.create_session()
    try:
        start = time.perf_counter()
        for _ in range(plan.long_steps):
            api.execute(long_id, "pass")
        fill_seconds = time.perf_counter() - start
        runners = {"long": api.stepper(long_id), "fresh": api.stepper(fresh_id)}
        repeat(runners["fresh"], plan.warmup)
        samples = interleaved(runners, plan.steps, plan.block)
        notebook_ms = statistics.median(timed_ms(lambda: _get_text(api, f"/v1/sessions/{long_id}/notebook"))
                                        for _ in range(3))
    finally:
        api.delete_session(long_id)
        api.delete_session(fresh_id)
    long, fresh = summarize(samples["long"]), summarize(samples["fresh"])
    return {"recorded_steps_before": plan.long_steps, "fill_pass_steps_per_s": round(plan.long_steps / fill_seconds, 1),
            "long": long, "fresh": fresh, "difference_p50_ms": round(long["p50_ms"] - fresh["p50_ms"], 3),
            "difference_mean_ms": round(long["mean_ms"] - fresh["mean_ms"], 3),
            "notebook_get_ms": round(notebook_ms, 3)}


def _get_text(api: ApiClient, path: str) -> None:
    """GET ``path`` on the API connection and discard the body (for non-JSON responses)."""
    api.connection.request("GET", path, headers=api.headers)
    response = api.connection.getresponse()
    response.read()
    if response.status != 200:
        raise RuntimeError(f"GET {path}: HTTP {response.status}")


def close_thread_event_loop() -> None:
    """Close the event loop that jupyter_client's blocking calls set up for this thread, if any."""
    try:
        loop = asyncio.get_event_loop_policy().get_event_loop()
    except RuntimeError:
        return
    loop.close()
    asyncio.set_event_loop(None)


def run_for(runners: list[Runner], seconds: float) -> tuple[int, float]:
    """Each runner in its own thread, looping for ``seconds``; (steps done, wall seconds)."""
    barrier = threading.Barrier(len(runners) + 1)
    counts = [0] * len(runners)
    errors: list[BaseException] = []

    def loop(index: int, run: Runner) -> None:
        barrier.wait()
        deadline = time.perf_counter() + seconds
        try:
            while time.perf_counter() < deadline:
                run()
                counts[index] += 1
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            close_thread_event_loop()

    threads = [threading.Thread(target=loop, args=(i, run), daemon=True) for i, run in enumerate(runners)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"a concurrent stepper failed: {errors[0]!r}") from errors[0]
    return sum(counts), elapsed


def measure_concurrency(server: GatewayServer, raws: list[RawKernel], plan: Plan) -> dict[str, Any]:
    """Steps per second with ``plan.concurrency`` sessions stepping at once, against as many raw kernels."""
    with contextlib.ExitStack() as stack:
        clients = [ApiClient(server.host, server.port) for _ in range(plan.concurrency)]
        for client in clients:
            stack.callback(client.close)
        session_ids = [client.create_session() for client in clients]
        for client, session_id in zip(clients, session_ids):
            stack.callback(client.delete_session, session_id)
        gateway_runners = [client.stepper(sid) for client, sid in zip(clients, session_ids)]
        raw_runners = [raw.stepper() for raw in raws]
        for run in gateway_runners + raw_runners:
            repeat(run, 5)
        sides = concurrent_rounds({"gateway": gateway_runners, "raw": raw_runners}, plan)
    gateway, raw = sides["gateway"], sides["raw"]
    return {"workers": plan.concurrency, "seconds_per_side": plan.duration,
            "gateway_steps": gateway["steps"], "raw_steps": raw["steps"],
            "gateway_steps_per_s": gateway["steps_per_s"], "raw_steps_per_s": raw["steps_per_s"],
            "ratio": round(gateway["steps_per_s"] / raw["steps_per_s"], 2),
            "gateway_p50_ms": gateway["latency"]["p50_ms"], "raw_p50_ms": raw["latency"]["p50_ms"]}


def timed_into(run: Runner, samples_ms: list[float]) -> Runner:
    """``run``, appending the latency of every call to ``samples_ms``."""
    def timed() -> None:
        samples_ms.append(timed_ms(run))
    return timed


def concurrent_rounds(sides: dict[str, list[Runner]], plan: Plan) -> dict[str, dict[str, Any]]:
    """Run each side's runners at once (one thread each), the sides taking turns, ``plan.rounds`` turns of
    ``plan.duration / plan.rounds`` seconds each; per side: steps, seconds, steps per second, step latency."""
    samples: dict[str, list[float]] = {name: [] for name in sides}
    timed = {name: [timed_into(run, samples[name]) for run in runners] for name, runners in sides.items()}
    totals = {name: [0, 0.0] for name in sides}
    for _ in range(plan.rounds):
        for name, runners in timed.items():
            steps, seconds = run_for(runners, plan.duration / plan.rounds)
            totals[name][0] += steps
            totals[name][1] += seconds
    return {name: {"steps": steps, "seconds": round(seconds, 3), "steps_per_s": round(steps / seconds, 1),
                   "latency": summarize(samples[name])}
            for name, (steps, seconds) in totals.items()}


def open_kernel_sockets(stack: contextlib.ExitStack, api: ApiClient, server: GatewayServer, protocol: str,
                        count: int) -> list[KernelSocket]:
    """``count`` new sessions with one websocket client each; closed, then deleted, when ``stack`` closes."""
    sockets = []
    for _ in range(count):
        session_id, kernel_id = api.create_kernel_session()
        stack.callback(api.delete_session, session_id)
        kernel_socket = KernelSocket(server.host, server.port, kernel_id, protocol)
        stack.callback(kernel_socket.close)
        sockets.append(kernel_socket)
    return sockets


def measure_ws_step_vs_raw(api: ApiClient, server: GatewayServer, raw: RawKernel, plan: Plan) -> dict[str, Any]:
    """`1+1` over the kernel websocket in each protocol (a session each, one client) against `1+1` on a raw
    kernel, interleaved in blocks."""
    with contextlib.ExitStack() as stack:
        runners = {protocol: open_kernel_sockets(stack, api, server, protocol, 1)[0].stepper()
                   for protocol in WS_PROTOCOLS}
        runners["raw"] = raw.stepper()
        for run in runners.values():
            repeat(run, plan.warmup)
        samples = interleaved(runners, plan.steps, plan.block)
    stats = {name: summarize(found) for name, found in samples.items()}
    baseline = stats["raw"]["p50_ms"]
    return {**stats,
            "ratio_p50": {p: round(stats[p]["p50_ms"] / baseline, 2) for p in WS_PROTOCOLS},
            "overhead_p50_ms": {p: round(stats[p]["p50_ms"] - baseline, 3) for p in WS_PROTOCOLS}}


def measure_ws_concurrency(api: ApiClient, server: GatewayServer, raws: list[RawKernel],
                           plan: Plan) -> dict[str, Any]:
    """``plan.concurrency`` sessions stepping at once over websockets (one client and thread each), for each
    protocol, against as many raw kernels; the three sides take turns."""
    with contextlib.ExitStack() as stack:
        sides = {protocol: [kernel_socket.stepper() for kernel_socket in
                            open_kernel_sockets(stack, api, server, protocol, plan.concurrency)]
                 for protocol in WS_PROTOCOLS}
        sides["raw"] = [raw.stepper() for raw in raws]
        for runners in sides.values():
            for run in runners:
                repeat(run, 5)
        figures = concurrent_rounds(sides, plan)
    raw = figures["raw"]
    return {"workers": plan.concurrency, "seconds_per_side": plan.duration, **figures,
            "ratio": {p: round(figures[p]["steps_per_s"] / raw["steps_per_s"], 2) for p in WS_PROTOCOLS},
            "ratio_p50": {p: round(figures[p]["latency"]["p50_ms"] / raw["latency"]["p50_ms"], 2)
                          for p in WS_PROTOCOLS}}


def measure_big_output(api: ApiClient, session_id: str, runs: int) -> dict[str, Any]:
    """Latency of a step printing 1 MB; checks the whole of it comes back in ``stdout``."""
    lengths: list[int] = []
    truncated: list[bool] = []

    def big_step() -> None:
        execution = api.execute(session_id, BIG_CODE)
        lengths.append(len(execution["stdout"]))
        truncated.append(bool(execution["truncated"]))

    big_step()  # warm-up
    samples = [timed_ms(big_step) for _ in range(runs)]
    complete = all(n == BIG_STDOUT_CHARS for n in lengths) and not any(truncated)
    return {"latency": summarize(samples), "stdout_chars": lengths[-1], "expected_chars": BIG_STDOUT_CHARS,
            "stdout_complete": complete, "response_bytes": api.last_response_bytes}


# the session lifecycle -------------------------------------------------------------------------

MIN_AVAILABLE_BYTES = 2048 * MIB  # stop creating kernels when the machine has less memory available than this
POOL_SIZE = 2  # the gateway's default --pool-size, used by the lifecycle gateways that keep a pool
BIG_STATE = ("import numpy as np\n"
             "arrays = [np.random.default_rng(i).random(1_310_720) for i in range(10)]  # 10 x 10 MiB of float64")
BIG_STATE_BYTES = 10 * 1_310_720 * 8
BIG_CHECK = ("import os\n"
             "(len(arrays), sum(a.nbytes for a in arrays), round(float(sum(a.sum() for a in arrays)), 6), os.getpid())")
SMALL_STATE = ("import math, json\n"
               "x = 42\nname = 'bench'\nitems = list(range(100))\nconfig = {'a': 1, 'b': [1, 2, 3]}\n"
               "def double(v):\n    return 2 * v\n")
SMALL_CHECK = ("import os\n"
               "(x, name, sum(items), config['b'][2], double(21), math.floor(2.5), json.dumps(config), os.getpid())")


def step_value(api: ApiClient, session_id: str, code: str) -> Any:
    """The result of a step whose last expression is a literal (a tuple of numbers and strings)."""
    return ast.literal_eval(api.execute(session_id, code)["result"])


def kernel_pid(api: ApiClient, session_id: str) -> int:
    return int(api.execute(session_id, "import os; os.getpid()")["result"])


def pause_session(api: ApiClient, session_id: str) -> dict[str, Any]:
    return api.call("POST", f"/v1/sessions/{session_id}/pause", {})


def resume_session(api: ApiClient, session_id: str) -> dict[str, Any]:
    return api.call("POST", f"/v1/sessions/{session_id}/resume", {})


def process_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for_pool(server: GatewayServer, size: int, timeout: float = 60.0) -> float:
    """Wait until the warm pool holds ``size`` ready kernels (or ``timeout`` passes); seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if len(server.pool_pids()[1]) >= size:
            break
        time.sleep(0.05)
    return time.perf_counter() - start


def settle(server: GatewayServer, gap: float, pool_size: int) -> float:
    """Sleep ``gap`` seconds, then (with a pool) until the pool is full again; seconds waited in all."""
    time.sleep(gap)
    return gap + (wait_for_pool(server, pool_size) if pool_size else 0.0)


def seconds_summary(values: list[float]) -> dict[str, float]:
    return {"p50_s": round(percentile(values, 50), 2), "max_s": round(max(values), 2)} if values else {}


def disk_usage(path: Path) -> tuple[int, int, int]:
    """(bytes allocated on disk, as du counts them; apparent bytes; files) under ``path``."""
    allocated = apparent = files = 0
    seen: set[tuple[int, int]] = set()
    for root, _, names in os.walk(path):
        for entry in (root, *(os.path.join(root, name) for name in names)):
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(entry)
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                allocated += st.st_blocks * 512
                apparent += st.st_size
                files += entry != root
    return allocated, apparent, files


def du_bytes(path: Path) -> int | None:
    """``du -s -B1 path`` (None when du is not available)."""
    try:
        out = subprocess.run(["du", "-s", "-B1", str(path)], capture_output=True, text=True, check=True).stdout
        return int(out.split()[0])
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return None


def list_all(api: ApiClient, query: str = "") -> tuple[list[dict[str, Any]], int]:
    """Every session ``GET /v1/sessions?{query}`` lists, paging with ``limit=500``; (sessions, pages)."""
    sessions: list[dict[str, Any]] = []
    cursor, pages = None, 0
    while True:
        path = f"/v1/sessions?{query + '&' if query else ''}limit=500"
        if cursor:
            path += "&cursor=" + urllib.parse.quote(cursor)
        page = api.call("GET", path)
        pages += 1
        sessions.extend(page["sessions"])
        cursor = page["next"]
        if not cursor:
            return sessions, pages


def state_counts(sessions: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for session in sessions:
        counts[session["state"]] = counts.get(session["state"], 0) + 1
    return dict(sorted(counts.items()))


def in_clients(server: GatewayServer, count: int, clients: int, job: Callable[[ApiClient, int], Any], *,
               deadline: float | None = None, guard_memory: bool = False,
               progress: Callable[[str], None] | None = None, label: str = "") -> dict[str, Any]:
    """Run ``job(api, index)`` for ``index`` in ``range(count)`` from ``clients`` threads, each with its own
    connection. Stops taking new work past ``deadline`` seconds or, with ``guard_memory``, when the machine
    has less than ``MIN_AVAILABLE_BYTES`` available. Returns the values (by index), latencies, errors, time."""
    lock = threading.Lock()
    next_index, done = [0], [0]
    stopped: list[str] = []
    values: dict[int, Any] = {}
    latencies: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    report_every = max(1, count // 10)

    def worker() -> None:
        api = ApiClient(server.host, server.port)
        try:
            while True:
                with lock:
                    if stopped or next_index[0] >= count:
                        return
                    if deadline is not None and time.perf_counter() - start > deadline:
                        stopped.append(f"deadline of {deadline:g} s")
                        return
                    if guard_memory and psutil.virtual_memory().available < MIN_AVAILABLE_BYTES:
                        stopped.append(f"less than {mb(MIN_AVAILABLE_BYTES)} of memory available")
                        return
                    index = next_index[0]
                    next_index[0] += 1
                began = time.perf_counter()
                try:
                    value = job(api, index)
                except Exception as exc:  # counted and reported
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}"[:300])
                    api.close()
                    api = ApiClient(server.host, server.port)
                    continue
                elapsed_ms = (time.perf_counter() - began) * 1000
                with lock:
                    values[index] = value
                    latencies.append(elapsed_ms)
                    done[0] += 1
                    if progress is not None and done[0] % report_every == 0:
                        progress(f"  {label}: {done[0]}/{count} in {time.perf_counter() - start:.0f} s")
        finally:
            api.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    return {"requested": count, "done": len(values), "errors": len(errors), "error_samples": errors[:5],
            "clients": clients, "seconds": round(seconds, 2), "per_s": round(len(values) / seconds, 2),
            "stopped_early": stopped[0] if stopped else None, "latency": summarize(latencies) if latencies else None,
            "values": [values[i] for i in sorted(values)]}


def gateway_shutdown(server: GatewayServer, timeout: float = 300) -> dict[str, Any]:
    """Stop ``server`` (SIGTERM) and what is left of it: exit code, seconds, leftover kernels, log errors."""
    exit_code = server.stop(timeout)
    time.sleep(0.2)
    return {"gateway": server.name, "flags": " ".join(server.args), "exit_code": exit_code,
            "stop_seconds": server.stop_seconds, "kernels_seen": len(server.kernel_pids),
            "kernels_left_running": server.leftover_kernels(), "log_errors": server.log_problems()[:20],
            "log_error_blocks": server.log_error_blocks(), "log_warnings": len(server.log_lines(" WARNING ", records_only=True)),
            "log_warning_kinds": server.log_warning_kinds()}


def measure_creates(server: GatewayServer, n: int, gap: float, pool_size: int) -> dict[str, Any]:
    """``n`` timed ``POST /v1/sessions``, each after ``gap`` seconds and (with a pool) once the pool is full
    again; afterwards each session's kernel pid tells whether a pooled kernel served it."""
    api = ApiClient(server.host, server.port)
    created: list[str] = []
    samples, waits = [], []
    from_pool = 0
    try:
        for _ in range(n):
            waits.append(settle(server, gap, pool_size))
            ready = server.pool_pids()[1] if pool_size else set()
            start = time.perf_counter()
            session_id = api.create_session()
            samples.append((time.perf_counter() - start) * 1000)
            created.append(session_id)
            from_pool += kernel_pid(api, session_id) in ready
    finally:
        for session_id in created:
            with contextlib.suppress(Exception):
                api.delete_session(session_id)
        api.close()
    return {"pool_size": pool_size, "create": summarize(samples), "gap_s": gap, "waited": seconds_summary(waits),
            "served_by_pool": from_pool}


def measure_pause_frees_memory(api: ApiClient, server: GatewayServer, gap: float) -> tuple[dict[str, Any], str, Any]:
    """A session holding 100 MiB of numpy arrays: its kernel's RSS, then pause, then whether the process is
    gone and how much the RSS of the gateway and all its kernels fell. Returns (figures, session, check)."""
    session_id = api.create_session()
    pid = kernel_pid(api, session_id)
    kernel = psutil.Process(pid)
    is_child = pid in {p.pid for p in server.kernel_processes()}
    fresh_rss = kernel.memory_info().rss
    api.execute(session_id, BIG_STATE)
    check = step_value(api, session_id, BIG_CHECK)
    settle(server, gap, POOL_SIZE)
    time.sleep(0.5)
    kernel_rss = kernel.memory_info().rss
    gateway_before, kernels_before, processes_before = server.rss()
    start = time.perf_counter()
    view = pause_session(api, session_id)
    pause_ms = (time.perf_counter() - start) * 1000
    gone_ms = None
    start = time.perf_counter()
    while time.perf_counter() - start < 10:
        if not process_running(pid):
            gone_ms = (time.perf_counter() - start) * 1000
            break
        time.sleep(0.01)
    time.sleep(0.5)
    gateway_after, kernels_after, processes_after = server.rss()
    freed = (gateway_before + kernels_before) - (gateway_after + kernels_after)
    snapshot = server.data_dir / "sessions" / session_id / "snapshot"
    state = api.call("GET", f"/v1/sessions/{session_id}")["state"]
    return ({"kernel_pid_is_gateway_child": is_child, "kernel_rss_fresh_bytes": fresh_rss,
             "kernel_rss_bytes": kernel_rss, "arrays_bytes": BIG_STATE_BYTES, "pause_ms": round(pause_ms, 1),
             "state_after": state, "process_gone": gone_ms is not None,
             "process_gone_ms_after_response": None if gone_ms is None else round(gone_ms, 1),
             "gateway_rss_before_bytes": gateway_before, "gateway_rss_after_bytes": gateway_after,
             "kernels_rss_before_bytes": kernels_before, "kernels_rss_after_bytes": kernels_after,
             "kernel_processes_before": processes_before, "kernel_processes_after": processes_after,
             "freed_bytes": freed, "freed_fraction": round(freed / kernel_rss, 4),
             "snapshot_pickle_bytes": (view.get("snapshot") or {}).get("bytes"),
             "snapshot_disk_bytes": disk_usage(snapshot)[0]},
            session_id, check)


def measure_pause_resume(api: ApiClient, server: GatewayServer, session_id: str, check_code: str, check: Any,
                         runs: int, gap: float) -> dict[str, Any]:
    """``runs`` cycles on a paused session: resume (timed), check its state came back, pause (timed); each
    timed call after ``gap`` seconds and once the warm pool is full."""
    resume_ms, pause_ms = [], []
    from_pool, mismatches = 0, 0
    not_restored: set[str] = set()
    for _ in range(runs):
        settle(server, gap, POOL_SIZE)
        ready = server.pool_pids()[1]
        start = time.perf_counter()
        view = resume_session(api, session_id)
        resume_ms.append((time.perf_counter() - start) * 1000)
        if view["state"] != "idle":
            raise RuntimeError(f"session {session_id} is {view['state']} after resume")
        not_restored.update(entry["name"] for entry in (view.get("snapshot") or {}).get("not_restored", []))
        value = step_value(api, session_id, check_code)
        mismatches += tuple(value[:-1]) != tuple(check[:-1])
        from_pool += value[-1] in ready
        settle(server, gap, POOL_SIZE)
        start = time.perf_counter()
        view = pause_session(api, session_id)
        pause_ms.append((time.perf_counter() - start) * 1000)
        if view["state"] != "paused":
            raise RuntimeError(f"session {session_id} is {view['state']} after pause")
    return {"resume": summarize(resume_ms), "pause": summarize(pause_ms), "runs": runs,
            "resumed_on_pooled_kernel": from_pool, "state_mismatches": mismatches,
            "not_restored": sorted(not_restored)}


def measure_pool_pause_resume(workdir: Path, plan: Plan, progress: Callable[[str], None]) -> dict[str, Any]:
    """Create latency with the warm pool, pause freeing memory, resume latency: one gateway (default pool);
    then create latency with ``--pool-size 0``."""
    out: dict[str, Any] = {}
    server = GatewayServer(workdir, "lifecycle-pool")
    try:
        progress(f"lifecycle: gateway pid {server.pid} (pool of {POOL_SIZE}); {plan.creates} creates, "
                 f"{plan.create_gap:g} s apart and with the pool full")
        out["create_pool"] = measure_creates(server, plan.creates, plan.create_gap, POOL_SIZE)
        api = ApiClient(server.host, server.port)
        try:
            progress("lifecycle: pausing a session holding 100 MiB of numpy arrays")
            out["pause_memory"], big_id, big_check = measure_pause_frees_memory(api, server, plan.create_gap)
            progress(f"lifecycle: {plan.resume_big_runs} resume/pause cycles of the 100 MiB session")
            out["resume_big"] = measure_pause_resume(api, server, big_id, BIG_CHECK, big_check,
                                                     plan.resume_big_runs, plan.create_gap)
            small_id = api.create_session()
            api.execute(small_id, SMALL_STATE)
            small_check = step_value(api, small_id, SMALL_CHECK)
            pause_session(api, small_id)
            progress(f"lifecycle: {plan.resume_small_runs} resume/pause cycles of a small session")
            out["resume_small"] = measure_pause_resume(api, server, small_id, SMALL_CHECK, small_check,
                                                       plan.resume_small_runs, plan.create_gap)
        finally:
            api.close()
    finally:
        out["shutdown_pool"] = gateway_shutdown(server)
    server = GatewayServer(workdir, "lifecycle-cold", ("--pool-size", "0"))
    try:
        progress(f"lifecycle: gateway pid {server.pid} with --pool-size 0; {plan.creates} creates, "
                 f"{plan.create_gap:g} s apart")
        out["create_cold"] = measure_creates(server, plan.creates, plan.create_gap, 0)
    finally:
        out["shutdown_cold"] = gateway_shutdown(server)
    return out


def measure_many_live(workdir: Path, plan: Plan, progress: Callable[[str], None]) -> dict[str, Any]:
    """``plan.many_sessions`` live sessions at once (``--max-live-kernels`` above that): time to create them,
    errors, RSS, a `1+1` in a sample; then deleting them."""
    n = plan.many_sessions
    server = GatewayServer(workdir, "lifecycle-many", ("--max-live-kernels", str(n + 10)))
    out: dict[str, Any] = {"max_live_kernels": n + 10}
    try:
        out["gateway_rss_idle_bytes"] = server.rss()[0]
        out["memory_available_before_bytes"] = psutil.virtual_memory().available
        progress(f"lifecycle: gateway pid {server.pid}, --max-live-kernels {n + 10}; creating {n} live sessions "
                 f"with {plan.many_clients} clients")
        creation = in_clients(server, n, plan.many_clients, lambda api, _: api.create_session(),
                              deadline=plan.many_deadline, guard_memory=True, progress=progress, label="created")
        ids = creation.pop("values")
        out["create"] = creation
        time.sleep(1.0)
        gateway_rss, kernels_rss, processes = server.rss()
        out.update(gateway_rss_bytes=gateway_rss, kernels_rss_bytes=kernels_rss, kernel_processes=processes,
                   gateway_fds=psutil.Process(server.pid).num_fds(),
                   memory_available_after_bytes=psutil.virtual_memory().available)
        api = ApiClient(server.host, server.port)
        try:
            out["health"] = api.call("GET", "/v1/health")["sessions"]
            sample = ids[::max(1, len(ids) // plan.many_sample)][:plan.many_sample]
            step_ms, step_errors = [], []
            for session_id in sample:
                try:
                    step_ms.append(timed_ms(api.stepper(session_id)))
                except Exception as exc:  # counted and reported
                    step_errors.append(f"{type(exc).__name__}: {exc}"[:300])
            out["sample_step"] = {"sessions": len(sample), "latency": summarize(step_ms) if step_ms else None,
                                  "errors": len(step_errors), "error_samples": step_errors[:3]}
        finally:
            api.close()
        progress(f"lifecycle: deleting the {len(ids)} sessions")
        deletion = in_clients(server, len(ids), plan.many_clients, lambda api, i: api.delete_session(ids[i]))
        deletion.pop("values")
        out["delete"] = deletion
    finally:
        out["shutdown"] = gateway_shutdown(server)
    return out


def measure_eviction(workdir: Path, plan: Plan, progress: Callable[[str], None]) -> dict[str, Any]:
    """``plan.many_sessions`` sessions with ``--max-live-kernels`` at half of it: no errors expected, and the
    sessions past the maximum evict (pause) the least recently used."""
    n, limit = plan.many_sessions, plan.many_sessions // 2
    server = GatewayServer(workdir, "lifecycle-evict", ("--max-live-kernels", str(limit)))
    out: dict[str, Any] = {"max_live_kernels": limit}
    try:
        progress(f"lifecycle: gateway pid {server.pid}, --max-live-kernels {limit}; creating {n} sessions "
                 f"with {plan.many_clients} clients")
        creation = in_clients(server, n, plan.many_clients, lambda api, _: api.create_session(),
                              deadline=plan.many_deadline, guard_memory=True, progress=progress, label="created")
        creation.pop("values")
        out["create"] = creation
        time.sleep(1.0)
        api = ApiClient(server.host, server.port)
        try:
            out["health"] = api.call("GET", "/v1/health")["sessions"]
            everything, _ = list_all(api)
            out["states"] = state_counts(everything)
            paused, pages = list_all(api, "state=paused")
            out["paused_listed"] = len(paused)
            out["paused_listed_pages"] = pages
            out["paused_reasons"] = sorted({(s.get("snapshot") or {}).get("reason", "?") for s in paused})
            out["kernel_processes"] = server.rss()[2]
            # A step in a few evicted sessions resumes each (evicting another).
            evicted = [s["id"] for s in paused][:3]
            samples = []
            for session_id in evicted:
                samples.append(timed_ms(api.stepper(session_id)))
            out["step_in_evicted"] = summarize(samples) if samples else None
            live = [s["id"] for s in list_all(api)[0] if s["state"] in ("idle", "busy", "starting")]
        finally:
            api.close()
        progress(f"lifecycle: deleting the {len(live)} live sessions")
        deletion = in_clients(server, len(live), plan.many_clients, lambda api, i: api.delete_session(live[i]))
        deletion.pop("values")
        out["delete_live"] = deletion
    finally:
        out["shutdown"] = gateway_shutdown(server)
    return out


def measure_paused_store(workdir: Path, plan: Plan, progress: Callable[[str], None]) -> dict[str, Any]:
    """``plan.paused_sessions`` sessions created with ``--max-live-kernels 4``, so that all but four are
    paused by eviction: disk per paused session, kernels left, and the time of listing them."""
    n, limit = plan.paused_sessions, 4
    server = GatewayServer(workdir, "lifecycle-paused", ("--max-live-kernels", str(limit)))
    out: dict[str, Any] = {"max_live_kernels": limit}
    try:
        progress(f"lifecycle: gateway pid {server.pid}, --max-live-kernels {limit}; creating {n} sessions with "
                 f"{plan.paused_clients} clients (each past the 4th pauses the least recently used)")
        creation = in_clients(server, n, plan.paused_clients, lambda api, _: api.create_session(),
                              deadline=plan.paused_deadline, guard_memory=True, progress=progress, label="created")
        creation.pop("values")
        out["create"] = creation
        time.sleep(1.0)
        api = ApiClient(server.host, server.port)
        try:
            out["health"] = api.call("GET", "/v1/health")["sessions"]
            everything, _ = list_all(api)
            out["states"] = state_counts(everything)
            paused, _ = list_all(api, "state=paused")
            out["paused"] = len(paused)
            live_ids = [s["id"] for s in everything if s["state"] in ("idle", "busy", "starting")]
            # Kernel processes: the gateway's children, and any process naming its data directory; every one
            # must be a live session's (its pid from a step) or the warm pool's.
            live_pids = {kernel_pid(api, session_id) for session_id in live_ids}
            pool = server.pool_pids()[0]
            children = {p.pid for p in server.kernel_processes()}
            anywhere = {p.pid for p in server.processes_of_data_dir()}
            out.update(kernel_processes=len(children), kernel_processes_anywhere=len(anywhere),
                       pool_kernels=len(pool), live_sessions=len(live_ids),
                       unaccounted_kernels=sorted((children | anywhere) - live_pids - pool))
            # Disk: du of DATA_DIR/sessions, and per paused session.
            sessions_dir = server.data_dir / "sessions"
            out["sessions_dir_du_bytes"] = du_bytes(sessions_dir)
            out["sessions_dirs"] = sum(1 for _ in sessions_dir.iterdir())
            per_session = [disk_usage(sessions_dir / s["id"])[0] for s in paused]
            per_snapshot = [disk_usage(sessions_dir / s["id"] / "snapshot")[0] for s in paused]
            out["paused_session_disk_bytes"] = ({"median": int(statistics.median(per_session)),
                                                 "mean": int(statistics.fmean(per_session)),
                                                 "max": max(per_session)} if per_session else None)
            out["paused_snapshot_disk_bytes"] = ({"median": int(statistics.median(per_snapshot)),
                                                  "mean": int(statistics.fmean(per_snapshot))}
                                                 if per_snapshot else None)
            out["database_bytes"] = sum(f.stat().st_size for f in server.data_dir.glob("gateway.db*"))
            out["store_sessions"] = len(everything)
            # Listing with them in the store, interleaved, one call at a time.
            runners = {name: getter(api, path) for name, path in LIST_CALLS.items()}
            for run in runners.values():
                repeat(run, 3)
            samples = interleaved(runners, plan.list_calls, 1)
            out["list"] = {name: summarize(found) for name, found in samples.items()}
            out["list_response_bytes"] = {}
            for name, path in LIST_CALLS.items():
                api.call("GET", path)
                out["list_response_bytes"][name] = api.last_response_bytes
            start = time.perf_counter()
            _, pages = list_all(api, "state=paused")
            out["page_all_paused"] = {"ms": round((time.perf_counter() - start) * 1000, 1), "pages": pages}
        finally:
            api.close()
        progress(f"lifecycle: deleting the {len(live_ids)} live sessions")
        deletion = in_clients(server, len(live_ids), 1, lambda api, i: api.delete_session(live_ids[i]))
        deletion.pop("values")
        out["delete_live"] = deletion
    finally:
        out["shutdown"] = gateway_shutdown(server)
    return out


def getter(api: ApiClient, path: str) -> Runner:
    """A runner doing one ``GET path``."""
    def get() -> None:
        api.call("GET", path)
    return get


LIST_CALLS = {"all": "/v1/sessions?limit=100", "paused": "/v1/sessions?state=paused&limit=100",
              "health": "/v1/health"}


def run_lifecycle(plan: Plan, workdir: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    """The lifecycle section: each part on its own gateway, stopped before the next starts. A part that
    fails is reported as such and the others still run."""
    results: dict[str, Any] = {}
    parts = {"pool_pause_resume": measure_pool_pause_resume, "many_live": measure_many_live,
             "eviction": measure_eviction, "paused_store": measure_paused_store}
    for name, part in parts.items():
        start = time.perf_counter()
        load = round(os.getloadavg()[0], 2)
        try:
            results[name] = part(workdir, plan, progress)
        except Exception as exc:  # reported; the other parts still run
            progress(f"lifecycle: {name} failed: {exc!r}")
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
        results[name].update(part_seconds=round(time.perf_counter() - start, 1), load_average_1m_before=load)
    results["problems"] = lifecycle_problems(results)
    return results


def lifecycle_problems(results: dict[str, Any]) -> list[str]:
    """What went wrong in the lifecycle section, in words (empty when nothing did)."""
    problems = []
    for name, part in results.items():
        if not isinstance(part, dict):
            continue
        if "error" in part:
            problems.append(f"{name}: {part['error']}")
        for key, value in part.items():
            if key.startswith("shutdown") and isinstance(value, dict):
                if value["exit_code"] != 0:
                    problems.append(f"{name}: gateway {value['gateway']} exited with {value['exit_code']}")
                if value["kernels_left_running"]:
                    problems.append(f"{name}: kernels left running: {value['kernels_left_running']}")
                if value["log_errors"]:
                    problems.append(f"{name}: {len(value['log_errors'])} error lines in the log of {value['gateway']}")
    for name in ("many_live", "eviction", "paused_store"):
        errors = results.get(name, {}).get("create", {}).get("errors")
        if errors:
            problems.append(f"{name}: {errors} sessions could not be created")
    if results.get("paused_store", {}).get("unaccounted_kernels"):
        problems.append(f"paused_store: kernel processes of no live session: "
                        f"{results['paused_store']['unaccounted_kernels']}")
    return problems


# the run ---------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "memory_total_bytes": psutil.virtual_memory().total,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "gateway_version": gateway_version, "jupyter_client_version": jupyter_client.__version__,
        "gateway_source": gateway_source(),
    }


def gateway_source() -> dict[str, Any]:
    """The commit of the checkout the gateway runs from, and its files changed since (if it is a git tree)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", "gateway", "kernels"], cwd=root,
                                 capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "changed": []}
    return {"commit": commit, "changed": [line[3:] for line in changed if line.strip()]}


def raw_spec_dir(workdir: Path) -> Path:
    """The gateway's kernel spec as plain jupyter_client runs it: in the spec's built environment
    (the one the gateway's kernels run in), so both sides run the same Python and packages."""
    from gateway.environments import DEFAULT_ROOT, Environments

    source = kernels_dir() / KERNEL_NAME
    environment = Environments(Path(os.environ.get("AGENT_GATEWAY_ENVS_DIR", DEFAULT_ROOT)).resolve()).for_spec(source)
    spec = json.loads((source / "kernel.json").read_text())
    if environment is not None:
        spec["argv"][0] = environment.executable
    target = workdir / "raw-specs" / KERNEL_NAME
    target.mkdir(parents=True, exist_ok=True)
    (target / "kernel.json").write_text(json.dumps(spec))
    return target.parent


def start_raw_kernels(stack: contextlib.ExitStack, workdir: Path, count: int) -> list[RawKernel]:
    """Start ``count`` raw kernels, each stopped when ``stack`` closes."""
    specs = KernelSpecManager(kernel_dirs=[str(raw_spec_dir(workdir))], ensure_native_kernel=False)
    kernels = []
    for index in range(count):
        kernel = RawKernel(specs, workdir, str(index))
        stack.callback(kernel.stop)
        kernels.append(kernel)
    return kernels


def run_benchmarks(plan: Plan, workdir: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    """Every measurement, with the gateway and all raw kernels stopped before returning."""
    results: dict[str, Any] = {}
    server = GatewayServer(workdir)
    try:
        with contextlib.ExitStack() as stack:
            api = ApiClient(server.host, server.port)
            stack.callback(api.close)
            progress(f"gateway pid {server.pid} on port {server.port}; creating {plan.sessions} sessions")
            results["sessions"] = measure_sessions(api, server, plan.sessions)

            progress(f"starting {plan.concurrency} raw kernels")
            raws = start_raw_kernels(stack, workdir, plan.concurrency)
            progress(f"`1+1`: {plan.steps} gateway steps and {plan.steps} raw steps, interleaved")
            session_id = api.create_session()
            results["step"] = measure_step_vs_raw(api, session_id, raws[0], plan)

            progress(f"`1+1` over the kernel websocket: {plan.steps} steps per protocol ({', '.join(WS_PROTOCOLS)}) "
                     f"and {plan.steps} raw steps, interleaved")
            results["ws_step"] = measure_ws_step_vs_raw(api, server, raws[0], plan)

            progress(f"long trajectory: {plan.long_steps} `pass` steps, then `1+1` against a fresh session")
            results["long_trajectory"] = measure_long_trajectory(api, plan)

            progress(f"{plan.concurrency} sessions stepping at once, {plan.duration:g} s per side")
            results["concurrency"] = measure_concurrency(server, raws, plan)

            progress(f"{plan.concurrency} sessions stepping at once over websockets, per protocol, "
                     f"{plan.duration:g} s per side")
            results["ws_concurrency"] = measure_ws_concurrency(api, server, raws, plan)

            progress(f"1 MB print, {plan.big_runs} runs")
            results["big_output"] = measure_big_output(api, session_id, plan.big_runs)

            gateway_rss, kernels_rss, kernels = server.rss()
            results["rss_end"] = {"gateway_bytes": gateway_rss, "kernels_total_bytes": kernels_rss,
                                  "kernel_processes": kernels}
            api.delete_session(session_id)
            results["raw_kernel_pids"] = [k.pid for k in raws]
    finally:
        exit_code = server.stop()
    time.sleep(0.2)
    results["shutdown"] = {"gateway_exit_code": exit_code, "kernels_seen": len(server.kernel_pids),
                           "kernels_left_running": server.leftover_kernels(),
                           "gateway_log_errors": server.log_problems()[:20]}
    raw_left = [pid for pid in results.get("raw_kernel_pids", []) if pid and psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    results["shutdown"]["raw_kernels_left_running"] = raw_left
    results.pop("raw_kernel_pids", None)
    return results


# the report ------------------------------------------------------------------------------------


def mb(value: int) -> str:
    return f"{value / MIB:.1f} MiB"


def latency_row(label: str, stats: dict[str, float]) -> str:
    return f"| {label} | {stats['n']} | {stats['p50_ms']:.2f} | {stats['p99_ms']:.2f} | {stats['mean_ms']:.2f} |"


PROTOCOL_LABELS = {"json": "default JSON protocol", "v1": "`v1.kernel.websocket.jupyter.org` protocol"}


def ws_comparison_rows(ws_step: dict[str, Any], ws_conc: dict[str, Any]) -> list[str]:
    """The comparison rows of the kernel websocket measurements."""
    rows = [f"| websocket ({PROTOCOL_LABELS[p]}) / raw, `1+1` p50 | {ws_step['ratio_p50'][p]:.2f}x "
            f"({ws_step['overhead_p50_ms'][p]:+.2f} ms per step) |" for p in WS_PROTOCOLS]
    workers = ws_conc["workers"]
    for name in (*WS_PROTOCOLS, "raw"):
        side = ws_conc[name]
        label = (f"{workers} sessions stepping `1+1` at once over websockets, {PROTOCOL_LABELS[name]}"
                 if name != "raw" else f"{workers} raw kernels stepping `1+1` at once (in turns with the two rows above)")
        rows.append(f"| {label} | {side['steps_per_s']:,.0f} steps/s, p50 {side['latency']['p50_ms']:.2f} ms, "
                    f"p99 {side['latency']['p99_ms']:.2f} ms |")
    rows.append("| concurrent throughput, websocket / raw | "
                + ", ".join(f"{p}: {ws_conc['ratio'][p]:.2f}x (p50 {ws_conc['ratio_p50'][p]:.2f}x)"
                            for p in WS_PROTOCOLS) + " |")
    return rows


def render_report(report: dict[str, Any]) -> str:
    """The markdown report, ready to paste into docs/performance.md."""
    m, plan, r = report["machine"], report["plan"], report["results"]
    lines = [
        f"### Benchmark run of {report['date']} ({plan['mode']} mode)",
        "",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, {mb(m['memory_total_bytes'])} RAM, Python {m['python']}, "
        f"load average {report['load_before']:.2f} before and {m['load_average_1m']:.2f} after the run; "
        f"gateway {m['gateway_version']}{source_note(m)}, jupyter_client {m['jupyter_client_version']}. "
        "Client and server on the same machine, over loopback; one persistent HTTP/1.1 connection per "
        "client (`http.client`). The raw baseline is a `BlockingKernelClient` on a kernel from the same spec.",
    ]
    if "step" in r:
        lines += render_core(r, plan, report)
    if "lifecycle" in r:
        lines += render_lifecycle(r["lifecycle"], plan)
    lines += ["", f"Whole run: {report['wall_seconds']:g} s."]
    return "\n".join(lines)


def source_note(m: dict[str, Any]) -> str:
    source = m.get("gateway_source") or {}
    if not source.get("commit"):
        return ""
    changed = source.get("changed") or []
    return f" (commit {source['commit']}" + (f", with uncommitted changes to {', '.join(changed)})" if changed else ")")


def render_core(r: dict[str, Any], plan: dict[str, Any], report: dict[str, Any]) -> list[str]:
    """The agent API and Jupyter face part of the report."""
    step, long, conc, big, sess = r["step"], r["long_trajectory"], r["concurrency"], r["big_output"], r["sessions"]
    ws_step, ws_conc = r["ws_step"], r["ws_concurrency"]
    lines = [
        "",
        "| measurement | n | p50 (ms) | p99 (ms) | mean (ms) |",
        "|---|---:|---:|---:|---:|",
        latency_row("`POST /v1/sessions` (create, kernel ready)", sess["create"]),
        latency_row("`DELETE /v1/sessions/{id}`", sess["delete"]),
        latency_row("`1+1` step through the gateway", step["gateway"]),
        latency_row("`1+1` on a raw kernel (jupyter_client, no gateway)", step["raw"]),
        *[latency_row(f"`1+1` over the kernel websocket, {PROTOCOL_LABELS[p]}", ws_step[p]) for p in WS_PROTOCOLS],
        latency_row("`1+1` on a raw kernel (interleaved with the two rows above)", ws_step["raw"]),
        latency_row(f"`1+1` in a session with {long['recorded_steps_before']:,} recorded steps", long["long"]),
        latency_row("`1+1` in a fresh session (interleaved with the row above)", long["fresh"]),
        latency_row("`print(\"x\" * 1_000_000)` step", big["latency"]),
        "",
        "| comparison | value |",
        "|---|---|",
        f"| gateway / raw, `1+1` p50 | {step['ratio_p50']:.2f}x ({step['overhead_p50_ms']:+.2f} ms per step) |",
        f"| long trajectory - fresh session, `1+1` p50 | {long['difference_p50_ms']:+.2f} ms "
        f"(mean {long['difference_mean_ms']:+.2f} ms) |",
        f"| {conc['workers']} sessions stepping `1+1` at once, gateway | {conc['gateway_steps_per_s']:,.0f} steps/s |",
        f"| {conc['workers']} raw kernels stepping `1+1` at once, jupyter_client "
        f"| {conc['raw_steps_per_s']:,.0f} steps/s |",
        f"| concurrent throughput, gateway / raw | {conc['ratio']:.2f}x |",
        *ws_comparison_rows(ws_step, ws_conc),
        f"| 1 MB print: stdout returned | {big['stdout_chars']:,} chars of {big['expected_chars']:,} "
        f"({'complete' if big['stdout_complete'] else 'INCOMPLETE'}); response {mb(big['response_bytes'])} |",
        f"| gateway RSS, no sessions | {mb(sess['rss']['gateway_idle_bytes'])} |",
        f"| gateway RSS, {sess['rss']['live_sessions']} live sessions | {mb(sess['rss']['gateway_bytes'])} "
        f"(their {sess['rss']['kernel_processes']} kernels: {mb(sess['rss']['kernels_total_bytes'])} in total) |",
        f"| gateway RSS at the end of the run | {mb(r['rss_end']['gateway_bytes'])} |",
        "",
        f"Method: {plan['warmup']} untimed warm-up steps per side; gateway and raw steps alternate in blocks of "
        f"{plan['block']}; concurrency is {conc['seconds_per_side']:g} s per side split into {plan['rounds']} "
        f"alternating rounds, all client threads in one Python process. Websocket clients: websocket-client "
        f"`create_connection` (`enable_multithread=False`, TCP_NODELAY, no UTF-8 validation), a session each, "
        f"one client per kernel; an `execute_request` is timed from its send until both its `status: idle` "
        f"and its `execute_reply` arrived (as on the raw side); v1 frames are built with `struct` and only "
        f"their parent header and header parts are decoded (and the content of status messages and of "
        f"the reply); JSON protocol, websocket v1 and raw steps alternate in blocks of {plan['block']}, "
        f"and the three concurrent sides take turns in {plan['rounds']} rounds. Percentiles are nearest-rank. "
        f"Filling the long session ran `pass` steps at {long['fill_pass_steps_per_s']:,.0f} steps/s; "
        f"GET of its notebook took {long['notebook_get_ms']:.1f} ms (median of 3). "
        f"Gateway shutdown (SIGTERM): exit code {r['shutdown']['gateway_exit_code']}, "
        f"kernels left running: {len(r['shutdown']['kernels_left_running'])}, "
        f"error lines in its log: {len(r['shutdown']['gateway_log_errors'])}.",
    ]
    return lines


def target(met: bool) -> str:
    return "met" if met else "**not met**"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def kib(value: float) -> str:
    return f"{value / 1024:,.1f} KiB"


def part_failed(part: dict[str, Any]) -> str | None:
    return f"failed: {part['error']}" if "error" in part else None


def render_lifecycle(lc: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    """The lifecycle section of the markdown report."""
    lines = ["", f"#### Session lifecycle ({plan['mode']} mode)", ""]
    ppr, many, evict, store = lc["pool_pause_resume"], lc["many_live"], lc["eviction"], lc["paused_store"]
    rows = ["| measurement | n | p50 (ms) | p99 (ms) | mean (ms) |", "|---|---:|---:|---:|---:|"]
    figures = ["| figure | value | target |", "|---|---|---|"]
    if part_failed(ppr):
        figures.append(f"| create, pause, resume | {part_failed(ppr)} | |")
    else:
        warm, cold = ppr["create_pool"], ppr["create_cold"]
        memory, big, small = ppr["pause_memory"], ppr["resume_big"], ppr["resume_small"]
        rows += [
            latency_row(f"`POST /v1/sessions`, warm pool (`--pool-size {warm['pool_size']}`; "
                        f"{warm['served_by_pool']} of {warm['create']['n']} served by a pooled kernel)", warm["create"]),
            latency_row("`POST /v1/sessions`, no pool (`--pool-size 0`, cold boot)", cold["create"]),
            latency_row("`POST /v1/sessions/{id}/pause`, 100 MiB of numpy arrays", big["pause"]),
            latency_row(f"`POST /v1/sessions/{{id}}/resume`, 100 MiB of numpy arrays "
                        f"({big['resumed_on_pooled_kernel']} of {big['runs']} on a pooled kernel)", big["resume"]),
            latency_row("`POST /v1/sessions/{id}/pause`, a few small variables", small["pause"]),
            latency_row(f"`POST /v1/sessions/{{id}}/resume`, a few small variables "
                        f"({small['resumed_on_pooled_kernel']} of {small['runs']} on a pooled kernel)", small["resume"]),
        ]
        freed_ok = memory["process_gone"] and memory["freed_fraction"] >= 0.95
        gone_ms = memory["process_gone_ms_after_response"]
        gone = ("kernel process STILL RUNNING 10 s after the response" if not memory["process_gone"] else
                "kernel process already gone when the response arrived" if gone_ms < 1 else
                f"kernel process gone {gone_ms:.0f} ms after the response")
        figures += [
            f"| create with the warm pool, p50 (cold boot p50 for comparison) | {warm['create']['p50_ms']:.1f} ms "
            f"({cold['create']['p50_ms']:.1f} ms) | < 20 ms: {target(warm['create']['p50_ms'] < 20)} |",
            f"| pause frees memory | kernel RSS {mb(memory['kernel_rss_bytes'])} ({mb(memory['kernel_rss_fresh_bytes'])} "
            f"fresh + {mb(memory['arrays_bytes'])} of arrays); pause took {memory['pause_ms']:.0f} ms, {gone}; "
            f"RSS of the gateway and its kernels fell by {mb(memory['freed_bytes'])} = "
            f"**{memory['freed_fraction']:.1%}** of the kernel's RSS (gateway {mb(memory['gateway_rss_before_bytes'])} "
            f"-> {mb(memory['gateway_rss_after_bytes'])}); snapshot on disk {mb(memory['snapshot_disk_bytes'])} "
            f"| >= 95%: {target(freed_ok)} |",
            f"| resume, 100 MiB session, p50 | {big['resume']['p50_ms']:.0f} ms (pause p50 {big['pause']['p50_ms']:.0f} ms); "
            f"state checked after each resume: {big['runs'] - big['state_mismatches']} of {big['runs']} identical "
            f"| < 1 s: {target(big['resume']['p50_ms'] < 1000)} |",
            f"| resume, small session, p50 | {small['resume']['p50_ms']:.0f} ms (pause p50 {small['pause']['p50_ms']:.0f} ms); "
            f"state checked: {small['runs'] - small['state_mismatches']} of {small['runs']} identical"
            f"{'; not restored: ' + ', '.join(small['not_restored']) if small['not_restored'] else ''} "
            f"| < 300 ms: {target(small['resume']['p50_ms'] < 300)} |",
        ]
    if part_failed(many):
        figures.append(f"| {plan['many_sessions']} live sessions | {part_failed(many)} | |")
    else:
        c = many["create"]
        reached = ("" if c["done"] == c["requested"] and not c["stopped_early"]
                   else f" (**stopped at {c['done']} of {c['requested']}: {c['stopped_early'] or 'errors'}**)")
        per_kernel = many["kernels_rss_bytes"] / max(1, many["kernel_processes"])
        sample = many["sample_step"]
        rows.append(latency_row(f"`POST /v1/sessions` while creating {c['requested']} live sessions, "
                                f"{c['clients']} clients at once", c["latency"]))
        if sample["latency"]:
            rows.append(latency_row(f"`1+1` in a sample of the {c['done']} live sessions", sample["latency"]))
        figures += [
            f"| {c['requested']} live sessions (`--max-live-kernels {many['max_live_kernels']}`) | created {c['done']} "
            f"in {c['seconds']:.0f} s ({c['per_s']:.2f}/s, {c['clients']} clients){reached}, {c['errors']} errors; "
            f"gateway RSS {mb(many['gateway_rss_idle_bytes'])} idle -> {mb(many['gateway_rss_bytes'])}, "
            f"{many['gateway_fds']} open fds; {many['kernel_processes']} kernel processes (incl. the pool) "
            f"{mb(many['kernels_rss_bytes'])} in total, {mb(per_kernel)} each; `1+1` in {sample['sessions']} of them: "
            f"{sample['errors']} errors; deleting them took {many['delete']['seconds']:.0f} s "
            f"({many['delete']['errors']} errors) | no errors: {target(c['errors'] == 0 and sample['errors'] == 0)} |",
        ]
    if part_failed(evict):
        figures.append(f"| eviction | {part_failed(evict)} | |")
    else:
        c = evict["create"]
        expected_paused = c["done"] - evict["max_live_kernels"]
        evicted_ok = c["errors"] == 0 and evict["paused_listed"] == expected_paused == evict["health"]["paused"]
        rows.append(latency_row(f"`POST /v1/sessions` past `--max-live-kernels {evict['max_live_kernels']}` "
                                f"(evicting), {c['clients']} clients at once", c["latency"]))
        if evict.get("step_in_evicted"):
            rows.append(latency_row("`1+1` in an evicted session (resumes it, evicting another)",
                                    evict["step_in_evicted"]))
        states = ", ".join(f"{k} {v}" for k, v in evict["states"].items())
        figures.append(
            f"| {c['requested']} sessions with `--max-live-kernels {evict['max_live_kernels']}` | created {c['done']} "
            f"in {c['seconds']:.0f} s ({c['per_s']:.2f}/s), {c['errors']} errors; then health: live "
            f"{evict['health']['live']}, paused {evict['health']['paused']}; `?state=paused` paging: "
            f"{evict['paused_listed']} in {plural(evict['paused_listed_pages'], 'page')}, reason "
            f"{', '.join(evict['paused_reasons']) or '-'}; states: {states}; kernel processes "
            f"{evict['kernel_processes']} (incl. the pool) | no errors, {expected_paused} evicted: {target(evicted_ok)} |")
    if part_failed(store):
        figures.append(f"| paused sessions | {part_failed(store)} | |")
    else:
        c = store["create"]
        reached = ("" if c["done"] == c["requested"] and not c["stopped_early"]
                   else f" (**stopped at {c['done']} of {c['requested']}: {c['stopped_early'] or 'errors'}**)")
        rows += [latency_row(f"`GET /v1/sessions?limit=100`, {store['store_sessions']:,} sessions in the store",
                             store["list"]["all"]),
                 latency_row(f"`GET /v1/sessions?state=paused&limit=100`, {store['paused']:,} paused",
                             store["list"]["paused"]),
                 latency_row("`GET /v1/health` (counts them)", store["list"]["health"])]
        disk = store["paused_session_disk_bytes"] or {"median": 0, "mean": 0, "max": 0}
        snap = store["paused_snapshot_disk_bytes"] or {"median": 0, "mean": 0}
        per_dir = (store["sessions_dir_du_bytes"] or 0) / max(1, store["sessions_dirs"])
        clean = not store["unaccounted_kernels"] and store["kernel_processes"] <= store["live_sessions"] + POOL_SIZE
        figures += [
            f"| {c['requested']:,} sessions with `--max-live-kernels 4` | created {c['done']:,} in {c['seconds']:.0f} s "
            f"({c['per_s']:.2f}/s, {c['clients']} clients){reached}, {c['errors']} errors; paused {store['paused']:,}, "
            f"live {store['live_sessions']}; kernel processes: {store['kernel_processes']} children of the gateway "
            f"({store['live_sessions']} live sessions' + {store['pool_kernels']} pool), "
            f"{store['kernel_processes_anywhere']} processes anywhere naming its data directory, "
            f"{len(store['unaccounted_kernels'])} belonging to no live session or the pool "
            f"| no kernel for a paused session: {target(clean)} |",
            f"| disk per paused session | median {kib(disk['median'])} (mean {kib(disk['mean'])}, max {kib(disk['max'])}), "
            f"of which the snapshot {kib(snap['median'])}; `du` of DATA_DIR/sessions {mb(store['sessions_dir_du_bytes'] or 0)} "
            f"for {store['sessions_dirs']:,} session directories = {kib(per_dir)} each; database "
            f"{mb(store['database_bytes'])} | |",
            f"| listing every paused session (`?state=paused&limit=500`, paging) | "
            f"{store['page_all_paused']['ms']:.0f} ms for {plural(store['page_all_paused']['pages'], 'page')}; responses of the "
            f"`limit=100` calls: {kib(store['list_response_bytes']['all'])} and {kib(store['list_response_bytes']['paused'])} | |",
        ]
    shutdowns = [value for part in (ppr, many, evict, store) for key, value in part.items()
                 if key.startswith("shutdown") and isinstance(value, dict)]
    figures.append("| lifecycle gateways stopped (SIGTERM) | " + "; ".join(
        f"{s['gateway']} (`{s['flags'] or 'defaults'}`): exit {s['exit_code']} in {s['stop_seconds']} s, "
        f"{len(s['kernels_left_running'])} kernels left, {len(s['log_errors'])} error / {s['log_warnings']} warning "
        f"log lines" for s in shutdowns) + " | exit 0, nothing left |")
    gap = plan["create_gap"]
    waited = (ppr.get("create_pool") or {}).get("waited") or {}
    timing = ", ".join(f"{name.replace('_', ' ')} {part['part_seconds']:.0f} s (load {part['load_average_1m_before']:.1f})"
                       for name, part in lc.items() if isinstance(part, dict) and "part_seconds" in part)
    lines += rows + [""] + figures + [
        "",
        f"Time of each part (and the 1-minute load average as it started): {timing}.",
        "",
        f"Method: each part runs on its own gateway (flags above), started and stopped (SIGTERM) by the script. "
        f"Create and resume latencies are end to end over one keep-alive connection. With the warm pool, every "
        f"timed create, pause and resume comes {gap:g} s after the previous call and once the pool holds its "
        f"{POOL_SIZE} kernels again (a pool kernel counts as ready once the gateway logged it started; waits before "
        f"the creates: p50 {waited.get('p50_s', 0):g} s, max {waited.get('max_s', 0):g} s); whether a pooled "
        f"kernel served a session is read from its kernel's pid (a step `os.getpid()` after the timed call) against "
        f"the pool's ready pids before it. Cold creates are {gap:g} s apart. The 100 MiB state is ten "
        f"`np.random.default_rng(i).random(1_310_720)` arrays; its kernel's RSS is read with psutil, and memory "
        f"freed is the fall of the RSS of the gateway plus all its kernels (no kernel starts during a pause), "
        f"0.5 s after the pause answered. Every resume is followed by a step comparing the restored state with the "
        f"state before the first pause. Many sessions: created by {plan['many_clients']} client threads at once, "
        f"stopping early past {plan['many_deadline']:g} s or below {mb(MIN_AVAILABLE_BYTES)} of available memory; "
        f"the paused store: {plan['paused_clients']} clients, at most {plan['paused_deadline']:g} s. Listing calls "
        f"alternate one by one, {plan['list_calls']} each. Disk sizes are allocated blocks, as `du` counts them.",
    ]
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (smaller n) to check everything works")
    parser.add_argument("--json", dest="json_out", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--only", choices=("core", "lifecycle"),
                        help="run only the agent API and Jupyter face part (core) or only the lifecycle section")
    parser.add_argument("--keep-logs", type=Path, metavar="DIR", help="copy the gateways' logs into DIR at the end")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.for_mode(args.quick)

    def progress(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = round(os.getloadavg()[0], 2)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        if args.only != "lifecycle":
            results.update(run_benchmarks(plan, Path(tmp), progress))
        if args.only != "core":
            results["lifecycle"] = run_lifecycle(plan, Path(tmp), progress)
        if args.keep_logs:
            args.keep_logs.mkdir(parents=True, exist_ok=True)
            for log in [*Path(tmp).glob("*.std*.txt"), *Path(tmp).glob("*.log")]:
                shutil.copy(log, args.keep_logs / log.name)
    report = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "load_before": load_before, "machine": machine(),
              "plan": asdict(plan),
              "wall_seconds": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1),
              "results": results}
    print(render_report(report))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        progress(f"figures written to {args.json_out}")
    problems = []
    if "shutdown" in results:
        shutdown = results["shutdown"]
        if (shutdown["gateway_exit_code"] != 0 or shutdown["kernels_left_running"]
                or shutdown["raw_kernels_left_running"] or shutdown["gateway_log_errors"]):
            problems.append(f"shutdown: {json.dumps(shutdown)}")
        if not results["big_output"]["stdout_complete"]:
            problems.append("the 1 MB stdout came back incomplete")
    if "lifecycle" in results:
        problems += results["lifecycle"]["problems"]
    for problem in problems:
        progress(f"problem: {problem}")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
