"""The MCP face against a real gateway, driven by the ``mcp`` package's own client: over
streamable HTTP at /mcp (protocol 2026-07-28, and the initialize handshake of earlier versions)
and over stdio through ``agent-gateway mcp``. State lasts across calls and connections through the
session handle; another principal's calls on that handle are refused and change nothing; steps are
recorded with source ``mcp``, other calls as ``mcp_call`` events."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import uuid
from typing import Any, Awaitable, Callable

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult

from tests.conftest import GatewayProcess
from tests.test_principals import token_for

PLOT = ("import matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots(); ax.plot([1, 3, 2]); display(fig); plt.close(fig)\nvalue * 2")
EXPECTED_TOOLS = {"create_session", "list_sessions", "execute", "wait_execution", "interrupt", "list_files",
                  "read_file", "write_file", "get_notebook", "pause_session", "resume_session", "fork_session",
                  "terminate_session"}


def http_client(gateway: GatewayProcess, token: str | None = None, mode: str = "auto") -> Client:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token or gateway.token}"}, timeout=120)
    return Client(streamable_http_client(f"{gateway.url}/mcp", http_client=http), mode=mode)


def stdio_client(gateway: GatewayProcess, token: str | None = None) -> Client:
    env = {**os.environ, "AGENT_GATEWAY_TOKEN": token or gateway.token}
    return Client(StdioServerParameters(command=sys.executable, args=["-m", "gateway", "mcp", "--gateway-url",
                                                                      gateway.url], env=env))


def call(client: Client, tool: str, **arguments: Any) -> Awaitable[CallToolResult]:
    return client.call_tool(tool, arguments)


def data(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


def error_of(result: CallToolResult) -> dict[str, Any]:
    """The gateway's error envelope carried by a failed tool call."""
    assert result.is_error
    text = result.content[0].text  # type: ignore[union-attr]
    return json.loads(text[text.index("{"):])["error"]


def steps_of(gateway: GatewayProcess, session_id: str) -> list[dict[str, Any]]:
    with gateway.client() as http:
        return http.get(f"/v1/sessions/{session_id}/steps").json()["steps"]


def events_of(gateway: GatewayProcess, session_id: str) -> list[dict[str, Any]]:
    with gateway.client() as http:
        return http.get(f"/v1/sessions/{session_id}/events").json()["events"]


async def the_agent_scenario(make_client: Callable[[], Client], gateway: GatewayProcess) -> None:
    """Create a session, set a variable, read it back in a later call on a new connection, render
    a plot, write and read a file, get the notebook, end the session."""
    async with make_client() as client:
        tools = {tool.name for tool in (await client.list_tools()).tools}
        assert tools == EXPECTED_TOOLS
        session = data(await call(client, "create_session", labels={"via": "mcp"}))
        session_id = session["id"]
        assert session["state"] == "idle" and session["labels"] == {"via": "mcp"}
        first = data(await call(client, "execute", session_id=session_id, code="value = 21\nprint('set')"))
        assert (first["status"], first["stdout"], first["step"]) == ("ok", "set\n", 1)
    async with make_client() as client:
        plotted = await call(client, "execute", session_id=session_id, code=PLOT)
        outcome = data(plotted)
        assert outcome["status"] == "ok" and outcome["result"] == "42"
        images = [block for block in plotted.content if block.type == "image"]
        assert len(images) == 1 and images[0].mime_type == "image/png"
        assert base64.b64decode(images[0].data).startswith(b"\x89PNG\r\n\x1a\n")
        assert outcome["displays"][0]["image"]["mime_type"] == "image/png"
        written = data(await call(client, "write_file", session_id=session_id, path="data/notes.txt",
                                  content="ünïcode ✓\n"))
        assert written["path"] == "data/notes.txt" and written["size"] == len("ünïcode ✓\n".encode())
        seen = data(await call(client, "execute", session_id=session_id,
                               code="open('data/notes.txt', encoding='utf-8').read()"))
        assert seen["result"] == repr("ünïcode ✓\n")
        await call(client, "execute", session_id=session_id,
                   code="open('blob.bin', 'wb').write(bytes(range(256)))")
        blob = data(await call(client, "read_file", session_id=session_id, path="blob.bin"))
        assert blob["encoding"] == "base64" and base64.b64decode(blob["content"]) == bytes(range(256))
        text = data(await call(client, "read_file", session_id=session_id, path="data/notes.txt"))
        assert (text["encoding"], text["content"]) == ("utf-8", "ünïcode ✓\n")
        listing = data(await call(client, "list_files", session_id=session_id))
        assert [f["path"] for f in listing["files"]] == ["blob.bin", "data/notes.txt"]
        notebook = json.loads(data(await call(client, "get_notebook", session_id=session_id))["result"])
        sources = ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]
        assert "value = 21\nprint('set')" in sources and PLOT in sources
        ended = data(await call(client, "terminate_session", session_id=session_id))
        assert ended["state"] == "terminated"
    steps = steps_of(gateway, session_id)
    assert [step["source"] for step in steps] == ["mcp"] * 4
    assert {step["principal"] for step in steps} == {"admin"}
    calls = [e["details"]["tool"] for e in events_of(gateway, session_id) if e["action"] == "mcp_call"]
    assert calls == ["create_session", "write_file", "read_file", "read_file", "list_files", "get_notebook",
                     "terminate_session"]


