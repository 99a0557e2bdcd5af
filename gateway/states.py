"""The session states, listed once, and the one error for a session that has ended.

A session is *live* while it has a kernel (``starting``, ``idle``, ``busy``: Jupyter's
execution states), ``paused`` while its state waits in a snapshot, and *ended* (``terminated``
or ``failed``) for good: its trajectory and files stay, it runs nothing more.
"""

from __future__ import annotations

from gateway.errors import Conflict

STATES: dict[str, str] = {
    "starting": "its kernel is being started",
    "idle": "its kernel waits for the next step",
    "busy": "its kernel runs a step",
    "paused": "no kernel; its state is in a snapshot, restored at resume",
    "terminated": "ended by a request; its trajectory and files are kept",
    "failed": "ended by a failure (the reason says which); its trajectory and files are kept",
}
LIVE = ("starting", "idle", "busy")
PAUSED = "paused"
ENDED = ("terminated", "failed")


def ended_error(session_id: str, state: str, message: str) -> Conflict:
    """The 409 ``session_ended`` for a request the session's state does not allow."""
    return Conflict(message, code="session_ended", details={"session_id": session_id, "state": state})
