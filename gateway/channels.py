"""The gateway's ZMQ connection to one kernel: shell, iopub, stdin and control channels.

Sockets are wrapped in ZMQStreams on the server's event loop, so messages arrive as callbacks
with no polling. Every reply and iopub message is routed to the listener registered for its
parent ``msg_id`` (one execution never sees another's outputs), and offered to any observers
(for clients that want every message of the kernel).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Protocol

import zmq
from jupyter_client.session import Session
from zmq.eventloop.zmqstream import ZMQStream

log = logging.getLogger(__name__)

CHANNELS = ("shell", "iopub", "stdin", "control")


class MessageListener(Protocol):
    """Receives the messages that answer one request."""

    def on_message(self, channel: str, msg: dict[str, Any]) -> None: ...


# Receives every message: channel, the deserialised message, and its raw frames
# (header, parent header, metadata, content, buffers) for forwarding without re-encoding.
Observer = Callable[[str, dict[str, Any], list[bytes]], None]


class KernelConnection:
    """Channels to one running kernel. Created by ``RunningKernel``, used by the executor."""

    def __init__(self, context: zmq.Context, connection_info: dict[str, Any], session: Session, label: str,
                 observers: list[Observer] | None = None):
        self.session = session
        self.label = label
        self.listeners: dict[str, MessageListener] = {}
        self.observers: list[Observer] = observers if observers is not None else []
        self.streams: dict[str, ZMQStream] = {}
        self.last_message_at = time.monotonic()
        for channel in CHANNELS:
            self.streams[channel] = ZMQStream(self._socket(context, connection_info, channel))
            self.streams[channel].on_recv(self._receiver(channel), copy=False)

    def _socket(self, context: zmq.Context, info: dict[str, Any], channel: str) -> zmq.Socket:
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
        sock.connect(url)
        return sock

    def _receiver(self, channel: str) -> Callable[[list[Any]], None]:
        def receive(frames: list[Any]) -> None:
            try:
                _, parts = self.session.feed_identities(frames, copy=False)
                msg = self.session.deserialize(parts, content=True, copy=False)
            except Exception:
                log.warning("kernel %s: dropped an unreadable %s message", self.label, channel, exc_info=True)
                return
            self.last_message_at = time.monotonic()
            parent_id = msg["parent_header"].get("msg_id") if msg.get("parent_header") else None
            listener = self.listeners.get(parent_id) if parent_id else None
            if listener is not None:
                try:
                    listener.on_message(channel, msg)
                except Exception:
                    log.exception("kernel %s: a %s message could not be handled", self.label, channel)
            if self.observers:
                raw = [frame.bytes if hasattr(frame, "bytes") else bytes(frame) for frame in parts[1:]]
                for observer in list(self.observers):
                    try:
                        observer(channel, msg, raw)
                    except Exception:
                        log.exception("kernel %s: observer failed", self.label)

        return receive

    def send(self, channel: str, msg: dict[str, Any], listener: MessageListener | None = None) -> None:
        """Send a message built with ``self.session.msg``; its answers go to ``listener``."""
        if listener is not None:
            self.listeners[msg["header"]["msg_id"]] = listener
        self.session.send(self.streams[channel], msg)

    def send_raw(self, channel: str, parts: list[bytes], msg_id: str, listener: MessageListener | None = None) -> None:
        """Sign and send an already-encoded message (header, parent, metadata, content, buffers)."""
        if listener is not None:
            self.listeners[msg_id] = listener
        signature = self.session.sign(parts[:4])
        self.streams[channel].send_multipart([b"<IDS|MSG>", signature, *parts], copy=False)

    def forget(self, msg_id: str) -> None:
        self.listeners.pop(msg_id, None)

    async def wait_ready(self, timeout: float, alive: Callable[[], Any]) -> dict[str, Any]:
        """Nudge the kernel with kernel_info requests until both shell and iopub answer.

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
            return ready.result()
        finally:
            for msg_id in sent:
                self.forget(msg_id)

    def close(self) -> None:
        """Close every channel; pending listeners are dropped (observers belong to the kernel)."""
        self.listeners.clear()
        for stream in self.streams.values():
            try:
                stream.close(linger=0)
            except Exception:
                log.debug("kernel %s: error closing a channel", self.label, exc_info=True)
        self.streams.clear()
