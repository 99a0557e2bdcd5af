"""A session's way out: a forward proxy the gateway runs for each isolated kernel, and its policy.

A sandboxed kernel has no network. Its one way out is a unix socket in its runtime directory
(``egress/egress.sock``: a directory of the server's, which the kernel may enter but not change,
in the kernel's own, reached only by descriptor), where the server answers HTTP proxy requests: ``CONNECT host:port`` (HTTPS)
and absolute-form plain HTTP requests. Each is checked against the session's policy (denied by
default; rules an admin gives for all sessions, or for one at its creation or while it runs),
and recorded: host, port, allowed or refused and why, bytes each way. Requests to a host with credentials configured get
them added here, so the kernel never holds them: plain HTTP as it passes, HTTPS by ending the
kernel's TLS with a certificate of the gateway's egress authority (``gateway.egress_tls``) and
talking TLS to the host, whose certificate is verified. Inside the kernel, the
environment's extension forwards a loopback port to the socket and points ``HTTP(S)_PROXY`` at it.

A rule is ``host`` (ports 80 and 443), ``host:port`` or ``host:port,port``; ``*.example.org``
matches any name under example.org and ``*`` any name. A name that resolves to a loopback,
private, link-local or otherwise non-public address is refused unless a rule names the host
exactly: a wildcard never opens the host's own services or the cloud's metadata address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from gateway.egress_tls import Authority

log = logging.getLogger(__name__)

DIRECTORY = "egress"
SOCKET_NAME = "egress.sock"
RULES_NAME = "rules.json"  # beside the socket: the session's rules, which the kernel may read (not change)
BUNDLE_NAME = "ca-bundle.pem"  # beside the socket: the CA certificates the kernel trusts
HEAD_MAX = 64 * 1024  # bytes of a request's line and headers
HEAD_TIMEOUT = 30.0
CONNECT_TIMEOUT = 15.0
DEFAULT_PORTS = (80, 443)
HOST = re.compile(r"^(\*|(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*)$")
HOP_BY_HOP = ("proxy-connection", "proxy-authorization", "connection", "keep-alive")


class InvalidRule(ValueError):
    """An egress rule that is not one; the message says what a rule looks like."""


@dataclass(frozen=True)
class Rule:
    host: str  # a lower-case name, "*.suffix" or "*"
    ports: tuple[int, ...]

    @property
    def exact(self) -> bool:
        return not self.host.startswith("*")

    def matches(self, host: str, port: int) -> bool:
        if port not in self.ports:
            return False
        if self.host == "*":
            return True
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and host != self.host[2:]
        return host == self.host

    def __str__(self) -> str:
        return f"{self.host}:{','.join(map(str, self.ports))}"

    @classmethod
    def parse(cls, text: str) -> "Rule":
        if not isinstance(text, str) or not 0 < len(text) <= 300:
            raise InvalidRule("an egress rule is a string: host, host:port or host:port,port ('*.' for any name "
                              "under a domain)")
        if not text.isascii():  # no Unicode digits in ports, no letters that lower-case to ASCII ones
            raise InvalidRule(f"'{text[:100]}' is not an egress rule: a rule is ASCII (an IDN host in its "
                              "xn-- form)")
        host, _, ports_text = text.strip().lower().partition(":")
        if not HOST.fullmatch(host):
            raise InvalidRule(f"'{text[:100]}' is not an egress rule: the host must be a name, '*.domain' or '*'")
        try:
            if ports_text and not all(p.isdigit() for p in ports_text.split(",")):
                raise ValueError(ports_text)
            ports = tuple(sorted({int(p) for p in ports_text.split(",")})) if ports_text else DEFAULT_PORTS
        except ValueError:
            raise InvalidRule(f"'{text[:100]}': ports are numbers separated by commas") from None
        if not all(0 < port < 65536 for port in ports):
            raise InvalidRule(f"'{text[:100]}': a port is between 1 and 65535")
        return cls(host, ports)


@dataclass(frozen=True)
class Policy:
    """The hosts one session's kernel may reach; no rule: nothing."""

    rules: tuple[Rule, ...] = ()

    @classmethod
    def parse(cls, rules: list[str] | tuple[str, ...]) -> "Policy":
        return cls(tuple(Rule.parse(rule) for rule in rules))

    def rule_for(self, host: str, port: int) -> Rule | None:
        """The rule allowing ``host:port`` (one naming the host exactly first), or None."""
        matching = sorted((rule for rule in self.rules if rule.matches(host, port)), key=lambda rule: not rule.exact)
        return matching[0] if matching else None

    def texts(self) -> list[str]:
        return [str(rule) for rule in self.rules]


