"""Serving an ASGI application from a tornado request handler, on tornado's own event loop.

The MCP face is an ASGI application (the ``mcp`` package's streamable HTTP transport); the
gateway is a tornado server. ``serve_asgi`` turns one tornado request into one ASGI ``http``
call: the request body (already read and bounded by the handler) is its only ``http.request``
message, the client going away is ``http.disconnect``, and each ``http.response.body`` chunk is
written and flushed as it comes, so a server-sent event stream reaches the client live.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable, MutableMapping

import tornado.web
from tornado.iostream import StreamClosedError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


def http_scope(handler: tornado.web.RequestHandler, root_path: str = "") -> Scope:
    """The ASGI ``http`` scope of a tornado request."""
    request = handler.request
    host, _, port = (request.host or "").rpartition(":")
    server_port = int(port) if port.isdigit() else (443 if request.protocol == "https" else 80)
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": request.version.removeprefix("HTTP/") or "1.1",
        "method": request.method or "GET",
        "scheme": request.protocol,
        "path": request.path,
        "raw_path": request.path.encode("latin-1", "replace"),
        "query_string": request.query.encode("latin-1", "replace"),
        "root_path": root_path,
        "headers": [(name.lower().encode("latin-1"), value.encode("latin-1", "replace"))
                    for name, value in request.headers.get_all()],
        "client": (request.remote_ip or "", 0),
        "server": (host or request.host or "", server_port),
        "state": {},
    }


async def serve_asgi(handler: tornado.web.RequestHandler, app: ASGIApp, body: bytes,
                     client_gone: asyncio.Event) -> None:
    """Run ``app`` for the handler's request with ``body`` as its whole body; finishes the handler."""
    body_given = False

    async def receive() -> Message:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await client_gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            handler.clear()
            handler.clear_header("Content-Type")
            handler.clear_header("Server")
            handler.set_status(int(message["status"]))
            for name, value in message.get("headers", []):
                handler.add_header(name.decode("latin-1"), value.decode("latin-1"))
        elif kind == "http.response.body":
            if client_gone.is_set():
                return
            chunk = message.get("body", b"")
            if chunk:
                handler.write(chunk)
            if message.get("more_body", False):
                try:
                    await handler.flush()
                except StreamClosedError:
                    client_gone.set()
            elif not handler._finished:
                handler.finish()

    await app(http_scope(handler), receive, send)
    if not handler._finished and not client_gone.is_set():
        handler.finish()

