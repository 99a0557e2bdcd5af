"""The agent API's session routes under /v1/sessions: lifecycle, execute, trajectory."""

from __future__ import annotations

import json
import time
from typing import Any

from tornado.ioloop import PeriodicCallback

from gateway import states
from gateway.api_spec import CURSOR, NO_BODY, Body, Field, Operation, Param, limit_param
from gateway.errors import InvalidRequest
from gateway.inputs import validate_labels, validate_stdin
from gateway.replay import replay_session
from gateway.handlers.base import BaseHandler

KEEPALIVE_SECONDS = 5.0

SESSION_LIMIT = limit_param(50, 500)
NEW_SESSION = Body((
    Field("kernel", (str,), "kernel spec name (GET /api/kernelspecs); default python3"),
    Field("labels", (dict,), "at most 64 string keys (up to 128 characters) to string values (up to 1024)",
          schema={"additionalProperties": {"type": "string"}}),
    Field("env", (dict,), "extra environment variables for the kernel (only the names are recorded)",
          schema={"additionalProperties": {"type": "string"}}),
    Field("setup", (str,), "code run once before the first step, recorded as step 0"),
    Field("sandbox", (str,), "isolation profile: none, process, sandbox or container (admins only, other than the server's)"),
    Field("limits", (dict,), "resource limits: memory, cpu, pids, file_size, workspace"),
    Field("egress", (list,), "hosts the kernel may reach through the gateway's egress proxy: host, host:port, "
          "*.domain:port,port (admins only, other than the server's)", schema={"items": {"type": "string"}}),
))
EGRESS_RULES = Body((
    Field("rules", (list,), "the hosts the kernel may reach from now on: host, host:port, *.domain:port,port, * "
          "([] for none)", required=True, schema={"items": {"type": "string"}}),
))
STEP = Body((
    Field("code", (str,), "the code to run", required=True),
    Field("timeout", (int, float), "seconds the step may run (> 0; capped at the server's maximum)",
          schema={"exclusiveMinimum": 0}),
    Field("stdin", (list,), "answers to the step's input() calls, in order", schema={"items": {"type": "string"}}),
))


class SessionsHandler(BaseHandler):
    """GET lists the caller's sessions; POST creates one."""

    operations = {
        "get": Operation("List the caller's sessions, newest first", "SessionList", query=(
            Param("state", "only sessions in this state", enum=tuple(states.STATES)),
            Param("label", "key:value: sessions with this label"),
            Param("owner", "only this principal's sessions"), SESSION_LIMIT, CURSOR)),
        "post": Operation("Create a session: a kernel, a workspace and a trajectory", "Session", status=201,
                          body=NEW_SESSION),
    }

    async def get(self) -> None:
        state = self.get_query_argument("state", None)
        if state is not None and state not in states.STATES:
            raise InvalidRequest(f"'state' must be one of {', '.join(states.STATES)}.", code="invalid_query",
                                 details={"parameter": "state"})
        label = self.get_query_argument("label", None)
        label_pair = None
        if label is not None:
            key, sep, value = label.partition(":")
            if not sep or not key:
                raise InvalidRequest("'label' must look like key:value.", code="invalid_query",
                                     details={"parameter": "label"})
            label_pair = (key, value)
        assert self.principal is not None
        self.write_json(self.gateway.sessions.list_sessions(
            self.principal, state=state, label=label_pair, owner=self.get_query_argument("owner", None),
            limit=self.int_query(SESSION_LIMIT), cursor=self.get_query_argument("cursor", None)))

    async def post(self) -> None:
        body = self.json_body(NEW_SESSION)
        labels = validate_labels(body.get("labels"))
        assert self.principal is not None
        session = await self.gateway.sessions.create(
            self.principal, kernel=body.get("kernel") or "python3", labels=labels, env=body.get("env"),
            setup=body.get("setup"), sandbox=body.get("sandbox"), limits=body.get("limits"),
            egress=body.get("egress"))
        self.set_header("Location", f"/v1/sessions/{session['id']}")
        self.write_json(session, status=201)


