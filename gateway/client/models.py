"""What the SDK returns: typed views of the gateway's JSON (docs/api.md). Each keeps the JSON it
came from in ``raw``."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Callable


class _Text:
    """One text format of a result's MIME bundle (None when it has none)."""

    def __init__(self, mime: str):
        self.mime = mime

    def __get__(self, result: Result, owner: type | None = None) -> str | None:
        value = result.data.get(self.mime)
        return "".join(value) if isinstance(value, list) else value


class _Image(_Text):
    """One image format of a result's MIME bundle, decoded from base64."""

    def __get__(self, result: Result, owner: type | None = None) -> bytes | None:  # type: ignore[override]
        value = super().__get__(result, owner)
        return base64.b64decode(value) if value is not None else None


@dataclass(frozen=True)
class Result:
    """One rich output: the step's value (``is_main_result``) or something it displayed, as a
    MIME bundle; ``text``, ``html``, ``markdown``, ``svg``, ``latex``, ``json``, ``png`` and
    ``jpeg`` give each format (None when absent)."""

    data: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    is_main_result: bool = False

    text = _Text("text/plain")
    html = _Text("text/html")
    markdown = _Text("text/markdown")
    svg = _Text("image/svg+xml")
    latex = _Text("text/latex")
    png = _Image("image/png")
    jpeg = _Image("image/jpeg")

    @property
    def json(self) -> Any:
        return self.data.get("application/json")

    def formats(self) -> list[str]:
        """The MIME types the output has."""
        return sorted(self.data)


@dataclass(frozen=True)
class ExecutionError:
    """The exception a step raised (or the gateway's own: ``Timeout``, ``KernelDied``...)."""

    name: str
    value: str
    traceback: str


@dataclass(frozen=True)
class Execution:
    """One recorded step: how it ended, its outputs, logs and error."""

    session_id: str
    step: int
    status: str  # ok, error, timeout, interrupted, died, not_run
    execution_count: int | None
    stdout: str
    stderr: str
    results: list[Result]
    error: ExecutionError | None
    started_at: str | None
    finished_at: str | None
    duration_ms: float | None
    truncated: bool
    raw: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def text(self) -> str | None:
        """The step's value as text (its ``execute_result``), if it had one."""
        main = next((r for r in self.results if r.is_main_result), None)
        return main.text if main is not None else None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Execution:
        results = [Result(o.get("data") or {}, o.get("metadata") or {}, o["output_type"] == "execute_result")
                   for o in data.get("outputs") or [] if o.get("output_type") in ("execute_result", "display_data")]
        error = data.get("error")
        return cls(session_id=data["session_id"], step=data["step"], status=data["status"],
                   execution_count=data.get("execution_count"), stdout=data.get("stdout") or "",
                   stderr=data.get("stderr") or "", results=results,
                   error=ExecutionError(error["name"], error["value"], error.get("traceback") or "") if error else None,
                   started_at=data.get("started_at"), finished_at=data.get("finished_at"),
                   duration_ms=data.get("duration_ms"), truncated=bool(data.get("truncated")), raw=data)


@dataclass(frozen=True)
class SessionInfo:
    """A session as the gateway describes it."""

    id: str
    kernel_id: str
    kernel: str
    state: str
    owner: str
    labels: dict[str, str]
    created_at: str
    last_activity: str
    steps: int
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SessionInfo:
        return cls(data["id"], data["kernel_id"], data["kernel"], data["state"], data["owner"], data.get("labels") or {},
                   data["created_at"], data["last_activity"], data["steps"], data)


@dataclass(frozen=True)
class FileInfo:
    """A regular file of a workspace."""

    path: str
    size: int
    modified: str


Handler = Callable[[Any], None]


@dataclass
class StreamHandlers:
    """What to call as a step's NDJSON lines arrive; ``feed`` returns the Execution at ``done``."""

    on_stdout: Handler | None = None
    on_stderr: Handler | None = None
    on_result: Handler | None = None  # a Result: the value and each display
    on_error: Handler | None = None  # an ExecutionError, as soon as it is raised

    def feed(self, line: str) -> Execution | None:
        if not line.strip():
            return None
        event = json.loads(line)
        kind = event.get("type")
        if kind == "stdout" and self.on_stdout is not None:
            self.on_stdout(event["text"])
        elif kind == "stderr" and self.on_stderr is not None:
            self.on_stderr(event["text"])
        elif kind in ("result", "display") and self.on_result is not None:
            self.on_result(Result(event.get("data") or {}, event.get("metadata") or {}, kind == "result"))
        elif kind == "error" and self.on_error is not None:
            self.on_error(ExecutionError(event["name"], event["value"], event.get("traceback") or ""))
        elif kind == "done":
            return Execution.from_json(event["execution"])
        return None
