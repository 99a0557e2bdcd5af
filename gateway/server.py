"""Builds the tornado application and runs the server until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Callable

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.ioloop import PeriodicCallback
from tornado.netutil import bind_sockets

from gateway import __version__, host, privileges
from gateway.audit import RateLimit
from gateway.auth import TokenAuthority
from gateway.environments import Environments, build_missing
from gateway.handlers import files, jupyter, kernel_ws, mcp, ops, sessions, ui
from gateway.handlers.base import NotFoundHandler, log_request
from gateway.isolation import Isolation
from gateway.jupyter import JupyterKernels
from gateway.kernels import KernelLauncher
from gateway.metrics import Metrics
from gateway.pool import KernelPool
from gateway.sessions import SessionManager
from gateway.settings import Settings
from gateway.store import Store

if TYPE_CHECKING:
    from gateway.mcp_server import McpFace

log = logging.getLogger(__name__)

KERNEL_WATCH_MS = 2000


def sweep_interval_ms(settings: Settings) -> float:
    """How often idle sessions and expired workspaces are looked for: a quarter of the idle
    time, between 1 s and 60 s."""
    idle = settings.idle_pause_seconds or 240.0
    return 1000 * min(60.0, max(1.0, idle / 4))


@dataclass
class Gateway:
    """The services one server process is made of; handed to every handler by ``initialize``."""

    settings: Settings
    store: Store
    auth: TokenAuthority
    sessions: SessionManager
    metrics: Metrics
    jupyter: JupyterKernels
    cookie_secret: str = field(default="", repr=False)
    refusals: RateLimit = field(default_factory=RateLimit)
    mcp: "McpFace | None" = None  # set once the server knows its address (``serving_mcp``)

    @classmethod
    def open(cls, settings: Settings) -> "Gateway":
        data = settings.data_path
        os.umask(0o077)  # what the gateway writes is its own; isolated kernels get their files handed over
        data.mkdir(parents=True, exist_ok=True)
        data.chmod(0o700)
        store = Store(data / "gateway.db")
        for path in data.glob("gateway.db*"):
            path.chmod(0o600)
        metrics = Metrics()
        isolation = Isolation(settings, data, host.current().hello)
        launcher = KernelLauncher(data / "runtime", isolation=isolation, environments=Environments(settings.envs_path))
        manager = SessionManager(settings, store, launcher, metrics)
        if settings.pool_size > 0:
            manager.pool = KernelPool(launcher, settings.pool_size, data / "pool", settings.kernel_start_timeout)
        jupyter_face = JupyterKernels(manager, settings.websocket_replay_seconds)
        verifier = None
        if settings.jwt_jwks:
            from gateway.jwt_auth import JwtVerifier

            verifier = JwtVerifier(settings.jwt_jwks, audience=settings.jwt_audience, issuer=settings.jwt_issuer,
                                   principal_claim=settings.jwt_principal_claim, role_claim=settings.jwt_role_claim,
                                   role_map=settings.jwt_role_map)
        return cls(settings, store, TokenAuthority(store, settings.token, verifier, settings.token_sha256), manager, metrics, jupyter_face,
                   cookie_secret=load_cookie_secret(data / "cookie_secret"))


def load_cookie_secret(path: Path) -> str:
    """The key that signs the pages' login cookies; made once, kept (mode 0600) so logins survive restarts."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        secret = secrets.token_hex(32)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secret)
        return secret


ROUTES = [*ops.routes, *sessions.routes, *files.routes, *jupyter.routes, *kernel_ws.routes, *mcp.routes, *ui.routes]


def make_app(gateway: Gateway) -> tornado.web.Application:
    """The tornado application with every route of the gateway."""
    kwargs = {"gateway": gateway}
    return tornado.web.Application(
        [(pattern, handler, kwargs) for pattern, handler in ROUTES],
        default_handler_class=NotFoundHandler,
        default_handler_args=kwargs,
        log_function=log_request,
        compress_response=False,
        xsrf_cookies=False,  # the pages check their forms' XSRF tokens themselves; the API uses no cookies
        xsrf_cookie_kwargs=ui.XSRF_COOKIE_KWARGS,
        cookie_secret=gateway.cookie_secret,
        template_path=str(Path(__file__).parent / "templates"),
        websocket_max_message_size=gateway.settings.max_body_bytes,
        websocket_ping_interval=30,
    )


