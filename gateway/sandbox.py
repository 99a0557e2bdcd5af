"""How a kernel process is isolated: the profiles ``none``, ``process`` and ``sandbox``.

``none``     the kernel runs as the gateway's own user, as before: no wrapping at all.
``process``  own cgroups (memory, CPU, pids), rlimits (file size, no core dumps) and its own
             unprivileged uid (``setpriv``). It shares the host's file system (guarded only by
             file permissions), network and process table.
``sandbox``  ``process`` inside bubblewrap: own mount, pid, network, ipc, uts and cgroup
             namespaces; only /usr, the interpreter, the workspace (at ``/workspace``) and the
             kernel's runtime directory (at its own path) are visible; no network but ``lo``.

The launch order, all in the privileged helper (``gateway.helper``): it forks; a ``preexec_fn``
joins the cgroups, sets rlimits and the umask, and (``process``) enters the workspace by
descriptor; for ``sandbox`` it then execs ``bwrap`` (still root, with an environment of its own:
nothing a session chose reaches a root process) which binds the workspace and the runtime
directory by descriptor and execs ``setpriv`` inside the namespaces to drop to the kernel's uid
with no capabilities and ``no_new_privs``; for ``process`` it execs ``setpriv`` directly. Only
then does ``env -i`` give the kernel its environment. The kernel is never a child of the server
(bwrap sits between them and calls ``setsid``): signal it through its cgroup, interrupt it with
``interrupt_request``.

``prepare(spec)`` turns a ``SandboxSpec`` into a ``LaunchPlan`` (environment, the kernel's
``CgroupSet``, rlimits) whose ``start()`` runs the kernel; ``probe_profiles()`` checks which
profiles really start a Python with ipykernel here.
"""

from __future__ import annotations

import os
import pwd
import resource
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import psutil

from gateway import cgroups, safefs
from gateway.cgroups import CgroupSet, Support
from gateway.environments import Environment, sandbox_paths

PROFILES = ("none", "process", "sandbox")  # what this host launches (and ``probe_profiles`` checks)
CONTAINER = "container"  # launched by a container engine (``gateway.containers``): a plan, no launcher here
SANDBOX_WORKSPACE = "/workspace"
DEFAULT_FIRST_UID = 1_000_000
DEFAULT_UID_COUNT = 10_000
UNIX_PATH_MAX = 107
# /etc files a Python process wants to find (dynamic loader cache, time zone, name service order).
ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/etc/nsswitch.conf")
# Fontconfig's configuration and cache: plots find the system's fonts, and fc-list says nothing.
FONT_PATHS = ("/etc/fonts", "/var/cache/fontconfig")
# Top-level names that are symlinks into /usr on merged-/usr systems, or directories elsewhere.
USR_ALIASES = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Variables of the gateway's environment a kernel must not inherit under isolation.
GATEWAY_ONLY_ENV = ("HOME", "USER", "LOGNAME", "PATH", "TMPDIR", "SHELL", "MAIL", "VIRTUAL_ENV", "PYTHONHOME",
                    "PYTHONEXECUTABLE", "PYTHONUSERBASE", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME",
                    "XDG_DATA_HOME", "XDG_CACHE_HOME", "JPY_PARENT_PID")
PYTHON_NAMES = ("python", f"python{sys.version_info[0]}", f"python{sys.version_info[0]}.{sys.version_info[1]}")
PROBE_SOURCE = "import os, ipykernel.kernelapp, zmq, cloudpickle; print('probe-ok', os.getuid())"
# What the root processes of a launch (bwrap, setpriv) run with: nothing of the session's.
LAUNCHER_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
ENV_PROGRAM = "/usr/bin/env"
# The kernel's umask: its files are its own; its ipc sockets are also open to the server's group,
# which owns its runtime directory (set-group-id), so the unprivileged server can connect.
KERNEL_UMASK = 0o007


class IsolationUnavailable(RuntimeError):
    """A profile cannot run here; the message says why."""