def test_an_agent_keeps_its_session_across_calls_over_http(gateway: GatewayProcess) -> None:
    asyncio.run(the_agent_scenario(lambda: http_client(gateway), gateway))


def test_an_agent_keeps_its_session_across_calls_over_stdio(gateway: GatewayProcess) -> None:
    asyncio.run(the_agent_scenario(lambda: stdio_client(gateway), gateway))


def test_a_client_of_the_initialize_handshake_era_is_served(gateway: GatewayProcess) -> None:
    async def scenario() -> None:
        async with http_client(gateway, mode="legacy") as client:
            assert client.protocol_version == "2025-11-25"
            session_id = data(await call(client, "create_session"))["id"]
            data(await call(client, "execute", session_id=session_id, code="kept = 'yes'"))
        async with http_client(gateway, mode="legacy") as client:
            assert data(await call(client, "execute", session_id=session_id, code="kept"))["result"] == "'yes'"
            data(await call(client, "terminate_session", session_id=session_id))

    asyncio.run(scenario())


def test_a_2025_06_18_client_speaking_json_rpc_by_hand_is_served(gateway: GatewayProcess) -> None:
    headers = {"Authorization": f"Bearer {gateway.token}", "Accept": "application/json, text/event-stream",
               "Content-Type": "application/json"}
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=60) as http:
        def rpc(method: str, params: dict[str, Any], ident: int | None) -> Any:
            message: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params}
            if ident is not None:
                message["id"] = ident
            response = http.post("/mcp", json=message, headers={"MCP-Protocol-Version": "2025-06-18"}
                                 if method != "initialize" else {})
            if ident is None:
                assert response.status_code == 202
                return None
            assert response.status_code == 200, response.text
            body = response.text
            if response.headers["content-type"].startswith("text/event-stream"):
                body = next(line[5:] for line in body.splitlines() if line.startswith("data:"))
            return json.loads(body)

        hello = rpc("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                   "clientInfo": {"name": "by-hand", "version": "1"}}, 1)
        assert hello["result"]["protocolVersion"] == "2025-06-18"
        rpc("notifications/initialized", {}, None)
        created = rpc("tools/call", {"name": "create_session", "arguments": {}}, 2)["result"]
        session_id = created["structuredContent"]["id"]
        ran = rpc("tools/call", {"name": "execute", "arguments": {"session_id": session_id, "code": "6 * 7"}}, 3)
        assert ran["result"]["structuredContent"]["result"] == "42" and not ran["result"]["isError"]
        rpc("tools/call", {"name": "terminate_session", "arguments": {"session_id": session_id}}, 4)


def test_a_step_outliving_the_call_returns_a_handle_to_wait_on_or_interrupt(gateway: GatewayProcess) -> None:
    async def scenario() -> None:
        async with http_client(gateway) as client:
            session_id = data(await call(client, "create_session"))["id"]
            slow = data(await call(client, "execute", session_id=session_id, wait_seconds=0.5,
                                   code="import time\ntime.sleep(2.5)\n'slept'"))
            assert slow["status"] == "running" and slow["execution_id"].startswith("x_")
            early = data(await call(client, "wait_execution", execution_id=slow["execution_id"], wait_seconds=0.2))
            assert early["status"] == "running"
            done = data(await call(client, "wait_execution", execution_id=slow["execution_id"], wait_seconds=30))
            assert (done["status"], done["result"]) == ("ok", "'slept'")
            endless = data(await call(client, "execute", session_id=session_id, wait_seconds=0.5,
                                      code="while True:\n    time.sleep(0.05)"))
            assert endless["status"] == "running"
            data(await call(client, "interrupt", session_id=session_id))
            stopped = await call(client, "wait_execution", execution_id=endless["execution_id"], wait_seconds=30)
            assert stopped.is_error and stopped.structured_content["status"] == "interrupted"
            after = data(await call(client, "execute", session_id=session_id, code="'still here'"))
            assert after["result"] == "'still here'" and after["step"] == 3
            unknown = await call(client, "wait_execution", execution_id="x_nothing")
            assert error_of(unknown)["code"] == "execution_not_found"
            bad = await call(client, "execute", session_id=session_id, code="1", wait_seconds=10_000)
            assert error_of(bad)["code"] == "invalid_field"
            data(await call(client, "terminate_session", session_id=session_id))

    asyncio.run(scenario())


def test_files_through_mcp_keep_to_the_workspace_and_to_whole_characters(gateway: GatewayProcess) -> None:
    """The files tools use the workspace's own confinement: a link the kernel made to a host
    file, or a path out of the workspace, is refused; text cut at max_bytes stays text."""
    async def scenario() -> None:
        async with http_client(gateway) as client:
            session_id = data(await call(client, "create_session"))["id"]
            data(await call(client, "execute", session_id=session_id,
                            code="import os\nos.symlink('/etc/passwd', 'out')\nos.symlink('/etc', 'up')\n"
                                 "open('t.txt', 'w', encoding='utf-8').write('é' * 10)"))
            for tool, arguments in (("read_file", {"path": "out"}), ("read_file", {"path": "up/passwd"}),
                                    ("read_file", {"path": "../../../etc/passwd"}),
                                    ("write_file", {"path": "up/evil", "content": "x"}),
                                    ("list_files", {"path": "up"})):
                refused = await client.call_tool(tool, {"session_id": session_id, **arguments})
                assert error_of(refused)["code"] in ("invalid_path", "file_not_found"), (tool, arguments)
                assert "root:" not in str(refused.content)
            cut = data(await call(client, "read_file", session_id=session_id, path="t.txt", max_bytes=5))
            assert (cut["encoding"], cut["content"], cut["truncated"], cut["size"]) == ("utf-8", "éé", True, 20)
            data(await call(client, "terminate_session", session_id=session_id))

    asyncio.run(scenario())


def test_pause_resume_and_fork_keep_the_state(gateway: GatewayProcess) -> None:
    async def scenario() -> None:
        async with http_client(gateway) as client:
            session_id = data(await call(client, "create_session"))["id"]
            data(await call(client, "execute", session_id=session_id, code="counter = 7"))
            assert data(await call(client, "pause_session", session_id=session_id))["state"] == "paused"
            assert data(await call(client, "resume_session", session_id=session_id))["state"] == "idle"
            assert data(await call(client, "execute", session_id=session_id, code="counter"))["result"] == "7"
            child = data(await call(client, "fork_session", session_id=session_id))
            assert child["parent"]["session_id"] == session_id
            data(await call(client, "execute", session_id=child["id"], code="counter += 1"))
            assert data(await call(client, "execute", session_id=child["id"], code="counter"))["result"] == "8"
            assert data(await call(client, "execute", session_id=session_id, code="counter"))["result"] == "7"
            mine = data(await call(client, "list_sessions", state="idle"))
            assert {session_id, child["id"]} <= {s["id"] for s in mine["sessions"]}
            for ident in (session_id, child["id"]):
                data(await call(client, "terminate_session", session_id=ident))

    asyncio.run(scenario())


def test_another_principal_cannot_use_the_handle(gateway: GatewayProcess) -> None:
    suffix = uuid.uuid4().hex[:6]
    alice, mallory = token_for(gateway, f"alice-{suffix}", "agent"), token_for(gateway, f"mallory-{suffix}", "agent")

    async def scenario() -> None:
        async with http_client(gateway, alice) as owner, http_client(gateway, mallory) as other:
            session_id = data(await call(owner, "create_session"))["id"]
            data(await call(owner, "execute", session_id=session_id, code="secret = 'alice only'"))
            data(await call(owner, "write_file", session_id=session_id, path="a.txt", content="alice's"))
            slow = data(await call(owner, "execute", session_id=session_id, wait_seconds=0.2,
                                   code="import time; time.sleep(1.5)"))
            attempts = {
                "execute": {"session_id": session_id, "code": "secret"},
                "wait_execution": {"execution_id": slow["execution_id"]},
                "interrupt": {"session_id": session_id},
                "list_files": {"session_id": session_id},
                "read_file": {"session_id": session_id, "path": "a.txt"},
                "write_file": {"session_id": session_id, "path": "a.txt", "content": "mallory's"},
                "get_notebook": {"session_id": session_id},
                "pause_session": {"session_id": session_id},
                "resume_session": {"session_id": session_id},
                "fork_session": {"session_id": session_id},
                "terminate_session": {"session_id": session_id},
            }
            for tool, arguments in attempts.items():
                refused = await other.call_tool(tool, arguments)
                assert error_of(refused)["code"] == "session_not_found", tool
                assert "alice only" not in str(refused.content)
            theirs = data(await call(other, "list_sessions"))
            assert session_id not in {s["id"] for s in theirs["sessions"]}
            done = data(await call(owner, "wait_execution", execution_id=slow["execution_id"]))
            assert done["status"] == "ok"
            assert data(await call(owner, "read_file", session_id=session_id, path="a.txt"))["content"] == "alice's"
            assert data(await call(owner, "execute", session_id=session_id, code="secret"))["result"] == "'alice only'"
            data(await call(owner, "terminate_session", session_id=session_id))
            return session_id

    session_id = asyncio.run(scenario())
    steps = steps_of(gateway, session_id)
    assert [s["code"] for s in steps] == ["secret = 'alice only'", "import time; time.sleep(1.5)", "secret"]
    assert {s["principal"] for s in steps} == {f"alice-{suffix}"}
    assert all(e["principal"] == f"alice-{suffix}" for e in events_of(gateway, session_id)
               if e["action"] == "mcp_call")
    exported = subprocess.run([sys.executable, "-m", "gateway", "audit", "export", "--data-dir", str(gateway.data_dir)],
                              capture_output=True, text=True, check=True)
    denied = [event["details"] for line in exported.stdout.splitlines() if (event := json.loads(line))["action"]
              == "access_denied" and event["principal"] == f"mallory-{suffix}"]
    assert denied and all(d["face"] == "mcp" and d["code"] == "session_not_found" for d in denied)
    assert "execute" in {d["tool"] for d in denied}


def test_an_unauthenticated_call_gets_401_with_the_resource_metadata(gateway: GatewayProcess) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    headers = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28"}
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        for auth in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": f"Basic {gateway.token}"}):
            refused = http.post("/mcp", json=body, headers={**headers, **auth})
            assert refused.status_code == 401
            challenge = refused.headers["WWW-Authenticate"]
            assert challenge.startswith("Bearer ")
            assert f'resource_metadata="{gateway.url}/.well-known/oauth-protected-resource/mcp"' in challenge
        refused = http.post(f"/mcp?token={gateway.token}", json=body, headers=headers)
        assert refused.status_code == 401  # the MCP face takes a bearer header only
        metadata = http.get("/.well-known/oauth-protected-resource/mcp").json()
        assert metadata["resource"] == f"{gateway.url}/mcp"
        assert metadata["authorization_servers"] == [gateway.url]
        assert metadata["bearer_methods_supported"] == ["header"]
        hello = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
        allowed = http.post("/mcp", json=hello, headers={"Accept": headers["Accept"],
                                                          "Authorization": f"Bearer {gateway.token}"})
        assert allowed.status_code == 200 and "agent-kernel-gateway" in allowed.text


@pytest.mark.parametrize("arguments", [
    {"code": 5},
    {"session_id": ["s"], "code": "1"},
    {"session_id": "s_x" * 1000, "code": "1"},
    {"session_id": "../../etc", "code": "1"},
    {"session_id": "s_x", "code": "1", "timeout": -1},
    {"session_id": "s_x", "code": "1", "unknown": True},
])
def test_bad_arguments_get_a_tool_error_and_change_nothing(gateway: GatewayProcess,
                                                           arguments: dict[str, Any]) -> None:
    async def scenario() -> CallToolResult:
        async with http_client(gateway) as client:
            return await client.call_tool("execute", arguments)

    with gateway.client() as http:
        before = http.get("/v1/sessions", params={"limit": 500}).json()["sessions"]
        result = asyncio.run(scenario())
        assert result.is_error and result.content
        assert http.get("/v1/sessions", params={"limit": 500}).json()["sessions"] == before
        assert http.get("/v1/health").status_code == 200


RAW_BODIES = [
    b"",
    b"not json",
    b"[]",
    b'{"jsonrpc": "2.0"}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "execute", '
    b'"arguments": {"session_id": "s_\\ud800", "code": "1"}}}',
    b'{"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "execute", '
    b'"arguments": {"session_id": "SESSION", "code": "print(1)\\udfff"}}}',
    b'{"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "create_session", '
    b'"arguments": {"labels": {"\\ud800": "x"}}}}',
    b'{"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "write_file", '
    b'"arguments": {"session_id": "SESSION", "path": "a", "content": "\\ud800"}}}',
    b'{"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "\xff\xfe", "arguments": {}}}',
    b'{"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "execute", '
    b'"arguments": {"session_id": "' + b"x" * 4_000_000 + b'", "code": "1"}}}',
    b'{"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "list_files", '
    b'"arguments": {"session_id": "SESSION", "path": "../../../etc"}}}',
    b'{"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "read_file", '
    b'"arguments": {"session_id": "SESSION", "path": "/etc/passwd"}}}',
    b'{"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "execute", '
    b'"arguments": {"session_id": "SESSION", "code": "1", "timeout": 1e999}}}',
]


@pytest.mark.parametrize("body", RAW_BODIES, ids=range(len(RAW_BODIES)))
def test_odd_bytes_at_mcp_get_a_clear_answer_never_a_500(gateway: GatewayProcess, session: dict[str, Any],
                                                         body: bytes) -> None:
    body = body.replace(b"SESSION", session["id"].encode())
    headers = {"Authorization": f"Bearer {gateway.token}", "Accept": "application/json, text/event-stream",
               "Content-Type": "application/json", "MCP-Protocol-Version": "2025-06-18"}
    with gateway.client() as http:
        before = http.get("/v1/sessions", params={"limit": 500}).json()["sessions"]
        answer = http.post("/mcp", content=body, headers=headers)
        assert answer.status_code < 500, answer.text
        if answer.status_code == 200:
            text = answer.text
            if answer.headers["content-type"].startswith("text/event-stream"):
                text = next(line[5:] for line in text.splitlines() if line.startswith("data:"))
            reply = json.loads(text)
            assert "error" in reply or reply["result"]["isError"]
        assert http.get("/v1/sessions", params={"limit": 500}).json()["sessions"] == before
        assert http.get("/v1/health").status_code == 200
        assert http.get(f"/v1/sessions/{session['id']}/steps").json()["steps"] == []
        assert http.get(f"/v1/sessions/{session['id']}/files").json()["files"] == []
