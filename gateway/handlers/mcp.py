"""The MCP face's routes: ``/mcp`` (streamable HTTP) and its OAuth protected-resource metadata,
served by the ``mcp`` package's ASGI application (``gateway.mcp_server``)."""

from __future__ import annotations

import asyncio

from gateway.asgi_bridge import serve_asgi
from gateway.errors import Unavailable
from gateway.handlers.base import BaseHandler


class McpHandler(BaseHandler):
    """Hands the request, its body read within the body limit, to the MCP application. The
    application checks the bearer token itself (with the gateway's token authority), so that an
    unauthenticated call gets its 401 with the resource metadata an MCP client looks for."""

    public = True

    def prepare(self) -> None:
        self.client_gone = asyncio.Event()
        super().prepare()

    def on_connection_close(self) -> None:
        self.client_gone.set()
        super().on_connection_close()

    async def get(self) -> None:
        face = self.gateway.mcp
        if face is None:
            raise Unavailable("The MCP face is not running on this gateway (it starts with the server).",
                              code="mcp_unavailable")
        await serve_asgi(self, face.app, self.body_bytes(), self.client_gone)

    post = delete = get


routes = [
    (r"/mcp", McpHandler),
    (r"/\.well-known/oauth-protected-resource/mcp", McpHandler),
]