@dataclass(frozen=True)
class Limits:
    """Per-kernel limits. ``address_space_bytes`` (RLIMIT_AS) applies only without a memory cgroup."""

    memory_bytes: int | None = None
    cpu_cores: float | None = None
    pids: int | None = None
    file_size_bytes: int | None = None
    address_space_bytes: int | None = None

    def for_cgroup(self) -> cgroups.Limits:
        return cgroups.Limits(self.memory_bytes, self.cpu_cores, self.pids)


@dataclass(frozen=True)
class Interpreter:
    """A Python a kernel can be started with, and what it needs to be found by an unprivileged uid."""

    executable: str
    pythonpath: tuple[str, ...] = ()
    read_only: tuple[str, ...] = ()  # directories a sandbox binds read-only for it
    reason: str = ""
    skipped_pth: tuple[str, ...] = ()  # .pth files of PYTHONPATH directories Python will not run

    def to_dict(self) -> dict[str, Any]:
        return {"executable": self.executable, "pythonpath": list(self.pythonpath),
                "read_only": list(self.read_only), "reason": self.reason, "skipped_pth": list(self.skipped_pth)}


@dataclass(frozen=True)
class SandboxSpec:
    """What one kernel launch should look like. ``name`` names its cgroups (the kernel id)."""

    profile: str
    name: str
    workspace: Path
    runtime_dir: Path
    uid: int | None = None
    gid: int | None = None
    limits: Limits = Limits()
    cgroup_parent: str = cgroups.DEFAULT_PARENT
    read_only_paths: tuple[str, ...] = ()
    interpreter: Interpreter | None = None
    hostname: str = "sandbox"
    log_file: Path | None = None  # the kernel's stdout and stderr (its start banner), appended
    server_gid: int | None = None  # the unprivileged server's group: its runtime dir is shared with it
    environment: str | None = None  # the directory name of the kernel's environment (gateway.environments)


