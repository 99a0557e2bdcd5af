"""The kinds of audit events, listed once: the recorder refuses any other, and docs/api.md's
event table documents each (a test checks both ways).

Every event is in the session's (or, for gateway-wide ones, the gateway's) hash chain; which of
them shape a notebook cell is the notebook's business (``gateway.notebook``).
"""

from __future__ import annotations

EVENTS: dict[str, str] = {
    "session_created": "a session was created (its kernel, labels, env names, origin, parent, isolation)",
    "execute": "a step ended (one per step; its final status)",
    "silent_execution": "a websocket client ran code silently (no step)",
    "silent_input": "what a websocket client typed for a silent execution's input()",
    "pause_failed": "a pause could not save the state; the session stayed live",
    "file_upload": "a file was put into the workspace",
    "file_delete": "a file or directory was deleted from the workspace",
    "interrupt": "an interrupt was asked for",
    "kernel_restarted": "the kernel was replaced on request (or replacing one that died)",
    "kernel_died": "the kernel process ended by itself; a new one was started",
    "limit_exceeded": "a limit of the session was hit",
    "session_paused": "the session was paused (its state saved)",
    "session_resumed": "the session was resumed (its state restored or replayed)",
    "session_forked": "a fork of this session was made",
    "state_restored": "this session (a fork) got its parent's state",
    "session_reattached": "the kernel was taken up again after a crash of the gateway",
    "jupyter_attached": "a websocket client attached to the kernel",
    "jupyter_detached": "a websocket client went away",
    "jupyter_released": "the Jupyter API let go of an agent's session",
    "session_terminated": "the session was ended on request",
    "session_failed": "the session ended by a failure",
    "workspace_removed": "retention removed an ended session's files",
    "environment_changed": "the kernel started in another build of its environment than before (its lock was changed and rebuilt)",
    "egress": "the kernel tried to reach a host through the egress proxy (host, port, allowed or refused and why, bytes each way)",
    "packages_installed": "a step's %pip installed packages into the session's own layer (the packages there, as its kernel reported them)",
    "egress_rules_changed": "an admin changed the hosts the session's kernel may reach (before, after)",
    "mcp_call": "an MCP client called a tool on this session (the tool; a step it ran is recorded as a step with source mcp)",
    "replay_report": "this session (a replay) judged each step of its source",
    "auth_failed": "a request without a valid token (gateway-wide)",
    "access_denied": "a request refused for its caller (gateway-wide), or a read-only client's request",
    "ui_login": "a login to the reviewer's pages (gateway-wide)",
}


def check_kind(action: str) -> str:
    """``action`` if it is a known kind of event; a typo fails loudly instead of being recorded."""
    if action not in EVENTS:
        raise ValueError(f"{action!r} is not a kind of audit event (gateway.events.EVENTS)")
    return action
