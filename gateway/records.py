"""The typed records of sessions and steps, from the store's rows to the API's views.

A session is one ``SessionRecord``: made at create, kept by its live session while it runs
(changed only with the store, through ``SessionManager.update``), read back from the store,
and shown to callers (``view``: the API's Session object).

A step is one ``StepRecord`` all its life: made ``running`` just before its request is sent
(``row`` is what the store inserts), completed when it ends (``completion`` is what the store
updates), read back from the store (``from_row``), and shown to callers (``view``: the agent
API's Execution, and the steps list's entries with ``with_code``). Its JSON columns are
encoded and decoded here only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from gateway.outcomes import RUNNING

VIEW_FIELDS = ("session_id", "step", "execution_count", "status", "stdout", "stderr", "result", "error", "outputs",
               "started_at", "finished_at", "duration_ms", "truncated")
EXTRAS = ("user_expressions", "stdin")  # in a step's view only when it had them
JSON_COLUMNS = ("error", "outputs", *EXTRAS)


def environment_summary(identity: dict[str, Any]) -> dict[str, Any]:
    """An environment's identity without its package list: what the Session object shows."""
    return {"name": identity.get("name"), "hash": identity.get("hash"), "python": identity.get("python"),
            "packages": len(identity.get("packages") or {})}


@dataclass
class SessionRecord:
    """One session as the store keeps it (JSON columns decoded)."""

    id: str
    kernel_id: str
    kernel: str  # its kernel spec's name
    state: str  # one of ``states.STATES``
    owner: str
    created_at: str
    last_activity: str
    steps: int = 0  # finished steps
    labels: dict[str, str] = field(default_factory=dict)
    origin: str = "agent"  # "agent", or "jupyter" for a session created through /api/kernels
    env: dict[str, str] = field(default_factory=dict)
    parent_session_id: str | None = None
    parent_step: int | None = None
    reason: str | None = None  # why it ended (or failed)
    ended_at: str | None = None
    language_info: dict[str, Any] | None = None
    snapshot: dict[str, Any] | None = None  # its last pause: what was saved, how it resumes
    isolation: dict[str, Any] | None = None  # the profile and limits its kernels run under
    placement: dict[str, Any] | None = None  # where its kernel runs (``gateway.placement``)
    environment: dict[str, Any] | None = None  # what its kernel runs in (``Environment.identity()``)
    kernel_pid: int | None = None  # of a session stored before placements were
    connection_file: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> SessionRecord:
        """The record of a ``sessions`` row (its JSON columns decoded by the store)."""
        values = {name: row[name] for name in cls.__dataclass_fields__ if name in row.keys()}
        values["labels"] = values.get("labels") or {}
        values["env"] = values.get("env") or {}
        return cls(**values)

    def row(self) -> dict[str, Any]:
        """The ``sessions`` row to insert (the store encodes its JSON columns)."""
        return dict(self.__dict__)

    def view(self) -> dict[str, Any]:
        """The API's Session object."""
        parent = None
        if self.parent_session_id:
            parent = {"session_id": self.parent_session_id, "step": self.parent_step}
        view: dict[str, Any] = {
            "id": self.id, "kernel_id": self.kernel_id, "kernel": self.kernel, "state": self.state,
            "owner": self.owner, "labels": self.labels, "created_at": self.created_at,
            "last_activity": self.last_activity, "steps": self.steps, "parent": parent,
        }
        if self.reason:
            view["reason"] = self.reason
        if self.snapshot:
            view["snapshot"] = self.snapshot
        if self.isolation:
            view["isolation"] = self.isolation
        if self.environment:
            view["environment"] = environment_summary(self.environment)
        return view


@dataclass
class StepRecord:
    """One recorded step (see the module's docstring)."""

    session_id: str
    step: int
    seq: int
    code: str
    source: str  # "agent", "jupyter", "mcp", "replay"
    principal: str | None
    started_at: str  # when the kernel began it; when it was sent, until then
    status: str = RUNNING
    execution_count: int | None = None
    stdout: str = ""
    stderr: str = ""
    result: str | None = None
    error: dict[str, Any] | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)
    finished_at: str | None = None
    duration_ms: float | None = None
    truncated: bool = False
    user_expressions: dict[str, dict[str, Any]] | None = None  # each expression with its result
    stdin: list[dict[str, Any]] | None = None  # input() prompts and the replies given

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> StepRecord:
        """The record of a ``steps`` row as the store returns it."""
        values = {name: row[name] for name in cls.__dataclass_fields__ if name in row.keys()}
        for name in JSON_COLUMNS:
            if values.get(name) is not None:
                values[name] = json.loads(values[name])
        values["outputs"] = values.get("outputs") or []
        values["truncated"] = bool(values.get("truncated"))
        return cls(**values)

    def row(self) -> dict[str, Any]:
        """The ``steps`` row to insert (columns without a value are left out), JSON encoded."""
        return {"session_id": self.session_id, "step": self.step, "seq": self.seq, "code": self.code,
                "source": self.source, "principal": self.principal,
                **{name: value for name, value in self.completion().items() if value is not None}}

    def completion(self) -> dict[str, Any]:
        """The columns a step's end sets (all but its identity; ``user_expressions`` and
        ``stdin`` only when it had them), JSON columns encoded."""
        columns = {
            "status": self.status, "execution_count": self.execution_count, "stdout": self.stdout,
            "stderr": self.stderr, "result": self.result, "error": _encoded(self.error),
            "outputs": json.dumps(self.outputs), "started_at": self.started_at, "finished_at": self.finished_at,
            "duration_ms": self.duration_ms, "truncated": int(self.truncated),
        }
        for name in EXTRAS:
            if getattr(self, name):
                columns[name] = json.dumps(getattr(self, name))
        return columns

    def view(self, *, with_code: bool = False) -> dict[str, Any]:
        """The agent API's Execution (with ``with_code``: also its code, source and principal)."""
        view: dict[str, Any] = {name: getattr(self, name) for name in VIEW_FIELDS}
        if with_code:
            view.update(code=self.code, source=self.source, principal=self.principal)
        for name in EXTRAS:
            if getattr(self, name):
                view[name] = getattr(self, name)
        return view


def _encoded(value: Any) -> str | None:
    return json.dumps(value) if value else None
