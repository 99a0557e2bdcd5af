"""The MCP face: the gateway's sessions as Model Context Protocol tools, served at ``/mcp``.

Built on the ``mcp`` package (``MCPServer``, its streamable HTTP transport and its bearer-token
middleware). State lasting across calls is the session handle (``session_id``), passed as a tool
argument; the transport keeps no protocol session, so any call may reach the gateway after a
restart. Every tool acts as its caller through the same ``SessionManager`` methods, and so the
same access rules, as the HTTP face; steps are recorded with source ``mcp`` and every other call
on a session is an ``mcp_call`` event in its trajectory.

A step that outlives the call's ``wait_seconds`` keeps running: the call returns
``status: "running"`` with an ``execution_id`` that ``wait_execution`` waits on again and
``interrupt`` stops.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import contextlib
import functools
import hashlib
import json
import logging
import os
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, AsyncIterator, Awaitable, Callable, Literal

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import CallToolResult, ContentBlock, ImageContent, ResourceLink, TextContent
from pydantic import BaseModel, Field

from gateway import __version__, states
from gateway.auth import Principal
from gateway.errors import GatewayError, InvalidRequest, NotFound, PayloadTooLarge
from gateway.handlers.base import REFUSAL_CODES, record_refusal
from gateway.inputs import validate_labels
from gateway.notebook import INLINE_UPLOAD_LIMIT
from gateway.workspace import MAX_PAGE, workspace_parts

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from gateway.server import Gateway

MCP_PATH = "/mcp"
DEFAULT_WAIT = 30.0
MAX_WAIT = 300.0
INLINE_IMAGE_LIMIT = 1024 * 1024  # image bytes per call sent as image content; past it, a link
READ_LIMIT = 4 * 1024 * 1024
FINISHED_KEPT = 256  # finished executions remembered for wait_execution
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")

INSTRUCTIONS = """\
Stateful Python sessions on a Jupyter kernel. create_session returns a session_id: pass it to
every other tool. Variables, imports and files last across calls until terminate_session.
execute returns the step's result, output and error; a step still running after wait_seconds
returns status "running" and an execution_id for wait_execution (or interrupt)."""


SessionHandle = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$",
                                    description="the session's id, as create_session returned it")]
ExecutionHandle = Annotated[str, Field(pattern=r"^x_[A-Za-z0-9_-]{1,64}$",
                                       description="the execution_id a running execute returned")]


class StepOutcome(BaseModel):
    """What ``execute`` and ``wait_execution`` return."""

    status: str = Field(description="ok, error, timeout, interrupted, died, not_run, or running (see execution_id)")
    session_id: str
    execution_id: str | None = Field(default=None, description="while running: pass it to wait_execution")
    step: int | None = None
    execution_count: int | None = None
    result: str | None = Field(default=None, description="the text of the last expression's value")
    stdout: str = ""
    stderr: str = ""
    error: dict[str, str] | None = Field(default=None, description="name, value and traceback of a failed step")
    displays: list[dict[str, Any]] = Field(default_factory=list,
                                           description="rich outputs: their MIME types, text/plain and images' sizes")
    duration_ms: float | None = None
    truncated: bool = False


@dataclass
class PendingStep:
    """A step started by ``execute``, waited on by later calls."""

    session_id: str
    task: asyncio.Task[dict[str, Any]]
    finished_at: float | None = None


@dataclass
class Executions:
    """The steps MCP calls started, by execution handle: running ones, and the last finished."""

    steps: dict[str, PendingStep] = field(default_factory=dict)

    def start(self, session_id: str, run: Awaitable[dict[str, Any]]) -> str:
        handle = "x_" + secrets.token_urlsafe(12)
        task = asyncio.ensure_future(run)
        pending = PendingStep(session_id, task)
        task.add_done_callback(lambda _: self._finished(pending))
        self.steps[handle] = pending
        return handle

    def _finished(self, pending: PendingStep) -> None:
        pending.finished_at = time.monotonic()
        done = sorted((p.finished_at, h) for h, p in self.steps.items() if p.finished_at is not None)
        for _, handle in done[:-FINISHED_KEPT]:
            self.steps.pop(handle, None)

    def get(self, handle: str) -> PendingStep:
        pending = self.steps.get(handle)
        if pending is None:
            raise NotFound(f"There is no execution '{handle}' (it finished long ago, or the gateway restarted): "
                           "its step is in the session's notebook (get_notebook).", code="execution_not_found",
                           details={"execution_id": handle})
        return pending

    async def wait(self, handle: str, seconds: float) -> dict[str, Any] | None:
        """The step's Execution, or None if it is still running after ``seconds``."""
        pending = self.get(handle)
        done, _ = await asyncio.wait({pending.task}, timeout=seconds)
        return pending.task.result() if done else None


