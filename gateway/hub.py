"""Websocket clients attached to one session's kernel (the Jupyter face's channels).

The hub is an observer of the kernel's channels: every iopub message goes to every attached
client; replies go to the client that sent the request (by parent ``msg_id``). A client that
disconnects is parked for a while: what it misses is kept (bounded) and replayed when it comes
back with the same ``session_id``. Every execute_request a client sends is recorded as a step
of the session (``source: "jupyter"``) before it is forwarded to the kernel (status ``running``,
numbered in the order the kernel runs it) and completed when the kernel finishes it, with its
user_expressions and what the client typed in answer to input(); silent executions are
recorded as audit events with their code before they are forwarded, and what a client types in
answer to their input() as ``silent_input`` events.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from gateway import access
from gateway.auth import Principal
from gateway.clock import now_iso
from gateway.errors import GatewayError
from gateway.steps import Step

if TYPE_CHECKING:
    from gateway.sessions import LiveSession, SessionManager

log = logging.getLogger(__name__)

MAX_PENDING_REQUESTS = 1000
PARKED_MAX_MESSAGES = 10_000
PARKED_MAX_BYTES = 64 * 1024 * 1024


class WebsocketClient(Protocol):
    """What the hub needs of a connected client (the channels handler)."""

    client_id: str
    principal: Principal

    def deliver(self, channel: str, msg: dict[str, Any], frames: list[bytes]) -> bool:
        """Send one message; False when the client cannot take it (gone, or too far behind)."""

    def refuse(self, reason: str) -> None:
        """Close the connection because the client broke a limit."""


def gateway_message(msg_type: str, content: dict[str, Any], parent: dict[str, Any] | None = None
                    ) -> tuple[dict[str, Any], list[bytes]]:
    """A message the gateway itself sends to websocket clients (a reply to ``parent``, or a
    status of its own), with its encoded frames."""
    parent = parent or {}
    header = {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "username": "gateway",
              "session": parent.get("session", ""), "date": now_iso(), "version": "5.3"}
    msg = {"header": header, "parent_header": parent, "metadata": {}, "content": content, "buffers": []}
    frames = [json.dumps(part).encode() for part in (header, parent, {}, content)]
    return msg, frames


@dataclass
class Parked:
    """A disconnected client's missed messages, kept until it returns or its time is up."""

    principal: Principal
    expires_at: float
    messages: deque[tuple[str, dict[str, Any], list[bytes]]] = field(default_factory=deque)
    size: int = 0
    dropped: int = 0

    def keep(self, channel: str, msg: dict[str, Any], frames: list[bytes]) -> None:
        self.messages.append((channel, msg, frames))
        self.size += sum(len(part) for part in frames)
        while self.messages and (len(self.messages) > PARKED_MAX_MESSAGES or self.size > PARKED_MAX_BYTES):
            _, _, old = self.messages.popleft()
            self.size -= sum(len(part) for part in old)
            self.dropped += 1


class ClientRequest:
    """The listener for one request a websocket client sent: replies go back to that client,
    and an execute_request is also gathered into a recorded step."""

    def __init__(self, hub: "KernelHub", client_id: str, principal: Principal, msg_id: str, step: Step | None):
        self.hub = hub
        self.client_id = client_id
        self.principal = principal
        self.msg_id = msg_id
        self.step = step  # an execute_request recorded as a step (not a silent one)
        self.prompts: deque[dict[str, Any]] = deque()  # a silent execution's unanswered input requests

    def on_message(self, channel: str, msg: dict[str, Any]) -> None:
        if channel != "iopub":
            self.hub.to_client(self.client_id, channel, msg, msg["frames"])
            if channel == "stdin" and msg["header"].get("msg_type") == "input_request":
                self.hub.awaiting_input[str(msg["header"].get("msg_id", ""))] = self
                if self.step is None and isinstance(msg.get("content"), dict):
                    self.prompts.append(msg["content"])
        if self.step is not None:
            self.step.listener.on_message(channel, msg)
            if self.step.listener.done.done():
                self.hub.finish_step(self)
        elif channel in ("shell", "control") and msg["header"].get("msg_type", "").endswith("_reply"):
            self.hub.forget(self.msg_id)


