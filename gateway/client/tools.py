"""The SDK's operations as an LLM's tools: one declaration per tool (name, description, JSON
Schema of its arguments), given in the tool formats of the OpenAI and Anthropic APIs, and
``Toolbox``, which carries out a model's tool call on a gateway and answers with JSON.

    toolbox = Toolbox(gateway)
    tools = openai_tools()                      # or anthropic_tools()
    ...                                         # the model answers with a tool call
    answer = toolbox.call(name, arguments)      # a dict: send it back as the tool's result

A tool call that fails (a bad argument, an unknown session) is answered with ``{"error": ...}``
rather than raised, so that the model can read it and correct itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

from gateway.client._sync import Gateway
from gateway.client.errors import GatewayError
from gateway.client.models import Execution

_SESSION = {"type": "string", "description": "the session_id that create_session returned"}
_PATH = {"type": "string", "description": "a path relative to the session's workspace"}


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # the JSON Schema of the arguments object

    def openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    def anthropic(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "input_schema": self.parameters}


def _arguments(required: tuple[str, ...], **properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


TOOLS: tuple[Tool, ...] = (
    Tool("create_session", "Start a Python session (a Jupyter kernel of its own). Variables, imports and files "
         "last across run_code calls until terminate_session. Returns its session_id.",
         _arguments((), labels={"type": "object", "additionalProperties": {"type": "string"},
                                "description": "labels to find the session by"})),
    Tool("run_code", "Run Python code in the session. Returns status, the last expression's value as text, "
         "stdout, stderr, the error if any, and how many images it displayed.",
         _arguments(("session_id", "code"), session_id=_SESSION, code={"type": "string"},
                    timeout={"type": "number", "description": "seconds the code may run"})),
    Tool("list_files", "The files of the session's workspace.",
         _arguments(("session_id",), session_id=_SESSION,
                    path={"type": "string", "description": "only under this directory"})),
    Tool("read_file", "Read a text file of the session's workspace.",
         _arguments(("session_id", "path"), session_id=_SESSION, path=_PATH)),
    Tool("write_file", "Write a text file into the session's workspace, replacing it.",
         _arguments(("session_id", "path", "content"), session_id=_SESSION, path=_PATH, content={"type": "string"})),
    Tool("terminate_session", "End the session; its recorded trajectory is kept.",
         _arguments(("session_id",), session_id=_SESSION)),
)


def openai_tools() -> list[dict[str, Any]]:
    """The tools for the ``tools`` parameter of OpenAI's Chat Completions API."""
    return [tool.openai() for tool in TOOLS]


def anthropic_tools() -> list[dict[str, Any]]:
    """The tools for the ``tools`` parameter of Anthropic's Messages API."""
    return [tool.anthropic() for tool in TOOLS]


def execution_summary(execution: Execution) -> dict[str, Any]:
    """What a model needs of a step: its outcome, in few tokens."""
    images = sum(1 for result in execution.results if result.png is not None or result.jpeg is not None)
    summary: dict[str, Any] = {"status": execution.status, "step": execution.step, "result": execution.text,
                               "stdout": execution.stdout, "stderr": execution.stderr, "images": images}
    if execution.error is not None:
        summary["error"] = {"name": execution.error.name, "value": execution.error.value}
    return summary


class Toolbox:
    """Carries out the tools' calls on one gateway, as its caller."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self._calls: dict[str, Callable[..., dict[str, Any]]] = {
            "create_session": self._create, "run_code": self._run, "list_files": self._list,
            "read_file": self._read, "write_file": self._write, "terminate_session": self._terminate}

    def call(self, name: str, arguments: dict[str, Any] | str) -> dict[str, Any]:
        """The answer to one tool call (``arguments`` as a dict, or the JSON text OpenAI sends)."""
        try:
            given = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError as exc:
            return {"error": {"code": "invalid_arguments", "message": f"the arguments are not JSON: {exc}"}}
        tool = next((t for t in TOOLS if t.name == name), None)
        if tool is None or not isinstance(given, dict):
            return {"error": {"code": "unknown_tool" if tool is None else "invalid_arguments",
                              "message": f"no tool {name!r}" if tool is None else "the arguments must be an object"}}
        missing = [key for key in tool.parameters["required"] if key not in given]
        unknown = sorted(set(given) - set(tool.parameters["properties"]))
        if missing or unknown:
            return {"error": {"code": "invalid_arguments",
                              "message": f"missing: {missing or 'none'}; not arguments of {name}: {unknown or 'none'}"}}
        try:
            return self._calls[name](**given)
        except GatewayError as exc:
            return {"error": {"code": exc.code, "message": exc.message}}

    def _create(self, labels: dict[str, str] | None = None) -> dict[str, Any]:
        session = self.gateway.create_session(labels=labels)
        return {"session_id": session.id, "state": session.info.state}

    def _run(self, session_id: str, code: str, timeout: float | None = None) -> dict[str, Any]:
        return execution_summary(self.gateway.session(session_id).run(code, timeout=timeout))

    def _list(self, session_id: str, path: str | None = None) -> dict[str, Any]:
        files = self.gateway.session(session_id).files.list(path)
        return {"files": [{"path": f.path, "size": f.size} for f in files]}

    def _read(self, session_id: str, path: str) -> dict[str, Any]:
        return {"path": path, "content": self.gateway.session(session_id).files.read_text(path)}

    def _write(self, session_id: str, path: str, content: str) -> dict[str, Any]:
        written = self.gateway.session(session_id).files.write(path, content)
        return {"path": written.path, "size": written.size}

    def _terminate(self, session_id: str) -> dict[str, Any]:
        return {"session_id": session_id, "state": self.gateway.session(session_id).terminate().state}