class SessionHandler(BaseHandler):
    """GET one session; DELETE terminates it."""

    operations = {"get": Operation("One session", "Session"),
                  "delete": Operation("Terminate the session: its kernel stopped, its records kept", "Session")}

    async def get(self, session_id: str) -> None:
        assert self.principal is not None
        self.write_json(self.gateway.sessions.get(self.principal, session_id))

    async def delete(self, session_id: str) -> None:
        assert self.principal is not None
        self.write_json(await self.gateway.sessions.terminate(self.principal, session_id))


class ExecuteHandler(BaseHandler):
    """POST runs one step; ``Accept: application/x-ndjson`` streams its outputs."""

    client_gone = False
    operations = {"post": Operation("Run one step and record it (NDJSON lines as it runs with "
                                    "Accept: application/x-ndjson)", "Execution", body=STEP, streams=True)}

    def on_connection_close(self) -> None:
        self.client_gone = True
        super().on_connection_close()

    async def post(self, session_id: str) -> None:
        assert self.principal is not None
        sessions = self.gateway.sessions
        sessions.get(self.principal, session_id)  # an unknown session is a 404 before any body error
        body = self.json_body(STEP)
        stdin = validate_stdin(body.get("stdin"))
        if "application/x-ndjson" not in self.request.headers.get("Accept", ""):
            execution = await sessions.execute(self.principal, session_id, body["code"], timeout=body.get("timeout"),
                                               stdin=stdin)
            self.write_json(execution)
            return
        sessions.check_timeout(body.get("timeout"))
        last_line = [time.monotonic()]

        def send(event: dict[str, Any]) -> None:
            if self.client_gone:
                return
            if not self._headers_written:
                self.set_header("Content-Type", "application/x-ndjson")
            self.write(json.dumps(event) + "\n")
            last_line[0] = time.monotonic()
            self.flush().add_done_callback(_ignore_closed)

        def keepalive() -> None:
            if time.monotonic() - last_line[0] >= KEEPALIVE_SECONDS:
                send({"type": "keepalive"})

        timer = PeriodicCallback(keepalive, KEEPALIVE_SECONDS * 1000 / 2)
        timer.start()
        try:
            execution = await sessions.execute(self.principal, session_id, body["code"],
                                               timeout=body.get("timeout"), sink=send, stdin=stdin)
        finally:
            timer.stop()
        send({"type": "done", "execution": execution})
        if not self.client_gone:
            self.finish()


def _ignore_closed(future: Any) -> None:
    future.exception()


class InterruptHandler(BaseHandler):
    operations = {"post": Operation("Interrupt the running step", "Interrupted")}

    async def post(self, session_id: str) -> None:
        self.json_body(NO_BODY)
        assert self.principal is not None
        self.write_json(await self.gateway.sessions.interrupt(self.principal, session_id))


class RestartHandler(BaseHandler):
    operations = {"post": Operation("A new kernel in the same workspace", "Session")}

    async def post(self, session_id: str) -> None:
        self.json_body(NO_BODY)
        assert self.principal is not None
        self.write_json(await self.gateway.sessions.restart(self.principal, session_id))


class StepsHandler(BaseHandler):
    operations = {"get": Operation("The recorded steps, in order", "StepList")}

    async def get(self, session_id: str) -> None:
        assert self.principal is not None
        self.write_json({"steps": self.gateway.sessions.steps(self.principal, session_id)})


class NotebookHandler(BaseHandler):
    operations = {"get": Operation("The trajectory as an nbformat 4 notebook", "Notebook",
                                   media_type="application/x-ipynb+json",
                                   query=(Param("download", "present: as an attachment"),))}

    async def get(self, session_id: str) -> None:
        assert self.principal is not None
        text = self.gateway.sessions.notebook(self.principal, session_id)
        self.set_header("Content-Type", "application/x-ipynb+json")
        if self.get_query_argument("download", None) is not None:
            self.set_header("Content-Disposition", f'attachment; filename="{session_id}.ipynb"')
        self.finish(text)


