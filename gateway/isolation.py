"""Which isolation profile kernels run under on this server, and each session's limits.

One ``Isolation`` per server: it picks the profile (``auto``: the strongest that starts a kernel
here, see ``agent-gateway doctor``), hands out kernel uids, and turns the global limits and a
session's own (admins may loosen them, anyone may tighten them) into what a launch needs.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.egress import InvalidRule, Policy, load_credentials
from gateway.egress_tls import Authority, kernel_bundle
from gateway.errors import Forbidden, InvalidRequest
from gateway.sandbox import CONTAINER, PROFILES, Limits, UidPool, probe_profile, untraversable
from gateway.settings import Settings, byte_size, uid_range

log = logging.getLogger(__name__)

STRONGEST_FIRST = ("sandbox", "process", "none")  # what ``auto`` tries; ``container`` needs an engine
SESSION_PROFILES = (*PROFILES, CONTAINER)
EGRESS_RULES_MAX = 64
EGRESS_AUTHORITY_DIR = "egress-ca"  # in the data directory: the egress proxy's CA (its key mode 0600)
LIMIT_FIELDS = {"memory": "memory_bytes", "cpu": "cpu_cores", "pids": "pids", "file_size": "file_size_bytes",
                "workspace": "workspace_bytes"}
# ipc socket paths must fit in sockaddr_un (107 bytes): "<runtime>/<12 chars>/ipc-<port>".
RUNTIME_PATH_BUDGET = 80


@dataclass(frozen=True)
class SessionIsolation:
    """A session's profile, limits (None: no limit) and egress rules, as stored in its row."""

    profile: str
    memory_bytes: int | None
    cpu_cores: float | None
    pids: int | None
    file_size_bytes: int | None
    workspace_bytes: int | None
    egress: tuple[str, ...] = ()  # the hosts its kernels may reach (``gateway.egress``); none by default

    def kernel_limits(self) -> Limits:
        return Limits(memory_bytes=self.memory_bytes, cpu_cores=self.cpu_cores, pids=self.pids,
                      file_size_bytes=self.file_size_bytes, address_space_bytes=self.memory_bytes)

    def view(self) -> dict[str, Any]:
        return {"profile": self.profile, "limits": {name: getattr(self, attr) for name, attr in LIMIT_FIELDS.items()},
                "egress": list(self.egress)}

    @classmethod
    def from_view(cls, data: dict[str, Any]) -> "SessionIsolation":
        limits = data.get("limits") or {}
        values: dict[str, Any] = {attr: limits.get(name) for name, attr in LIMIT_FIELDS.items()}
        return cls(data.get("profile", "none"), **values, egress=tuple(str(rule) for rule in data.get("egress") or ()))