def public(address: str) -> bool:
    """Whether an address is one of the internet's (not loopback, private, link-local, ...)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


@dataclass
class Connection:
    """One attempt to get out, as the audit log keeps it (an ``egress`` event)."""

    host: str
    port: int
    method: str
    allowed: bool
    reason: str = ""
    bytes_sent: int = 0  # from the kernel to the host
    bytes_received: int = 0  # from the host to the kernel
    duration_ms: float = 0.0
    credentials: bool = False  # whether the proxy added the host's credentials (for HTTPS: ended its TLS)

    def details(self) -> dict[str, object]:
        return asdict(self)


Sink = Callable[[Connection], None]


def load_credentials(path: str | None) -> dict[str, dict[str, str]]:
    """The headers to add per host (``"host"`` or ``"host:port"``) from a JSON file of the operator's."""
    if not path:
        return {}
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or not all(isinstance(v, dict) and all(isinstance(h, str) and isinstance(x, str)
                                                                         for h, x in v.items())
                                            for v in raw.values()):
        raise ValueError(f"{path}: expected {{\"host[:port]\": {{\"Header\": \"value\"}}}}")
    return {str(host).lower(): dict(headers) for host, headers in raw.items()}


class Proxy:
    """The forward proxy on one kernel's ``egress.sock``."""

    def __init__(self, runtime_dir: Path, policy: Policy, credentials: dict[str, dict[str, str]] | None = None,
                 sink: Sink | None = None, authority: "Authority | None" = None, bundle: bytes | None = None):
        self.runtime_dir = runtime_dir
        self.socket_path = runtime_dir / DIRECTORY / SOCKET_NAME
        self.policy = policy
        self.credentials = credentials or {}
        self.sink = sink
        self.authority = authority  # ends the kernel's TLS to hosts with credentials; None: tunnels only
        self.bundle = bundle  # the CA certificates the kernel trusts, written beside the socket
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen on the socket. The kernel owns the runtime directory, so the socket's directory
        is opened without following links and must be this process's own: nothing in it can be
        swapped for a link before the socket is made and opened to the kernel."""
        from gateway import safefs

        with safefs.opened(safefs.open_root(self.runtime_dir)) as runtime, \
                safefs.opened(safefs.open_dir(runtime, (DIRECTORY,), create=True, mode=0o711)) as directory:
            info = os.fstat(directory)
            if info.st_uid != os.geteuid():
                raise PermissionError(f"{self.socket_path.parent} is not the gateway's (the kernel made it)")
            os.fchmod(directory, 0o711)  # the kernel may pass, not list or change it
            with contextlib.suppress(FileNotFoundError):
                os.unlink(SOCKET_NAME, dir_fd=directory)  # one left by an earlier gateway process
            self._write_rules(directory)
            if self.bundle is not None:
                _write_file(directory, BUNDLE_NAME, self.bundle)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(f"/proc/self/fd/{directory}/{SOCKET_NAME}")
                os.chmod(SOCKET_NAME, 0o666, dir_fd=directory)
                self.server = await asyncio.start_unix_server(self._serve, sock=listener, limit=HEAD_MAX)
            except BaseException:
                listener.close()
                raise

    def set_policy(self, policy: Policy) -> None:
        """Apply new rules to the connections to come (those open go on) and tell the kernel."""
        from gateway import safefs

        self.policy = policy
        if self.server is None:
            return
        with safefs.opened(safefs.open_root(self.runtime_dir)) as runtime, \
                safefs.opened(safefs.open_dir(runtime, (DIRECTORY,))) as directory:
            if os.fstat(directory).st_uid != os.geteuid():
                raise PermissionError(f"{self.socket_path.parent} is not the gateway's")
            self._write_rules(directory)

    def _write_rules(self, directory: int) -> None:
        """``rules.json`` in the socket's directory: the kernel's pip looks there for whether any
        host may be reached."""
        _write_file(directory, RULES_NAME, json.dumps({"rules": self.policy.texts()}).encode())

    def close(self) -> None:
        """Stop taking connections, end those open, remove the socket (safe to call twice)."""
        if self.server is not None:
            self.server.close()
            self.server = None
        for task in list(self.tasks):
            task.cancel()
        from gateway import safefs

        with contextlib.suppress(OSError, safefs.UnsafeEntry):
            with safefs.opened(safefs.open_root(self.runtime_dir)) as runtime, \
                    safefs.opened(safefs.open_dir(runtime, (DIRECTORY,))) as directory:
                if os.fstat(directory).st_uid == os.geteuid():
                    for name in (SOCKET_NAME, RULES_NAME, BUNDLE_NAME):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(name, dir_fd=directory)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        started = time.monotonic()
        connection: Connection | None = None
        attempt: list[Connection] = []  # the attempt, recorded also when it ends in an error
        try:
            connection = await self._handle(reader, writer, attempt)
        except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                asyncio.TimeoutError, OSError, ValueError) as exc:
            log.debug("egress: a connection ended: %r", exc)
            if attempt and not attempt[0].reason:
                attempt[0].reason = f"it ended in an error ({exc!r})"[:200]
        finally:
            writer.close()
            if task is not None:
                self.tasks.discard(task)
        connection = connection or (attempt[0] if attempt else None)
        if connection is not None:
            connection.duration_ms = round((time.monotonic() - started) * 1000, 1)
            if self.sink is not None:
                self.sink(connection)
            else:
                log.info("egress (no session yet): %s", connection.details())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      attempt: list[Connection]) -> Connection | None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            await self._answer(writer, 400, "not an HTTP proxy request")
            return None
        method, target, _version = parts
        host, port, path = self._target(method, target)
        if host is None:
            await self._answer(writer, 400, "a proxy request names http://host/... or CONNECT host:port "
                                            "(https:// goes through CONNECT)")
            return Connection(target[:200], 0, method[:16], False, "not a proxy request")
        connection = Connection(host, port, method[:16], False)
        attempt.append(connection)
        rule = self.policy.rule_for(host, port)
        if rule is None:
            connection.reason = "no rule allows it"
            await self._answer(writer, 403, f"{host}:{port} is not allowed for this session: an admin allows hosts "
                                            "with the session's egress rules (docs/operations.md)")
            return connection
        try:
            addresses = await self._resolve(host, port)
        except OSError as exc:
            connection.reason = f"the name does not resolve ({exc.strerror or exc})"
            await self._answer(writer, 502, f"{host} does not resolve")
            return connection
        if not rule.exact and not all(public(address) for address in addresses):
            connection.reason = "it resolves to a non-public address, which only a rule naming the host exactly allows"
            await self._answer(writer, 403, f"{host} resolves to a non-public address: not allowed by '{rule}'")
            return connection
        try:
            upstream_reader, upstream_writer = await self._open(addresses, port)
        except (OSError, asyncio.TimeoutError) as exc:
            connection.reason = f"the host did not accept the connection ({exc!r})"[:200]
            await self._answer(writer, 502, f"{host}:{port} did not accept the connection")
            return connection
        connection.allowed, connection.reason = True, f"allowed by '{rule}'"
        try:
            if method.upper() == "CONNECT" and self.credentials_for(host, port) and self.authority is not None:
                problem = await self._upstream_tls(upstream_writer, host)
                if problem is not None:
                    connection.allowed, connection.reason = False, problem
                    await self._answer(writer, 502, f"{host}:{port}: {problem}")
                    return connection
                await self._intercept(writer, host)
                if not await self._forward_head(reader, writer, upstream_writer, host, port, connection):
                    return connection
                await self._pipe(reader, writer, upstream_reader, upstream_writer, connection, one_exchange=True)
            elif method.upper() == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
                await self._pipe(reader, writer, upstream_reader, upstream_writer, connection)
            else:
                request = self._forwarded(method, path, lines[1:], host, port, connection)
                upstream_writer.write(request)
                connection.bytes_sent += len(request)
                await upstream_writer.drain()
                await self._pipe(reader, writer, upstream_reader, upstream_writer, connection, one_exchange=True)
        finally:
            upstream_writer.close()
        return connection

    async def _upstream_tls(self, upstream_writer: asyncio.StreamWriter, host: str) -> str | None:
        """TLS to the host on the open connection, its certificate verified for ``host``; None,
        or why it failed (the attempt is then refused and the kernel gets 502)."""
        assert self.authority is not None
        try:
            await upstream_writer.start_tls(self.authority.upstream, server_hostname=host,
                                            ssl_handshake_timeout=CONNECT_TIMEOUT)
        except ssl.SSLCertVerificationError as exc:
            return f"the host's TLS certificate is not trusted ({exc.verify_message})"[:300]
        except (ssl.SSLError, OSError, asyncio.TimeoutError) as exc:
            return f"TLS with the host failed ({exc!r})"[:300]
        return None

    async def _intercept(self, writer: asyncio.StreamWriter, host: str) -> None:
        """Answer the CONNECT and end the kernel's TLS here, as ``host``."""
        assert self.authority is not None
        context = await asyncio.to_thread(self.authority.server_context, host)
        # Nothing may be read between the answer and the switch to TLS (the kernel's first TLS
        # bytes would be left in the plain reader): the answer is written and TLS started at once.
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.start_tls(context, ssl_handshake_timeout=HEAD_TIMEOUT)

    async def _forward_head(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            upstream_writer: asyncio.StreamWriter, host: str, port: int,
                            connection: Connection) -> bool:
        """Read the kernel's request inside its TLS and send it on with the host's credentials."""
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[1].startswith("/"):
            await self._answer(writer, 400, "not an HTTP request (origin-form) inside the tunnel")
            return False
        request = self._forwarded(parts[0], parts[1], lines[1:], host, port, connection)
        upstream_writer.write(request)
        connection.bytes_sent += len(request)
        await upstream_writer.drain()
        return True

    @staticmethod
    def _target(method: str, target: str) -> tuple[str | None, int, str]:
        """The host, port and (plain HTTP) path a request asks for; None for a host it cannot be."""
        if method.upper() == "CONNECT":
            host, _, port_text = target.rpartition(":")
            path = ""
        else:
            split = urlsplit(target)
            if split.scheme.lower() != "http" or not split.hostname:
                return None, 0, ""
            try:
                host, port_text = split.hostname, str(split.port or 80)
            except ValueError:  # a port that is not a number
                return None, 0, ""
            path = (split.path or "/") + (f"?{split.query}" if split.query else "")
        host = host.strip("[]").lower()
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536 or not host \
                or len(host) > 253 or not re.fullmatch(r"[a-z0-9.:-]+", host):
            return None, 0, ""
        return host, int(port_text), path

    @staticmethod
    async def _open(addresses: list[str], port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the first of the host's addresses that takes one (``localhost`` may
        resolve to ::1 first for a server listening on 127.0.0.1 only)."""
        failure: BaseException = OSError("no address")
        for address in addresses[:4]:
            try:
                return await asyncio.wait_for(asyncio.open_connection(address, port), CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as exc:
                failure = exc
        raise failure

    @staticmethod
    async def _resolve(host: str, port: int) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=1)  # SOCK_STREAM
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise OSError("no address")
        return addresses

    def credentials_for(self, host: str, port: int) -> dict[str, str]:
        """The headers the proxy adds to requests to ``host:port`` (none: {})."""
        return self.credentials.get(f"{host}:{port}") or self.credentials.get(host) or {}

    def _forwarded(self, method: str, path: str, headers: list[str], host: str, port: int,
                   connection: Connection) -> bytes:
        """A plain HTTP request as the host gets it: origin-form, one request per connection, and
        the host's credentials (replacing any the kernel sent under the same names)."""
        extra = self.credentials_for(host, port)
        replaced = {name.lower() for name in extra} | set(HOP_BY_HOP)
        kept = [line for line in headers if line and line.split(":", 1)[0].strip().lower() not in replaced]
        added = [f"{name}: {value}" for name, value in extra.items()]
        connection.credentials = bool(extra)
        return "\r\n".join([f"{method} {path} HTTP/1.1", *kept, *added, "Connection: close", "", ""]).encode("latin-1")

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    upstream_reader: asyncio.StreamReader, upstream_writer: asyncio.StreamWriter,
                    connection: Connection, one_exchange: bool = False) -> None:
        """Copy both ways until both ends are done; ``one_exchange`` (a forwarded request, sent
        with ``Connection: close``): until the host has answered and closed."""
        async def copy(source: asyncio.StreamReader, target: asyncio.StreamWriter, outward: bool) -> None:
            try:
                while chunk := await source.read(65536):
                    target.write(chunk)
                    await target.drain()
                    if outward:
                        connection.bytes_sent += len(chunk)
                    else:
                        connection.bytes_received += len(chunk)
            finally:
                with contextlib.suppress(OSError, RuntimeError):
                    if target.can_write_eof():
                        target.write_eof()

        outward = asyncio.ensure_future(copy(reader, upstream_writer, True))
        inward = asyncio.ensure_future(copy(upstream_reader, writer, False))
        try:
            if one_exchange:
                await asyncio.wait([inward])
                outward.cancel()
            results = await asyncio.gather(outward, inward, return_exceptions=True)
        finally:  # cancelled itself (the proxy closing): neither copy is left running
            outward.cancel()
            inward.cancel()
        for result in results:
            if isinstance(result, asyncio.CancelledError) and one_exchange:
                continue
            if isinstance(result, BaseException) and not isinstance(result, (ConnectionError, OSError)):
                raise result

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, status: int, text: str) -> None:
        reasons = {400: "Bad Request", 403: "Forbidden", 502: "Bad Gateway"}
        body = f"agent-gateway egress: {text}\n".encode()
        writer.write(f"HTTP/1.1 {status} {reasons[status]}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()


def _write_file(directory: int, name: str, content: bytes) -> None:
    """A file the kernel may read (not change) in the gateway's directory ``directory`` (a
    descriptor): written whole under a temporary name, then renamed over ``name``."""
    partial = f".{name}.partial"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(partial, dir_fd=directory)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=directory)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o644)
        out.write(content)
    os.replace(partial, name, src_dir_fd=directory, dst_dir_fd=directory)
