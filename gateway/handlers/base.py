"""The one base handler: authentication, request bodies, JSON responses and the error envelope."""

from __future__ import annotations

import functools
import json
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import tornado.web
from tornado.iostream import StreamClosedError

from gateway.api_spec import Body, Param
from gateway.auth import Principal
from gateway.errors import GatewayError, InvalidRequest, NotFound, PayloadTooLarge
from gateway.inputs import check_arguments, decoded, parse_json

if TYPE_CHECKING:
    from gateway.server import Gateway

log = logging.getLogger(__name__)
access_log = logging.getLogger("gateway.access")

TOKEN_PARAMETER = "token"
DRAIN_LIMIT = 1024 * 1024
STATUS_CODES = {400: "bad_request", 401: "invalid_token", 403: "forbidden", 404: "route_not_found",
                405: "method_not_allowed", 413: "body_too_large", 500: "internal_error"}


def query_parameters(query: str) -> list[tuple[str, str, str]]:
    """Each ``&``-separated part of a query string, with its name and value percent-decoded
    (``tok%65n`` is ``token``). The one reading of a query shared by the token lookup and the
    log scrubber, so that whatever is taken as a token is also redacted."""
    parts = []
    for part in query.split("&"):
        pairs = parse_qsl(part, keep_blank_values=True)
        name, value = pairs[0] if pairs else ("", "")
        parts.append((part, name, value))
    return parts


def scrub(uri: str) -> str:
    """A request URI with the value of any parameter named ``token`` (once decoded, in any case)
    replaced by ``[redacted]``, fit for logs."""
    path, mark, query = uri.partition("?")
    if not mark:
        return uri
    return path + mark + "&".join(
        f"{part.partition('=')[0]}=[redacted]" if name.strip().lower() == TOKEN_PARAMETER else part
        for part, name, _ in query_parameters(query))


def log_request(handler: tornado.web.RequestHandler) -> None:
    """The access log: method, scrubbed URI, status, time. Never a token."""
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if access_log.isEnabledFor(level):
        access_log.log(level, "%d %s %s %.2fms", status, handler.request.method, scrub(handler.request.uri or ""),
                       1000.0 * handler.request.request_time())


class BodyBuffer:
    """Collects a request body up to a limit; past it, remembers only that it was too large."""

    def __init__(self, limit: int):
        self.limit = limit
        self.size = 0
        self.chunks: list[bytes] = []
        self.too_large = False

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            self.too_large = True
            self.chunks.clear()
        elif not self.too_large:
            self.chunks.append(chunk)

    def close(self) -> None:
        self.chunks.clear()