@dataclass
class LaunchPlan:
    """Everything needed to start one kernel under its profile; ``release()`` undoes ``prepare()``."""

    spec: SandboxSpec
    interpreter: Interpreter
    cwd: str
    home: str
    cgroup: CgroupSet | None = None
    rlimits: list[tuple[int, int]] = field(default_factory=list)
    enforced: dict[str, str] = field(default_factory=dict)

    @property
    def profile(self) -> str:
        return self.spec.profile

    def command(self, argv: list[str], env: dict[str, str], workspace_fd: int, runtime_fd: int) -> list[str]:
        """The full argv: the launcher (bwrap and setpriv, or setpriv), then ``env -i`` with the
        kernel's environment, then the kernel's argv with its Python replaced by the plan's."""
        if not argv:
            raise ValueError("empty kernel command")
        program = argv[0]
        if program == sys.executable or os.path.basename(program) in PYTHON_NAMES:
            program = self.interpreter.executable  # whichever Python the server runs, the plan's runs kernels
        if self.profile == "none":
            return [program, *argv[1:]]
        if self.profile == "process":
            prefix = setpriv_args(self.spec.uid or 0, _gid(self.spec))
        else:
            prefix = bwrap_args(self.spec, self.interpreter, workspace_fd, runtime_fd)
        variables = [f"{name}={value}" for name, value in self.environment(env).items()]
        return [*prefix, ENV_PROGRAM, "-i", *variables, program, *argv[1:]]

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        """The kernel's environment: ``base`` minus the gateway's identity, plus the plan's own."""
        if self.profile == "none":
            return dict(base)
        env = {name: value for name, value in base.items() if name not in GATEWAY_ONLY_ENV}
        bin_dir = os.path.dirname(self.interpreter.executable)
        env.update(HOME=self.home, USER="kernel", LOGNAME="kernel", PYTHONNOUSERSITE="1",
                   PATH=":".join(dict.fromkeys([bin_dir, "/usr/local/bin", "/usr/bin", "/bin"])))
        env.setdefault("LANG", "C.UTF-8")
        if self.profile != "process":  # a /tmp of its own
            env["TMPDIR"] = "/tmp"
        paths = [*self.interpreter.pythonpath, *filter(None, base.get("PYTHONPATH", "").split(":"))]
        if paths:
            env["PYTHONPATH"] = ":".join(dict.fromkeys(paths))
        return env

    def preexec_fn(self, workspace_fd: int | None = None) -> Callable[[], None]:
        """Run in the forked child as root: join the cgroups, set the rlimits and the umask, and
        enter the workspace by descriptor (``process``; bwrap enters it inside the sandbox)."""
        join = self.cgroup.joiner() if self.cgroup is not None else None
        rlimits = list(self.rlimits)

        def before_exec() -> None:
            if join is not None:
                join()
            for which, value in rlimits:
                resource.setrlimit(which, (value, value))
            os.umask(KERNEL_UMASK)
            if workspace_fd is not None:
                os.fchdir(workspace_fd)

        return before_exec

    def start(self, argv: list[str], env: dict[str, str], **popen: Any) -> subprocess.Popen[bytes]:
        """Start the kernel. The workspace and the runtime directory are opened once, without
        following links, and handed to the launch as descriptors (never resolved again by path)."""
        if self.profile == CONTAINER:
            raise ValueError("a container's plan is started by its engine (gateway.containers)")
        if self.profile == "none":
            return subprocess.Popen(self.command(argv, env, -1, -1), env=self.environment(env), cwd=self.cwd,
                                    start_new_session=True, **popen)
        with safefs.opened(safefs.open_root(self.spec.workspace)) as workspace, \
                safefs.opened(safefs.open_root(self.spec.runtime_dir)) as runtime:
            sandboxed = self.profile == "sandbox"
            return subprocess.Popen(self.command(argv, env, workspace, runtime), env=dict(LAUNCHER_ENV), cwd="/",
                                    preexec_fn=self.preexec_fn(None if sandboxed else workspace),
                                    pass_fds=(workspace, runtime) if sandboxed else (), start_new_session=True,
                                    **popen)

    def hand_over(self, name: str) -> None:
        """Give a file the server wrote in the kernel's runtime directory (the connection file) to
        the kernel's uid, readable by the server's group; by descriptor: a link is not followed."""
        if self.spec.uid is None:
            return
        group = self.spec.server_gid if self.spec.server_gid is not None else _gid(self.spec)
        with safefs.opened(safefs.open_root(self.spec.runtime_dir)) as runtime:
            fd, _info = safefs.open_entry(runtime, name)
            with safefs.opened(fd):
                os.fchown(fd, self.spec.uid, group)
                os.fchmod(fd, 0o640 if self.spec.server_gid is not None else 0o600)

    def oom_killed(self) -> bool:
        return self.cgroup is not None and self.cgroup.oom_killed()

    def release(self) -> None:
        """Kill whatever still runs in the kernel's cgroups and remove them (safe to call twice)."""
        if self.cgroup is not None:
            self.cgroup.remove()


# --- interpreters ------------------------------------------------------------------------------

def _denied(path: str, ancestors: bool) -> str | None:
    """Why other users cannot read ``path`` (or traverse its parents, with ``ancestors``), else None."""
    real = os.path.realpath(path)
    try:
        mode = os.stat(real).st_mode
    except OSError as error:
        return f"{real}: {error.strerror}"
    need = stat.S_IROTH | (stat.S_IXOTH if stat.S_ISDIR(mode) or mode & stat.S_IXUSR else 0)
    if mode & need != need:
        return f"{real} is mode {stat.S_IMODE(mode):04o}: other users cannot read it"
    return untraversable(real) if ancestors else None


def untraversable(path: str) -> str | None:
    """Why other users cannot reach ``path`` through its parent directories, else None."""
    for parent in Path(os.path.realpath(path)).parents:
        mode = os.stat(parent).st_mode
        if not mode & stat.S_IXOTH:
            return f"{parent} is mode {stat.S_IMODE(mode):04o}: other users cannot traverse it"
    return None


