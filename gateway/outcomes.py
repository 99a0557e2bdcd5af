"""What an execution means for its step: the status and the error the agent sees.

The one list of step statuses is ``STATUSES``; which of them a rerun runs again, and which
did not run to their end, are named here too, so that the recorder, the notebook, replay and
resume-by-replay apply the same rules.
"""

from __future__ import annotations

from typing import Any

from gateway.executor import RawExecution
from gateway.outputs import strip_ansi

RUNNING = "running"
NOT_RUN = "not_run"
LOST = "lost"

STATUSES: dict[str, str] = {
    RUNNING: "recorded before the kernel received it; not finished yet",
    "ok": "the code ran to its end",
    "error": "the code raised an exception",
    "timeout": "over its time limit; stopped by an interrupt (or by a restart when the interrupt did not stop it)",
    "interrupted": "stopped by an interrupt, a restart, a pause or the end of the session",
    "died": "the kernel process ended during the step",
    NOT_RUN: "the kernel aborted the request without running it (a request before it failed)",
    LOST: "the gateway stopped while the step was running; its end was not seen",
}
FINAL_STATUSES = tuple(status for status in STATUSES if status != RUNNING)
RERUN_STATUSES = ("ok", "error")  # ran to their end: replay and resume-by-replay run them again
UNFINISHED_STATUSES = ("timeout", "interrupted", "died", LOST)  # began, but did not run to their end


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
        return NOT_RUN, _error("Aborted", (
            "The kernel did not run this request: it aborted it, as it does with the requests waiting behind "
            "one that raised an error (stop_on_error)."))
    error = _error(reply.get("ename", "Error"), strip_ansi(reply.get("evalue", "")),
                   "\n".join(strip_ansi(line) for line in reply.get("traceback", [])))
    if interrupt_requested and reply.get("ename") == "KeyboardInterrupt":
        return "interrupted", error
    return "error", error


def lost_outcome(kernel_reattached: bool) -> tuple[str, dict[str, Any]]:
    """The outcome of a step found ``running`` when the gateway starts again after a crash;
    ``kernel_reattached`` says whether the session's kernel was found alive and reattached."""
    after = ("Its kernel was found alive afterwards and reattached: the step may have run in part or to its end, "
             "so what it did may be in the session's variables." if kernel_reattached else
             "Its kernel was not found alive afterwards: what the step did to variables is gone; files it wrote in "
             "the workspace are kept.")
    return LOST, _error("GatewayStopped", "The gateway stopped while this step was running, so its end and its "
                                          f"outputs were not recorded. {after}")


def _error(name: str, value: str, traceback: str = "") -> dict[str, Any]:
    return {"name": name, "value": value, "traceback": traceback}
