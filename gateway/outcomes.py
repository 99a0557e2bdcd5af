"""What a finished execution means for its step: the status and the error the agent sees."""

from __future__ import annotations

from typing import Any

from gateway.executor import RawExecution
from gateway.outputs import strip_ansi


def step_outcome(raw: RawExecution, aborted_by: str | None, interrupt_requested: bool, limit: float,
                 exit_description: str) -> tuple[str, dict[str, Any] | None]:
    """The step's status and, when it did not succeed, its error.

    ``aborted_by`` says what cut the wait short ("restart", "terminated", ...), if anything.
    """
    if raw.ended == "died":
        return "died", _error("KernelDied", (
            f"The kernel process ended during this step ({exit_description}). A new kernel was started "
            "for this session: variables and imports are gone; files in the workspace are kept."))
    if raw.ended in ("timeout", "stuck"):
        tail = ("The kernel was interrupted; the session's variables are kept." if raw.ended == "timeout" else
                "The kernel ignored the interrupt and was restarted: variables and imports are gone; files are kept.")
        return "timeout", _error("Timeout", f"The step did not finish within its {limit:g} s time limit. {tail}")
    if raw.ended == "aborted":
        why = aborted_by or "stopped"
        message = {"restart": "The kernel was restarted during this step: variables and imports are gone."}.get(
            why, f"The session was {why} during this step.")
        return "interrupted", _error("Interrupted", message)
    reply = raw.reply or {}
    if reply.get("status") == "ok":
        return "ok", None
    if reply.get("status") == "aborted":
        return "error", _error("Aborted", "The kernel aborted this step without running it.")
    error = _error(reply.get("ename", "Error"), strip_ansi(reply.get("evalue", "")),
                   "\n".join(strip_ansi(line) for line in reply.get("traceback", [])))
    if interrupt_requested and reply.get("ename") == "KeyboardInterrupt":
        return "interrupted", error
    return "error", error


def _error(name: str, value: str, traceback: str = "") -> dict[str, Any]:
    return {"name": name, "value": value, "traceback": traceback}
