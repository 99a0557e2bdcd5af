"""The kernel websocket, /api/kernels/{id}/channels, in both of Jupyter's protocols.

Authentication and visibility are checked before the upgrade (JSON errors). Each connection
is a client of the session's ``KernelHub``; ``?session_id=`` names the client, so a client that
reconnects with the same id gets what it missed.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

from tornado.iostream import StreamBufferFullError, StreamClosedError
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from gateway.auth import Principal
from gateway.handlers.base import check_query, log_handler_exception, request_token, write_error_envelope
from gateway.handlers.jupyter import KID
from gateway.hub import KernelHub
from gateway.wsproto import (V1_PROTOCOL, ProtocolError, frame_json, from_json_frame, from_v1_frame, to_json_frame,
                              to_v1_frame)

if TYPE_CHECKING:
    from gateway.server import Gateway

log = logging.getLogger(__name__)

CLIENT_WRITE_BUFFER = 64 * 1024 * 1024
RECORDED_CONTENT = ("execute_request", "input_reply")  # messages whose content the hub records


class KernelChannelsHandler(WebSocketHandler):
    """One websocket client of one kernel."""

    principal: Principal  # set by prepare(), before the upgrade

    def initialize(self, gateway: "Gateway") -> None:
        self.gateway = gateway
        self.hub: KernelHub | None = None
        self.client_id = ""
        self.protocol: str | None = None

    async def prepare(self) -> None:
        self.principal = self.gateway.auth.authenticate(request_token(self))
        check_query(self)
        self.hub = self.gateway.jupyter.hub(self.principal, self.path_kwargs["kernel_id"])
        self.client_id = self.get_query_argument("session_id", "") or uuid.uuid4().hex

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        write_error_envelope(self, status_code, kwargs.get("exc_info", (None, None, None))[1])

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        log_handler_exception(self, typ, value, tb)

    def check_origin(self, origin: str) -> bool:
        # Browsers send cookies with cross-site websockets; this API authenticates by token only.
        return True

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        self.protocol = V1_PROTOCOL if V1_PROTOCOL in subprotocols else None
        return self.protocol

    def get_compression_options(self) -> dict[str, Any] | None:
        return None

    def open(self, kernel_id: str) -> None:
        self.set_nodelay(True)
        stream = getattr(self.ws_connection, "stream", None)
        if stream is not None:
            stream.max_write_buffer_size = CLIENT_WRITE_BUFFER
        assert self.hub is not None
        self.hub.attach(self)

    def on_message(self, message: str | bytes) -> None:
        if self.hub is None or self.hub.live.kernel is None or self.hub.live.kernel.connection is None:
            return
        connection = self.hub.live.kernel.connection
        try:
            if self.protocol == V1_PROTOCOL:
                if not isinstance(message, bytes):
                    raise ProtocolError("v1 frames are binary")
                channel, parts = from_v1_frame(message)
                header = frame_json(parts[0])
                msg_type = header.get("msg_type") if isinstance(header, dict) else None
                content = frame_json(parts[3]) if msg_type in RECORDED_CONTENT else None
                parent = frame_json(parts[1]) if msg_type == "input_reply" else None
                if not all(isinstance(part, dict) for part in (header, content, parent) if part is not None):
                    raise ProtocolError("the header, parent header and content must be objects")

                def send(listener: Any) -> None:
                    connection.send_raw(channel, parts, str(header.get("msg_id", "")), listener)
            else:
                channel, msg, buffers = from_json_frame(message)
                header, content, parent = msg["header"], msg["content"], msg.get("parent_header")

                def send(listener: Any) -> None:
                    connection.send(channel, msg, listener, buffers)
        except (ProtocolError, ValueError, KeyError, IndexError) as exc:
            log.info("session %s: dropped a malformed websocket message from %s: %s",
                     self.hub.live.id, self.client_id, exc)
            return
        self.hub.from_client(self, channel, header, content, send, parent)

    def on_close(self) -> None:
        if self.hub is not None:
            self.hub.detach(self)

    # WebsocketClient ---------------------------------------------------------------------

    def deliver(self, channel: str, msg: dict[str, Any], frames: list[bytes]) -> bool:
        if self.ws_connection is None or self.ws_connection.is_closing():
            return False
        try:
            if self.protocol == V1_PROTOCOL:
                self.write_message(to_v1_frame(channel, frames), binary=True)
            else:
                frame = to_json_frame(msg, channel, list(msg.get("buffers") or []))
                self.write_message(frame, binary=isinstance(frame, bytes))
        except (WebSocketClosedError, StreamClosedError):
            return False
        except StreamBufferFullError:
            self.refuse("the client is not reading its messages fast enough")
            return False
        return True

    def refuse(self, reason: str) -> None:
        log.info("kernel websocket %s closed: %s", self.client_id, reason)
        if self.ws_connection is not None and not self.ws_connection.is_closing():
            self.close(1008, reason[:120])


routes = [
    (rf"/api/kernels/{KID}/channels", KernelChannelsHandler),
]