def _first_denied(paths: list[str], ancestors: bool) -> str | None:
    for path in paths:
        why = _denied(path, ancestors)
        if why:
            return why
    return None


def site_dirs() -> list[str]:
    """The gateway environment's site-packages directories."""
    paths = sysconfig.get_paths()
    return [p for p in dict.fromkeys([paths["purelib"], paths["platlib"]]) if os.path.isdir(p)]


def _roots(paths: list[str]) -> tuple[str, ...]:
    """The outermost of ``paths`` (real paths), without those /usr already provides."""
    real = sorted({os.path.realpath(p) for p in paths})
    kept: list[str] = []
    for path in real:
        if path == "/usr" or path.startswith("/usr/") or any(path.startswith(k + "/") for k in kept):
            continue
        kept.append(path)
    return tuple(kept)


def _pth_files(directories: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted(str(p) for d in directories for p in Path(d).glob("*.pth")))


def own_interpreter(profile: str) -> tuple[Interpreter | None, str]:
    """The gateway's own Python, if the kernel's uid can run it under ``profile``; else why not."""
    needed = [sys.executable, sysconfig.get_paths()["stdlib"], *site_dirs()]
    binds = _roots([sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))])
    if profile == "process":
        why = _first_denied(needed, ancestors=True)
    else:
        why = _first_denied([*needed, *binds], ancestors=False)
    if why:
        return None, f"the gateway's interpreter {sys.executable} is not usable: {why}"
    reason = "the gateway's own interpreter" + (" (bound read-only)" if profile == "sandbox" else "")
    return Interpreter(sys.executable, read_only=binds if profile == "sandbox" else (), reason=reason), ""


def system_interpreter(profile: str) -> tuple[Interpreter | None, str]:
    """/usr/bin/python3.X of the gateway's version, with the gateway's site-packages on PYTHONPATH."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    executable = f"/usr/bin/python{version}"
    if not os.access(executable, os.X_OK):
        return None, f"{executable} does not exist (a system Python {version} is needed)"
    sites = tuple(site_dirs())
    why = _first_denied([executable, *sites], ancestors=profile == "process")
    if why:
        return None, f"{executable} with the gateway's site-packages is not usable: {why}"
    reason = f"{executable} (same {version} ABI) with the gateway's site-packages on PYTHONPATH"
    return Interpreter(executable, pythonpath=sites, read_only=_roots(list(sites)) if profile == "sandbox" else (),
                       reason=reason, skipped_pth=_pth_files(sites)), ""


def environment_interpreter(environment: Environment, profile: str) -> Interpreter:
    """The Python of a built environment under ``profile``. The sandbox binds the environment and
    its base interpreter read-only; under ``process``, where the kernel's uid cannot reach the
    base interpreter, /usr/bin/python3.X (same X.Y) runs with the environment's site-packages."""
    label = f"environment {environment.name} ({environment.short_hash})"
    if profile == "none":
        return Interpreter(environment.executable, reason=label)
    if profile == CONTAINER:  # the image holds it at the same path (``gateway.kernel_image``)
        return Interpreter(environment.executable, reason=f"{label}, in its kernel image")
    site = environment.site_packages
    if profile == "sandbox":
        binds = _roots(list(sandbox_paths(environment)))
        why = _first_denied([environment.executable, site, *binds], ancestors=False)
        if why:
            raise IsolationUnavailable(f"the {label} is not usable by a kernel's uid: {why}")
        return Interpreter(environment.executable, read_only=binds, reason=f"{label}, bound read-only")
    if not _first_denied([environment.executable, site], ancestors=True):
        return Interpreter(environment.executable, reason=label)
    major, minor = environment.python_version.split(".")[:2]
    executable = f"/usr/bin/python{major}.{minor}"
    why = _first_denied([executable, site], ancestors=True)
    if why or not os.access(executable, os.X_OK):
        raise IsolationUnavailable(f"the {label} is not usable by a kernel's uid under process: "
                                   f"{why or executable + ' does not exist'}")
    return Interpreter(executable, pythonpath=(site,), reason=f"{executable} with the {label}'s site-packages",
                       skipped_pth=_pth_files((site,)))


