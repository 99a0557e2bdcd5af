"""One registry of the gateway's settings, read by the CLI and the server.

Each setting has a name, a default, a type, a help text and an environment variable.
Precedence: command-line flag, then environment variable, then default.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Setting:
    """One configurable value: how it is named, parsed and documented."""

    name: str
    default: Any
    type: Callable[[str], Any]
    help: str

    @property
    def env(self) -> str:
        return "AGENT_GATEWAY_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


MIB = 1024 * 1024


def _pairs(text: str) -> list[tuple[str, str]]:
    import json
    import re

    pairs = [(str(a), str(b)) for a, b in json.loads(text)]
    for pattern, _ in pairs:
        re.compile(pattern)
    return pairs


def _mapping(text: str) -> dict[str, str]:
    import json

    return {str(k): str(v) for k, v in json.loads(text).items()}


SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": MIB, "mb": MIB, "mib": MIB,
              "g": 1024 * MIB, "gb": 1024 * MIB, "gib": 1024 * MIB, "t": 1024 ** 4, "tb": 1024 ** 4, "tib": 1024 ** 4}


def byte_size(text: str | int) -> int:
    """A size in bytes from ``2GiB``, ``512M``, ``1048576`` (0 means no limit)."""
    import re

    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (write e.g. 2GiB, 512MiB or a number of bytes)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def _list(text: str) -> list[str]:
    """A JSON list of strings, or strings separated by spaces."""
    text = text.strip()
    if text.startswith("["):
        value = json.loads(text)
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValueError("expected a JSON list of strings")
        return value
    return text.split()


def _boolean(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")

REGISTRY: tuple[Setting, ...] = (
    Setting("host", "127.0.0.1", str, "Interface to listen on."),
    Setting("port", 8765, int, "TCP port to listen on."),
    Setting("public_url", None, str, "The gateway's URL as its clients reach it (behind a proxy, say), e.g. https://gw.example.com; default: the address it listens on. Names the MCP face's OAuth resource."),
    Setting("data_dir", "./gateway-data", str, "Directory holding the database, workspaces and notebooks."),
    Setting("envs_dir", "./gateway-envs", str, "Directory of the kernel environments (agent-gateway env); keep it outside the data directory, owned by whoever builds them."),
    Setting("build_environments", True, _boolean, "At start, build the gateway's own kernel environments that are not built yet (python3: a few minutes, once)."),
    Setting("token", None, str, "Admin token to accept (instead of one generated on first start). Never logged; serve keeps only its SHA-256, and restarts itself without the token in its environment or command line."),
    Setting("token_sha256", None, str, "The SHA-256 (hex) of an admin token to accept: what serve passes itself in place of the token."),
    Setting("default_timeout", 60.0, float, "Seconds a step may run when the request names no timeout."),
    Setting("max_timeout", 3600.0, float, "Largest step timeout a request may ask for, in seconds."),
    Setting("max_output_bytes", 1 * MIB, int, "Output kept per step; the rest is cut and the step marked truncated."),
    Setting("max_body_bytes", 8 * MIB, int, "Largest JSON request body, in bytes (413 past it)."),
    Setting("max_upload_bytes", 256 * MIB, int, "Largest file upload, in bytes (413 past it)."),
    Setting("kernel_start_timeout", 60.0, float, "Seconds to wait for a new kernel to answer."),
    Setting("interrupt_grace", 5.0, float, "Seconds a timed-out step gets to stop after an interrupt before its kernel is restarted."),
    Setting("notebook_write_delay", 1.0, float, "Seconds to gather changes before rewriting a session's notebook file."),
    Setting("pool_size", 2, int, "Kernels kept started and ready per kernel spec, so new sessions do not wait for a boot."),
    Setting("max_live_kernels", 0, int, "Most sessions with a running kernel (0: derived from memory, 64 MiB a kernel); past it the least recently used idle session is paused."),
    Setting("idle_pause_seconds", 1800.0, float, "Pause a session idle this long (0: never)."),
    Setting("retention_days", 0.0, float, "Remove the workspace and snapshot of sessions ended this long ago (0: keep). Trajectories are kept."),
    Setting("resume_strategy", "snapshot", str, "How a paused session gets its state back: snapshot (saved namespace) or replay (re-run its steps)."),
    Setting("snapshot_fallback_replay", False, _boolean, "With snapshot, re-run the steps first when the snapshot lacks some names."),
    Setting("snapshot_timeout", 120.0, float, "Seconds a kernel may take to save or load its state."),
    Setting("jwt_jwks", None, str, "A JWKS file or URL: accept bearer JWTs signed by its keys (needs the [jwt] extra)."),
    Setting("jwt_audience", None, str, "The audience JWTs must name (unchecked when unset)."),
    Setting("jwt_issuer", None, str, "The issuer JWTs must name (unchecked when unset)."),
    Setting("jwt_principal_claim", "sub", str, "The JWT claim that names the principal."),
    Setting("jwt_role_claim", "role", str, "The JWT claim that gives the role (a value or a list)."),
    Setting("jwt_role_map", {}, _mapping, "JSON object mapping the role claim's values to agent, reviewer or admin."),
    Setting("replay_normalisers", [], _pairs, "Extra [pattern, replacement] pairs (a JSON list) applied to outputs before replay compares them."),
    Setting("websocket_replay_seconds", 60.0, float, "How long messages for a disconnected websocket client are kept for its return."),
    Setting("sandbox", "auto", str, "How kernels are isolated: none, process, sandbox, container (each kernel in a container of the container engine), or auto (the strongest of the first three that works here; see agent-gateway doctor)."),
    Setting("container_engine", None, str, "The Docker Engine API (podman system service, or dockerd) of the container profile, e.g. unix:///run/podman/podman.sock; only the privileged helper connects to it. Sessions may ask for the container profile when it is set and answers."),
    Setting("server_user", "agent-gateway", str, "Started as root, serve runs as this user (a name or uid[:gid]) and leaves what needs root to its privileged helper; a name with no account falls back to uid 999999."),
    Setting("egress_allow", [], _list, "Hosts every session's kernel may reach through the gateway's egress proxy (a JSON list, or rules separated by spaces: host, host:port, *.domain:port,port); none by default. Admins set a session's own at its creation."),
    Setting("egress_credentials", None, str, "A JSON file of headers the egress proxy adds to requests per host, HTTP and HTTPS ({\"host:port\": {\"Authorization\": \"Bearer ...\"}}): kernels never see them."),
    Setting("egress_trust", None, str, "A PEM file of CA certificates, beside the system's, that the egress proxy trusts for the HTTPS hosts it adds credentials to, and that kernels trust too (a private index's own CA)."),
    Setting("sandbox_uids", "1000000-1009999", str, "The range of unprivileged uids given to kernels under process and sandbox, one per kernel."),
    Setting("memory_limit", 2048 * MIB, byte_size, "Memory a session's kernel may use (cgroup; RLIMIT_AS where no memory cgroup can be made), e.g. 2GiB; 0: none."),
    Setting("cpu_limit", 1.0, float, "CPU cores a session's kernel may use (cgroup quota); 0: none."),
    Setting("pids_limit", 256, int, "Processes and threads a session's kernel may have at once (cgroup pids); 0: none."),
    Setting("file_size_limit", 1024 * MIB, byte_size, "Largest file a kernel may write (RLIMIT_FSIZE), e.g. 1GiB; 0: none."),
    Setting("workspace_limit", 5 * 1024 * MIB, byte_size, "Largest total size of a session's workspace, checked after each step and upload; 0: none."),
    Setting("workspace_volumes", "auto", str, "A file system of the workspace limit's size per isolated workspace, so the limit holds during a step: on, off, or auto (on where it works: root, loop devices, mkfs.ext4)."),
    Setting("log_level", "INFO", str, "Logging level (DEBUG, INFO, WARNING, ERROR)."),
)


@dataclass
class Settings:
    """Resolved settings for one gateway process."""

    host: str = "127.0.0.1"
    port: int = 8765
    public_url: str | None = None
    data_dir: str = "./gateway-data"
    envs_dir: str = "./gateway-envs"
    build_environments: bool = True
    token: str | None = field(default=None, repr=False)
    token_sha256: str | None = field(default=None, repr=False)
    default_timeout: float = 60.0
    max_timeout: float = 3600.0
    max_output_bytes: int = 1 * MIB
    max_body_bytes: int = 8 * MIB
    max_upload_bytes: int = 256 * MIB
    kernel_start_timeout: float = 60.0
    interrupt_grace: float = 5.0
    notebook_write_delay: float = 1.0
    pool_size: int = 2
    max_live_kernels: int = 0
    idle_pause_seconds: float = 1800.0
    retention_days: float = 0.0
    resume_strategy: str = "snapshot"
    snapshot_fallback_replay: bool = False
    snapshot_timeout: float = 120.0
    jwt_jwks: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_principal_claim: str = "sub"
    jwt_role_claim: str = "role"
    jwt_role_map: dict[str, str] = field(default_factory=dict)
    replay_normalisers: list[tuple[str, str]] = field(default_factory=list)
    websocket_replay_seconds: float = 60.0
    sandbox: str = "auto"
    container_engine: str | None = None
    server_user: str = "agent-gateway"
    sandbox_uids: str = "1000000-1009999"
    egress_allow: list[str] = field(default_factory=list)
    egress_credentials: str | None = None
    egress_trust: str | None = None
    workspace_volumes: str = "auto"
    memory_limit: int = 2048 * MIB
    cpu_limit: float = 1.0
    pids_limit: int = 256
    file_size_limit: int = 1024 * MIB
    workspace_limit: int = 5 * 1024 * MIB
    log_level: str = "INFO"

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()

    @property
    def envs_path(self) -> Path:
        return Path(self.envs_dir).expanduser().resolve()

    @classmethod
    def resolve(cls, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> "Settings":
        """Build settings from the environment and explicit overrides (CLI flags, tests)."""
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        for setting in REGISTRY:
            if setting.env in environ:
                values[setting.name] = setting.type(environ[setting.env])
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = value
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown settings: {sorted(unknown)}")
        settings = cls(**values)
        if settings.resume_strategy not in ("snapshot", "replay"):
            raise ValueError("resume_strategy must be 'snapshot' or 'replay'")
        if settings.sandbox not in ("auto", "none", "process", "sandbox", "container"):
            raise ValueError("sandbox must be auto, none, process, sandbox or container")
        if settings.workspace_volumes not in ("auto", "on", "off"):
            raise ValueError("workspace_volumes must be auto, on or off")
        uid_range(settings.sandbox_uids)
        if settings.max_live_kernels <= 0:
            settings.max_live_kernels = default_max_live_kernels()
        return settings


def uid_range(text: str) -> tuple[int, int]:
    """``first-last`` as (first uid, how many)."""
    first, sep, last = text.partition("-")
    if not (first.strip().isdigit() and sep and last.strip().isdigit()) or int(last) < int(first) or int(first) < 1000:
        raise ValueError(f"sandbox_uids must look like 1000000-1009999 (unprivileged uids), not {text!r}")
    return int(first), int(last) - int(first) + 1


def default_max_live_kernels() -> int:
    """Three quarters of the machine's memory at 64 MiB a kernel (an idle ipykernel is about 50)."""
    import psutil

    return max(4, int(psutil.virtual_memory().total * 0.75 // (64 * MIB)))