class KernelHub:
    """The websocket side of one live session. Created by the Jupyter face on first attach."""

    def __init__(self, manager: "SessionManager", live: "LiveSession", replay_seconds: float):
        self.manager = manager
        self.live = live
        self.replay_seconds = replay_seconds
        self.clients: dict[str, WebsocketClient] = {}
        self.parked: dict[str, Parked] = {}
        self.requests: dict[str, ClientRequest] = {}
        self.awaiting_input: dict[str, ClientRequest] = {}  # by the msg_id of the kernel's input_request
        self.pending_by_client: dict[str, int] = {}
        assert live.kernel is not None
        live.kernel.observers.append(self.observe)

    @property
    def connections(self) -> int:
        return len(self.clients)

    # clients ----------------------------------------------------------------------------

    def attach(self, client: WebsocketClient) -> int:
        """Connect a client; returns how many missed messages were replayed to it."""
        previous = self.clients.pop(client.client_id, None)
        if previous is not None and previous is not client:
            previous.refuse("another connection with the same session_id replaced this one")
        self.clients[client.client_id] = client
        parked = self.parked.pop(client.client_id, None)
        replayed = dropped = 0
        if parked is not None and parked.principal == client.principal:
            dropped = parked.dropped
            for channel, msg, frames in parked.messages:
                if not client.deliver(channel, msg, frames):
                    break
                replayed += 1
        self.manager.recorder.record_event(self.live.trajectory, "jupyter_attached", client.principal.name,
                                           {"client": client.client_id, "replayed": replayed,
                                            "dropped": dropped})
        return replayed

    def detach(self, client: WebsocketClient) -> None:
        """A client went away: keep what it misses for ``replay_seconds``."""
        if self.clients.get(client.client_id) is client:
            del self.clients[client.client_id]
            self.parked[client.client_id] = Parked(client.principal, time.monotonic() + self.replay_seconds)
            self.manager.recorder.record_event(self.live.trajectory, "jupyter_detached", client.principal.name,
                                               {"client": client.client_id})

    def close_all(self, reason: str, ended_by: str) -> None:
        """Disconnect every client; executions still running are recorded as ``interrupted``
        ("The session was <ended_by> during this step.")."""
        for request in list(self.requests.values()):
            if request.step is not None:
                self.finish_step(request, "aborted", aborted_by=ended_by)
        for client in list(self.clients.values()):
            client.refuse(reason)
        self.clients.clear()
        self.parked.clear()

    def to_client(self, client_id: str, channel: str, msg: dict[str, Any], frames: list[bytes]) -> None:
        client = self.clients.get(client_id)
        if client is not None:
            if not client.deliver(channel, msg, frames):
                self.detach(client)
                if client_id in self.parked:  # kept for its return, as what comes after it
                    self.parked[client_id].keep(channel, msg, frames)
        elif client_id in self.parked:
            self.parked[client_id].keep(channel, msg, frames)

    def observe(self, channel: str, msg: dict[str, Any], frames: list[bytes]) -> None:
        """Every kernel message: iopub goes to every client (and to parked buffers)."""
        if channel != "iopub":
            return
        for client in list(self.clients.values()):
            if not client.deliver(channel, msg, frames):
                self.detach(client)
        if self.parked:
            now = time.monotonic()
            for client_id, parked in list(self.parked.items()):
                if parked.expires_at < now:
                    del self.parked[client_id]
                else:
                    parked.keep(channel, msg, frames)

    # requests from clients --------------------------------------------------------------

    def from_client(self, client: WebsocketClient, channel: str, header: dict[str, Any], content: dict[str, Any] | None,
                    send: Any, parent: dict[str, Any] | None = None) -> None:
        """Forward one client message to the kernel. ``send(listener)`` puts it on the wire;
        ``content`` is given for execute requests (the code is recorded, before it is sent) and
        input replies (with their ``parent``: the kernel's input_request)."""
        msg_type = str(header.get("msg_type", ""))
        msg_id = str(header.get("msg_id", ""))
        if not self.may_run(client.principal):
            self.refuse_read_only(client, channel, header, content)
            return
        if msg_type == "shutdown_request":
            # A debugger must not end a session through the kernel protocol; restarts go through REST.
            log.info("session %s: ignored a shutdown_request from %s", self.live.id, client.principal.name)
            return
        if msg_type == "input_reply":
            self.record_input(parent if isinstance(parent, dict) else {}, content if isinstance(content, dict) else {})
        if not msg_type.endswith("_request"):
            send(None)
            return
        if self.pending_by_client.get(client.client_id, 0) >= MAX_PENDING_REQUESTS:
            client.refuse(f"more than {MAX_PENDING_REQUESTS} requests waiting for replies")
            return
        if msg_id in self.requests:
            refused = {"status": "error", "ename": "DuplicateMessageId", "traceback": [],
                       "evalue": f"A request with msg_id {msg_id!r} is still waiting for its reply; give each "
                                 "request a msg_id of its own."}
            self.to_client(client.client_id, channel, *gateway_message(msg_type[:-len("request")] + "reply",
                                                                       refused, header))
            return
        step = None
        if msg_type == "execute_request":  # on shell; ipykernel also runs one sent on control
            try:
                self.manager.runner.admit(self.live)  # the agent API's rules: a full workspace runs nothing more
            except GatewayError as exc:
                self.refuse_step(client, channel, header, exc)
                return
            content = content if isinstance(content, dict) else {}
            code = str(content.get("code", ""))
            given = content.get("user_expressions")
            expressions = {str(k): str(v) for k, v in given.items()} if isinstance(given, dict) else {}
            if content.get("silent") or content.get("store_history") is False:
                details: dict[str, Any] = {"code": code, "client": client.client_id}
                if expressions:
                    details["user_expressions"] = expressions
                self.manager.recorder.record_event(self.live.trajectory, "silent_execution", client.principal.name,
                                                   details)
            else:
                step = self.manager.runner.prepare(self.live, code, source="jupyter", principal=client.principal.name,
                                                  user_expressions=expressions)
                self.manager.runner.sent(step)
        request = ClientRequest(self, client.client_id, client.principal, msg_id, step)
        self.requests[msg_id] = request
        self.pending_by_client[client.client_id] = self.pending_by_client.get(client.client_id, 0) + 1
        send(request)

    def record_input(self, parent: dict[str, Any], content: dict[str, Any]) -> None:
        """A client's input_reply: recorded with the step that asked (before it reaches the kernel)."""
        request = self.awaiting_input.pop(str(parent.get("msg_id", "")), None)
        if request is None and self.awaiting_input:
            # ipykernel takes the next reply whatever its parent says: so does the record.
            request = self.awaiting_input.pop(next(iter(self.awaiting_input)))
        if request is not None and request.step is None:
            self._record_silent_input(request, content)
            return
        if request is None or request.step is None:
            return
        request.step.listener.input_given(str(content.get("value", "")))
        self.manager.recorder.record_stdin(self.live.trajectory, request.step.place.step, request.step.listener.stdin)

    def _record_silent_input(self, request: ClientRequest, content: dict[str, Any]) -> None:
        """What a client typed for a silent execution (not a step): an audit event, before the
        reply reaches the kernel; a password's value is not kept."""
        asked = request.prompts.popleft() if request.prompts else {}
        password = bool(asked.get("password"))
        self.manager.recorder.record_event(self.live.trajectory, "silent_input", request.principal.name, {
            "client": request.client_id, "request": request.msg_id, "prompt": str(asked.get("prompt", "")),
            "password": password, "value": None if password else str(content.get("value", ""))})

    def refuse_step(self, client: WebsocketClient, channel: str, header: dict[str, Any], exc: GatewayError) -> None:
        """An execute_request the step rules refuse (a workspace over its limit: the agent API's
        507): an error reply named after the error's code (``WorkspaceFull``), and the refusal
        in the audit log."""
        self.manager.recorder.record_event(self.live.trajectory, "access_denied", client.principal.name, {
            "status": exc.status, "code": exc.code, "msg_type": "execute_request", "client": client.client_id})
        ename = "".join(word.capitalize() for word in exc.code.split("_"))
        refused = {"status": "error", "ename": ename, "evalue": exc.message, "traceback": []}
        self.to_client(client.client_id, channel, *gateway_message("execute_reply", refused, header))

    def may_run(self, principal: Principal) -> bool:
        return access.may_change(principal, self.live.record.owner)

    def refuse_read_only(self, client: WebsocketClient, channel: str, header: dict[str, Any],
                         content: dict[str, Any] | None) -> None:
        """A read-only client (a reviewer) asked for something: only kernel_info goes through;
        any other request gets an error reply and is recorded as ``access_denied``."""
        msg_type = str(header.get("msg_type", ""))
        if msg_type == "kernel_info_request" and self.live.kernel is not None:
            info = self.live.kernel.kernel_info
            self.to_client(client.client_id, channel, *gateway_message("kernel_info_reply", info, header))
            return
        self.manager.recorder.record_event(self.live.trajectory, "access_denied", client.principal.name, {
            "msg_type": msg_type, "client": client.client_id, "code": (content or {}).get("code"),
            "reason": "read-only websocket client"})
        if msg_type.endswith("_request"):
            denied = {"status": "error", "ename": "Forbidden", "traceback": [],
                      "evalue": f"The {client.principal.role} '{client.principal.name}' may watch this session "
                                "but not run anything in it."}
            self.to_client(client.client_id, channel, *gateway_message(msg_type[:-len("request")] + "reply", denied, header))

    def forget(self, msg_id: str) -> None:
        request = self.requests.pop(msg_id, None)
        if request is not None:
            for key in [key for key, asking in self.awaiting_input.items() if asking is request]:
                del self.awaiting_input[key]
            count = self.pending_by_client.get(request.client_id, 1) - 1
            if count > 0:
                self.pending_by_client[request.client_id] = count
            else:
                self.pending_by_client.pop(request.client_id, None)
        if self.live.kernel is not None and self.live.kernel.connection is not None:
            self.live.kernel.connection.forget(msg_id)

    def finish_step(self, request: ClientRequest, ended: str = "reply", aborted_by: str | None = None,
                    exit_description: str = "") -> None:
        """Record a websocket client's execution (committed at once, like an agent step)."""
        if request.msg_id not in self.requests:
            return
        self.forget(request.msg_id)
        assert request.step is not None
        # A client's KeyboardInterrupt is always an interrupt someone asked for.
        self.manager.runner.complete(request.step, ended, aborted_by=aborted_by, interrupt_requested=True,
                                    exit_description=exit_description)

    def kernel_replaced(self, died: bool, exit_description: str) -> None:
        """The kernel died or is being restarted: unfinished client executions are recorded as
        ``died`` or ``interrupted``, and clients are told the kernel is restarting."""
        for request in list(self.requests.values()):
            if request.step is None:
                self.forget(request.msg_id)
            elif died:
                self.finish_step(request, "died", exit_description=exit_description)
            else:
                self.finish_step(request, "aborted", aborted_by="restart")
        self.observe("iopub", *gateway_message("status", {"execution_state": "restarting"}))
