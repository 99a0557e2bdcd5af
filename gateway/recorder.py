"""Records a session's trajectory: steps and events into the store, and the notebook file on disk.

Called by the session manager. A step is written ahead: committed as ``running`` before its
request goes to the kernel, and completed (the same row) when it ends, before its response is
sent. The notebook file, a view of the store, is rewritten shortly after a step ends (changes
within ``notebook_write_delay`` are gathered into one write) and on shutdown, atomically.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from datetime import datetime
from typing import Any, Callable

from tornado.ioloop import IOLoop

from gateway import notebook
from gateway.clock import now_iso, utcnow
from gateway.events import check_kind
from gateway.outcomes import RUNNING
from gateway.records import SessionRecord, StepRecord
from gateway.store import Store

log = logging.getLogger(__name__)

RENDER_SPACING = 50
ANCESTRY_MAX = 32  # generations of forks a notebook carries


@dataclass
class Trajectory:
    """Where the next step and event of one session go."""

    session_id: str
    directory: Path
    next_step: int = 0
    next_seq: int = 1

    def take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def take_step(self) -> int:
        step = self.next_step
        self.next_step += 1
        return step

    @property
    def notebook_path(self) -> Path:
        return self.directory / notebook.NOTEBOOK_FILE


@dataclass
class StepPlace:
    """A step's number and sequence, taken just before its request is sent to the kernel. A
    kernel runs the execute requests of its shell channel in the order they were sent, so this
    is the order in which it runs them. ``started_at`` is when the kernel began running it."""

    step: int = -1
    seq: int = -1
    sent_at: datetime | None = None
    started_at: datetime | None = None

    def take(self, trajectory: Trajectory) -> None:
        if self.step < 0:
            self.step, self.seq = trajectory.take_step(), trajectory.take_seq()
            self.sent_at = utcnow()

    def begin(self) -> None:
        """The kernel reported ``execute_input``: the step began running."""
        if self.started_at is None:
            self.started_at = utcnow()


def expressions_record(expressions: dict[str, str], reply: dict[str, Any] | None,
                       limit: int) -> dict[str, dict[str, Any]]:
    """A step's ``user_expressions``: each expression with the kernel's result from its
    execute_reply (null until then, or when the kernel gave none). A result whose JSON is over
    ``limit`` bytes is replaced by a note of its size."""
    results = (reply or {}).get("user_expressions") or {}
    record: dict[str, dict[str, Any]] = {}
    for name, expression in expressions.items():
        result = results.get(name)
        size = len(json.dumps(result)) if result is not None else 0
        if size > limit:
            result = {"status": "truncated", "bytes": size}
        record[name] = {"expression": expression, "result": result}
    return record


def recorded_replies(row: dict[str, Any]) -> list[str] | None:
    """What was typed in answer to a recorded step's input() calls, in order, to answer a rerun
    with (a password, which is not recorded, is answered with an empty string); None if the
    step asked for no input."""
    if not row.get("stdin"):
        return None
    return [exchange.get("value") or "" for exchange in json.loads(row["stdin"])]


class Recorder:
    """Writes the trajectory. One per server."""

    def __init__(self, store: Store, write_delay: float, display_name: Callable[[str], str]):
        self.store = store
        self.write_delay = write_delay
        self.display_name = display_name
        self._pending: dict[str, Trajectory] = {}
        self._render_seconds: dict[str, float] = {}

    def open_step(self, trajectory: Trajectory, record: StepRecord) -> None:
        """Commit a step as ``running`` just before its request goes to the kernel (one INSERT)."""
        assert record.status == RUNNING and record.session_id == trajectory.session_id
        self.store.open_step(record.row())

    def record_stdin(self, trajectory: Trajectory, step: int, stdin: list[dict[str, Any]]) -> None:
        """Keep a running step's input exchanges so far (before the reply reaches the kernel)."""
        self.store.update_step(trajectory.session_id, step, stdin=json.dumps(stdin))

    def record_step(self, trajectory: Trajectory, record: StepRecord) -> None:
        """Complete a running step (its row is updated, with its audit event, in one
        transaction); then schedule the notebook write."""
        self.store.finish_step(trajectory.session_id, record.step, record.completion(), code=record.code,
                               source=record.source, principal=record.principal, at=record.finished_at or now_iso(),
                               last_activity=record.finished_at)
        self.schedule(trajectory)

    def record_lost(self, trajectory: Trajectory, row: dict[str, Any], status: str, error: dict[str, Any]) -> None:
        """Complete a step a crash left ``running``: its end is unknown, so ``finished_at`` stays null."""
        self.store.finish_step(trajectory.session_id, row["step"], {"status": status, "error": json.dumps(error)},
                               code=row["code"], source=row["source"], principal=row["principal"], at=now_iso(),
                               last_activity=None)
        self.schedule(trajectory)

    def record_event(self, trajectory: Trajectory | None, action: str, principal: str | None,
                     details: dict[str, Any] | None = None) -> None:
        """Commit one event of a session (or of the gateway when ``trajectory`` is None)."""
        check_kind(action)
        self.store.record_event(
            session_id=trajectory.session_id if trajectory else None,
            seq=trajectory.take_seq() if trajectory else None,
            at=now_iso(), principal=principal, action=action, details=details,
        )
        if trajectory is not None:
            self.schedule(trajectory)

    def notebook_text(self, session_id: str) -> str:
        """The trajectory notebook, rendered from the store now."""
        session = self.store.get_session(session_id)
        assert session is not None
        return notebook.render(session, self.display_name(session.kernel), self.store.timeline(session_id),
                               self.ancestry(session))

    def ancestry(self, session: SessionRecord) -> list[notebook.Inherited]:
        """A fork's ancestors' trajectories up to each fork point, the oldest first, so that its
        notebook re-runs on its own (at most ``ANCESTRY_MAX`` generations)."""
        inherited: list[notebook.Inherited] = []
        child: SessionRecord | None = session
        while child is not None and child.parent_session_id and len(inherited) < ANCESTRY_MAX:
            parent_id = child.parent_session_id
            point = self.store.fork_point(parent_id, child.id)
            parent = self.store.get_session(parent_id)
            if point is None or parent is None:
                break
            inherited.append(notebook.Inherited(parent_id, child.parent_step,
                                                list(self.store.timeline(parent_id, before_seq=point))))
            child = parent
        return list(reversed(inherited))

    # the notebook file ------------------------------------------------------------------

    def schedule(self, trajectory: Trajectory) -> None:
        """Write the session's notebook file soon; rewrites of large notebooks are spaced out
        (at least ``RENDER_SPACING`` times their last rendering time) so they stay a small share
        of the server's time however long the trajectory grows."""
        if trajectory.session_id in self._pending:
            return
        self._pending[trajectory.session_id] = trajectory
        delay = max(self.write_delay, RENDER_SPACING * self._render_seconds.get(trajectory.session_id, 0.0))
        IOLoop.current().call_later(delay, self._write_pending, trajectory.session_id)

    def _write_pending(self, session_id: str) -> None:
        trajectory = self._pending.pop(session_id, None)
        if trajectory is not None:
            self.write_file(trajectory)

    def write_file(self, trajectory: Trajectory) -> None:
        started = time.perf_counter()
        try:
            notebook.write_atomically(trajectory.notebook_path, self.notebook_text(trajectory.session_id))
            self._render_seconds[trajectory.session_id] = time.perf_counter() - started
        except Exception:
            log.exception("session %s: could not write the notebook file", trajectory.session_id)

    def forget(self, session_id: str) -> None:
        """Drop what is kept about an ended session (after its last flush)."""
        self._render_seconds.pop(session_id, None)

    def flush(self, session_id: str | None = None) -> None:
        """Write pending notebook files now (one session, or all); called on terminate and shutdown."""
        ids = [session_id] if session_id else list(self._pending)
        for sid in ids:
            trajectory = self._pending.pop(sid, None)
            if trajectory is not None:
                self.write_file(trajectory)
