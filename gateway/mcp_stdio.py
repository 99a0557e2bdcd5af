"""``agent-gateway mcp``: the gateway's MCP tools over stdio, for desktop clients.

A stdio MCP server that forwards every tool listing and call to a gateway's ``/mcp`` with the
caller's token. The tools, their authorisation and their recording stay in the gateway
(``gateway.mcp_server``); this process only carries messages, and holds no state of its own.
"""

from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator

import httpx2
import mcp_types as types
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError

from gateway import __version__
from gateway.mcp_server import MAX_WAIT, MCP_PATH

CONNECT_TIMEOUT = 10.0


def gateway_client(url: str, token: str) -> Client:
    """An MCP client of the gateway at ``url`` (its base URL, or its ``/mcp`` URL)."""
    endpoint = url.rstrip("/")
    if not endpoint.endswith(MCP_PATH):
        endpoint += MCP_PATH
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"},
                              timeout=httpx2.Timeout(MAX_WAIT + 60, connect=CONNECT_TIMEOUT))
    return Client(streamable_http_client(endpoint, http_client=http))


def bridge(remote: Client, instructions: str | None) -> Server[Any]:
    """A server whose tools are the remote gateway's."""

    async def list_tools(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        return await remote.list_tools(cursor=params.cursor if params else None)

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        try:
            result = await remote.call_tool(params.name, params.arguments or {})
        except (MCPError, httpx2.HTTPError) as exc:
            return types.CallToolResult(content=[types.TextContent(type="text", text=f"the gateway failed: {exc}")],
                                        is_error=True)
        assert isinstance(result, types.CallToolResult)
        return result

    return Server("agent-kernel-gateway", version=__version__, instructions=instructions,
                  on_list_tools=list_tools, on_call_tool=call_tool)


@contextlib.asynccontextmanager
async def connected(url: str, token: str) -> AsyncIterator[Server[Any]]:
    async with gateway_client(url, token) as remote:
        yield bridge(remote, remote.instructions)


async def serve_stdio(url: str, token: str) -> None:
    """Serve the gateway's tools on standard input and output until the client closes them."""
    async with connected(url, token) as server, stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())
