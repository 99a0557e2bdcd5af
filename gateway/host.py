"""The server's way to its privileged helper (``gateway.helper``): everything that needs root.

Started as root, ``agent-gateway serve`` starts the helper, then drops to an unprivileged user
(``gateway.privileges``) before it reads any request. From then on the server reaches kernels'
processes, cgroups, workspace volumes and every tree a kernel can write only through the narrow
requests of the helper. ``Host`` sends them over a socket pair and returns the results, with the
descriptors the helper passes (a file to download, a kernel's pidfd); errors of the helper come
back as the same exceptions (``OSError`` with its errno, ``safefs.UnsafeEntry``, ...).

Code that runs outside a server (a tool, a test) gets a helper of its own on first use, started
as its own user: it then holds no privilege the caller does not have.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any

from gateway import helper_wire

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 60.0
INHERITED = "AGENT_GATEWAY_HELPER_FD"  # "<fd>:<pid>": a helper started before the server dropped root


class HelperRefused(ValueError):
    """The helper refused a request as invalid (a bug of the server, or a compromised one)."""


class HelperFailed(RuntimeError):
    """The helper could not carry out a request, or is gone."""


@dataclass(frozen=True)
class HelperConfig:
    """What the helper is told at start (on its command line, as JSON)."""

    anchors: tuple[str, ...] = ()  # directories requests may name paths beneath; () = any (own-user helper)
    server_owner: tuple[int, int] | None = None  # the unprivileged server's (uid, gid)
    kernel_uids: tuple[int, int] = (1_000_000, 10_000)  # first, count
    sandbox: str = "auto"  # the profile asked for; the helper probes and chooses before taking requests
    data_dir: str | None = None
    environments: str | None = None  # the root of the kernel environments (gateway.environments)
    container_engine: str | None = None  # the Docker Engine API of the container profile (gateway.containers)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "HelperConfig":
        raw = json.loads(text)
        return cls(anchors=tuple(raw["anchors"]),
                   server_owner=tuple(raw["server_owner"]) if raw["server_owner"] else None,  # type: ignore[arg-type]
                   kernel_uids=tuple(raw["kernel_uids"]), sandbox=raw["sandbox"],  # type: ignore[arg-type]
                   data_dir=raw["data_dir"], environments=raw.get("environments"),
                   container_engine=raw.get("container_engine"))


@dataclass
class Reply:
    result: Any
    fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class Host:
    """A connection to one helper: requests may be sent from any thread and any event loop."""

    def __init__(self, sock: socket.socket, process: subprocess.Popen[bytes] | None = None):
        self.sock = sock
        self.process = process
        self.hello: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._pending: dict[int, Future[Reply]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._ready: Future[dict[str, Any]] = Future()
        self._inherited_pid: int | None = None
        self._reader = threading.Thread(target=self._read, name="helper-reader", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else self._inherited_pid

    def wait_hello(self, timeout: float = HELLO_TIMEOUT) -> dict[str, Any]:
        self.hello = self._ready.result(timeout)
        return self.hello

    def handover_env(self) -> dict[str, str]:
        """What a re-executed server needs to take over this connection (its socket is made
        inheritable): see ``inherited()``."""
        os.set_inheritable(self.sock.fileno(), True)
        return {INHERITED: f"{self.sock.fileno()}:{self.pid}"}

    def submit(self, op: str, fds: tuple[int, ...] = (), **args: Any) -> Future[Reply]:
        future: Future[Reply] = Future()
        with self._lock:
            if self._closed:
                raise HelperFailed("the privileged helper is gone")
            request_id = next(self._ids)
            self._pending[request_id] = future
            try:
                helper_wire.send(self.sock, {"id": request_id, "op": op, "args": args}, fds)
            except OSError as exc:
                self._pending.pop(request_id, None)
                raise HelperFailed(f"the privileged helper is gone ({exc.strerror})") from None
        return future

    async def call(self, op: str, fds: tuple[int, ...] = (), **args: Any) -> Any:
        """Run ``op`` in the helper and return its result (descriptors it sent are closed)."""
        reply = await asyncio.wrap_future(self.submit(op, fds, **args))
        reply.close()
        return reply.result

    async def call_fds(self, op: str, fds: tuple[int, ...] = (), **args: Any) -> Reply:
        """Like ``call``, keeping the descriptors the helper sent (the caller closes them)."""
        return await asyncio.wrap_future(self.submit(op, fds, **args))

    def call_sync(self, op: str, fds: tuple[int, ...] = (), timeout: float | None = 120, **args: Any) -> Any:
        """``call`` for code that is not a coroutine (never on the event loop)."""
        reply = self.submit(op, fds, **args).result(timeout)
        reply.close()
        return reply.result

    def close(self, timeout: float = 10) -> None:
        """Close the connection; the helper exits when it sees that (and is waited for)."""
        with self._lock:
            self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        elif self._inherited_pid is not None:
            _wait_child(self._inherited_pid, timeout)

    def _read(self) -> None:
        try:
            while True:
                received = helper_wire.receive(self.sock)
                if received is None:
                    break
                message, fds = received
                if "hello" in message and not self._ready.done():
                    self._ready.set_result(message["hello"])
                    continue
                future = self._pending.pop(message.get("id"), None)  # type: ignore[arg-type]
                # A caller that gave up (its task cancelled) cancelled its future: the reply is dropped.
                if future is None or not future.set_running_or_notify_cancel():
                    for fd in fds:
                        os.close(fd)
                    continue
                if message.get("ok"):
                    future.set_result(Reply(message.get("result"), fds))
                else:
                    for fd in fds:
                        os.close(fd)
                    future.set_exception(_error(message.get("error") or {}))
        except (OSError, helper_wire.WireError) as exc:
            if not self._closed:
                log.error("the privileged helper's connection failed: %s", exc)
        finally:
            with self._lock:
                self._closed = True
                pending, self._pending = self._pending, {}
            gone = HelperFailed("the privileged helper is gone")
            if not self._ready.done():
                self._ready.set_exception(gone)
            for future in pending.values():
                if future.set_running_or_notify_cancel():
                    future.set_exception(gone)


def _error(error: dict[str, Any]) -> Exception:
    """The exception the helper reported, as the type the caller expects."""
    from gateway import safefs, volumes
    from gateway.sandbox import IsolationUnavailable

    kind, message = error.get("kind"), str(error.get("message", ""))
    if kind in ("OSError", "TooDeep", "UnsafeEntry"):
        cls = {"OSError": OSError, "TooDeep": safefs.TooDeep, "UnsafeEntry": safefs.UnsafeEntry}[kind]
        return cls(int(error.get("errno") or 0), str(error.get("strerror") or message), error.get("filename"))
    if kind == "IsolationUnavailable":
        return IsolationUnavailable(message)
    if kind == "VolumeError":
        return volumes.VolumeError(message)
    if kind == "refused":
        return HelperRefused(message)
    return HelperFailed(message or "the privileged helper failed")


def start(config: HelperConfig) -> Host:
    """Start a helper (as this process's user: root, when the server is about to drop) and
    wait for its greeting (the profile it chose)."""
    server_end, helper_end = helper_wire.pair()
    try:
        process = subprocess.Popen([sys.executable, "-m", "gateway.helper", str(helper_end.fileno()),
                                    config.to_json()], pass_fds=(helper_end.fileno(),), stdin=subprocess.DEVNULL)
    finally:
        helper_end.close()
    host = Host(server_end, process)
    try:
        host.wait_hello()
    except BaseException:
        host.close()
        raise
    return host


def inherited() -> Host | None:
    """The helper a server started before it dropped root and re-executed itself, if this
    process is that server (``handover_env``); it is still this process's child."""
    value = os.environ.pop(INHERITED, None)
    if not value:
        return None
    fd_text, _, pid_text = value.partition(":")
    sock = socket.socket(fileno=int(fd_text))
    os.set_inheritable(sock.fileno(), False)
    connection = Host(sock)
    connection._inherited_pid = int(pid_text)
    connection._ready.set_result({})
    connection.hello = connection.call_sync("hello")
    return connection


def _wait_child(pid: int, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.02)
    try:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    except OSError:
        pass


_current: Host | None = None
_current_lock = threading.Lock()


def install(host: Host | None) -> None:
    """Make ``host`` the one ``current()`` returns (the server's, at its start)."""
    global _current
    with _current_lock:
        _current = host


def current() -> Host:
    """The server's helper; outside a server, one of this process's own user, started once."""
    global _current
    with _current_lock:
        if _current is None:
            # Its caller's own privileges bound it: any unprivileged uid may be a kernel's.
            _current = start(HelperConfig(sandbox="none", kernel_uids=(1000, (1 << 32) - 1002)))
        return _current
