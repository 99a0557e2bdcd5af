"""One step, from either face: the agent API's execute and a websocket client's execute_request.

Both go through ``StepRunner``: the same admission rules before anything is sent (the session
runs, its workspace has room), the same numbering and write-ahead record just before the
request goes out (``sent``), the same gathering of what the kernel answers
(``executor.ExecutionListener``), and the same outcome, limit and recording rules when it ends
(``complete``). Only how the request travels differs: the agent API sends it itself and waits
with a time budget (``executor.run``); a websocket client's is forwarded as the client wrote it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from gateway import states
from gateway.clock import iso, utcnow
from gateway.errors import InsufficientStorage
from gateway.executor import ExecutionListener
from gateway.isolation import describe_limit, human_bytes, limit_behind
from gateway.metrics import Metrics
from gateway.outcomes import step_outcome
from gateway.outputs import EventSink, OutputCollector, reported_packages, summarise
from gateway.recorder import Recorder, StepPlace, expressions_record
from gateway.records import SessionRecord, StepRecord

if TYPE_CHECKING:
    from gateway.sessions import LiveSession


@dataclass
class Step:
    """One execution on its way through the kernel, whichever face sent it."""

    live: "LiveSession"
    code: str
    source: str  # "agent", "jupyter", "mcp", "replay"
    principal: str
    listener: ExecutionListener
    place: StepPlace = field(default_factory=StepPlace)
    user_expressions: dict[str, str] = field(default_factory=dict)
    limit: float = 0.0  # its time budget in seconds (an agent's timeout); 0: none (a websocket client's)
    record: StepRecord | None = None  # once sent


def workspace_limit(record: SessionRecord) -> int | None:
    """The session's workspace limit in bytes, if it has one."""
    limits = (record.isolation or {}).get("limits") or {}
    return limits.get("workspace")


def check_workspace_room(record: SessionRecord, size: int, adding: int = 0) -> None:
    """Refuse (507 ``workspace_full``) when the workspace is, or would be, over its limit."""
    limit = workspace_limit(record)
    if limit is None or size + adding <= limit:
        return
    raise InsufficientStorage(
        f"The session's workspace holds {size + adding} bytes, over its {human_bytes(limit)} limit. Delete "
        f"files (DELETE /v1/sessions/{record.id}/files/{{path}}) to run steps or upload again.",
        details={"limit": "workspace", "limit_bytes": limit, "size_bytes": size + adding})


class StepRunner:
    """The rules every step follows, from admission to its record. One per session manager."""

    def __init__(self, recorder: Recorder, metrics: Metrics, output_limit: int):
        self.recorder = recorder
        self.metrics = metrics
        self.output_limit = output_limit

    def admit(self, live: "LiveSession") -> None:
        """Raise unless a step may be sent to the session now: it runs a kernel, and its
        workspace is within its limit (the caller's right to change it is checked before)."""
        if live.record.state in states.ENDED or live.kernel is None:
            raise states.ended_error(live.id, live.record.state,
                                     f"Session '{live.id}' ended while this step waited to run.")
        check_workspace_room(live.record, live.workspace_bytes)

    def prepare(self, live: "LiveSession", code: str, *, source: str, principal: str,
                user_expressions: dict[str, str] | None = None, sink: EventSink | None = None,
                answer: Callable[[dict[str, Any]], str] | None = None, limit: float = 0.0) -> Step:
        """A step ready to be sent: its listener gathers what the kernel answers (streamed to
        ``sink``; ``answer`` replies to its input requests)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        listener = ExecutionListener(OutputCollector(self.output_limit, sink), done, answer=answer)
        step = Step(live, code, source, principal, listener, user_expressions=dict(user_expressions or {}),
                    limit=limit)
        listener.on_start = step.place.begin
        return step

    def sent(self, step: Step) -> None:
        """Take the step's number and record it as ``running``; called just before its request
        goes out, so nothing the kernel runs goes unrecorded."""
        trajectory, place = step.live.trajectory, step.place
        place.take(trajectory)
        assert place.sent_at is not None
        expressions = expressions_record(step.user_expressions, None, 0) if step.user_expressions else None
        step.record = StepRecord(trajectory.session_id, place.step, place.seq, step.code, step.source, step.principal,
                                 started_at=iso(place.sent_at), user_expressions=expressions)
        self.recorder.open_step(trajectory, step.record)

    def complete(self, step: Step, ended: str, *, aborted_by: str | None = None, interrupt_requested: bool = True,
                 exit_description: str = "") -> dict[str, Any]:
        """Record how the step ended; returns its Execution view. ``started_at`` is when the
        kernel began it (when it was sent, if the kernel never began it). An error a limit
        caused names it (and a ``limit_exceeded`` event records it); the workspace is measured
        afterwards."""
        live, place, record = step.live, step.place, step.record
        assert record is not None and place.sent_at is not None, "a step is recorded before its request is sent"
        raw = step.listener.result(ended)
        status, error = step_outcome(raw, aborted_by, interrupt_requested, step.limit, exit_description)
        hit = limit_behind(error, live.record.isolation)
        if hit is not None and error is not None:
            error["value"] = f"{error['value']} ({describe_limit(hit)})"
            self.recorder.record_event(live.trajectory, "limit_exceeded", step.principal, hit)
        finished = utcnow()
        started = place.started_at or place.sent_at
        summary = summarise(raw.outputs)
        record.status, record.execution_count, record.outputs = status, raw.execution_count, raw.outputs
        record.stdout, record.stderr, record.result = summary["stdout"], summary["stderr"], summary["result"]
        record.error = error if error is not None else summary["error"]
        record.started_at, record.finished_at = iso(started), iso(finished)
        record.duration_ms = round((finished - started).total_seconds() * 1000, 3)
        record.truncated, record.stdin = raw.truncated, raw.stdin or None
        if step.user_expressions:
            record.user_expressions = expressions_record(step.user_expressions, raw.reply, self.output_limit)
        self.recorder.record_step(live.trajectory, record)
        packages = reported_packages(raw.outputs)
        if packages is not None:
            self.recorder.record_event(live.trajectory, "packages_installed", step.principal,
                                       {"step": place.step, "packages": packages, "reported_by": "kernel"})
        execution = record.view()
        live.record.steps += 1
        live.record.last_activity = record.finished_at
        self.metrics.observe_step(status, record.duration_ms)
        limit = workspace_limit(live.record)
        if limit is not None and live.measuring is None and not live.workspace.is_volume:
            # Measured off the response path; the next step or upload is refused if it is over.
            # (A volume needs no measuring: its file system holds the limit during the step.)
            live.measuring = asyncio.get_running_loop().create_task(self._measure_workspace(live, limit))
        return execution

    async def _measure_workspace(self, live: "LiveSession", limit: int) -> None:
        """Measure the workspace after a step; past the limit, record it once."""
        try:
            was_over = live.workspace_bytes > limit
            live.workspace_bytes = await live.workspace.size()
            if live.workspace_bytes > limit and not was_over:
                self.recorder.record_event(live.trajectory, "limit_exceeded", None, {
                    "limit": "workspace", "value": limit, "size": live.workspace_bytes})
        finally:
            live.measuring = None
