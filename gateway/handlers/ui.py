"""The reviewer's pages under /ui/: server-rendered HTML, no front-end build.

A person logs in with a token once; it is kept in a signed, HttpOnly, SameSite=Strict cookie
scoped to /ui/ and checked again on every request (a revoked token logs out at once). Every
form carries tornado's XSRF token. Requests with an ``Authorization`` header are accepted too
(they cannot be forged by another site). Roles apply exactly as on the API: the pages read
through the same session manager calls, with the same principal.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote, urlencode

import tornado.httputil
import tornado.web

from gateway import states
from gateway.auth import Principal
from gateway.errors import AuthenticationRequired, Forbidden, GatewayError, InvalidRequest
from gateway.handlers.base import BaseHandler, audit_refusal, request_token
from gateway.handlers.files import send_file
from gateway.handlers.sessions import SID
from gateway.inputs import check_arguments
from gateway.ui_render import render_outputs, shown_values

LOGIN_COOKIE = "agent_gateway_login"
LOGIN_MAX_AGE_DAYS = 0.5
PAGE_SIZE = 50
PAGE_FILES = 200  # the session page shows the first files; the API pages through the rest
FORM_BODY_LIMIT = 64 * 1024
CONTENT_SECURITY_POLICY = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
                           "frame-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
XSRF_COOKIE_KWARGS = {"httponly": True, "samesite": "Strict", "path": "/ui/"}


class LoginRequired(AuthenticationRequired):
    """No valid login: pages redirect to the login form, forms answer 401."""


class UiHandler(BaseHandler):
    """Base of every page: cookie or header authentication, HTML errors, security headers."""

    public = True
    requires_login = True

    def body_limit(self) -> int:
        return FORM_BODY_LIMIT

    def prepare(self) -> None:
        self.started = time.perf_counter()
        super().prepare()
        self.set_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("Cache-Control", "no-store")
        if self.requires_login and self.deferred_error is None:
            self.principal = self.logged_in()
            if self.principal is None:
                # Answered once the (empty) body is read, like every error found in prepare.
                self.deferred_error = LoginRequired("Log in first.", code="missing_token")

    def logged_in(self) -> Principal | None:
        """The principal of the request's header token, else of its login cookie, else None."""
        header_token = request_token(self) if "Authorization" in self.request.headers else None
        cookie = self.get_signed_cookie(LOGIN_COOKIE, max_age_days=LOGIN_MAX_AGE_DAYS)
        token = header_token or (cookie.decode("utf-8") if cookie else None)
        if token is None:
            return None
        try:
            return self.gateway.auth.authenticate(token)
        except GatewayError as exc:
            if header_token:
                raise
            audit_refusal(self, exc)
            self.clear_cookie(LOGIN_COOKIE, path="/ui/")
            return None

    def form(self) -> None:
        """Parse the (size-limited) form body and check its XSRF token."""
        tornado.httputil.parse_body_arguments(self.request.headers.get("Content-Type", ""), self.body_bytes(),
                                              self.request.body_arguments, self.request.files)
        for name, values in self.request.body_arguments.items():
            self.request.arguments.setdefault(name, []).extend(values)
        try:
            self.check_xsrf_cookie()
        except tornado.web.HTTPError:
            raise Forbidden("The form is missing its XSRF token or the token does not match; reload the page "
                            "and submit it again.") from None
        check_arguments(self.request.body_arguments, code="invalid_field", noun="form field")

    def page(self, template: str, status: int = 200, **values: Any) -> None:
        """Render ``template``; every string in ``values`` is made fit to show first (``shown``)."""
        self.set_status(status)
        html = self.render_string(template, principal=self.principal, short=short, status=status,
                                  **shown_values(values))
        self.set_header("Server-Timing", f"render;dur={1000 * (time.perf_counter() - self.started):.1f}")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(html)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, LoginRequired) and self.request.method == "GET":
            self.redirect(f"/ui/login?next={quote(self.request.uri or '/ui/', safe='')}")
            return
        if isinstance(exc, GatewayError):
            message, code, status_code = exc.message, exc.code, exc.status
            if exc.status in (401, 403):
                audit_refusal(self, exc)
        elif status_code == 500:
            message, code = "The gateway hit an internal error; it was logged.", "internal_error"
        else:
            message, code = self._reason, "http_error"
        self.clear_header("Content-Disposition")
        self.page("ui/error.html", status=status_code, message=message, code=code, reason=self._reason)


