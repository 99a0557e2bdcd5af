"""Turns a kernel's iopub messages for one execution into nbformat outputs.

Called by the executor for every iopub message of a step. Consecutive stream outputs are
coalesced, carriage returns and backspaces resolved, ANSI escape codes stripped (from streams,
plain-text results and tracebacks: agents and reviewers see text, not terminal colours), and everything past the per-step output budget is cut and marked.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

# CSI sequences (colours, cursor moves), OSC sequences (titles, links) and two-character escapes.
ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
TRUNCATION_NOTE = "\n[output truncated: this step produced more than {limit} bytes of output; the rest was discarded]\n"

EventSink = Callable[[dict[str, Any]], None]


def strip_ansi(text: str) -> str:
    return ANSI_ESCAPE.sub("", text)


def resolve_control_chars(text: str) -> str:
    """Resolve ``\\r`` and ``\\b`` as Jupyter's front ends do.

    A carriage return discards what came before it on its line (progress bars keep their last
    state); a backspace erases the character before it.
    """
    if "\r" not in text and "\b" not in text:
        return text
    text = text.replace("\r\n", "\n")
    lines = []
    for line in text.split("\n"):
        if "\r" in line:
            line = line.rsplit("\r", 1)[1]
        if "\b" in line:
            chars: list[str] = []
            for ch in line:
                if ch == "\b":
                    if chars:
                        chars.pop()
                else:
                    chars.append(ch)
            line = "".join(chars)
        lines.append(line)
    return "\n".join(lines)


JSON_MIME = re.compile(r"^application/(.*\+)?json$")


def clean_bundle(data: Any) -> dict[str, Any]:
    """A mime bundle nbformat accepts: JSON types keep structure; other values become strings."""
    if not isinstance(data, dict):
        return {"text/plain": str(data)}
    cleaned: dict[str, Any] = {}
    for mime, value in data.items():
        if not isinstance(mime, str):
            continue
        if mime == "text/plain" and isinstance(value, str):
            cleaned[mime] = strip_ansi(value)
        elif isinstance(value, str) or JSON_MIME.match(mime):
            cleaned[mime] = value
        elif isinstance(value, list) and all(isinstance(line, str) for line in value):
            cleaned[mime] = "".join(value)
        else:
            cleaned[mime] = json.dumps(value, default=str)
    return cleaned


def utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _data_size(data: dict[str, Any]) -> int:
    return sum(utf8_size(v) if isinstance(v, str) else utf8_size(json.dumps(v, default=str)) for v in data.values())


class OutputCollector:
    """Accumulates the outputs of one execution, within a byte budget.

    ``sink`` (optional) receives streaming events as they arrive, in the agent API's
    NDJSON shape (``{"type": "stdout", "text": ...}`` and so on).
    """

    def __init__(self, limit_bytes: int, sink: EventSink | None = None):
        self.limit = limit_bytes
        self.sink = sink
        self.outputs: list[dict[str, Any]] = []
        self.used = 0
        self.truncated = False
        self.execution_count: int | None = None
        self._clear_pending = False

    # budget -----------------------------------------------------------------------------

    def _take(self, size: int) -> int:
        """How many of ``size`` units still fit in the budget; marks truncation."""
        room = max(self.limit - self.used, 0)
        taken = min(size, room)
        self.used += taken
        if taken < size:
            self.truncated = True
        return taken

    def _emit(self, event: dict[str, Any]) -> None:
        if self.sink is not None:
            self.sink(event)

    # message handling -------------------------------------------------------------------

    def handle(self, msg: dict[str, Any]) -> None:
        """Fold one iopub message into the outputs (status and execute_input are ignored)."""
        msg_type = msg["header"]["msg_type"]
        content = msg["content"]
        if msg_type == "stream":
            self._stream(content.get("name", "stdout"), content.get("text", ""))
        elif msg_type in ("display_data", "execute_result"):
            self._rich(msg, msg_type)
        elif msg_type == "error":
            self._error(content)
        elif msg_type == "update_display_data":
            self._update_display(content)
        elif msg_type == "clear_output":
            if content.get("wait"):
                self._clear_pending = True
            else:
                self.outputs.clear()

    def _apply_pending_clear(self) -> None:
        if self._clear_pending:
            self.outputs.clear()
            self._clear_pending = False

    def _stream(self, name: str, text: str) -> None:
        self._apply_pending_clear()
        if name not in ("stdout", "stderr"):
            name = "stdout"
        text = strip_ansi(text if isinstance(text, str) else str(text))
        if self.truncated:
            return
        size = utf8_size(text)
        kept = self._take(size)
        if kept < size:
            text = text.encode("utf-8")[:kept].decode("utf-8", "ignore") + TRUNCATION_NOTE.format(limit=self.limit)
        if self.outputs and self.outputs[-1]["output_type"] == "stream" and self.outputs[-1]["name"] == name:
            self.outputs[-1]["_chunks"].append(text)
        else:
            self.outputs.append({"output_type": "stream", "name": name, "_chunks": [text]})
        self._emit({"type": name, "text": text})

    def _rich(self, msg: dict[str, Any], msg_type: str) -> None:
        self._apply_pending_clear()
        content = msg["content"]
        if msg_type == "execute_result":
            self.execution_count = content.get("execution_count")
        data = clean_bundle(content.get("data", {}))
        metadata = content.get("metadata") if isinstance(content.get("metadata"), dict) else {}
        size = _data_size(data)
        if msg_type == "display_data" and (self.truncated or self._take(size) < size):
            return
        output: dict[str, Any] = {"output_type": msg_type, "data": data, "metadata": metadata}
        if msg_type == "execute_result":
            output["execution_count"] = content.get("execution_count")
        transient = content.get("transient") if isinstance(content.get("transient"), dict) else {}
        display_id = transient.get("display_id")
        if display_id:
            output["_display_id"] = display_id
        self.outputs.append(output)
        kind = "result" if msg_type == "execute_result" else "display"
        event: dict[str, Any] = {"type": kind, "data": data}
        if kind == "display":
            event["metadata"] = metadata
        self._emit(event)

    def _error(self, content: dict[str, Any]) -> None:
        self._apply_pending_clear()
        traceback = [strip_ansi(str(line)) for line in content.get("traceback", [])]
        output = {
            "output_type": "error",
            "ename": content.get("ename", ""),
            "evalue": strip_ansi(str(content.get("evalue", ""))),
            "traceback": traceback,
        }
        self.outputs.append(output)
        self._emit({"type": "error", "name": output["ename"], "value": output["evalue"],
                    "traceback": "\n".join(traceback)})

    def _update_display(self, content: dict[str, Any]) -> None:
        display_id = content.get("transient", {}).get("display_id")
        data = clean_bundle(content.get("data", {}))
        metadata = content.get("metadata") if isinstance(content.get("metadata"), dict) else {}
        size = _data_size(data)
        for output in self.outputs:
            if display_id and output.get("_display_id") == display_id:
                # Held to the step's budget as any output: what the new data adds must fit.
                old = _data_size(output["data"])
                if size > old and (self.truncated or self._take(size - old) < size - old):
                    self.truncated = True
                    continue
                self.used -= max(old - size, 0)
                output["data"] = data
                output["metadata"] = metadata
        self._emit({"type": "display", "data": data, "metadata": metadata})

    # results ----------------------------------------------------------------------------

    def finish(self) -> list[dict[str, Any]]:
        """The final nbformat outputs: streams joined and control characters resolved."""
        final = []
        for output in self.outputs:
            output = {k: v for k, v in output.items() if k != "_display_id"}
            if output["output_type"] == "stream":
                output["text"] = resolve_control_chars(strip_ansi("".join(output.pop("_chunks"))))
            final.append(output)
        return final


def summarise(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """The Execution fields derived from outputs: ``stdout``, ``stderr``, ``result``, ``error``."""
    stdout = "".join(o["text"] for o in outputs if o["output_type"] == "stream" and o["name"] == "stdout")
    stderr = "".join(o["text"] for o in outputs if o["output_type"] == "stream" and o["name"] == "stderr")
    result = None
    error = None
    for output in outputs:
        if output["output_type"] == "execute_result":
            result = output.get("data", {}).get("text/plain")
        elif output["output_type"] == "error":
            error = {"name": output["ename"], "value": output["evalue"], "traceback": "\n".join(output["traceback"])}
    return {"stdout": stdout, "stderr": stderr, "result": result, "error": error}


PACKAGES_MIME = "application/vnd.agent-gateway.packages+json"
PACKAGES_MAX = 2000


def reported_packages(outputs: list[dict[str, Any]]) -> dict[str, str] | None:
    """The packages a step's ``%pip`` reported in the session's own layer (the environments'
    kernel extension displays them as ``PACKAGES_MIME``), as ``{name: version}``; None when it
    reported none. It is the kernel's word: names and versions are bounded, anything else dropped."""
    for output in reversed(outputs):
        report = (output.get("data") or {}).get(PACKAGES_MIME) if output.get("output_type") == "display_data" else None
        if not isinstance(report, dict) or not isinstance(report.get("packages"), dict):
            continue
        packages = {name[:200]: version[:100] for name, version in list(report["packages"].items())[:PACKAGES_MAX]
                    if isinstance(name, str) and isinstance(version, str) and name}
        return dict(sorted(packages.items()))
    return None