def ensure_admin_token(gateway: Gateway, announce: Callable[[str], None]) -> None:
    """On first start with no token configured, create an admin token and show it once."""
    if gateway.auth.has_tokens():
        return
    token = gateway.auth.create("admin", "admin")
    announce(f"Created the admin token (shown only this once; only its hash is stored):\n\n    {token}\n")


@contextlib.asynccontextmanager
async def serving_mcp(gateway: Gateway, base_url: str) -> AsyncIterator[None]:
    """The MCP face at ``/mcp`` for as long as the server runs."""
    from gateway.mcp_server import McpFace

    face = McpFace(gateway, gateway.settings.public_url or base_url)
    async with face.running():
        gateway.mcp = face
        try:
            yield
        finally:
            gateway.mcp = None


def serve(settings: Settings) -> None:
    """Start the privileged helper; started as root, drop to the server's user and run again
    as that user (``gateway.privileges``); serve until stopped."""
    from gateway.isolation import runtime_root
    from gateway.settings import uid_range

    helper = host.inherited()
    if helper is None:
        if settings.build_environments:
            build_missing(Environments(settings.envs_path), lambda line: log.info("environments: %s", line))
        data = settings.data_path
        kernel_uids = uid_range(settings.sandbox_uids)
        identity = privileges.server_identity(settings.server_user, kernel_uids)
        runtime = runtime_root(data)
        if identity is not None:
            privileges.prepare_data_dir(data, runtime, identity, kernel_uids)
            for directory in privileges.open_the_way(identity, data, settings.envs_path):
                log.warning("gave %s search permission on %s (an ACL entry of its own) to reach its data "
                            "directory and code", identity.name, directory)
            privileges.check_runs(identity, data)
        anchors = (str(data),) if runtime.is_relative_to(data) else (str(data), str(runtime))
        helper = host.start(host.HelperConfig(anchors=anchors, server_owner=identity.owner if identity else None,
                                              kernel_uids=kernel_uids, sandbox=settings.sandbox, data_dir=str(data),
                                              environments=str(settings.envs_path),
                                              container_engine=settings.container_engine))
        if identity is not None:
            privileges.become(identity, data / "home", helper.handover_env())  # does not return
    else:
        log.info("serving as uid %d:%d; the privileged helper (pid %s) runs as root", os.getuid(), os.getgid(),
                 helper.pid)
    host.install(helper)
    try:
        asyncio.run(run(settings))
    finally:
        host.install(None)
        helper.close()


async def run(settings: Settings, announce: Callable[[str], None] = print) -> None:
    """Serve until SIGINT/SIGTERM, then shut down cleanly: steps recorded, kernels stopped, store closed."""
    gateway = Gateway.open(settings)
    await gateway.sessions.recover()
    ensure_admin_token(gateway, announce)
    app = make_app(gateway)
    # Handlers enforce their own body limits (with a JSON 413); tornado's is only a backstop.
    server = HTTPServer(app, max_body_size=1 << 40, idle_connection_timeout=3600, xheaders=False)
    sockets = bind_sockets(settings.port, settings.host)
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    host = settings.host if ":" not in settings.host else f"[{settings.host}]"
    isolation = gateway.sessions.launcher.isolation
    if isolation is not None:
        (log.warning if isolation.profile == "none" else log.info)("%s", isolation.describe())
    # The signals are handled before the address is announced: whoever starts the gateway may
    # stop it as soon as it reads that line.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    announce(f"Agent Kernel Gateway {__version__} listening on http://{host}:{port} "
             f"(data: {settings.data_path})")
    sys.stdout.flush()
    watcher = PeriodicCallback(gateway.sessions.watch_kernels, KERNEL_WATCH_MS)
    watcher.start()
    sweeper = PeriodicCallback(gateway.sessions.lifecycle.sweep, sweep_interval_ms(settings))
    sweeper.start()
    if gateway.sessions.pool is not None:
        gateway.sessions.pool.fill()
    try:
        async with serving_mcp(gateway, f"http://{host}:{port}"):
            await stop.wait()
    finally:
        log.info("shutting down: stopping sessions")
        watcher.stop()
        sweeper.stop()
        server.stop()
        await gateway.sessions.shutdown()
        await server.close_all_connections()
        gateway.store.close()
        log.info("shut down cleanly")
