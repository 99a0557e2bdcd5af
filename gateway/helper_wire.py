"""The messages between the server and its privileged helper (``gateway.helper``).

One JSON object per datagram of a ``SOCK_SEQPACKET`` socket pair, with file descriptors passed
beside it (``SCM_RIGHTS``). A message larger than one datagram travels in a memfd passed first,
which the receiver reads up to ``MAX_BODY`` bytes. Either side treats what it receives as
untrusted: a truncated datagram, too many descriptors or bytes that are not a JSON object end the
conversation with ``WireError``.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

DATAGRAM_MAX = 60 * 1024
BODY_MAX = 256 * 1024 * 1024  # a page of a listing, a report: far below this
FDS_MAX = 4
MEMFD_KEY = "$memfd"


class WireError(Exception):
    """The other side sent something that is not a message of this protocol."""


def pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of sockets, the helper's end inheritable by its process."""
    server_end, helper_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return server_end, helper_end


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send one message with ``fds`` (the caller keeps and closes its own descriptors)."""
    data = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    if len(data) <= DATAGRAM_MAX:
        socket.send_fds(sock, [data], list(fds)) if fds else sock.sendmsg([data])
        return
    body = os.memfd_create("agent-gateway-message", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(body, view):]
        os.lseek(body, 0, os.SEEK_SET)
        socket.send_fds(sock, [json.dumps({MEMFD_KEY: len(data)}).encode()], [body, *fds])
    finally:
        os.close(body)


def receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """The next message and the descriptors that came with it; None when the other side closed."""
    data, fds, flags, _address = socket.recv_fds(sock, DATAGRAM_MAX + 1, FDS_MAX)
    if not data and not fds:
        return None
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > DATAGRAM_MAX:
            raise WireError("a message was truncated")
        message = _decode(data)
        if MEMFD_KEY in message:
            if not fds:
                raise WireError("a large message came without its body")
            body, fds = fds[0], fds[1:]
            try:
                message = _decode(_read_body(body, message[MEMFD_KEY]))
            finally:
                os.close(body)
        return message, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _read_body(fd: int, size: Any) -> bytes:
    if not isinstance(size, int) or not 0 < size <= BODY_MAX:
        raise WireError("a message body has an impossible size")
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise WireError("a message body ended early")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _decode(data: bytes) -> dict[str, Any]:
    try:
        message = json.loads(data.decode("utf-8", "surrogatepass"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireError(f"a message is not JSON ({type(exc).__name__})") from None
    if not isinstance(message, dict):
        raise WireError("a message is not a JSON object")
    return message
