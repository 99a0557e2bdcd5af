"""The gateway's ZMQ connection to one kernel: shell, iopub, stdin and control channels.

Each socket's descriptor is watched on the server's event loop, so messages arrive as callbacks
with no polling and no thread. Every reply and iopub message is routed to the listener registered for its
parent ``msg_id`` (one execution never sees another's outputs), and offered to any observers
(for clients that want every message of the kernel).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections import deque
from typing import Any, Callable, Mapping, Protocol

import zmq
from jupyter_client.session import Session
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)

CHANNELS = ("shell", "iopub", "stdin", "control")


class MessageListener(Protocol):
    """Receives the messages that answer one request."""

    def on_message(self, channel: str, msg: dict[str, Any]) -> None: ...


# Receives every message: channel, the deserialised message, and its raw frames
# (header, parent header, metadata, content, buffers) for forwarding without re-encoding.
Observer = Callable[[str, dict[str, Any], list[bytes]], None]


DELIMITER = b"<IDS|MSG>"


def decode_message(session: Session, frames: list[bytes]) -> dict[str, Any]:
    """A kernel message from its ZMQ frames, signature checked.

    Lighter than ``Session.deserialize``: header dates stay ISO strings (they are only
    forwarded, never compared), and ``frames`` keeps the encoded parts (header, parent,
    metadata, content, buffers) for forwarding to websocket clients without re-encoding.
    """
    start = frames.index(DELIMITER) + 1
    signature, encoded = frames[start], frames[start + 1:]
    if len(encoded) < 4:
        raise ValueError("malformed message: fewer than four parts")
    if session.auth is not None and not hmac.compare_digest(signature, session.sign(encoded[:4])):
        raise ValueError("invalid signature")
    header = json.loads(encoded[0])
    return {
        "header": header, "msg_id": header.get("msg_id"), "msg_type": header.get("msg_type"),
        "parent_header": json.loads(encoded[1]), "metadata": json.loads(encoded[2]),
        "content": json.loads(encoded[3]), "buffers": encoded[4:], "frames": encoded,
    }


class SocketReader:
    """One ZMQ socket on the event loop: its file descriptor is watched directly, every ready
    message is read at once, and sends go out immediately (queued only when ZMQ pushes back).

    ZMQ's descriptor is edge-triggered and a send can consume the edge a read needed, so the
    socket is drained again after every send.
    """

    def __init__(self, sock: zmq.Socket, on_frames: Callable[[list[bytes]], None]):
        self.sock = sock
        self.on_frames = on_frames
        self.loop = asyncio.get_running_loop()
        self.fd = int(sock.getsockopt(zmq.FD))
        self.backlog: deque[list[bytes]] = deque()
        self.closed = False
        self.loop.add_reader(self.fd, self.drain)

    def drain(self) -> None:
        sock = self.sock
        try:
            while not self.closed and int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                self.on_frames(sock.recv_multipart(zmq.NOBLOCK))
        except zmq.ZMQError:
            log.debug("a kernel socket failed to read", exc_info=True)
        while self.backlog and not self.closed:
            try:
                sock.send_multipart(self.backlog[0], zmq.NOBLOCK)
            except zmq.Again:
                break
            self.backlog.popleft()

    def send(self, frames: list[bytes]) -> None:
        if self.closed:
            return
        if self.backlog:
            self.backlog.append(frames)
        else:
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                self.backlog.append(frames)
        self.loop.call_soon(self.drain)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.fd)
            self.sock.close(linger=0)


class KernelConnection:
    """Channels to one running kernel. Created by ``RunningKernel``, used by the executor."""

    def __init__(self, context: zmq.Context, connection_info: Mapping[str, Any], session: Session, label: str,
                 observers: list[Observer] | None = None):
        self.session = session
        self.label = label
        self.listeners: dict[str, MessageListener] = {}
        self.observers: list[Observer] = observers if observers is not None else []
        self.streams: dict[str, SocketReader] = {}
        for channel in CHANNELS:
            self.streams[channel] = SocketReader(self._socket(context, connection_info, channel),
                                                 self._receiver(channel))

    def _socket(self, context: zmq.Context, info: Mapping[str, Any], channel: str) -> zmq.Socket:
        port = info[f"{channel}_port"]
        transport = info.get("transport", "tcp")
        url = f"{transport}://{info['ip']}:{port}" if transport == "tcp" else f"{transport}://{info['ip']}-{port}"
        if channel == "iopub":
            sock = context.socket(zmq.SUB)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        else:
            sock = context.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, self.session.bsession)
        sock.linger = 0
        if channel == "stdin":
            # The kernel's stdin socket drops an input_request for a peer whose handshake it has
            # not seen yet: watch for ours (before connecting, so the event cannot be missed).
            self.stdin_events = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
            self.stdin_connected = False
        sock.connect(url)
        return sock

    async def stdin_ready(self, timeout: float) -> bool:
        """Wait (up to ``timeout``) until the stdin channel is connected to the kernel; whether it
        is (part of ``wait_ready``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.stdin_connected and not self.stdin_events.closed:
            while self.stdin_events.poll(0):
                if recv_monitor_message(self.stdin_events, zmq.NOBLOCK)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.stdin_connected = True
            if self.stdin_connected or loop.time() > deadline:
                break
            await asyncio.sleep(0.01)
        return self.stdin_connected

    def _receiver(self, channel: str) -> Callable[[list[bytes]], None]:
        def receive(frames: list[bytes]) -> None:
            try:
                msg = decode_message(self.session, frames)
            except Exception:
                log.warning("kernel %s: dropped an unreadable %s message", self.label, channel, exc_info=True)
                return
            parent_id = msg["parent_header"].get("msg_id") if msg.get("parent_header") else None
            listener = self.listeners.get(parent_id) if parent_id else None
            if listener is not None:
                try:
                    listener.on_message(channel, msg)
                except Exception:
                    log.exception("kernel %s: a %s message could not be handled", self.label, channel)
            if self.observers:
                raw = msg["frames"]
                for observer in list(self.observers):
                    try:
                        observer(channel, msg, raw)
                    except Exception:
                        log.exception("kernel %s: observer failed", self.label)

        return receive

    def send(self, channel: str, msg: dict[str, Any], listener: MessageListener | None = None,
             buffers: list[bytes] | None = None) -> None:
        """Send a message (header, parent_header, metadata, content); its answers go to ``listener``."""
        if listener is not None:
            self.listeners[msg["header"]["msg_id"]] = listener
        frames = self.session.serialize(msg)
        self.streams[channel].send([*frames, *buffers] if buffers else frames)

    def send_raw(self, channel: str, parts: list[bytes], msg_id: str, listener: MessageListener | None = None) -> None:
        """Sign and send an already-encoded message (header, parent, metadata, content, buffers)."""
        if listener is not None:
            self.listeners[msg_id] = listener
        signature = self.session.sign(parts[:4])
        self.streams[channel].send([DELIMITER, signature, *parts])

    def forget(self, msg_id: str) -> None:
        self.listeners.pop(msg_id, None)

    async def wait_ready(self, timeout: float, alive: Callable[[], Any]) -> dict[str, Any]:
        """Nudge the kernel with kernel_info requests until both shell and iopub answer, then
        wait for the stdin channel's handshake (an input() right after the start would be lost).

        Returns the kernel_info reply content. Raises ``TimeoutError`` or ``RuntimeError``
        (the kernel process ended).
        """
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[dict[str, Any]] = loop.create_future()
        state: dict[str, Any] = {"reply": None, "iopub": False}
        sent: set[str] = set()

        class Nudge:
            def on_message(self, channel: str, msg: dict[str, Any]) -> None:
                if channel == "shell" and msg["header"]["msg_type"] == "kernel_info_reply":
                    state["reply"] = msg["content"]
                elif channel == "iopub":
                    state["iopub"] = True
                if state["reply"] is not None and state["iopub"] and not ready.done():
                    ready.set_result(state["reply"])

        nudge = Nudge()
        deadline = loop.time() + timeout
        interval = 0.05
        try:
            while not ready.done():
                if loop.time() > deadline:
                    raise TimeoutError(f"the kernel did not answer within {timeout:g}s")
                if not await alive():
                    raise RuntimeError("the kernel process exited while starting")
                request = self.session.msg("kernel_info_request")
                sent.add(request["header"]["msg_id"])
                self.send("shell", request, nudge)
                try:
                    await asyncio.wait_for(asyncio.shield(ready), interval)
                except asyncio.TimeoutError:
                    interval = min(interval * 2, 0.5)
            if not await self.stdin_ready(max(0.0, deadline - loop.time())):
                raise TimeoutError(f"the kernel's stdin channel did not connect within {timeout:g}s")
            return ready.result()
        finally:
            for msg_id in sent:
                self.forget(msg_id)

    def close(self) -> None:
        """Close every channel; pending listeners are dropped (observers belong to the kernel)."""
        self.listeners.clear()
        self.stdin_events.close(linger=0)
        for stream in self.streams.values():
            try:
                stream.close()
            except Exception:
                log.debug("kernel %s: error closing a channel", self.label, exc_info=True)
        self.streams.clear()
