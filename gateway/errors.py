"""The gateway's exceptions, turned into the JSON error envelope by the base handler.

Services raise these, never HTTP errors. The tree::

    GatewayError (500 internal_error)
    ├── InvalidRequest (400): invalid_json, invalid_field, unknown_field, missing_field,
    │                         invalid_path, unknown_kernel, invalid_query
    ├── AuthenticationRequired (401): missing_token, invalid_token
    ├── Forbidden (403): forbidden
    ├── NotFound (404): session_not_found, file_not_found, route_not_found
    ├── MethodNotAllowed (405): method_not_allowed
    ├── Conflict (409): session_ended, is_a_directory
    ├── PayloadTooLarge (413): body_too_large
    ├── InsufficientStorage (507): workspace_full
    └── Unavailable (503): kernel_start_failed, shutting_down, environment_not_built,
                           image_not_built, engine_unavailable
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """Base of every error the gateway reports; carries an HTTP status, a code and details."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details: dict[str, Any] = details or {}

    def envelope(self) -> dict[str, Any]:
        """The JSON body of the error response (API.md, "Authentication and errors")."""
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class InvalidRequest(GatewayError):
    """The request is malformed or names something invalid; nothing was changed."""

    status = 400
    code = "invalid_request"


class AuthenticationRequired(GatewayError):
    """No token, or a token the gateway does not know."""

    status = 401
    code = "invalid_token"


class Forbidden(GatewayError):
    """The principal is known but may not do this."""

    status = 403
    code = "forbidden"


class NotFound(GatewayError):
    """The session, file or route does not exist (or is not visible to the caller)."""

    status = 404
    code = "not_found"


class MethodNotAllowed(GatewayError):
    """The route exists but not with this HTTP method."""

    status = 405
    code = "method_not_allowed"


class Conflict(GatewayError):
    """The request conflicts with the current state of the session."""

    status = 409
    code = "conflict"


class PayloadTooLarge(GatewayError):
    """The request body exceeds the configured limit."""

    status = 413
    code = "body_too_large"


class InsufficientStorage(GatewayError):
    """The session's workspace is at its size limit."""

    status = 507
    code = "workspace_full"


class Unavailable(GatewayError):
    """The gateway cannot serve this now (kernel failed to start, shutting down)."""

    status = 503
    code = "unavailable"