@tornado.web.stream_request_body
class BaseHandler(tornado.web.RequestHandler):
    """Every route's handler derives from this. ``public = True`` skips authentication."""

    public = False
    gateway: "Gateway"

    def initialize(self, gateway: "Gateway") -> None:
        self.gateway = gateway
        self.principal: Principal | None = None
        self.body_sink: Any = None

    # request side -----------------------------------------------------------------------

    def body_limit(self) -> int:
        return self.gateway.settings.max_body_bytes

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("get", "post", "put", "delete"):
            if name in cls.__dict__:
                setattr(cls, name, _after_body(cls.__dict__[name]))

    def prepare(self) -> None:
        stream = getattr(self.request.connection, "stream", None)
        if stream is not None and not getattr(stream, "_gateway_nodelay", False):
            stream.set_nodelay(True)
            stream._gateway_nodelay = True
        self.gateway.metrics.requests += 1
        self.deferred_error: GatewayError | None = None
        length_header = self.request.headers.get("Content-Length", "0")
        length = int(length_header) if length_header.isascii() and length_header.isdigit() else 0
        try:
            if not self.public:
                self.principal = self.gateway.auth.authenticate(self.request_token())
            self.check_url_arguments()
            limit = self.body_limit()
            if length > limit:
                raise self.too_large(limit)
            self.body_sink = self.open_body_sink(limit)
        except GatewayError as exc:
            if length > DRAIN_LIMIT or "chunked" in self.request.headers.get("Transfer-Encoding", ""):
                self.set_header("Connection", "close")
                raise
            # Read the (small) body before answering, so the client sees the error, not a reset.
            self.deferred_error = exc
            self.body_sink = BodyBuffer(0)

    def open_body_sink(self, limit: int) -> Any:
        return BodyBuffer(limit)

    def data_received(self, chunk: bytes) -> None:
        sink = self.body_sink
        if sink is None:
            return
        sink.write(chunk)
        if sink.too_large and sink.size > DRAIN_LIMIT and not self._finished:
            # A body that keeps coming past its limit is not read to the end: answer and close.
            self.body_sink = None
            sink.close()
            exc = self.too_large(self.body_limit())
            self.set_header("Connection", "close")
            self.send_error(exc.status, exc_info=(type(exc), exc, None))

    def too_large(self, limit: int) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body is larger than this server's limit of {limit} bytes.",
                               details={"limit_bytes": limit})

    def on_connection_close(self) -> None:
        if self.body_sink is not None:
            self.body_sink.close()

    def request_token(self) -> str | None:
        return request_token(self)

    def decode_argument(self, value: bytes, name: str | None = None) -> str:
        """Path arguments and query or form values as text; bytes that are not UTF-8 are kept
        as lone surrogates, which ``check_url_arguments`` and the pages' forms refuse with the
        JSON envelope (tornado's own decoding answers a bare 400)."""
        return decoded(value)

    def check_url_arguments(self) -> None:
        """Every path argument and query parameter must be UTF-8 text once percent-decoded."""
        raw_path = {name: [value.encode("utf-8", "surrogateescape")] for name, value in self.path_kwargs.items()}
        check_arguments(raw_path, code="invalid_field", noun="part of the URL")
        check_query(self)

    def require_body_within_limit(self) -> None:
        if self.body_sink is not None and self.body_sink.too_large:
            raise self.too_large(self.body_limit())

    def body_bytes(self) -> bytes:
        self.require_body_within_limit()
        return b"".join(self.body_sink.chunks) if self.body_sink is not None else b""

    def json_value(self) -> Any:
        """The body as JSON (``{}`` when empty), checked: not too deep, numbers that fit a float,
        every string Unicode text (``gateway.inputs``)."""
        raw = self.body_bytes()
        return parse_json(raw) if raw.strip() else {}

    def json_body(self, body: Body) -> dict[str, Any]:
        """The body as a JSON object whose fields are all known and of the right types."""
        fields, required = body.types, body.required
        data = self.json_value()
        if not isinstance(data, dict):
            raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
        unknown = sorted(set(data) - set(fields))
        if unknown:
            allowed = ", ".join(sorted(fields)) if fields else "none (send no body)"
            raise InvalidRequest(f"Unknown field(s): {', '.join(unknown)}. Allowed: {allowed}.",
                                 code="unknown_field", details={"fields": unknown, "allowed": sorted(fields)})
        for name in required:
            if data.get(name) is None:
                raise InvalidRequest(f"The field '{name}' is required.", code="missing_field", details={"field": name})
        for name, value in data.items():
            expected = fields[name]
            if value is None:
                continue
            if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
                names = " or ".join(t.__name__ for t in expected)
                raise InvalidRequest(f"The field '{name}' must be of type {_json_type(names)}.",
                                     code="invalid_field", details={"field": name})
        return data

    def int_query(self, param: Param) -> int:
        """A whole-number query parameter within its declared bounds."""
        name, default, low, high = param.name, param.default, param.minimum, param.maximum
        assert isinstance(default, int) and low is not None and high is not None
        raw = self.get_query_argument(name, None)
        if raw is None:
            return default
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 18) or not low <= int(raw) <= high:
            raise InvalidRequest(f"The query parameter '{name}' must be a whole number from {low} to {high}.",
                                 code="invalid_query", details={"parameter": name})
        return int(raw)

    # response side ----------------------------------------------------------------------

    def write_json(self, data: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        write_error_envelope(self, status_code, kwargs.get("exc_info", (None, None, None))[1])

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        log_handler_exception(self, typ, value, tb)

    def on_finish(self) -> None:
        if self.body_sink is not None:
            self.body_sink.close()


def request_token(handler: tornado.web.RequestHandler) -> str | None:
    """The token of a request: ``Authorization: Bearer|token <t>``, else ``?token=`` (its name
    percent-decoded, as ``scrub`` reads it; the last one wins, as in tornado)."""
    header = handler.request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() in ("bearer", "token") and value.strip():
        return value.strip()
    values = [value for _, name, value in query_parameters(handler.request.query) if name == TOKEN_PARAMETER]
    token = values[-1].strip() if values else ""
    return token or None


def check_query(handler: tornado.web.RequestHandler) -> None:
    """Refuse a request whose query parameters are not UTF-8 text (``invalid_query``)."""
    check_arguments(handler.request.query_arguments, code="invalid_query", noun="query parameter")


def write_error_envelope(handler: tornado.web.RequestHandler, status_code: int, exc: BaseException | None) -> None:
    """Finish ``handler`` with the JSON error envelope for ``exc`` (API.md, errors)."""
    if isinstance(exc, GatewayError):
        error = exc
        handler.set_status(exc.status)
    elif isinstance(exc, tornado.web.HTTPError):
        error = GatewayError(exc.log_message or handler._reason, code=STATUS_CODES.get(status_code, "http_error"))
    elif status_code == 500:
        error = GatewayError("The gateway hit an internal error; it was logged. Retry, or report it with the time.")
    else:
        error = GatewayError(handler._reason, code=STATUS_CODES.get(status_code, "http_error"))
    if error.status in (401, 403) or error.code in REFUSAL_CODES:
        audit_refusal(handler, error)
    if error.status == 401:
        handler.set_header("WWW-Authenticate", 'Bearer realm="agent-gateway"')
    if "retry_after" in error.details:
        handler.set_header("Retry-After", str(int(error.details["retry_after"])))
    handler.clear_header("Content-Disposition")
    handler.set_header("Content-Type", "application/json")
    handler.finish(json.dumps(error.envelope()))


REFUSAL_CODES = ("session_not_found", "kernel_not_found")


def audit_refusal(handler: tornado.web.RequestHandler, error: GatewayError) -> None:
    """Record a refused request in the audit log (rate-limited, so a flood cannot fill it)."""
    gateway = getattr(handler, "gateway", None)
    if gateway is None:
        return
    principal = getattr(handler, "principal", None)
    record_refusal(gateway, principal, error, {"method": handler.request.method, "path": handler.request.path,
                                               "remote_ip": handler.request.remote_ip})


def record_refusal(gateway: "Gateway", principal: Principal | None, error: GatewayError,
                   where: dict[str, Any]) -> None:
    """The audit event of a refusal, on any face (rate-limited)."""
    dropped = gateway.refusals.allow()
    if dropped is None:
        return
    details = {"status": error.status, "code": error.code, **where}
    if dropped:
        details["dropped_before"] = dropped
    action = "auth_failed" if error.status == 401 else "access_denied"
    gateway.sessions.recorder.record_event(None, action, principal.name if principal else None, details)


def log_handler_exception(handler: tornado.web.RequestHandler, typ: Any, value: Any, tb: Any) -> None:
    """Log a failed request without its token: expected errors quietly, others with a traceback."""
    where = f"{handler.request.method} {scrub(handler.request.uri or '')}"
    if isinstance(value, (GatewayError, tornado.web.HTTPError)):
        log.debug("%s: %s", where, value)
    elif isinstance(value, StreamClosedError):
        log.info("%s: the client went away", where)
    else:
        log.error("%s failed", where, exc_info=(typ, value, tb))


def _after_body(method: Any) -> Any:
    """Wraps a handler method: an error found before the body was read is raised now."""

    @functools.wraps(method)
    async def run(self: BaseHandler, *args: Any, **kwargs: Any) -> Any:
        if self.deferred_error is not None:
            raise self.deferred_error
        result = method(self, *args, **kwargs)
        if result is not None and hasattr(result, "__await__"):
            result = await result
        return result

    return run


class NotFoundHandler(BaseHandler):
    """Any path no route claims. Answered once the body is read, like every error found in
    ``prepare``: answering earlier would close a keep-alive connection under the client."""

    public = True

    def prepare(self) -> None:
        super().prepare()
        if self.deferred_error is None:
            self.deferred_error = NotFound(f"There is no route {self.request.path}. See docs/api.md for the routes.",
                                           code="route_not_found", details={"path": self.request.path})

    async def get(self, *args: Any, **kwargs: Any) -> None:
        assert self.deferred_error is not None
        raise self.deferred_error

    post = put = delete = patch = head = options = get


def _json_type(names: str) -> str:
    return (names.replace("str", "string").replace("dict", "object").replace("list", "array")
            .replace("float", "number").replace("int", "integer").replace("bool", "boolean"))