class GatewayTokens:
    """The ``mcp`` package's token verifier, answered by the gateway's own token authority: the
    gateway's tokens and JWTs are accepted at ``/mcp`` exactly as on the other routes."""

    def __init__(self, gateway: "Gateway"):
        self.gateway = gateway

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            principal = self.gateway.auth.authenticate(token)
        except GatewayError:
            self.gateway.sessions.recorder.record_event(None, "auth_failed", None,
                                                        {"status": 401, "path": MCP_PATH, "face": "mcp"})
            return None
        return AccessToken(token=token, client_id=principal.name, subject=principal.name, scopes=[principal.role],
                           claims={"role": principal.role})


def caller() -> Principal:
    """The principal of the tool call being served (set by the bearer-token middleware)."""
    token = get_access_token()
    if token is None or not token.claims:
        raise ToolError("unauthenticated: this call carries no gateway token")
    return Principal(token.client_id, str(token.claims["role"]))


def step_outcome(execution: dict[str, Any]) -> StepOutcome:
    displays = []
    for output in execution.get("outputs") or []:
        if output.get("output_type") not in ("display_data", "execute_result"):
            continue
        data = output.get("data") or {}
        shown: dict[str, Any] = {"mime_types": sorted(data)}
        if "text/plain" in data:
            shown["text/plain"] = _text(data["text/plain"])
        for kind in IMAGE_TYPES:
            if kind in data:
                shown["image"] = {"mime_type": kind, "bytes": len(_text(data[kind])) * 3 // 4}
        if output.get("output_type") == "display_data" or len(data) > 1:
            displays.append(shown)
    return StepOutcome(status=execution["status"], session_id=execution["session_id"], step=execution.get("step"),
                       execution_count=execution.get("execution_count"), result=execution.get("result"),
                       stdout=execution.get("stdout") or "", stderr=execution.get("stderr") or "",
                       error=execution.get("error"), displays=displays, duration_ms=execution.get("duration_ms"),
                       truncated=bool(execution.get("truncated")))


def step_result(execution: dict[str, Any], base_url: str, handle: str) -> CallToolResult:
    """The tool result of a finished step: its outcome as structured content and as JSON text,
    and its images as image content up to ``INLINE_IMAGE_LIMIT`` bytes in all (the rest as links
    to the session's notebook, which holds every output)."""
    outcome = step_outcome(execution)
    outcome.execution_id = handle
    content: list[ContentBlock] = [TextContent(type="text", text=outcome.model_dump_json())]
    budget = INLINE_IMAGE_LIMIT
    for output in execution.get("outputs") or []:
        data = output.get("data") or {}
        kind = next((k for k in IMAGE_TYPES if k in data), None)
        if kind is None:
            continue
        encoded = _text(data[kind]).replace("\n", "")
        size = len(encoded) * 3 // 4
        if size <= budget:
            budget -= size
            content.append(ImageContent(type="image", data=encoded, mime_type=kind))
        else:
            uri = f"{base_url}/v1/sessions/{outcome.session_id}/notebook"
            content.append(ResourceLink(type="resource_link", name=f"step {outcome.step} image", uri=uri,
                                        mime_type="application/x-ipynb+json",
                                        description=f"a {kind} image of {size} bytes, in the session's notebook"))
    return CallToolResult(content=content, structured_content=outcome.model_dump(mode="json"),
                          is_error=outcome.status not in ("ok", "running"))


def running_result(session_id: str, handle: str) -> CallToolResult:
    outcome = StepOutcome(status="running", session_id=session_id, execution_id=handle)
    return CallToolResult(content=[TextContent(type="text", text=outcome.model_dump_json())],
                          structured_content=outcome.model_dump(mode="json"))


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _wait(seconds: float | None) -> float:
    if seconds is None:
        return DEFAULT_WAIT
    if not 0 <= seconds <= MAX_WAIT:
        raise InvalidRequest(f"'wait_seconds' must be from 0 to {MAX_WAIT:g}.", code="invalid_field",
                             details={"field": "wait_seconds"})
    return seconds


class McpFace:
    """The MCP server of one gateway and the ASGI application that serves it."""

    def __init__(self, gateway: "Gateway", base_url: str):
        self.gateway = gateway
        self.base_url = base_url.rstrip("/")
        self.executions = Executions()
        issuer = gateway.settings.jwt_issuer or self.base_url
        self.server = MCPServer(
            "agent-kernel-gateway", version=__version__, instructions=INSTRUCTIONS,
            token_verifier=GatewayTokens(gateway),
            auth=AuthSettings.model_validate({"issuer_url": issuer, "resource_server_url": self.base_url + MCP_PATH,
                                              "validate_token_resource": False}))  # a JWT's audience: jwt_audience
        self._add_tools()
        for name in ("mcp.server.streamable_http", "mcp.server.streamable_http_manager"):
            logging.getLogger(name).setLevel(logging.WARNING)  # a line per request otherwise
        # Tokens are never cookies, so no page of another origin can call with the user's
        # credentials: the Host and Origin checks against DNS rebinding are not needed.
        self.app: "Starlette" = self.server.streamable_http_app(
            streamable_http_path=MCP_PATH, stateless_http=True, max_request_body_size=gateway.settings.max_body_bytes,
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Serve while inside: the transport's task group runs for the server's lifetime."""
        async with self.server.session_manager.run():
            yield  # steps still running are left to the session manager's shutdown, which records them

    # the calls --------------------------------------------------------------------------

    def note(self, principal: Principal, session_id: str, tool: str, *, changes: bool, **details: Any) -> None:
        """Record a tool call on a session in its trajectory, once the caller is known to be
        allowed it (a refused call leaves no trace in someone else's trajectory)."""
        sessions = self.gateway.sessions
        if changes:
            sessions.changeable(principal, session_id)
        else:
            sessions.visible(principal, session_id)
        sessions.recorder.record_event(sessions.trajectory_of(session_id), "mcp_call", principal.name,
                                       {"tool": tool, **{k: v for k, v in details.items() if v is not None}})

    def reports_gateway_errors(self, tool: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        """A tool whose gateway errors reach the client as a tool error carrying the error envelope
        (code, message, details), as the HTTP face would answer them, and are audited as there."""

        @functools.wraps(tool)
        async def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return await tool(*args, **kwargs)
            except GatewayError as exc:
                if exc.status in (401, 403) or exc.code in REFUSAL_CODES:
                    token = get_access_token()
                    who = Principal(token.client_id, str((token.claims or {}).get("role"))) if token else None
                    record_refusal(self.gateway, who, exc, {"face": "mcp", "tool": tool.__name__})
                raise ToolError(json.dumps(exc.envelope())) from None

        return call

    def _add_tools(self) -> None:
        tool = self.server.tool
        reports_gateway_errors = self.reports_gateway_errors
        sessions = self.gateway.sessions
        lifecycle = sessions.lifecycle

        @tool(description="Start a new session: a Python kernel of its own. Returns the session, "
                          "whose 'id' is the session_id every other tool takes.")
        @reports_gateway_errors
        async def create_session(kernel: str = "python3", labels: dict[str, str] | None = None) -> dict[str, Any]:
            principal = caller()
            session = await sessions.create(principal, kernel=kernel, labels=validate_labels(labels))
            self.note(principal, session["id"], "create_session", changes=True)
            return session

        @tool(description="The caller's sessions, newest first (an admin or reviewer sees everyone's).")
        @reports_gateway_errors
        async def list_sessions(state: str | None = None, limit: int = 50) -> dict[str, Any]:
            if state is not None and state not in states.STATES:
                raise InvalidRequest(f"'state' must be one of {', '.join(states.STATES)}.", code="invalid_field",
                                     details={"field": "state"})
            if not 1 <= limit <= 500:
                raise InvalidRequest("'limit' must be from 1 to 500.", code="invalid_field", details={"field": "limit"})
            return sessions.list_sessions(caller(), state=state, label=None, owner=None, limit=limit, cursor=None)

        @tool(description="Run Python code in the session (the next step). Returns its status, result, "
                          "stdout, stderr, error and images. A step still running after wait_seconds returns "
                          "status 'running' and an execution_id: call wait_execution with it, or interrupt.")
        @reports_gateway_errors
        async def execute(session_id: SessionHandle, code: str, timeout: float | None = None,
                          wait_seconds: float | None = None) -> Annotated[CallToolResult, StepOutcome]:
            principal = caller()
            budget = _wait(wait_seconds)
            sessions.check_timeout(timeout)
            sessions.visible(principal, session_id)
            handle = self.executions.start(session_id, sessions.execute(principal, session_id, code,
                                                                        timeout=timeout, source="mcp"))
            return await self._outcome(handle, budget)

        @tool(description="Wait for a step that execute left running; returns it as execute does.")
        @reports_gateway_errors
        async def wait_execution(execution_id: ExecutionHandle,
                                 wait_seconds: float | None = None) -> Annotated[CallToolResult, StepOutcome]:
            principal = caller()
            budget = _wait(wait_seconds)
            sessions.visible(principal, self.executions.get(execution_id).session_id)
            return await self._outcome(execution_id, budget)

        @tool(description="Interrupt the session's running step (KeyboardInterrupt); variables are kept.")
        @reports_gateway_errors
        async def interrupt(session_id: SessionHandle) -> dict[str, Any]:
            principal = caller()
            self.note(principal, session_id, "interrupt", changes=True)
            return await sessions.interrupt(principal, session_id)

        @tool(description="The session's files (regular files, path order), optionally under a directory.")
        @reports_gateway_errors
        async def list_files(session_id: SessionHandle, path: str | None = None, limit: int = 200) -> dict[str, Any]:
            principal = caller()
            workspace = await sessions.workspace(principal, session_id)
            if not 1 <= limit <= MAX_PAGE:
                raise InvalidRequest(f"'limit' must be from 1 to {MAX_PAGE}.", code="invalid_field",
                                     details={"field": "limit"})
            page = await workspace.list(path or None, limit=limit)
            self.note(principal, session_id, "list_files", changes=False, path=path)
            listing: dict[str, Any] = json.loads(page.to_json())
            return listing

        @tool(description="Read a file of the session: UTF-8 text as text, other bytes as base64.")
        @reports_gateway_errors
        async def read_file(session_id: SessionHandle, path: str, max_bytes: int = 1024 * 1024) -> dict[str, Any]:
            principal = caller()
            if not 1 <= max_bytes <= READ_LIMIT:
                raise InvalidRequest(f"'max_bytes' must be from 1 to {READ_LIMIT}.", code="invalid_field",
                                     details={"field": "max_bytes"})
            workspace = await sessions.workspace(principal, session_id)
            fd, info = await workspace.open_file(path)
            with os.fdopen(fd, "rb") as handle:
                data = handle.read(max_bytes)
            self.note(principal, session_id, "read_file", changes=False, path=path)
            truncated = info.st_size > len(data)
            try:  # text cut at max_bytes keeps its whole characters (a character cut in two is left out)
                text = codecs.getincrementaldecoder("utf-8")().decode(data, final=not truncated)
                return {"path": path, "size": info.st_size, "encoding": "utf-8", "content": text,
                        "truncated": truncated}
            except UnicodeDecodeError:
                return {"path": path, "size": info.st_size, "encoding": "base64",
                        "content": base64.b64encode(data).decode("ascii"), "truncated": truncated}

        @tool(description="Write a file into the session's workspace (replacing it), from text or base64.")
        @reports_gateway_errors
        async def write_file(session_id: SessionHandle, path: str, content: str,
                             encoding: Literal["utf-8", "base64"] = "utf-8") -> dict[str, Any]:
            principal = caller()
            data = _decode(content, encoding)
            limit = self.gateway.settings.max_upload_bytes
            if len(data) > limit:
                raise PayloadTooLarge(f"The file is larger than this server's upload limit of {limit} bytes.",
                                      details={"limit_bytes": limit})
            result = await self._put(principal, session_id, path, data)
            self.note(principal, session_id, "write_file", changes=True, path=result["path"])
            return result

        @tool(description="The session's trajectory as a Jupyter notebook (nbformat 4 JSON text).")
        @reports_gateway_errors
        async def get_notebook(session_id: SessionHandle) -> str:
            principal = caller()
            text = sessions.notebook(principal, session_id)
            self.note(principal, session_id, "get_notebook", changes=False)
            return text

        @tool(description="Pause the session: its state is saved and its kernel stopped until resumed "
                          "(execute resumes it too).")
        @reports_gateway_errors
        async def pause_session(session_id: SessionHandle) -> dict[str, Any]:
            principal = caller()
            self.note(principal, session_id, "pause_session", changes=True)
            return await lifecycle.pause(principal, session_id)

        @tool(description="Resume a paused session on a new kernel, its state restored.")
        @reports_gateway_errors
        async def resume_session(session_id: SessionHandle) -> dict[str, Any]:
            principal = caller()
            self.note(principal, session_id, "resume_session", changes=True)
            return await lifecycle.resume(principal, session_id)

        @tool(description="Fork the session: a new session with a copy of its variables and files.")
        @reports_gateway_errors
        async def fork_session(session_id: SessionHandle) -> dict[str, Any]:
            principal = caller()
            self.note(principal, session_id, "fork_session", changes=True)
            return await lifecycle.fork(principal, session_id)

        @tool(description="End the session: its kernel is stopped; its trajectory and files are kept.")
        @reports_gateway_errors
        async def terminate_session(session_id: SessionHandle) -> dict[str, Any]:
            principal = caller()
            self.note(principal, session_id, "terminate_session", changes=True)
            return await sessions.terminate(principal, session_id)

    async def _outcome(self, handle: str, budget: float) -> CallToolResult:
        pending = self.executions.get(handle)
        execution = await self.executions.wait(handle, budget)
        if execution is None:
            return running_result(pending.session_id, handle)
        return step_result(execution, self.base_url, handle)

    async def _put(self, principal: Principal, session_id: str, path: str, data: bytes) -> dict[str, Any]:
        """Install ``data`` at ``path`` as an upload would (through a file outside the workspace)."""
        sessions = self.gateway.sessions
        workspace_parts(path)
        directory = sessions.upload_dir(principal, session_id)
        fd, name = tempfile.mkstemp(dir=directory, prefix="upload-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            return await sessions.put_file(principal, session_id, path, Path(name),
                                           size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                                           content=data if len(data) <= INLINE_UPLOAD_LIMIT else None)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)


def _decode(content: str, encoding: str) -> bytes:
    if encoding == "base64":
        try:
            return base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("'content' is not valid base64.", code="invalid_field",
                                 details={"field": "content"}) from None
    try:
        return content.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest("'content' is not Unicode text (it holds a lone surrogate).", code="invalid_field",
                             details={"field": "content"}) from None