class LoginPage(UiHandler):
    """GET shows the token form; POST checks the token and sets the login cookie."""

    requires_login = False

    def get(self) -> None:
        self.page("ui/login.html", next_url=safe_next(self.get_query_argument("next", None)), error=None)

    def post(self) -> None:
        self.form()
        token = self.get_body_argument("token", "").strip()
        next_url = safe_next(self.get_body_argument("next", None))
        try:
            principal = self.gateway.auth.authenticate(token or None)
        except GatewayError as exc:
            audit_refusal(self, exc)
            self.page("ui/login.html", status=401, next_url=next_url, error="That token is not valid.")
            return
        self.set_signed_cookie(LOGIN_COOKIE, token, expires_days=None, path="/ui/", httponly=True,
                               samesite="Strict", secure=self.request.protocol == "https")
        self.gateway.sessions.recorder.record_event(None, "ui_login", principal.name,
                                                    {"remote_ip": self.request.remote_ip})
        self.redirect(next_url, status=303)


class LogoutPage(UiHandler):
    def post(self) -> None:
        self.form()
        self.clear_cookie(LOGIN_COOKIE, path="/ui/")
        self.redirect("/ui/login", status=303)


class IndexPage(UiHandler):
    requires_login = False

    def get(self) -> None:
        self.redirect("/ui/sessions")


class SessionsPage(UiHandler):
    """The sessions the principal may see, newest first, filtered and paged."""

    def get(self) -> None:
        assert self.principal is not None
        state = self.get_query_argument("state", "") or None
        if state is not None and state not in states.STATES:
            raise InvalidRequest(f"'state' must be one of {', '.join(states.STATES)}.", code="invalid_query")
        owner = self.get_query_argument("owner", "").strip() or None
        label_text = self.get_query_argument("label", "").strip()
        label = None
        if label_text:
            key, sep, value = label_text.partition(":")
            if not sep or not key:
                raise InvalidRequest("The label filter must look like key:value.", code="invalid_query")
            label = (key, value)
        cursor = self.get_query_argument("cursor", None)
        listing = self.gateway.sessions.list_sessions(self.principal, state=state, label=label, owner=owner,
                                                      limit=PAGE_SIZE, cursor=cursor)
        filters = {k: v for k, v in (("state", state), ("owner", owner), ("label", label_text)) if v}
        next_url = f"/ui/sessions?{urlencode({**filters, 'cursor': listing['next']})}" if listing["next"] else None
        self.page("ui/sessions.html", sessions=listing["sessions"], states=states.STATES, filters=filters,
                  next_url=next_url, first_url=f"/ui/sessions?{urlencode(filters)}" if cursor else None)


class SessionPage(UiHandler):
    """One session: its trajectory rendered as a notebook, files, audit events, how to attach."""

    async def get(self, session_id: str) -> None:
        assert self.principal is not None
        sessions = self.gateway.sessions
        session = sessions.get(self.principal, session_id)
        timeline = sessions.timeline(self.principal, session_id)
        try:
            listing = await (await sessions.workspace(self.principal, session_id)).list(limit=PAGE_FILES)
            files, more_files = listing.files, listing.next is not None
        except GatewayError:
            files, more_files = [], False
        events = sessions.events(self.principal, session_id)
        base_url = f"{self.request.protocol}://{self.request.host}"
        environment = sessions.visible(self.principal, session_id).environment
        self.page("ui/session.html", session=session, timeline=timeline, files=files,
                  more_files=more_files, events=events, environment=environment,
                  render_outputs=render_outputs, base_url=base_url, quote=quote)


class NotebookDownload(UiHandler):
    def get(self, session_id: str) -> None:
        assert self.principal is not None
        text = self.gateway.sessions.notebook(self.principal, session_id)
        self.set_header("Content-Type", "application/x-ipynb+json")
        self.set_header("Content-Disposition", f'attachment; filename="{session_id}.ipynb"')
        self.finish(text)


class FileDownload(UiHandler):
    """A workspace file, always as an attachment, never rendered in the pages' origin."""

    async def get(self, session_id: str, path: str) -> None:
        assert self.principal is not None
        await send_file(self, await self.gateway.sessions.workspace(self.principal, session_id), path)


def safe_next(target: str | None) -> str:
    """Where to go after logging in: only a path of these pages, never another site."""
    if target and target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/sessions"


def short(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


routes = [
    (r"/ui/?", IndexPage),
    (r"/ui/login", LoginPage),
    (r"/ui/logout", LogoutPage),
    (r"/ui/sessions", SessionsPage),
    (rf"/ui/sessions/{SID}", SessionPage),
    (rf"/ui/sessions/{SID}/notebook\.ipynb", NotebookDownload),
    (rf"/ui/sessions/{SID}/files/(?P<path>.+)", FileDownload),
]