class EventsHandler(BaseHandler):
    operations = {"get": Operation("The session's audit events", "EventList")}

    async def get(self, session_id: str) -> None:
        assert self.principal is not None
        self.write_json({"events": self.gateway.sessions.events(self.principal, session_id)})


class EgressHandler(BaseHandler):
    operations = {"put": Operation("Replace the hosts the session's kernel may reach (admins; sandbox and container profiles)",
                                   "Session", body=EGRESS_RULES)}

    async def put(self, session_id: str) -> None:
        assert self.principal is not None
        # who may change it (404, 403, 409) before any body error, as for uploads
        self.gateway.sessions.egress_changeable(self.principal, session_id)
        body = self.json_body(EGRESS_RULES)
        self.write_json(await self.gateway.sessions.set_egress(self.principal, session_id, body["rules"]))


class PauseHandler(BaseHandler):
    operations = {"post": Operation("Save the state and stop the kernel", "Session")}

    async def post(self, session_id: str) -> None:
        self.json_body(NO_BODY)
        assert self.principal is not None
        self.write_json(await self.gateway.sessions.lifecycle.pause(self.principal, session_id))


class ResumeHandler(BaseHandler):
    operations = {"post": Operation("Bring a paused session back with its state", "Session")}

    async def post(self, session_id: str) -> None:
        self.json_body(NO_BODY)
        assert self.principal is not None
        self.write_json(await self.gateway.sessions.lifecycle.resume(self.principal, session_id))


class ForkHandler(BaseHandler):
    operations = {"post": Operation("A new session with a copy of this one's files and state", "Session",
                                     status=201)}

    async def post(self, session_id: str) -> None:
        self.json_body(NO_BODY)
        assert self.principal is not None
        child = await self.gateway.sessions.lifecycle.fork(self.principal, session_id)
        self.set_header("Location", f"/v1/sessions/{child['id']}")
        self.write_json(child, status=201)


class ReplayHandler(BaseHandler):
    """POST reruns the trajectory in a new session and reports step by step; with
    ``Accept: application/x-ndjson`` a line per step as it goes, then ``done`` with the report."""

    operations = {"post": Operation("Rerun the trajectory in a new session; a report per step", "ReplayReport",
                                    status=201, streams=True)}

    async def post(self, session_id: str) -> None:
        self.json_body(NO_BODY)
        assert self.principal is not None
        if "application/x-ndjson" not in self.request.headers.get("Accept", ""):
            self.write_json(await replay_session(self.gateway.sessions, self.principal, session_id), status=201)
            return

        def send(line: dict[str, Any]) -> None:
            if not self._headers_written:
                self.set_header("Content-Type", "application/x-ndjson")
            self.write(json.dumps(line) + "\n")
            self.flush().add_done_callback(_ignore_closed)

        report = await replay_session(self.gateway.sessions, self.principal, session_id, progress=send)
        send({"type": "done", "report": report})
        self.finish()


SID = r"(?P<session_id>[A-Za-z0-9_-]{1,64})"
routes = [
    (r"/v1/sessions", SessionsHandler),
    (rf"/v1/sessions/{SID}", SessionHandler),
    (rf"/v1/sessions/{SID}/execute", ExecuteHandler),
    (rf"/v1/sessions/{SID}/interrupt", InterruptHandler),
    (rf"/v1/sessions/{SID}/restart", RestartHandler),
    (rf"/v1/sessions/{SID}/steps", StepsHandler),
    (rf"/v1/sessions/{SID}/notebook", NotebookHandler),
    (rf"/v1/sessions/{SID}/events", EventsHandler),
    (rf"/v1/sessions/{SID}/egress", EgressHandler),
    (rf"/v1/sessions/{SID}/pause", PauseHandler),
    (rf"/v1/sessions/{SID}/resume", ResumeHandler),
    (rf"/v1/sessions/{SID}/fork", ForkHandler),
    (rf"/v1/sessions/{SID}/replay", ReplayHandler),
]
