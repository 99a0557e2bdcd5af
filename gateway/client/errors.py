"""The gateway's error envelope as exceptions: each carries the HTTP status and the server's
``code``, ``message`` and ``details`` (docs/api.md, "Authentication and errors")."""

from __future__ import annotations

import json
from typing import Any

import httpx


class GatewayError(Exception):
    """An error answer of the gateway (or a transport failure, with ``status`` 0)."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details or {}


class InvalidRequestError(GatewayError):
    """400: the request was malformed or named something invalid; nothing was changed."""


class AuthenticationError(GatewayError):
    """401: no valid token or JWT."""


class PermissionDeniedError(GatewayError):
    """403: the principal may see the session but not do this (a reviewer)."""


class NotFoundError(GatewayError):
    """404: no such session or file, for this principal."""


class ConflictError(GatewayError):
    """409: the session's state does not allow this now."""


class SessionEndedError(ConflictError):
    """409 ``session_ended``: the session is terminated or failed; it runs nothing more."""


class StateNotSavedError(ConflictError):
    """409 ``state_not_saved``: a pause or fork could not save the state; the session is unchanged."""


class PayloadTooLargeError(GatewayError):
    """413: a body or file over its limit."""


class UnavailableError(GatewayError):
    """503: shutting down, at capacity, or a kernel could not be started; retry later."""


class WorkspaceFullError(GatewayError):
    """507 ``workspace_full``: the session's workspace is over its limit; delete files."""


BY_STATUS: dict[int, type[GatewayError]] = {
    400: InvalidRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
    409: ConflictError, 413: PayloadTooLargeError, 503: UnavailableError, 507: WorkspaceFullError,
}
BY_CODE: dict[str, type[GatewayError]] = {"session_ended": SessionEndedError, "state_not_saved": StateNotSavedError}


def from_response(response: httpx.Response) -> GatewayError:
    """The exception for an error response (its body read)."""
    try:
        error = json.loads(response.content)["error"]
        code, message, details = str(error["code"]), str(error["message"]), error.get("details") or {}
    except (ValueError, KeyError, TypeError):
        code, message, details = "http_error", response.text[:500] or response.reason_phrase, {}
    kind = BY_CODE.get(code) or BY_STATUS.get(response.status_code, GatewayError)
    return kind(response.status_code, code, message, details)
