"""The session manager: every session's kernel, workspace and trajectory, behind one API.

Handlers of both faces call it with the caller's ``Principal``. It enforces visibility (a
session the caller may not see is ``NotFound``), serialises the steps of a session in arrival
order, records every step and event through the recorder, and replaces a kernel that died.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import access, egress, executor, host, states, volumes
from gateway.auth import Principal
from gateway.clock import now_iso
from gateway.errors import (Conflict, GatewayError, InvalidRequest, Unavailable)
from gateway.inputs import check_text, is_text
from gateway.kernels import EGRESS_PROFILES, KernelLauncher, RunningKernel, validate_env
from gateway.lifecycle import Lifecycle
from gateway.metrics import Metrics
from gateway.notebook import upload_details
from gateway.outputs import EventSink
from gateway.pool import KernelPool, bind
from gateway.recorder import Recorder, Trajectory
from gateway.records import SessionRecord, StepRecord, environment_summary
from gateway.settings import Settings
from gateway.steps import StepRunner, check_workspace_room, workspace_limit
from gateway.store import Store, decode_cursor, encode_cursor
from gateway.isolation import SessionIsolation, parse_egress
from gateway.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass
class RunningStep:
    """The step a session is executing now; lets interrupt, restart and terminate reach it."""

    abort: asyncio.Future[str]
    interrupt_requested: bool = False
    begun: asyncio.Event = field(default_factory=asyncio.Event)  # the kernel reported execute_input


@dataclass
class LiveSession:
    """A session whose kernel this process runs."""

    record: SessionRecord
    kernel: RunningKernel | None
    trajectory: Trajectory
    workspace: Workspace
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    current: RunningStep | None = None
    generation: int = 0
    execution_state: str = "starting"
    last_message_at: str = ""
    hub: Any = None  # the Jupyter face's KernelHub, once a websocket client attached
    workspace_bytes: int = 0  # measured after each step when the session has a workspace limit
    measuring: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def active_at(self) -> str:
        """When the session last did anything: its last step or its kernel's last message."""
        return max(self.record.last_activity, self.last_message_at)


def _ended(row: SessionRecord) -> Conflict:
    """The 409 for a request to a session that has ended, saying why."""
    return states.ended_error(row.id, row.state, f"Session '{row.id}' is {row.state}: it runs nothing more. "
                              f"{row.reason or ''} Create a new session to continue.".replace("  ", " "))


