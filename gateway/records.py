"""The typed record of one step, from its write-ahead row to the API's Execution.

A step is one ``StepRecord`` all its life: made ``running`` just before its request is sent
(``running``; ``row`` is what the store inserts), completed when it ends (``completion`` is
what the store updates), read back from the store (``from_row``), and shown to callers
(``view``: the agent API's Execution, and the steps list's entries with ``with_code``). Its
JSON columns are encoded and decoded here only.
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


@dataclass
class StepRecord:
    """One recorded step (see the module's docstring)."""

    session_id: str
    step: int
    seq: int
    code: str
    source: str  # "agent", "jupyter", "replay"
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
        """The ``steps`` row to insert, its JSON columns encoded."""
        return {"session_id": self.session_id, "step": self.step, "seq": self.seq, "code": self.code,
                "source": self.source, "principal": self.principal, **self.completion()}

    def completion(self) -> dict[str, Any]:
        """The columns a step's end sets (all but its identity), JSON columns encoded."""
        return {
            "status": self.status, "execution_count": self.execution_count, "stdout": self.stdout,
            "stderr": self.stderr, "result": self.result, "error": _encoded(self.error),
            "outputs": json.dumps(self.outputs), "started_at": self.started_at, "finished_at": self.finished_at,
            "duration_ms": self.duration_ms, "truncated": int(self.truncated),
            "user_expressions": _encoded(self.user_expressions), "stdin": _encoded(self.stdin),
        }

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