class Isolation:
    """The server's profile, kernel uids and default limits."""

    def __init__(self, settings: Settings, data_dir: Path, greeting: dict[str, Any]):
        """``greeting``: what the privileged helper found when it started (``gateway.helper``):
        the profile it chose (or why the one asked for cannot work), and whether volumes work."""
        self.requested = settings.sandbox
        if greeting.get("refused"):
            raise IsolationRefused(greeting["refused"])
        self.profile, self.reasons = greeting["profile"], dict(greeting.get("reasons") or {})
        self.container_engine: str | None = greeting.get("container_engine")
        if greeting.get("container_refused"):
            self.reasons[CONTAINER] = greeting["container_refused"]
        first, count = uid_range(settings.sandbox_uids)
        self.uids = UidPool(first, count)
        try:
            egress = tuple(Policy.parse(settings.egress_allow).texts())
            self.credentials = load_credentials(settings.egress_credentials)
            # HTTPS to a host with credentials is ended by the proxy, with the gateway's own authority.
            self.authority = Authority(data_dir / EGRESS_AUTHORITY_DIR, settings.egress_trust) \
                if self.credentials else None
            self.kernel_bundle = kernel_bundle(settings.egress_trust, self.authority)
        except PermissionError as exc:
            raise IsolationRefused(f"an egress file cannot be read by the server's user (uid {os.getuid()}): "
                                   f"{exc.filename}; give that user the file, mode 0600") from None
        except (InvalidRule, OSError, ValueError, ssl.SSLError) as exc:
            raise IsolationRefused(f"the egress settings cannot be used: {exc}") from None
        self.defaults = SessionIsolation(
            self.profile, settings.memory_limit or None, settings.cpu_limit or None, settings.pids_limit or None,
            settings.file_size_limit or None, settings.workspace_limit or None, egress)
        self.runtime_root = runtime_root(data_dir)
        self.data_dir = data_dir
        self.volumes, self.volumes_reason = choose_volumes(settings.workspace_volumes, self.profile,
                                                           greeting.get("volumes"))

    def describe(self) -> str:
        """One line for the server's start-up message."""
        if self.profile == "none":
            return ("kernels run UNISOLATED as the gateway's own user (sandbox profile 'none': for development "
                    "only; any session can read the database, tokens and other sessions' files)")
        limits = self.defaults
        parts = [f"memory {human_bytes(limits.memory_bytes)}", f"cpu {limits.cpu_cores or 'unlimited'}",
                 f"pids {limits.pids or 'unlimited'}", f"file size {human_bytes(limits.file_size_bytes)}",
                 f"workspace {human_bytes(limits.workspace_bytes)}"
                 f" ({'a volume each' if self.volumes else 'measured between steps: ' + self.volumes_reason})"]
        engine = f", on {self.container_engine}" if self.profile == CONTAINER and self.container_engine else ""
        return f"kernels run under the '{self.profile}' sandbox profile{engine} ({', '.join(parts)})"

    def available(self, profile: str) -> bool:
        """Whether kernels can run under ``profile`` here: the server's, a weaker local one, or
        ``container`` when the engine answered."""
        if profile == "none":
            return True
        if profile == CONTAINER:
            return self.profile == CONTAINER or CONTAINER not in self.reasons
        if self.profile == CONTAINER:
            return profile not in self.reasons
        return STRONGEST_FIRST.index(profile) >= STRONGEST_FIRST.index(self.profile)

    def for_session(self, is_admin: bool, profile: str | None, limits: dict[str, Any] | None,
                    egress: Any = None) -> SessionIsolation:
        """A new session's isolation: the defaults, changed by the request (400/403 when not allowed)."""
        chosen = self.defaults.profile
        if profile is not None:
            if profile not in SESSION_PROFILES:
                raise InvalidRequest(f"'sandbox' must be one of {', '.join(SESSION_PROFILES)}.",
                                     code="invalid_field", details={"field": "sandbox"})
            if profile != chosen and not is_admin:
                raise Forbidden("Only an admin may choose a session's sandbox profile.", details={"field": "sandbox"})
            if not self.available(profile):
                why = self.reasons.get(profile, "it does not work on this machine")
                raise InvalidRequest(f"The '{profile}' profile is not available here: {why}", code="invalid_field",
                                     details={"field": "sandbox"})
            chosen = profile
        values = {attr: getattr(self.defaults, attr) for attr in LIMIT_FIELDS.values()}
        for name, raw in (limits or {}).items():
            if name not in LIMIT_FIELDS:
                raise InvalidRequest(f"Unknown limit '{name}'. Known: {', '.join(LIMIT_FIELDS)}.",
                                     code="invalid_field", details={"field": "limits", "name": name})
            value = parse_limit(name, raw)
            attr = LIMIT_FIELDS[name]
            current = values[attr]
            loosens = value is None or (current is not None and value > current)
            if loosens and current is not None and not is_admin:
                raise Forbidden(f"Only an admin may raise a session's {name} limit above the server's "
                                f"{current}; ask for less.", details={"field": "limits", "name": name})
            values[attr] = value
        return SessionIsolation(chosen, **values, egress=self._egress(is_admin, egress))

    def _egress(self, is_admin: bool, egress: Any) -> tuple[str, ...]:
        """The session's egress rules: the server's, or (admins only) those the request gives."""
        if egress is None:
            return self.defaults.egress
        rules = parse_egress(egress, "egress")
        if rules != self.defaults.egress and not is_admin:
            raise Forbidden("Only an admin may choose a session's egress rules.", details={"field": "egress"})
        return rules


def parse_egress(value: Any, field_name: str) -> tuple[str, ...]:
    """Egress rules from a request's ``field_name`` in their stored form (400 when they are not)."""
    if not isinstance(value, list) or len(value) > EGRESS_RULES_MAX:
        raise InvalidRequest(f"'{field_name}' is a list of at most {EGRESS_RULES_MAX} rules (host, host:port, "
                             "*.domain:port).", code="invalid_field", details={"field": field_name})
    try:
        return tuple(dict.fromkeys(Policy.parse(value).texts()))
    except InvalidRule as exc:
        raise InvalidRequest(str(exc), code="invalid_field", details={"field": field_name}) from None


def choose_volumes(requested: str, profile: str, unsupported: str | None) -> tuple[bool, str]:
    """Whether isolated workspaces get a volume of their own (``gateway.volumes``), and why not
    (``unsupported``: why the helper cannot make them, or None)."""
    if requested == "off":
        return False, "workspace_volumes is off"
    why = "kernels are not isolated" if profile == "none" else unsupported
    if why is not None and requested == "on":
        raise ValueError(f"workspace_volumes is on, but {why}")
    return why is None, why or ""


