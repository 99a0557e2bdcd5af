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

It prints a markdown report (ready for docs/performance.md) and, with ``--json OUT``, writes every
figure to a JSON file. Every process it starts is stopped before it exits.

    python tests/benchmarks/bench_gateway.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import http.client
import json
import math
import os
import platform
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
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

    @classmethod
    def for_mode(cls, quick: bool) -> "Plan":
        if quick:
            return cls("quick", sessions=5, steps=100, warmup=20, block=50, long_steps=200, concurrency=8,
                       duration=2.0, rounds=2, big_runs=3)
        return cls("full", sessions=20, steps=500, warmup=20, block=50, long_steps=1000, concurrency=8,
                   duration=5.0, rounds=2, big_runs=10)


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
    """``python -m gateway serve`` on a free loopback port; logs go to files in ``workdir``."""

    def __init__(self, workdir: Path):
        self.data_dir = workdir / "gateway-data"
        self.stdout_path = workdir / "gateway.stdout.txt"
        self.stderr_path = workdir / "gateway.stderr.txt"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_GATEWAY_")}
        env["AGENT_GATEWAY_TOKEN"] = TOKEN
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--port", "0", "--data-dir", str(self.data_dir)],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        self.host, self.port = self._wait_for_address(timeout=60)
        self.kernel_pids: set[int] = set()
        self.exit_code: int | None = None

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
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            self.exit_code = -signal.SIGKILL
        return self.exit_code

    def log_problems(self) -> list[str]:
        """Lines of the gateway's stderr (its log and its kernels') that report an error."""
        text = self.stderr_path.read_text(errors="replace")
        return [line for line in text.splitlines() if " ERROR " in line or line.startswith("Traceback")]

    def leftover_kernels(self) -> list[int]:
        """Kernel pids seen during the run that are still running (not zombies)."""
        left = []
        for pid in self.kernel_pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
        return left


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


# the run ---------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "python": platform.python_version(),
        "memory_total_bytes": psutil.virtual_memory().total,
        "load_average_1m": round(os.getloadavg()[0], 2),
        "gateway_version": gateway_version, "jupyter_client_version": jupyter_client.__version__,
    }


def start_raw_kernels(stack: contextlib.ExitStack, workdir: Path, count: int) -> list[RawKernel]:
    """Start ``count`` raw kernels, each stopped when ``stack`` closes."""
    specs = KernelSpecManager(kernel_dirs=[str(kernels_dir())], ensure_native_kernel=False)
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
    step, long, conc, big, sess = r["step"], r["long_trajectory"], r["concurrency"], r["big_output"], r["sessions"]
    ws_step, ws_conc = r["ws_step"], r["ws_concurrency"]
    lines = [
        f"### Benchmark run of {report['date']} ({plan['mode']} mode)",
        "",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, {mb(m['memory_total_bytes'])} RAM, Python {m['python']}, "
        f"load average {report['load_before']:.2f} before and {m['load_average_1m']:.2f} after the run; "
        f"gateway {m['gateway_version']}, jupyter_client {m['jupyter_client_version']}. "
        "Client and server on the same machine, over loopback; one persistent HTTP/1.1 connection per "
        "client (`http.client`). The raw baseline is a `BlockingKernelClient` on a kernel from the same spec.",
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
        f"error lines in its log: {len(r['shutdown']['gateway_log_errors'])}. Whole run: {report['wall_seconds']:g} s.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (smaller n) to check everything works")
    parser.add_argument("--json", dest="json_out", type=Path, help="also write every figure to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.for_mode(args.quick)

    def progress(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        results = run_benchmarks(plan, Path(tmp), progress)
    report = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "load_before": load_before, "machine": machine(),
              "plan": asdict(plan),
              "wall_seconds": round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1),
              "results": results}
    print(render_report(report))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        progress(f"figures written to {args.json_out}")
    shutdown = results["shutdown"]
    clean = (shutdown["gateway_exit_code"] == 0 and not shutdown["kernels_left_running"]
             and not shutdown["raw_kernels_left_running"] and not shutdown["gateway_log_errors"]
             and results["big_output"]["stdout_complete"])
    if not clean:
        progress(f"problems: {json.dumps(shutdown)}; 1 MB stdout complete: {results['big_output']['stdout_complete']}")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