def kernel_interpreter(profile: str = "process") -> Interpreter:
    """The Python a kernel under ``profile`` runs; raises ``IsolationUnavailable`` naming every refusal."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    if profile == "none":
        return Interpreter(sys.executable, reason="the gateway's own interpreter, as its own user")
    own, why_own = own_interpreter(profile)
    if own is not None:
        return own
    system, why_system = system_interpreter(profile)
    if system is not None:
        return replace(system, reason=f"{system.reason}; {why_own}")
    raise IsolationUnavailable(f"no interpreter an unprivileged uid can run: {why_own}; {why_system}")


# --- uids ---------------------------------------------------------------------------------------

def _process_uids() -> set[int]:
    """The real and effective uids of every running process."""
    uids: set[int] = set()
    for process in psutil.process_iter(["uids"]):
        if process.info["uids"] is not None:
            uids.update(process.info["uids"][:2])
    return uids


def _has_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


class UidPool:
    """Hands out numeric uids (no /etc/passwd entry needed) from ``first .. first+count-1``.

    A uid is skipped while it has an account or a running process (a kernel that outlived a
    gateway crash keeps its uid until it is stopped). ``allocate`` is idempotent per owner.
    """

    def __init__(self, first: int = DEFAULT_FIRST_UID, count: int = DEFAULT_UID_COUNT):
        if first < 1000 or count < 1:
            raise ValueError("uids below 1000 belong to the system; count must be positive")
        self.first = first
        self.count = count
        self.owners: dict[str, int] = {}
        self.lock = threading.Lock()  # allocate() scans the process table, so callers run it in threads

    def allocate(self, owner: str) -> int:
        with self.lock:
            if owner in self.owners:
                return self.owners[owner]
            taken = set(self.owners.values()) | _process_uids()
            for uid in range(self.first, self.first + self.count):
                if uid not in taken and not _has_account(uid):
                    self.owners[owner] = uid
                    return uid
        raise IsolationUnavailable(f"all {self.count} kernel uids from {self.first} are in use")

    def reserve(self, owner: str, uid: int) -> None:
        """Record a uid already in use (a reattached kernel's)."""
        self.owners[owner] = uid

    def release(self, owner: str) -> None:
        with self.lock:
            self.owners.pop(owner, None)

    def owner_of(self, uid: int) -> str | None:
        return next((owner for owner, held in self.owners.items() if held == uid), None)


# --- building a plan ----------------------------------------------------------------------------

def _gid(spec: SandboxSpec) -> int:
    return spec.gid if spec.gid is not None else spec.uid if spec.uid is not None else os.getgid()


def _check_spec(spec: SandboxSpec) -> None:
    if spec.profile not in (*PROFILES, CONTAINER):
        raise ValueError(f"unknown profile {spec.profile!r}; known: {', '.join((*PROFILES, CONTAINER))}")
    if spec.profile == "none":
        return
    if os.geteuid() != 0:
        raise IsolationUnavailable(f"the {spec.profile} profile needs the gateway to run as root")
    if spec.uid is None or spec.uid < 1000:
        raise ValueError(f"the {spec.profile} profile needs an unprivileged uid (>= 1000), not {spec.uid}")
    for tool in {"process": ("setpriv",), "sandbox": ("setpriv", "bwrap")}.get(spec.profile, ()):
        if shutil.which(tool) is None:
            raise IsolationUnavailable(f"the {spec.profile} profile needs `{tool}` on PATH")
    if len(str(spec.runtime_dir)) + 10 > UNIX_PATH_MAX:
        raise ValueError(f"runtime dir {spec.runtime_dir} is too long for ipc socket paths")


def _prepare_dirs(spec: SandboxSpec) -> str:
    """Create the workspace and runtime dir, owned by the kernel's uid; return the kernel's HOME.
    With ``server_gid`` the runtime dir is also the server's group's (mode 2770): the server
    writes the connection file there and connects to the kernel's ipc sockets."""
    if spec.profile == "none":
        spec.workspace.mkdir(parents=True, exist_ok=True)
        spec.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return os.environ.get("HOME", str(spec.workspace))
    owner = (spec.uid or 0, _gid(spec))
    shared = (owner[0], spec.server_gid) if spec.server_gid is not None else owner
    # The runtime dir and the workspace are the kernel's: an earlier kernel of the session (this
    # is run again at every restart) may have left links there, so they are changed only
    # through descriptors (``gateway.safefs``), and a ``home`` that is not a directory is replaced.
    home = spec.runtime_dir / "home"
    with safefs.opened(safefs.open_root(spec.runtime_dir, create=True)) as runtime:
        try:
            os.close(safefs.open_dir(runtime, ("home",)))
        except (safefs.UnsafeEntry, FileNotFoundError):
            safefs.remove_entry(runtime, "home", missing_ok=True)
        with safefs.opened(safefs.open_dir(runtime, ("home",), create=True, owner=owner, mode=0o700)) as fd:
            os.fchown(fd, *owner)
        os.fchown(runtime, *shared)
        os.fchmod(runtime, 0o2770 if spec.server_gid is not None else 0o700)
    with safefs.opened(safefs.open_root(spec.workspace, create=True)) as workspace:
        os.fchown(workspace, *owner)
        # bwrap enters the workspace (--chdir) as root without CAP_DAC_OVERRIDE, so it must be
        # traversable; under process only the kernel's uid enters it (Popen's cwd, as full root).
        os.fchmod(workspace, 0o711 if spec.profile == "sandbox" else 0o700)
    if spec.profile == "process":
        why = untraversable(str(spec.workspace)) or untraversable(str(spec.runtime_dir))
        if why:
            raise IsolationUnavailable(f"the process profile shares the host's file system, so {why}")
        return str(home)
    return "/tmp"


def _make_cgroup(spec: SandboxSpec, support: Support | None) -> CgroupSet | None:
    if spec.profile in ("none", CONTAINER):  # a container's cgroups are its engine's
        return None
    support = support or cgroups.detect_cached(spec.cgroup_parent)
    if not support.controllers and support.v2_parent is None:
        return None
    group = CgroupSet(support, spec.name)
    if group.exists():
        group.remove()
    group.create(spec.limits.for_cgroup())
    return group


def _rlimit(which: int, value: int) -> tuple[int, int]:
    """``value`` capped at the current hard limit (root here cannot raise hard limits)."""
    hard = resource.getrlimit(which)[1]
    return which, value if hard == resource.RLIM_INFINITY else min(value, hard)


def _limits_plan(spec: SandboxSpec, group: CgroupSet | None) -> tuple[list[tuple[int, int]], dict[str, str]]:
    """The rlimits to set and, per limit, how it is enforced (or that it is not)."""
    limits, rlimits, enforced = spec.limits, [], {}
    if spec.profile == "none":
        return [], {name: "not enforced (profile none)" for name, value in vars(limits).items() if value}
    if spec.profile == CONTAINER:  # the engine applies them (``gateway.containers.create_settings``)
        how = {"memory_bytes": "the container's memory limit", "cpu_cores": "the container's CPU quota",
               "pids": "the container's pids limit", "file_size_bytes": "RLIMIT_FSIZE (the container's ulimit)"}
        return [], {name: how[name] for name, value in vars(limits).items() if value and name in how}
    controllers = group.paths if group else {}
    rlimits.append(_rlimit(resource.RLIMIT_CORE, 0))
    if limits.file_size_bytes is not None:
        rlimits.append(_rlimit(resource.RLIMIT_FSIZE, limits.file_size_bytes))
        enforced["file_size_bytes"] = "RLIMIT_FSIZE"
    for name, controller in (("memory_bytes", "memory"), ("cpu_cores", "cpu"), ("pids", "pids")):
        if getattr(limits, name) is not None:
            version = group.version(controller) if group and controller in controllers else None
            enforced[name] = f"cgroup v{version}" if version else "not enforced (no cgroup controller)"
    if limits.pids is not None and "pids" not in controllers:
        rlimits.append(_rlimit(resource.RLIMIT_NPROC, limits.pids))
        enforced["pids"] = "RLIMIT_NPROC (the kernel's uid is its own)"
    if limits.address_space_bytes is not None and "memory" not in controllers:
        rlimits.append(_rlimit(resource.RLIMIT_AS, limits.address_space_bytes))
        enforced["memory_bytes"] = "RLIMIT_AS (allocations fail with MemoryError)"
    return rlimits, enforced


def kernel_pidfd(pid: int, connection_file: str) -> int | None:
    """A pidfd of ``pid`` if it is a running process whose command line names
    ``connection_file`` (a kernel, or its launcher, taken up after a crash: a reused pid is never
    taken for it); None otherwise."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        process = psutil.Process(pid)
        if process.status() != psutil.STATUS_ZOMBIE and connection_file in process.cmdline():
            return pidfd
    except psutil.Error:
        pass
    os.close(pidfd)
    return None


def setpriv_args(uid: int, gid: int) -> list[str]:
    """Drop to ``uid``/``gid`` with no groups, no capabilities and no way to gain privileges."""
    return [shutil.which("setpriv") or "setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]


def _usr_aliases() -> list[str]:
    args: list[str] = []
    for alias in USR_ALIASES:
        if os.path.islink(alias):
            args += ["--symlink", os.readlink(alias), alias]
        elif os.path.isdir(alias):
            args += ["--ro-bind", alias, alias]
    return args


class _Tree:
    """Emits ``--dir`` (mode 0755) for each missing parent of a mount destination, once."""

    def __init__(self, existing: set[str]):
        self.made = set(existing)

    def parents(self, destination: str) -> list[str]:
        args: list[str] = []
        for parent in reversed(Path(destination).parents):
            name = str(parent)
            if name == "/" or name in self.made:
                continue
            self.made.add(name)
            args += ["--perms", "0755", "--dir", name]
        self.made.add(destination)
        return args


def _check_not_exposed(spec: SandboxSpec, interpreter: Interpreter) -> None:
    """Refuse read-only binds that contain the workspace or runtime dir: their neighbours would show."""
    if spec.profile != "sandbox":
        return
    for own in (spec.workspace, spec.runtime_dir):
        real = Path(os.path.realpath(own))
        for path in ("/usr", *_roots([*interpreter.read_only, *spec.read_only_paths])):
            if real.is_relative_to(path):
                raise IsolationUnavailable(f"{own} lies inside the read-only bind {path}; the sandbox would "
                                           f"show everything next to it (move the data dir elsewhere)")


def bwrap_args(spec: SandboxSpec, interpreter: Interpreter, workspace_fd: int, runtime_fd: int) -> list[str]:
    """bwrap's arguments, run as root (so it can bind any path) and ending in ``setpriv``. The
    workspace and the runtime directory are bound from descriptors the helper opened."""
    args = [shutil.which("bwrap") or "bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
            "--unshare-cgroup-try", "--hostname", spec.hostname, "--new-session",
            "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP",
            "--ro-bind", "/usr", "/usr", *_usr_aliases()]
    tree = _Tree({"/usr", "/proc", "/dev", "/tmp", *USR_ALIASES})
    for name in (*ETC_FILES, *FONT_PATHS):  # /etc and /var made 0755: what is bound there can be read
        args += [*tree.parents(name), "--ro-bind-try", name, name]
    # /dev/shm of its own, writable: POSIX semaphores and shared memory (multiprocessing, joblib).
    args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/dev/shm",
             "--perms", "1777", "--tmpfs", "/tmp"]
    for path in _roots([*interpreter.read_only, *spec.read_only_paths]):
        args += [*tree.parents(path), "--ro-bind", path, path]
    args += ["--bind-fd", str(workspace_fd), SANDBOX_WORKSPACE]
    runtime = str(spec.runtime_dir)
    args += [*tree.parents(runtime), "--bind-fd", str(runtime_fd), runtime, "--chdir", SANDBOX_WORKSPACE, "--"]
    return args + setpriv_args(spec.uid or 0, _gid(spec))


def prepare(spec: SandboxSpec, support: Support | None = None) -> LaunchPlan:
    """Check ``spec``, create its directories and cgroups, and return the plan to launch with."""
    _check_spec(spec)
    interpreter = spec.interpreter or kernel_interpreter(spec.profile)
    _check_not_exposed(spec, interpreter)
    home = _prepare_dirs(spec)
    group = _make_cgroup(spec, support)
    try:
        rlimits, enforced = _limits_plan(spec, group)
    except BaseException:
        if group is not None:
            group.remove()
        raise
    return LaunchPlan(spec, interpreter, cwd=str(spec.workspace), home=home, cgroup=group,
                      rlimits=rlimits, enforced=enforced)


# --- probing what works here ----------------------------------------------------------------------

@dataclass(frozen=True)
class ProfileStatus:
    """Whether a profile started a Python with ipykernel here, and why not."""

    profile: str
    works: bool
    reason: str
    seconds: float = 0.0
    interpreter: Interpreter | None = None
    enforced: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"works": self.works, "reason": self.reason, "seconds": round(self.seconds, 3),
                "interpreter": self.interpreter.to_dict() if self.interpreter else None,
                "enforced": dict(self.enforced)}


_PROBED: dict[str, ProfileStatus] = {}
PROBE_LIMITS = Limits(memory_bytes=1 << 30, cpu_cores=1.0, pids=64, file_size_bytes=1 << 20)


def _run_probe(plan: LaunchPlan) -> tuple[bool, str]:
    """Start ``python -c PROBE_SOURCE`` exactly as a kernel is started."""
    argv = [plan.interpreter.executable, "-c", PROBE_SOURCE]
    try:
        process = plan.start(argv, {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as error:
        return False, f"could not run the launcher: {error}"
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    if process.returncode == 0 and "probe-ok" in stdout:
        uid = stdout.split()[-1]
        return True, f"started {plan.interpreter.executable} with ipykernel as uid {uid}"
    tail = (stderr or stdout).strip().splitlines()[-3:]
    return False, f"exit code {process.returncode}: {' | '.join(tail) or 'no output'}"


def probe_profile(profile: str, uid: int | None = None,
                  cgroup_parent: str = cgroups.DEFAULT_PARENT) -> ProfileStatus:
    """Really start ``python -c 'import ipykernel...'`` under ``profile`` (with limits and cgroups)."""
    base = Path(tempfile.mkdtemp(prefix="agw-probe-"))
    os.chmod(base, 0o711)
    pool = UidPool()
    uid = uid if uid is not None else (pool.allocate("probe") if profile != "none" else None)
    spec = SandboxSpec(profile, f"probe-{os.getpid()}-{profile}", base / "workspace", base / "run",
                       uid=uid, limits=PROBE_LIMITS, cgroup_parent=cgroup_parent)
    started = time.monotonic()
    plan: LaunchPlan | None = None
    try:
        plan = prepare(spec)
        works, reason = _run_probe(plan)
    except (IsolationUnavailable, OSError, ValueError) as error:
        works, reason = False, str(error)
    finally:
        if plan is not None:
            plan.release()
        shutil.rmtree(base, ignore_errors=True)
    return ProfileStatus(profile, works, reason, time.monotonic() - started,
                         plan.interpreter if plan else None, plan.enforced if plan else {})


def probe_profiles(refresh: bool = False, cgroup_parent: str = cgroups.DEFAULT_PARENT) -> dict[str, ProfileStatus]:
    """Per profile: does it work here, and why not. Probed once per process unless ``refresh``."""
    for profile in PROFILES:
        if refresh or profile not in _PROBED:
            _PROBED[profile] = probe_profile(profile, cgroup_parent=cgroup_parent)
    return {profile: _PROBED[profile] for profile in PROFILES}