def open_for_traversal(path: Path, root: Path) -> None:
    """Let other users pass through (not list) ``root`` and the directories from it down to
    ``path``: under the process profile a kernel's uid must reach its workspace on the host."""
    for directory in [*reversed(path.parents), path]:
        if directory == root or root in directory.parents:
            mode = directory.stat().st_mode & 0o777
            if mode & 0o011 != 0o011:
                directory.chmod(mode | 0o011)


LIMIT_WORDS = {"file_size": "largest file", "pids": "process and thread", "workspace": "workspace size"}


def limit_behind(error: dict[str, Any] | None, isolation: dict[str, Any] | None) -> dict[str, Any] | None:
    """The limit a step's Python error comes from (a file past RLIMIT_FSIZE, a fork or thread
    past the pids limit), if it does: ``{"limit", "value"}``."""
    if not error or not isolation or isolation.get("profile") == "none":
        return None
    limits = isolation.get("limits") or {}
    text = f"{error.get('name')}: {error.get('value')}"
    if "File too large" in text and limits.get("file_size"):
        return {"limit": "file_size", "value": limits["file_size"]}
    if "No space left on device" in text and limits.get("workspace"):
        return {"limit": "workspace", "value": limits["workspace"]}
    if error.get("name") == "BlockingIOError" and "Resource temporarily unavailable" in text and limits.get("pids"):
        return {"limit": "pids", "value": limits["pids"]}
    return None


def describe_limit(hit: dict[str, Any]) -> str:
    value = human_bytes(hit["value"]) if hit["limit"] in ("file_size", "workspace") else str(hit["value"])
    return f"the session's {LIMIT_WORDS.get(hit['limit'], hit['limit'])} limit is {value}"


def parse_limit(name: str, raw: Any) -> int | float | None:
    """A limit from a request: a number, a size string for byte limits, or 0/null for none."""
    try:
        if raw is None:
            return None
        if isinstance(raw, bool):
            raise ValueError
        if name == "cpu":
            value: int | float = float(raw)
        elif name == "pids":
            value = int(raw) if isinstance(raw, int) else int(str(raw))
        else:
            value = byte_size(raw if isinstance(raw, (int, str)) else int(raw))
        if value < 0 or not math.isfinite(value):
            raise ValueError
        return value or None
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"The {name} limit must be a non-negative number"
                             f"{' or a size like 512MiB' if name in ('memory', 'file_size', 'workspace') else ''}.",
                             code="invalid_field", details={"field": "limits", "name": name}) from None


class IsolationRefused(RuntimeError):
    """The configured profile cannot work here; the server does not start."""


def choose_profile(requested: str, data_dir: Path,
                   container_refused: str | None = "no container engine") -> tuple[str, dict[str, str]]:
    """The profile to use and, for each one tried and not working, why (``container_refused``:
    why the container engine cannot be used, None when it can)."""
    reasons: dict[str, str] = {}
    if requested == CONTAINER:
        if container_refused:
            raise IsolationRefused(f"The container sandbox profile does not work here: {container_refused} "
                                   "(run `agent-gateway doctor`).")
        for profile in ("sandbox", "process"):  # what a session may ask for beside it
            status = probe_profile(profile)
            if not status.works:
                reasons[profile] = status.reason
        return CONTAINER, reasons
    candidates = STRONGEST_FIRST if requested == "auto" else (requested,)
    for profile in candidates:
        if profile == "none":
            return "none", reasons
        status = probe_profile(profile)
        blocked = untraversable(str(data_dir)) if profile == "process" else None
        if status.works and blocked is None:
            return profile, reasons
        reasons[profile] = status.reason if not status.works else (
            f"kernel uids must reach the data directory, but {blocked}")
        log.warning("sandbox profile %s does not work here: %s", profile, status.reason)
    if requested != "auto":
        raise IsolationRefused(f"The '{requested}' sandbox profile does not work here: {reasons[requested]} "
                           "(run `agent-gateway doctor`, or choose another with --sandbox).")
    return "none", reasons


def runtime_root(data_dir: Path) -> Path:
    """Where kernels' runtime directories (connection files, ipc sockets) live: in the data dir,
    or under /run when that path is too long for socket names."""
    inside = data_dir / "runtime"
    if len(str(inside)) <= RUNTIME_PATH_BUDGET:
        return inside
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    return Path("/run") / f"agent-gateway-{digest}"


def human_bytes(value: int | None) -> str:
    if not value:
        return "unlimited"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size and value % (size // 8 or 1) == 0:
            return f"{value / size:g} {unit}"
    return f"{value} bytes"