class SessionManager:
    """Creates, runs and ends sessions. One per server; its methods are what handlers call."""

    def __init__(self, settings: Settings, store: Store, launcher: KernelLauncher, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.store = store
        self.launcher = launcher
        self.recorder = Recorder(store, settings.notebook_write_delay, self.display_name)
        self.sessions_dir = settings.data_path / "sessions"
        self.sessions_dir.mkdir(parents=True, exist_ok=True)
        self.live: dict[str, LiveSession] = {}
        self.by_kernel: dict[str, str] = {}
        self.closing = False
        self.pool: KernelPool | None = None
        self.lifecycle = Lifecycle(self)
        self.runner = StepRunner(self.recorder, metrics, settings.max_output_bytes)

    def display_name(self, kernel: str) -> str:
        try:
            return str(self.launcher.get_spec(kernel).display_name)
        except GatewayError:
            return kernel

    # start-up and shutdown --------------------------------------------------------------

    async def recover(self) -> None:
        """At start: bring back what a previous gateway process left (see ``Lifecycle.recover``)."""
        await self.lifecycle.recover()

    async def shutdown(self) -> None:
        """Interrupt running steps (they are recorded), pause every session (its state saved, its
        kernel stopped), write every notebook. The next start resumes them on demand."""
        self.closing = True
        sessions = list(self.live.values())
        for live in sessions:
            websocket_steps = live.hub is not None and bool(live.hub.requests)
            if live.kernel is not None and (live.current is not None or websocket_steps):
                if live.current is not None:
                    live.current.interrupt_requested = True
                try:
                    await live.kernel.interrupt()
                except Exception:
                    log.warning("session %s: interrupt at shutdown failed", live.id, exc_info=True)
        await asyncio.gather(*(self.lifecycle.pause_for_shutdown(live) for live in sessions))
        if self.pool is not None:
            await self.pool.close()
        self.recorder.flush()
        try:
            released = await host.current().call("volume.release_all", root=str(self.settings.data_path))
        except host.HelperFailed as exc:
            # Every step is recorded and every session paused by now: what is left is the helper's.
            log.error("shutdown: the privileged helper is not there to unmount workspace volumes (%s): any "
                      "that were mounted stay mounted", exc)
            return
        if released:
            log.info("unmounted %d workspace volumes", released)

    # lookups ----------------------------------------------------------------------------

    def trajectory_of(self, session_id: str) -> Trajectory:
        next_step, next_seq = self.store.next_positions(session_id)
        return Trajectory(session_id, self.sessions_dir / session_id, next_step, next_seq)

    def visible(self, principal: Principal, session_id: str) -> SessionRecord:
        """The session's current record if the principal may see it; else ``NotFound``."""
        live = self.live.get(session_id)
        return access.check_seen(principal, session_id, live.record if live is not None else
                                 self.store.get_session(session_id))

    def changeable(self, principal: Principal, session_id: str) -> SessionRecord:
        """The record of a live or paused session the principal may change (404, 403, 409 ended)."""
        row = self.visible(principal, session_id)
        access.check_change(principal, session_id, row)
        if row.state in states.ENDED:
            raise _ended(row)
        return row

    def writable(self, principal: Principal, session_id: str) -> LiveSession:
        """A live session the principal may act on (404 unseen, 403 read-only, 409 ended or paused)."""
        row = self.changeable(principal, session_id)
        live = self.live.get(session_id)
        if live is None and row.state == "paused":
            raise Conflict(f"Session '{session_id}' is paused. Resume it (POST /v1/sessions/{session_id}/resume), "
                           "or send a step, which resumes it.", code="session_paused",
                           details={"session_id": session_id, "state": "paused"})
        if live is None or live.record.state in states.ENDED:
            raise _ended(row)
        return live

    def session_id_for_kernel(self, kernel_id: str) -> str | None:
        if kernel_id in self.by_kernel:
            return self.by_kernel[kernel_id]
        row = self.store.get_session_by_kernel(kernel_id)
        return row.id if row else None

    def get(self, principal: Principal, session_id: str) -> dict[str, Any]:
        return self.visible(principal, session_id).view()

    def list_sessions(self, principal: Principal, *, state: str | None = None, label: tuple[str, str] | None = None,
             owner: str | None = None, limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
        if cursor and not all(is_text(part) for part in decode_cursor(cursor)):
            # A forged cursor can decode to text that is not Unicode; the store cannot look it up.
            raise InvalidRequest("The cursor is not one this server issued; use the 'next' value of a previous page.",
                                 code="invalid_query", details={"parameter": "cursor"})
        if not access.sees_every_session(principal):
            if owner is not None and owner != principal.name:
                return {"sessions": [], "next": None}
            owner = principal.name
        if state in states.LIVE:
            # Live states change with every step and are kept in memory, not in the store.
            rows, next_cursor = self._list_live(owner=owner, state=state, label=label, limit=limit, cursor=cursor)
        else:
            rows, next_cursor = self.store.list_sessions(owner=owner, state=state, label=label, limit=limit,
                                                         cursor=cursor)
        views = [(self.live[r.id].record if r.id in self.live else r).view() for r in rows]
        return {"sessions": views, "next": next_cursor}

    def _list_live(self, *, owner: str | None, state: str, label: tuple[str, str] | None, limit: int,
                   cursor: str | None) -> tuple[list[SessionRecord], str | None]:
        after = decode_cursor(cursor) if cursor else None
        rows = sorted((live.record for live in self.live.values()
                       if live.record.state == state and (owner is None or live.record.owner == owner)
                       and (label is None or live.record.labels.get(label[0]) == label[1])
                       and (after is None or (live.record.created_at, live.record.id) < after)),
                      key=lambda row: (row.created_at, row.id), reverse=True)
        if len(rows) > limit:
            return rows[:limit], encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id)
        return rows, None

    # create, terminate ------------------------------------------------------------------

    async def create(self, principal: Principal, *, kernel: str = "python3", labels: dict[str, str] | None = None,
                     env: dict[str, str] | None = None, setup: str | None = None, origin: str = "agent",
                     parent: tuple[str, int] | None = None, sandbox: str | None = None,
                     limits: dict[str, Any] | None = None, egress: list[str] | None = None,
                     isolation: SessionIsolation | None = None) -> dict[str, Any]:
        """Start a session and its kernel; runs ``setup`` as step 0. Returns the Session view."""
        if self.closing:
            raise Unavailable("The gateway is shutting down; retry against the next instance.", code="shutting_down")
        access.check_create(principal)
        self.launcher.environment_of(kernel)  # an unknown kernel, or one whose environment is not built: refused now
        env = validate_env(env)
        check_text(setup or "", "setup")  # setup that could not even be sent is refused before anything exists
        if isolation is None and self.launcher.isolation is not None:
            isolation = self.launcher.isolation.for_session(access.may_loosen_isolation(principal), sandbox, limits,
                                                            egress)
        await self.launcher.check_image(kernel, isolation)
        await self.lifecycle.ensure_room()
        session_id = "s_" + secrets.token_urlsafe(12).replace("-", "x").replace("_", "y")
        created = now_iso()
        row = SessionRecord(
            session_id, str(uuid.uuid4()), kernel, "starting", principal.name, created, created,
            labels=dict(labels or {}), origin=origin, env=env, parent_session_id=parent[0] if parent else None,
            parent_step=parent[1] if parent else None, isolation=isolation.view() if isolation is not None else None)
        self.store.insert_session(row)
        trajectory = Trajectory(session_id, self.sessions_dir / session_id, next_step=0 if setup else 1)
        live = self.register(row, trajectory)
        self.recorder.record_event(trajectory, "session_created", principal.name, {
            "kernel": kernel, "labels": row.labels, "env_names": sorted(env), "origin": origin,
            **({"isolation": row.isolation} if row.isolation else {}),
            **({"parent": {"session_id": parent[0], "step": parent[1]}} if parent else {})})
        await self.start_kernel(live, principal.name)
        log.info("session %s: created by %s (kernel %s)", session_id, principal.name, row.kernel_id)
        if setup:
            try:
                await self.execute(principal, session_id, setup)
            except Exception as exc:
                # The setup could not run at all: no session is left half made, no kernel running.
                if self.live.get(session_id) is live:
                    await self.end(live, principal.name, "failed", f"The setup code could not be run: {exc}")
                raise
        return row.view()

    def register(self, row: SessionRecord, trajectory: Trajectory) -> LiveSession:
        live = LiveSession(row, None, trajectory, Workspace(trajectory.directory / "workspace"))
        self.live[row.id] = live
        self.by_kernel[row.kernel_id] = row.id
        return live

    async def start_kernel(self, live: LiveSession, principal: str | None) -> None:
        """Give a registered session a kernel: a pooled one bound to it, or a new one.

        On failure the session is ended as ``failed`` and ``Unavailable`` raised.
        """
        row, env = live.record, live.record.env
        isolation = self.isolation_of(row)
        # A pooled kernel brings a workspace of its own (a volume, under a workspace limit): a
        # session that has one already (a paused session's) is started on it.
        pooled = self.pool is not None and (isolation is None or isolation == self.launcher.isolation_defaults()) \
            and not volumes.image_of(live.workspace.root).exists()
        try:
            kernel = await self.pool.take(row.kernel, env) if pooled and self.pool is not None else None
            if kernel is not None:
                try:
                    await bind(kernel, live.workspace.root, env, self.settings.kernel_start_timeout)
                except Exception:
                    log.warning("session %s: the pooled kernel could not be bound; starting one", live.id,
                                exc_info=True)
                    await kernel.shutdown(now=True)
                    kernel = None
            if kernel is None:
                kernel = await self.launcher.start(
                    kernel_id=str(uuid.uuid4()), spec_name=row.kernel, cwd=live.workspace.root, env=env,
                    ready_timeout=self.settings.kernel_start_timeout, isolation=isolation)
        except Exception as exc:
            reason = f"The kernel could not be started: {exc}"
            log.error("session %s: %s", live.id, reason)
            await self.end(live, principal, "failed", reason)
            raise Unavailable(reason + " Check the kernel spec and the server log, then retry.",
                              code="kernel_start_failed", details={"session_id": live.id}) from None
        self.attach_kernel(live, kernel)

    @staticmethod
    def isolation_of(row: SessionRecord) -> SessionIsolation | None:
        return SessionIsolation.from_view(row.isolation) if row.isolation else None

    def attach_kernel(self, live: LiveSession, kernel: RunningKernel) -> None:
        """Make ``kernel`` the session's, and record where it runs (for reattaching after a crash)."""
        live.kernel = kernel
        live.workspace.owner = kernel.owner
        kernel.egress_sink = lambda connection: self.recorder.record_event(live.trajectory, "egress", None,
                                                                          connection.details())
        kernel.observers.append(self._state_tracker(live))
        live.execution_state = "idle"
        language_info = kernel.kernel_info.get("language_info") or live.record.language_info
        environment = kernel.environment.identity() if kernel.environment else live.record.environment
        if live.record.environment and environment and live.record.environment.get("hash") != environment["hash"]:
            self.recorder.record_event(live.trajectory, "environment_changed", None, {
                "from": environment_summary(live.record.environment), "to": environment_summary(environment)})
        self.store.save_session(live.record, state="idle", language_info=language_info, kernel_pid=kernel.pid,
                                connection_file=kernel.connection_file, placement=kernel.placement().to_dict(),
                                environment=environment)

    async def terminate(self, principal: Principal, session_id: str) -> dict[str, Any]:
        """Shut the kernel down (a paused session has none); the trajectory and workspace stay."""
        self.changeable(principal, session_id)
        if session_id in self.lifecycle.resuming:
            await asyncio.shield(self.lifecycle.resuming[session_id])
        reason = f"Terminated by {principal.name}."
        live = self.live.get(session_id)
        if live is not None:
            await self.end(live, principal.name, "terminated", reason)
            return live.record.view()
        self.store.update_session(session_id, state="terminated", reason=reason, ended_at=now_iso())
        self.recorder.record_event(self.trajectory_of(session_id), "session_terminated", principal.name,
                                   {"reason": reason})
        self.recorder.flush(session_id)
        return self.get(principal, session_id)

    def egress_changeable(self, principal: Principal, session_id: str) -> SessionRecord:
        """The record of a live or paused session whose egress rules the principal may change
        (404 unseen, 403 not an admin, 409 ended)."""
        row = self.changeable(principal, session_id)
        access.check_set_egress(principal, session_id)
        return row

    async def set_egress(self, principal: Principal, session_id: str, rules: Any) -> dict[str, Any]:
        """Replace the hosts a live or paused sandboxed session's kernel may reach (admins only):
        stored with the session, applied by its proxy to the connections to come, audited."""
        row = self.egress_changeable(principal, session_id)
        new = parse_egress(rules, "rules")
        if session_id in self.lifecycle.resuming:  # the kernel it starts must get the new rules
            await asyncio.shield(self.lifecycle.resuming[session_id])
        live = self.live.get(session_id)
        row = live.record if live is not None else self.store.get_session(session_id) or row
        isolation = self.isolation_of(row)
        if isolation is None or isolation.profile not in EGRESS_PROFILES:
            profile = isolation.profile if isolation else "none"
            raise Conflict(f"Session '{session_id}' runs under '{profile}': its kernel shares the host's network, "
                           "and egress rules apply under the 'sandbox' and 'container' profiles only.",
                           code="egress_not_enforced",
                           details={"session_id": session_id, "profile": profile})
        before = list(isolation.egress)
        self.store.save_session(row, isolation=dataclasses.replace(isolation, egress=new).view())
        proxy = live.kernel.egress if live is not None and live.kernel is not None else None
        if proxy is not None:
            proxy.set_policy(egress.Policy.parse(list(new)))
        self.recorder.record_event(live.trajectory if live is not None else self.trajectory_of(session_id),
                                   "egress_rules_changed", principal.name, {"before": before, "after": list(new)})
        self.recorder.flush(session_id)
        log.info("session %s: egress rules set by %s: %s", session_id, principal.name, list(new) or "none")
        return row.view()

    async def end(self, live: LiveSession, principal: str | None, state: str, reason: str,
                   grace: float = 0.0) -> None:
        """End a session: let a running step finish within ``grace``, abort it otherwise, then close."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while live.current is not None and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if live.current is not None and not live.current.abort.done():
            live.current.abort.set_result(state)
        live.record.state = state
        async with live.lock:
            await self._close(live, principal, state, reason)

    async def _close(self, live: LiveSession, principal: str | None, state: str, reason: str) -> None:
        """Stop the kernel and record the end; the caller holds the session's lock."""
        live.record.state = state
        live.execution_state = "dead"
        if live.hub is not None:
            live.hub.close_all(f"the session was {state}", state)
        if live.kernel is not None:
            await live.kernel.shutdown(now=state == "failed")
        ended = now_iso()
        self.store.save_session(live.record, state=state, reason=reason, ended_at=ended)
        self.recorder.record_event(live.trajectory, f"session_{state}", principal, {"reason": reason})
        self.live.pop(live.id, None)
        self.by_kernel.pop(live.record.kernel_id, None)
        self.recorder.flush(live.id)
        self.recorder.forget(live.id)
        log.info("session %s: %s (%s)", live.id, state, reason)

    # steps ------------------------------------------------------------------------------

    def check_timeout(self, timeout: Any) -> float:
        if timeout is None:
            return self.settings.default_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
                or timeout <= 0:
            raise InvalidRequest("'timeout' must be a positive number of seconds.", code="invalid_field",
                                 details={"field": "timeout"})
        return min(float(timeout), self.settings.max_timeout)

    async def execute(self, principal: Principal, session_id: str, code: str, *, timeout: float | None = None,
                      sink: EventSink | None = None, source: str = "agent",
                      stdin: list[str] | None = None) -> dict[str, Any]:
        """Run one step and record it; returns the Execution (committed before this returns).
        A paused session is resumed first. ``stdin`` (a caller's, or a replay's) answers the
        step's input() calls in order; without it input() raises in the kernel."""
        limit = self.check_timeout(timeout)
        while True:
            if session_id not in self.live and self.visible(principal, session_id).state == "paused":
                await self.lifecycle.resume(principal, session_id, reason="execute")
            live = self.writable(principal, session_id)
            async with live.lock:
                if live.record.state == "paused" or self.live.get(session_id) is not live:
                    continue  # paused while this step waited: resume it, then run
                self.runner.admit(live)
                assert live.kernel is not None
                if not await live.kernel.is_alive():
                    await self._replace_dead_kernel(live, "before this step")
                return await self._run_step(live, principal, code, limit, sink, source, stdin)

    async def _run_step(self, live: LiveSession, principal: Principal, code: str, limit: float,
                        sink: EventSink | None, source: str, stdin: list[str] | None) -> dict[str, Any]:
        """Send one step and wait for it (its time counts from when the kernel begins it: a
        websocket client's step ahead of it is not interrupted), then record it."""
        kernel = live.kernel
        assert kernel is not None and kernel.connection is not None
        answer = None if stdin is None else executor.replier(kernel.connection, stdin)
        step = self.runner.prepare(live, code, source=source, principal=principal.name, sink=sink, answer=answer,
                                  limit=limit)
        running = RunningStep(asyncio.get_running_loop().create_future())
        place_begin = step.listener.on_start

        def begun() -> None:
            if place_begin is not None:
                place_begin()
            running.begun.set()

        step.listener.on_start = begun
        live.current, live.record.state = running, "busy"
        try:
            ended = await executor.run(
                kernel.connection, step.listener, code, timeout=limit, is_alive=kernel.is_alive,
                interrupt=kernel.interrupt, interrupt_grace=self.settings.interrupt_grace, abort=running.abort,
                on_send=lambda: self.runner.sent(step), queue_timeout=self.settings.max_timeout)
        finally:
            live.current = None
            if live.record.state == "busy":
                live.record.state = "idle"
        aborted_by = running.abort.result() if running.abort.done() else None
        execution = self.runner.complete(step, ended, aborted_by=aborted_by,
                                        interrupt_requested=running.interrupt_requested,
                                        exit_description=kernel.exit_description() if ended == "died" else "")
        if ended == "died":
            error = execution.get("error") or {}
            await self._replace_kernel(live, "kernel_died", principal.name, error.get("value", ""))
        elif ended == "stuck":
            await self._replace_kernel(live, "kernel_restarted", principal.name,
                                       "the kernel ignored the interrupt after a timeout")
        elif ended == "aborted" and aborted_by == "restart":
            await self._replace_kernel(live, "kernel_restarted", principal.name, "restart requested during a step")
        return execution

    def _state_tracker(self, live: LiveSession) -> Any:
        """An observer keeping the kernel's execution state and last activity (Jupyter's model)."""

        def track(channel: str, msg: dict[str, Any], frames: list[bytes]) -> None:
            if channel == "iopub" and msg["header"].get("msg_type") == "status":
                live.execution_state = msg["content"].get("execution_state", live.execution_state)
            live.last_message_at = now_iso()

        return track

    async def _replace_kernel(self, live: LiveSession, action: str, principal: str | None, message: str) -> None:
        """Record why the kernel is being replaced, then start a new one (or fail the session)."""
        assert live.kernel is not None
        details: dict[str, Any] = {"message": message} if action == "kernel_died" else {"reason": message}
        hit = live.kernel.limit_hit() if action == "kernel_died" else None
        if hit is not None:
            details["limit"] = hit
            self.recorder.record_event(live.trajectory, "limit_exceeded", None, hit)
        self.recorder.record_event(live.trajectory, action, principal, details)
        if live.hub is not None:
            live.hub.kernel_replaced(action == "kernel_died", live.kernel.exit_description())
        live.execution_state = "restarting"
        try:
            await live.kernel.restart(self.settings.kernel_start_timeout)
            # A restarted process starts where the kernel was first started (for a pooled kernel,
            # the pool's directory): bind it to the session again.
            await bind(live.kernel, live.workspace.root, live.record.env, self.settings.kernel_start_timeout)
            live.execution_state = "idle"
            live.workspace.owner = live.kernel.owner  # a restart may give the kernel another uid
            self.store.save_session(live.record, kernel_pid=live.kernel.pid, connection_file=live.kernel.connection_file,
                                    placement=live.kernel.placement().to_dict())
            live.generation += 1
            if action == "kernel_died":
                self.recorder.record_event(live.trajectory, "kernel_restarted", None,
                                           {"reason": "replacing a kernel that died"})
            log.info("session %s: kernel replaced (%s)", live.id, action)
        except Exception as exc:
            log.error("session %s: no new kernel could be started: %s", live.id, exc)
            await self._close(live, principal, "failed", f"A new kernel could not be started: {exc}")

    async def _replace_dead_kernel(self, live: LiveSession, when: str) -> None:
        """A kernel found dead outside a step: say so in the trajectory and start a new one."""
        assert live.kernel is not None
        await self._replace_kernel(live, "kernel_died", None,
                                   f"The kernel stopped {when} ({live.kernel.exit_description()}); a new one was "
                                   "started: variables and imports are gone, files are kept.")

    async def interrupt(self, principal: Principal, session_id: str) -> dict[str, Any]:
        """Interrupt the running step, if any; it ends with status ``interrupted``."""
        live = self.writable(principal, session_id)
        running = live.current
        if running is not None and live.kernel is not None:
            running.interrupt_requested = True
            if not running.begun.is_set():
                # Sent, not begun yet: an interrupt now would find the kernel idle and be lost.
                began: asyncio.Future[Any] = asyncio.ensure_future(running.begun.wait())
                waiting: set[asyncio.Future[Any]] = {began, running.abort}
                await asyncio.wait(waiting, timeout=self.settings.interrupt_grace,
                                   return_when=asyncio.FIRST_COMPLETED)
                began.cancel()
            await live.kernel.interrupt()
        self.recorder.record_event(live.trajectory, "interrupt", principal.name, {"step_running": running is not None})
        return {"session_id": session_id, "interrupted": running is not None}

    async def restart(self, principal: Principal, session_id: str) -> dict[str, Any]:
        """A new kernel in the same workspace; a running step ends as ``interrupted``."""
        live = self.writable(principal, session_id)
        generation = live.generation
        if live.current is not None and not live.current.abort.done():
            live.current.abort.set_result("restart")
        async with live.lock:
            if live.record.state in states.ENDED:
                raise states.ended_error(session_id, live.record.state, f"Session '{session_id}' ended before it could be "
                                  "restarted.")
            if live.generation == generation:
                await self._replace_kernel(live, "kernel_restarted", principal.name,
                                           f"restart requested by {principal.name}")
        return live.record.view()

    # trajectory and files ---------------------------------------------------------------

    def steps(self, principal: Principal, session_id: str) -> list[dict[str, Any]]:
        self.visible(principal, session_id)
        return [StepRecord.from_row(row).view(with_code=True) for row in self.store.list_steps(session_id)]

    def timeline(self, principal: Principal, session_id: str) -> list[tuple[str, dict[str, Any]]]:
        """Steps and the events that shape a rerun, in recorded order: ("step"|"event", row)."""
        self.visible(principal, session_id)
        return [(kind, dict(row)) for kind, row in self.store.timeline(session_id)]

    def events(self, principal: Principal, session_id: str) -> list[dict[str, Any]]:
        self.visible(principal, session_id)
        events = self.store.list_events(session_id)
        for event in events:
            event["details"].pop("content_b64", None)
        return events

    def notebook(self, principal: Principal, session_id: str) -> str:
        self.visible(principal, session_id)
        return self.recorder.notebook_text(session_id)

    async def workspace(self, principal: Principal, session_id: str) -> Workspace:
        """The workspace of a session the principal may read (live or ended)."""
        self.visible(principal, session_id)
        live = self.live.get(session_id)
        return live.workspace if live else await self._resting_workspace(session_id)

    async def _resting_workspace(self, session_id: str) -> Workspace:
        """The workspace of a session without a kernel (paused or ended), its volume mounted."""
        path = self.sessions_dir / session_id / "workspace"
        try:
            await host.current().call("volume.ensure_existing", path=str(path))
        except volumes.VolumeError as exc:
            raise Unavailable(f"The workspace of session '{session_id}' cannot be mounted: {exc}. See the server log.",
                              code="workspace_unavailable", details={"session_id": session_id}) from None
        return Workspace(path)

    def upload_dir(self, principal: Principal, session_id: str) -> Path:
        """Where an upload is received before it is moved into the workspace (outside of it)."""
        self.changeable(principal, session_id)
        path = self.sessions_dir / session_id / "uploads"
        path.mkdir(exist_ok=True)
        return path

    async def _files_of(self, principal: Principal, session_id: str) -> tuple[Workspace, Trajectory]:
        """The workspace and trajectory of a live or paused session the principal may change."""
        self.changeable(principal, session_id)
        live = self.live.get(session_id)
        if live is not None:
            return live.workspace, live.trajectory
        return await self._resting_workspace(session_id), self.trajectory_of(session_id)

    async def put_file(self, principal: Principal, session_id: str, path: str, received: Path, *, size: int,
                       sha256: str, content: bytes | None) -> dict[str, Any]:
        """Install a received upload at ``path`` and record it."""
        workspace, trajectory = await self._files_of(principal, session_id)
        row = self.visible(principal, session_id)
        if workspace_limit(row) is not None:
            check_workspace_room(row, await workspace.size(), size)
        relative = await workspace.install(path, received)
        self.recorder.record_event(trajectory, "file_upload", principal.name,
                                   upload_details(relative, content, size, sha256))
        return {"path": relative, "size": size, "sha256": sha256}

    async def delete_file(self, principal: Principal, session_id: str, path: str) -> dict[str, Any]:
        workspace, trajectory = await self._files_of(principal, session_id)
        kind = await workspace.delete(path)
        live = self.live.get(session_id)
        if live is not None and workspace_limit(live.record) is not None:
            live.workspace_bytes = await workspace.size()
        self.recorder.record_event(trajectory, "file_delete", principal.name, {"path": path, "kind": kind})
        return {"path": path, "deleted": kind}

    # operations -------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        return {"live": len(self.live), "paused": self.store.count_sessions("paused")}

    async def watch_kernels(self) -> None:
        """Replace kernels that died between steps (called periodically by the server)."""
        for live in list(self.live.values()):
            if live.kernel is None or live.lock.locked() or live.record.state != "idle":
                continue
            if not await live.kernel.is_alive():
                async with live.lock:
                    if live.kernel is not None and live.record.state == "idle" and not await live.kernel.is_alive():
                        await self._replace_dead_kernel(live, "between steps")
