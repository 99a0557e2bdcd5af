"""Who may see, change and create sessions: the one access policy.

Every face (the agent API, the Jupyter API and its websocket, the reviewer's pages, replay)
and the lifecycle (resume, fork) ask here. The roles: an ``agent`` sees and changes its own
sessions; a ``reviewer`` sees every session and changes none (it watches a kernel's websocket
read-only, and creates nothing, so it cannot fork or replay either); an ``admin`` sees and
changes every session, may loosen a session's isolation, and may end an agent's session
through the Jupyter API. A session someone may not see does not exist for them (404); one
they may see but not change is a 403.
"""

from __future__ import annotations


from gateway.auth import Principal
from gateway.errors import Forbidden, NotFound
from gateway.records import SessionRecord


def sees_every_session(principal: Principal) -> bool:
    return principal.role in ("admin", "reviewer")


def may_see(principal: Principal, owner: str) -> bool:
    return sees_every_session(principal) or owner == principal.name


def may_change(principal: Principal, owner: str) -> bool:
    return principal.role == "admin" or owner == principal.name


def may_create(principal: Principal) -> bool:
    """Create sessions: new ones, forks, replays."""
    return principal.role != "reviewer"


def may_loosen_isolation(principal: Principal) -> bool:
    """Choose another profile or higher limits than the server's defaults for a session."""
    return principal.role == "admin"


def may_set_egress(principal: Principal) -> bool:
    """Choose which hosts a session's kernel may reach (at its creation, or while it exists)."""
    return principal.role == "admin"


def check_set_egress(principal: Principal, session_id: str) -> None:
    """``Forbidden`` unless the principal may change the session's egress rules."""
    if not may_set_egress(principal):
        raise Forbidden(f"Only an admin may change the egress rules of session '{session_id}'.",
                        details={"session_id": session_id, "field": "rules"})


def may_end_from_jupyter(principal: Principal, record: SessionRecord) -> bool:
    """End a session through ``DELETE /api/kernels/{id}``: one created there, or any by an admin."""
    return record.origin == "jupyter" or principal.role == "admin"


def check_seen(principal: Principal, session_id: str, record: SessionRecord | None) -> SessionRecord:
    """``record`` if the principal may see that session; else ``NotFound`` (also for none)."""
    if record is None or not may_see(principal, record.owner):
        raise NotFound(f"There is no session '{session_id}'. List yours with GET /v1/sessions.",
                       code="session_not_found", details={"session_id": session_id})
    return record


def check_change(principal: Principal, session_id: str, record: SessionRecord, verb: str = "change") -> None:
    """``Forbidden`` unless the principal may change the session (``verb``: what it asked)."""
    if not may_change(principal, record.owner):
        raise Forbidden(f"The {principal.role} '{principal.name}' may read session '{session_id}' but not {verb} it.",
                        details={"session_id": session_id})


def check_create(principal: Principal, what: str = "create them") -> None:
    """``Forbidden`` unless the principal may create sessions (``what``: how it asked to)."""
    if not may_create(principal):
        raise Forbidden(f"Reviewers read sessions; they cannot {what}.")
