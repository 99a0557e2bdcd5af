"""The two websocket framings of kernel messages that Jupyter clients speak.

- The default JSON protocol: a text frame holding the message as JSON with a ``channel`` key;
  a message with binary buffers goes in a binary frame that starts with a table of offsets
  (big-endian 32-bit: the number of parts, then where each part starts), followed by the JSON
  and the buffers.
- ``v1.kernel.websocket.jupyter.org``: always binary. Little-endian 64-bit: the number of
  offsets, then the offsets; the parts are the channel name, then the header, parent header,
  metadata and content as JSON bytes, then the buffers. The JSON parts are the kernel's own
  frames, so they pass through without being parsed again.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from jupyter_client.jsonutil import json_default

from gateway.errors import InvalidRequest
from gateway.inputs import parse_json

V1_PROTOCOL = "v1.kernel.websocket.jupyter.org"
CHANNELS = ("shell", "iopub", "stdin", "control")


class ProtocolError(ValueError):
    """A frame that is not a kernel message in the negotiated protocol."""


def frame_json(raw: str | bytes) -> Any:
    """One JSON part of an incoming frame, checked like a request body (depth, numbers, text)."""
    try:
        return parse_json(raw.encode("utf-8") if isinstance(raw, str) else raw)
    except InvalidRequest as exc:
        raise ProtocolError(exc.message) from None


# JSON protocol ------------------------------------------------------------------------------

def to_json_frame(msg: dict[str, Any], channel: str, buffers: list[bytes]) -> str | bytes:
    """One outgoing message in the default protocol: text, or binary when it has buffers."""
    body = {"header": msg["header"], "parent_header": msg["parent_header"], "metadata": msg["metadata"],
            "content": msg["content"], "channel": channel, "msg_id": msg["header"].get("msg_id"),
            "msg_type": msg["header"].get("msg_type"), "buffers": []}
    if not buffers:
        return json.dumps(body, default=json_default)
    encoded = json.dumps(body, default=json_default).encode("utf-8")
    parts = [encoded, *buffers]
    count = len(parts)
    offsets = [4 * (count + 1)]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + len(part))
    return struct.pack(f"!{count + 1}I", count, *offsets) + b"".join(parts)


def from_json_frame(frame: str | bytes) -> tuple[str, dict[str, Any], list[bytes]]:
    """An incoming default-protocol frame: (channel, message, buffers)."""
    buffers: list[bytes] = []
    if isinstance(frame, bytes):
        if len(frame) < 8:
            raise ProtocolError("binary frame too short")
        count = struct.unpack("!I", frame[:4])[0]
        if count < 1 or 4 * (count + 1) > len(frame):
            raise ProtocolError("bad offset table")
        offsets = list(struct.unpack(f"!{count}I", frame[4:4 * (count + 1)])) + [len(frame)]
        if offsets != sorted(offsets) or offsets[-2] > len(frame):
            raise ProtocolError("offsets out of order")
        parts = [frame[offsets[i]:offsets[i + 1]] for i in range(count)]
        text: str | bytes = parts[0]
        buffers = parts[1:]
    else:
        text = frame
    msg = frame_json(text)
    if not isinstance(msg, dict):
        raise ProtocolError("a message must be a JSON object")
    # Some clients (Jupyter Server's gateway kernel client) leave the channel out of shell
    # requests; Jupyter servers take those as shell messages, and so does this one.
    channel = msg.pop("channel", None) or "shell"
    _check(channel, msg)
    return str(channel), msg, buffers


# v1 protocol ---------------------------------------------------------------------------------

def to_v1_frame(channel: str, parts: list[bytes]) -> bytes:
    """One outgoing message in the v1 protocol; ``parts`` are header, parent, metadata, content, buffers."""
    name = channel.encode("ascii")
    count = 2 + len(parts)
    offsets = [8 * (1 + count), 8 * (1 + count) + len(name)]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    table = struct.pack(f"<{count + 1}Q", count, *offsets)
    return b"".join([table, name, *parts])


def from_v1_frame(frame: bytes) -> tuple[str, list[bytes]]:
    """An incoming v1 frame: (channel, [header, parent, metadata, content, *buffers]) as bytes."""
    if not isinstance(frame, bytes) or len(frame) < 8:
        raise ProtocolError("v1 frames are binary")
    count = struct.unpack("<Q", frame[:8])[0]
    if count < 6 or 8 * (count + 1) > len(frame):
        raise ProtocolError("bad offset table")
    offsets = list(struct.unpack(f"<{count}Q", frame[8:8 * (count + 1)]))
    if offsets != sorted(offsets) or offsets[-1] > len(frame):
        raise ProtocolError("offsets out of order")
    channel = frame[offsets[0]:offsets[1]].decode("ascii", "replace")
    parts = [frame[offsets[i]:offsets[i + 1]] for i in range(1, count - 1)]
    if channel not in CHANNELS:
        raise ProtocolError(f"unknown channel {channel!r}")
    return channel, parts


def _check(channel: Any, msg: dict[str, Any]) -> None:
    if channel not in CHANNELS:
        raise ProtocolError(f"unknown channel {channel!r}")
    header = msg.get("header")
    if not isinstance(header, dict) or not isinstance(header.get("msg_type"), str) \
            or not isinstance(header.get("msg_id"), str):
        raise ProtocolError("a message needs a header with msg_id and msg_type")
    msg.setdefault("parent_header", {})
    msg.setdefault("metadata", {})
    msg.setdefault("content", {})
    if not all(isinstance(msg[k], dict) for k in ("parent_header", "metadata", "content")):
        raise ProtocolError("parent_header, metadata and content must be objects")
