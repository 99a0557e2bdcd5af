"""The privileged helper: the only code of the gateway that runs as root while it serves.

``agent-gateway serve``, started as root, starts this process and then drops to an unprivileged
user; the server never parses a request as root. The helper takes requests over a socket pair
(``gateway.helper_wire``), one short operation each, and checks every argument before acting:

- kernels: prepare (directories, cgroups, limits), launch (bwrap/setpriv, with an environment of
  its own), poll, signal and release, by kernel name; only uids of the kernel range; only the
  signals a kernel's life needs;
- workspace volumes: make, mount, move, unmount;
- trees a kernel can write (workspaces, exchange and runtime directories): open a file for a
  download (the descriptor is passed back), install an upload from a passed descriptor, list,
  measure, remove, copy and hand over, all through ``gateway.safefs``.

Every path must lie beneath the directories the helper was given at start (the data directory
and the kernels' runtime root); they are reached from descriptors opened then, one component at
a time, never following a link, so neither a kernel nor a compromised server can point the
helper elsewhere. What the helper makes in the server's own directories is given to the
server's user. Requests run on a few threads, so a long walk of one workspace delays no other
request. The helper ignores SIGINT and SIGTERM and exits when the server's end closes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from gateway import cgroups, containers, environments, helper_wire, kernel_image, safefs, sandbox, volumes
from gateway.cgroups import CgroupSet
from gateway.clock import iso
from gateway.host import HelperConfig
from gateway.sandbox import Limits, SandboxSpec

log = logging.getLogger("gateway.helper")

THREADS = 8
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
CONNECTION_FILE = re.compile(r"^kernel-[A-Za-z0-9_-]{1,64}\.json$")
PATH_BYTES_MAX = 4096
ARGV_MAX = 64
ARG_BYTES_MAX = 8192
ENV_MAX = 256
ENV_BYTES_MAX = 512 * 1024
SIGNALS = {int(signal.SIGINT), int(signal.SIGTERM), int(signal.SIGKILL), int(signal.SIGHUP)}
PAGE_MAX = 10_000
DEPTH_MAX = 64


class Refused(ValueError):
    """A request the helper does not carry out: its message says which argument and why."""


# --- checking arguments ---------------------------------------------------------------------

def _text(value: Any, what: str, limit: int = PATH_BYTES_MAX) -> str:
    if not isinstance(value, str) or "\x00" in value:
        raise Refused(f"{what} must be a string without NUL")
    try:
        if len(value.encode("utf-8")) > limit:
            raise Refused(f"{what} is longer than {limit} bytes")
    except UnicodeEncodeError:
        raise Refused(f"{what} is not valid Unicode") from None
    return value


def _name(value: Any) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise Refused("a kernel name is 1 to 64 letters, digits, '-' or '_'")
    return value


def _path(value: Any, what: str = "path") -> Path:
    """An absolute, normalised path (whether it lies beneath an anchor is checked when opened)."""
    text = _text(value, what)
    if not text.startswith("/") or os.path.normpath(text) != text:
        raise Refused(f"{what} must be an absolute, normalised path")
    return Path(text)


def _parts(value: Any, what: str = "parts") -> safefs.Parts:
    if not isinstance(value, list) or len(value) > DEPTH_MAX:
        raise Refused(f"{what} must be a list of at most {DEPTH_MAX} names")
    parts = tuple(_text(part, what, 255) for part in value)
    if any(part in ("", ".", "..") or "/" in part for part in parts):
        raise Refused(f"{what} holds a name that is not one")
    return parts


def _int(value: Any, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise Refused(f"{what} must be an integer from {low} to {high}")
    return value


class Helper:
    """The operations, each checking its arguments, on the state of one helper process."""

    def __init__(self, config: HelperConfig, greeting: dict[str, Any]):
        self.config = config
        self.greeting = greeting
        self.first_uid, self.uid_count = config.kernel_uids
        self.plans: dict[str, sandbox.LaunchPlan] = {}
        self.images: dict[str, str] = {}  # container kernels' images, by kernel name
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.adopted: dict[str, tuple[int, int]] = {}  # launchers an earlier helper started: (pid, pidfd)
        self.engine = containers.Engine(config.container_engine, instance=containers.instance_of(config.data_dir)) \
            if config.container_engine else None
        self.lock = threading.Lock()
        self.ops: dict[str, Callable[..., tuple[Any, list[int]] | Any]] = {
            name.removeprefix("op_").replace("__", "."): getattr(self, name)
            for name in dir(self) if name.startswith("op_")}

    def op_hello(self) -> dict[str, Any]:
        """What the helper found at its start (the profile, volumes), asked again by a server
        that re-executed itself after dropping root."""
        return self.greeting

    # -- owners ------------------------------------------------------------------------------

    def _kernel_owner(self, value: Any) -> tuple[int, int]:
        if not isinstance(value, list) or len(value) != 2:
            raise Refused("an owner is [uid, gid]")
        uid = _int(value[0], "uid", self.first_uid, self.first_uid + self.uid_count - 1)
        gid = _int(value[1], "gid", self.first_uid, self.first_uid + self.uid_count - 1)
        return uid, gid

    def _owner(self, value: Any) -> tuple[int, int] | None:
        """A kernel's owner, or (None) the server's user: nothing made here is root's."""
        return self.config.server_owner if value is None else self._kernel_owner(value)

    def _limits(self, raw: Any) -> Limits:
        if not isinstance(raw, dict) or set(raw) - set(Limits.__dataclass_fields__):
            raise Refused("limits must be an object of known limits")
        values: dict[str, Any] = {}
        for name, value in raw.items():
            if value is None:
                values[name] = None
            elif name == "cpu_cores":
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 4096:
                    raise Refused("cpu_cores must be a positive number")
                values[name] = float(value)
            else:
                values[name] = _int(value, name, 1, 1 << 62)
        return Limits(**values)

    # -- kernels -----------------------------------------------------------------------------

    def op_kernel__prepare(self, name: Any, profile: Any, workspace: Any, runtime_dir: Any, uid: Any,
                           limits: Any, hostname: Any = "sandbox",
                           cgroup_parent: Any = cgroups.DEFAULT_PARENT, environment: Any = None) -> dict[str, Any]:
        """Make the kernel's directories and cgroups; remember the plan for ``kernel.launch``.
        ``environment`` names a built environment (its directory) the kernel runs in."""
        name = _name(name)
        if profile not in ("process", "sandbox", sandbox.CONTAINER):
            raise Refused("profile must be process, sandbox or container")
        if profile == sandbox.CONTAINER and (environment is None or self.engine is None):
            raise Refused("a container kernel needs an environment (its image) and a container engine")
        owner = self._kernel_owner([uid, uid])
        runtime = _path(runtime_dir, "runtime_dir")
        if len(str(runtime)) + 10 > sandbox.UNIX_PATH_MAX:
            raise Refused("runtime_dir is too long for ipc socket paths")
        spec = SandboxSpec(profile, name, _path(workspace, "workspace"), runtime, uid=owner[0], gid=owner[1],
                           limits=self._limits(limits), hostname=_text(hostname, "hostname", 64),
                           cgroup_parent=_name(cgroup_parent),
                           server_gid=self.config.server_owner[1] if self.config.server_owner else None)
        if environment is not None:
            spec = replace(spec, environment=_text(environment, "environment", 80),
                           interpreter=sandbox.environment_interpreter(self._environment(environment), profile))
        if profile == sandbox.CONTAINER:
            assert self.engine is not None and spec.environment is not None
            image = kernel_image.image_tag(self._environment(spec.environment))
            try:
                if not self.engine.has_image(image):
                    raise Refused(f"the container engine has no kernel image {image}: run "
                                  f"`agent-gateway image build {spec.environment.rsplit('-', 1)[0]}`")
            except containers.EngineUnavailable as exc:
                raise Refused(str(exc)) from None
            self.images[name] = image
        plan = sandbox.prepare(spec)
        with self.lock:
            self.plans[name] = plan
        return {"enforced": plan.enforced, "interpreter": plan.interpreter.to_dict(),
                "cgroup": plan.cgroup.name if plan.cgroup else None}

    def _environment(self, name: Any) -> environments.Environment:
        """A built environment under the configured root, checked (``environments.trusted``)."""
        if self.config.environments is None:
            raise Refused("this helper has no kernel environments")
        try:
            return environments.trusted(Path(self.config.environments), _text(name, "environment", 80))
        except environments.EnvironmentProblem as exc:
            raise Refused(f"environment {name}: {exc}") from None

    def op_kernel__launch(self, name: Any, argv: Any, env: Any, connection_file: Any,
                          log_file: Any = None) -> tuple[dict[str, Any], list[int]]:
        """Start the prepared kernel, its output appended to ``log_file`` (the server's file,
        opened here without following links); returns its launcher's pid, and a pidfd of it."""
        name = _name(name)
        plan = self.plans.get(name)
        if plan is None:
            raise Refused(f"kernel {name} was not prepared")
        if not isinstance(argv, list) or not 0 < len(argv) <= ARGV_MAX:
            raise Refused(f"argv must be a list of 1 to {ARGV_MAX} strings")
        command = [_text(arg, "an argument", ARG_BYTES_MAX) for arg in argv]
        if not isinstance(env, dict) or len(env) > ENV_MAX:
            raise Refused(f"env must be an object of at most {ENV_MAX} variables")
        variables = {_text(key, "a variable name", 128): _text(value, "a variable", 64 * 1024)
                     for key, value in env.items()}
        if any(not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) for key in variables):
            raise Refused("a variable name is not one")
        if sum(len(k) + len(v) for k, v in variables.items()) > ENV_BYTES_MAX:
            raise Refused("the environment is too large")
        connection = _text(connection_file, "connection_file", 255)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\.json", connection):
            raise Refused("connection_file must be the name of a .json file in the kernel's runtime dir")
        plan.hand_over(connection)
        if plan.profile == sandbox.CONTAINER:
            started = self._run_container(name, plan, command, variables)
            return started, _pidfds(started.get("pid"))
        output = self._open_log(_path(log_file, "log_file")) if log_file is not None else None
        try:
            process = plan.start(command, variables, stdin=subprocess.DEVNULL, stdout=output, stderr=output)
        finally:
            if output is not None:
                os.close(output)
        with self.lock:
            self.processes[name] = process
            self._forget_adopted(name)
        return {"pid": process.pid}, [os.pidfd_open(process.pid)]

    def _run_container(self, name: str, plan: sandbox.LaunchPlan, argv: list[str],
                       env: dict[str, str]) -> dict[str, Any]:
        """Start a prepared container kernel on the engine: its Python the environment's (in its image)."""
        assert self.engine is not None and plan.spec.uid is not None
        program = plan.interpreter.executable if os.path.basename(argv[0]) in sandbox.PYTHON_NAMES or \
            argv[0] == sys.executable else argv[0]
        launch = containers.ContainerLaunch(
            kernel=name, image=self.images[name], argv=(program, *argv[1:]), env=plan.environment(env),
            uid=plan.spec.uid, gid=plan.spec.gid if plan.spec.gid is not None else plan.spec.uid,
            workspace=str(plan.spec.workspace), runtime_dir=str(plan.spec.runtime_dir), limits=plan.spec.limits,
            hostname=plan.spec.hostname, instance=self._engine().instance)
        try:
            state = self.engine.run(launch)
        except containers.EngineUnavailable as exc:
            raise Refused(str(exc)) from None
        return {"pid": state.pid, "container": state.id}

    # -- container kernels (by kernel name: also those an earlier helper started) ---------------

    def _engine(self) -> containers.Engine:
        if self.engine is None:
            raise Refused("this gateway has no container engine")
        return self.engine

    def op_container__adopt(self, name: Any) -> tuple[dict[str, Any], list[int]]:
        """The kernel's container, started before a crash: its state and, while it runs (on this
        host's engine), a pidfd of its init."""
        state = self.op_container__poll(name)
        return state, _pidfds(state.get("pid")) if state.get("running") else []

    def op_container__image(self, environment: Any) -> dict[str, Any]:
        """The kernel image of a built environment (its directory name), and whether the engine has it."""
        built = self._environment(environment)
        image = kernel_image.image_tag(built)
        hidden = kernel_image.mounted_over(built)
        if hidden:
            return {"image": image, "present": False, "why": hidden}
        try:
            return {"image": image, "present": self._engine().has_image(image)}
        except containers.EngineUnavailable as exc:
            raise Refused(str(exc)) from None

    def op_container__poll(self, name: Any) -> dict[str, Any]:
        """Whether the kernel's container runs; its exit code and whether its memory limit ended it."""
        try:
            state = self._engine().state(_name(name))
        except containers.EngineUnavailable as exc:
            return {"running": None, "exists": None, "returncode": None, "oom_killed": False, "unreachable": str(exc)}
        if state is None:
            return {"running": False, "exists": False, "returncode": None, "oom_killed": False, "pid": None}
        return {"running": state.running, "exists": True, "returncode": state.exit_code,
                "oom_killed": state.oom_killed, "pid": state.pid}

    def op_container__signal(self, name: Any, signum: Any) -> bool:
        if signum not in SIGNALS:
            raise Refused("signum must be SIGINT, SIGTERM, SIGKILL or SIGHUP")
        try:
            return self._engine().signal(_name(name), int(signum))
        except containers.EngineUnavailable as exc:
            raise Refused(str(exc)) from None

    def op_container__release(self, name: Any, runtime_dir: Any = None, log_file: Any = None) -> dict[str, Any]:
        """Remove the kernel's container (its output appended to ``log_file`` first); with
        ``runtime_dir``, remove that too (the final cleanup)."""
        name = _name(name)
        engine = self._engine()
        state = None
        try:
            if log_file is not None and engine.state(name) is not None:
                output = engine.logs(name)
                if output:
                    fd = self._open_log(_path(log_file, "log_file"))
                    with os.fdopen(fd, "ab") as log_out:
                        log_out.write(output)
            state = engine.remove(name)
        except containers.EngineUnavailable as exc:
            log.warning("kernel %s: its container could not be removed: %s", name, exc)
        if runtime_dir is not None:
            with self.lock:
                self.plans.pop(name, None)
                self.images.pop(name, None)
            safefs.remove_tree(_path(runtime_dir, "runtime_dir"))
        return {"oom_killed": bool(state and state.oom_killed), "removed": state is not None}

    def op_container__remove_unclaimed(self, claimed: Any) -> list[str]:
        """Remove the gateway's containers on the engine whose kernel is not in ``claimed``."""
        if not isinstance(claimed, list) or len(claimed) > 100_000:
            raise Refused("claimed must be a list of kernel names")
        if self.engine is None:
            return []
        try:
            return self.engine.remove_unclaimed({_name(value) for value in claimed})
        except containers.EngineUnavailable as exc:
            raise Refused(str(exc)) from None

    def op_kernel__adopt(self, name: Any, pid: Any, connection_file: Any) -> tuple[dict[str, Any], list[int]]:
        """Take up the launcher of a kernel an earlier helper started (before a crash): ``pid``
        must be a running process whose command line names ``connection_file``. Returns a pidfd
        of it (none when it is gone); signals and polls by ``name`` then work on it."""
        name = _name(name)
        pid = _int(pid, "pid", 2, 1 << 22)
        path = _path(connection_file, "connection_file")
        if not CONNECTION_FILE.fullmatch(path.name):
            raise Refused("a connection file is named kernel-<id>.json")
        safefs.anchored(path)
        pidfd = sandbox.kernel_pidfd(pid, str(path))
        if pidfd is None:
            return {"adopted": False}, []
        with self.lock:
            self._forget_adopted(name)
            self.adopted[name] = (pid, os.dup(pidfd))
        return {"adopted": True}, [pidfd]

    def _forget_adopted(self, name: str) -> None:
        adopted = self.adopted.pop(name, None)
        if adopted is not None:
            os.close(adopted[1])

    def _adopted_running(self, name: str) -> int | None:
        """The pid of the adopted launcher ``name`` while it runs."""
        adopted = self.adopted.get(name)
        if adopted is None or select.select([adopted[1]], [], [], 0)[0]:
            return None
        return adopted[0]

    def _open_log(self, path: Path) -> int:
        with safefs.opened(safefs.open_root(path.parent, create=True, owner=self.config.server_owner)) as parent:
            fd = os.open(path.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=parent)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(fd)
            raise Refused("log_file is not a plain file")
        if self.config.server_owner is not None and info.st_uid != self.config.server_owner[0]:
            os.fchown(fd, *self.config.server_owner)
        return fd

    def op_kernel__poll(self, name: Any) -> dict[str, Any]:
        """The launcher's exit code (None while it runs, and for an adopted launcher, whose
        exit code went to its first parent), whether it ended, and whether the memory limit was hit."""
        name = _name(name)
        process = self.processes.get(name)
        code = process.poll() if process is not None else None
        exited = code is not None if process is not None else \
            name in self.adopted and self._adopted_running(name) is None
        return {"returncode": code, "exited": exited, "oom_killed": self._cgroup(name).oom_killed()}

    def op_kernel__signal(self, name: Any, signum: Any) -> int:
        """Signal the processes of a kernel's cgroups (SIGKILL: all, bwrap too); without cgroups,
        the launcher started here and its descendants. How many were signalled."""
        name = _name(name)
        if signum not in SIGNALS:
            raise Refused("signum must be SIGINT, SIGTERM, SIGKILL or SIGHUP")
        group = self._cgroup(name)
        if group.exists():
            if signum == signal.SIGKILL:
                group.kill_all()
                return len(group.pids())
            return group.signal(signum, exclude=_is_wrapper)
        process = self.processes.get(name)
        if process is not None:
            return _signal_tree(process.pid, signum) if process.poll() is None else 0
        adopted = self._adopted_running(name)
        return _signal_tree(adopted, signum) if adopted is not None else 0

    def op_kernel__release(self, name: Any, runtime_dir: Any = None) -> dict[str, Any]:
        """Kill what is left in a kernel's cgroups and remove them; with ``runtime_dir``, remove
        that too (the final cleanup). Works for kernels another helper started (after a crash)."""
        name = _name(name)
        group = self._cgroup(name)
        oom = group.oom_killed()
        if group.exists():
            group.remove()
        with self.lock:
            process = self.processes.pop(name, None) if runtime_dir is not None else self.processes.get(name)
            if runtime_dir is not None:
                self.plans.pop(name, None)
                self._forget_adopted(name)
        if process is not None:
            try:
                process.wait(2)
            except subprocess.TimeoutExpired:
                pass
        if runtime_dir is not None:
            safefs.remove_tree(_path(runtime_dir, "runtime_dir"))
        return {"oom_killed": oom}

    def op_kernel__kill_unclaimed(self, connection_files: Any) -> list[int]:
        """SIGKILL every process whose command line names one of these connection files (kernels
        of a crashed server that no session claims). Each must be a kernel's, beneath an anchor."""
        if not isinstance(connection_files, list) or len(connection_files) > 100_000:
            raise Refused("connection_files must be a list")
        paths = set()
        for value in connection_files:
            path = _path(value, "a connection file")
            if not CONNECTION_FILE.fullmatch(path.name):
                raise Refused("a connection file is named kernel-<id>.json")
            safefs.anchored(path)
            paths.add(str(path))
        import psutil

        stopped = []
        for process in psutil.process_iter(["pid", "cmdline"]):
            try:
                if paths.intersection(process.info["cmdline"] or []):
                    process.kill()
                    stopped.append(process.pid)
            except psutil.Error:
                continue
        return stopped

    def _cgroup(self, name: str) -> CgroupSet:
        plan = self.plans.get(name)
        if plan is not None and plan.cgroup is not None:
            return plan.cgroup
        return CgroupSet(cgroups.detect_cached(cgroups.DEFAULT_PARENT), name)

    # -- volumes -----------------------------------------------------------------------------

    def op_volume__ensure(self, path: Any, size: Any, owner: Any) -> None:
        volumes.ensure(self._volume_path(path), _int(size, "size", 1, 1 << 50), self._kernel_owner(owner))

    def op_volume__ensure_existing(self, path: Any) -> None:
        volumes.ensure_existing(self._volume_path(path))

    def op_volume__move(self, current: Any, target: Any) -> None:
        volumes.move(self._volume_path(current), self._volume_path(target))

    def op_volume__release(self, path: Any, remove: Any = False) -> None:
        volumes.release(self._volume_path(path), remove=bool(remove))

    def op_volume__release_all(self, root: Any) -> int:
        return volumes.release_all(self._volume_path(root))

    def _volume_path(self, value: Any) -> Path:
        """A mount point beneath an anchor whose every component is a directory, not a link,
        right now (the mount tools take paths; the server's own directories hold them)."""
        path = _path(value)
        if safefs.anchored(path) is not None and (path.is_symlink() or os.path.realpath(path.parent) != str(path.parent)):
            raise Refused(f"{path} is reached through a symbolic link")
        return path

    # -- trees a kernel can write ------------------------------------------------------------

    def op_file__open(self, root: Any, parts: Any) -> tuple[dict[str, Any], list[int]]:
        """A read descriptor of a regular file of a tree (a download, a kernel's report)."""
        with safefs.opened(safefs.open_root(_path(root, "root"))) as fd:
            descriptor, info = safefs.open_file(fd, _parts(parts))
        return {"size": info.st_size, "mtime": info.st_mtime}, [descriptor]

    def op_file__install(self, root: Any, parts: Any, owner: Any, _fds: list[int]) -> str:
        """Copy a descriptor's content (the server's upload) to ``parts`` in a tree."""
        if len(_fds) != 1:
            raise Refused("file.install takes one descriptor")
        names = _parts(parts)
        if not names:
            raise Refused("a file needs a name")
        with safefs.opened(safefs.open_root(_path(root, "root"))) as fd:
            safefs.install_from(fd, names, _fds[0], self._owner(owner))
        return "/".join(names)

    def op_tree__list(self, root: Any, parts: Any, after: Any, limit: Any, max_depth: Any) -> dict[str, Any]:
        """One page of the regular files under ``parts``, serialised here (not on the server's loop)."""
        from gateway.workspace import encode_file_cursor

        with safefs.opened(safefs.open_root(_path(root, "root"))) as fd:
            entries, more = safefs.list_files(fd, _parts(parts), after=_parts(after) if after is not None else None,
                                              limit=_int(limit, "limit", 1, PAGE_MAX),
                                              max_depth=_int(max_depth, "max_depth", 1, DEPTH_MAX))
        files = [{"path": "/".join(entry.parts), "size": entry.size,
                  "modified": iso(datetime.fromtimestamp(entry.mtime, timezone.utc))} for entry in entries]
        return {"files_json": json.dumps(files), "next": encode_file_cursor(entries[-1].parts) if more and entries
                else None}

    def op_tree__size(self, root: Any) -> int:
        with safefs.opened(safefs.open_root(_path(root, "root"))) as fd:
            return safefs.tree_size(fd)

    def op_tree__remove_entry(self, root: Any, parts: Any) -> str:
        names = _parts(parts)
        if not names:
            raise Refused("name the entry to remove")
        with safefs.opened(safefs.open_root(_path(root, "root"))) as fd:
            return safefs.remove(fd, names)

    def op_tree__clear(self, root: Any, names: Any, owner: Any) -> None:
        """Make directory ``root`` (given to ``owner``) and remove ``names`` from it."""
        with safefs.opened(safefs.open_root(_path(root, "root"), create=True, owner=self._owner(owner))) as fd:
            for name in _parts(names, "names"):
                safefs.remove_entry(fd, name, missing_ok=True)

    def op_tree__remove(self, path: Any) -> None:
        safefs.remove_tree(_path(path))

    def op_tree__copy(self, source: Any, target: Any, owner: Any) -> int:
        made = self._owner(owner)
        with safefs.opened(safefs.open_root(_path(source, "source"))) as src, \
                safefs.opened(safefs.open_root(_path(target, "target"), create=True, owner=made)) as dst:
            return safefs.copy_tree(src, dst, made)

    def op_tree__hand_over(self, root: Any, owner: Any) -> int:
        uid, gid = self._kernel_owner(owner)
        with safefs.opened(safefs.open_root(_path(root, "root"))) as fd:
            return safefs.chown_tree(fd, uid, gid)

    def op_workspace__move(self, current: Any, target: Any, owner: Any) -> None:
        """Move a pooled kernel's workspace (a volume, or a directory) to its session's place,
        with what the target already holds, and give it all to the kernel."""
        source, destination = self._volume_path(current), self._volume_path(target)
        made = self._kernel_owner(owner)
        if volumes.is_mounted(source):
            volumes.move(source, destination)
        elif volumes.image_of(source).exists():
            # The kernel was started on a volume that is no longer mounted there: moving the bare
            # directory would give the session files its kernel does not see.
            raise Refused(f"{source} has a volume image but no volume mounted")
        else:
            with safefs.opened(safefs.open_root(source.parent)) as from_parent, \
                    safefs.opened(safefs.open_root(destination.parent)) as to_parent:
                try:
                    with safefs.opened(safefs.open_dir(to_parent, (destination.name,))) as old, \
                            safefs.opened(safefs.open_dir(from_parent, (source.name,))) as new:
                        for entry in os.listdir(old):
                            os.rename(entry, entry, src_dir_fd=old, dst_dir_fd=new)
                    os.rmdir(destination.name, dir_fd=to_parent)
                except FileNotFoundError:
                    pass
                os.rename(source.name, destination.name, src_dir_fd=from_parent, dst_dir_fd=to_parent)
        with safefs.opened(safefs.open_root(destination)) as fd:
            safefs.chown_tree(fd, *made)


def _pidfds(pid: Any) -> list[int]:
    """A pidfd of ``pid`` (a container's init, on this host when the engine is local), or none."""
    if not isinstance(pid, int) or pid <= 1:
        return []
    try:
        return [os.pidfd_open(pid)]
    except OSError:  # the engine is on another host, or the process is gone already
        return []


def _is_wrapper(pid: int) -> bool:
    """Whether ``pid`` is one of bubblewrap's own processes (they must not get SIGINT or SIGTERM)."""
    import shutil

    bwrap = shutil.which("bwrap")
    try:
        return bwrap is not None and os.readlink(f"/proc/{pid}/exe") == os.path.realpath(bwrap)
    except OSError:
        return False


def _signal_tree(pid: int, signum: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        targets = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    sent = 0
    for process in targets:
        if signum == signal.SIGKILL or not _is_wrapper(process.pid):
            try:
                process.send_signal(signum)
                sent += 1
            except psutil.Error:
                continue
    return sent


# --- the process ------------------------------------------------------------------------------

def _failure(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, Refused):
        return {"kind": "refused", "message": str(exc)}
    if isinstance(exc, (safefs.TooDeep, safefs.UnsafeEntry)):
        return {"kind": type(exc).__name__, "errno": exc.errno, "strerror": exc.strerror,
                "filename": exc.filename if isinstance(exc.filename, str) else None}
    if isinstance(exc, OSError):
        return {"kind": "OSError", "errno": exc.errno, "strerror": exc.strerror or str(exc),
                "filename": exc.filename if isinstance(exc.filename, str) else None}
    if isinstance(exc, sandbox.IsolationUnavailable):
        return {"kind": "IsolationUnavailable", "message": str(exc)}
    if isinstance(exc, volumes.VolumeError):
        return {"kind": "VolumeError", "message": str(exc)}
    if isinstance(exc, (TypeError, ValueError)):
        return {"kind": "refused", "message": f"{type(exc).__name__}: {exc}"}
    return {"kind": "failed", "message": f"{type(exc).__name__}: {exc}"}


def _handle(helper: Helper, sock: socket.socket, send_lock: threading.Lock, message: dict[str, Any],
            fds: list[int]) -> None:
    request_id = message.get("id")
    sent_fds: list[int] = []
    try:
        op = helper.ops.get(message.get("op"))  # type: ignore[arg-type]
        args = message.get("args")
        if op is None or not isinstance(args, dict) or "_fds" in args:
            raise Refused(f"unknown operation {str(message.get('op'))[:64]!r}")
        if fds:
            args = {**args, "_fds": fds}
        result = op(**args)
        if isinstance(result, tuple):
            result, sent_fds = result
        reply: dict[str, Any] = {"id": request_id, "ok": True, "result": result}
    except BaseException as exc:  # every failure is answered; the helper goes on
        if not isinstance(exc, (Refused, OSError)):
            log.warning("request %s failed", message.get("op"), exc_info=not isinstance(exc, (TypeError, ValueError)))
        reply = {"id": request_id, "ok": False, "error": _failure(exc)}
    finally:
        for fd in fds:
            os.close(fd)
    try:
        with send_lock:
            helper_wire.send(sock, reply, sent_fds)
    except OSError:
        pass
    finally:
        for fd in sent_fds:
            os.close(fd)


def _choose(config: HelperConfig) -> dict[str, Any]:
    """Probe and choose the profile before any request (probes run in temporary directories)."""
    from gateway.isolation import IsolationRefused, choose_profile

    greeting: dict[str, Any] = {"euid": os.geteuid(), "volumes": volumes.support()}
    engine, why_not = containers.probe(config.container_engine)
    greeting.update(container_engine=engine, container_refused=why_not)
    try:
        profile, reasons = choose_profile(config.sandbox, Path(config.data_dir or "/"), container_refused=why_not)
        greeting.update(profile=profile, reasons=reasons)
    except IsolationRefused as exc:
        greeting.update(profile=None, refused=str(exc))
    return greeting


def serve(sock: socket.socket, config: HelperConfig) -> None:
    """Answer requests until the server's end closes."""
    greeting = _choose(config)
    safefs.set_anchors([Path(anchor) for anchor in config.anchors])
    helper = Helper(config, greeting)
    send_lock = threading.Lock()
    with send_lock:
        helper_wire.send(sock, {"hello": greeting})
    with ThreadPoolExecutor(THREADS, thread_name_prefix="helper") as pool:
        while True:
            try:
                received = helper_wire.receive(sock)
            except helper_wire.WireError as exc:
                log.error("the server sent what is not a request (%s); stopping", exc)
                break
            except OSError:
                break
            if received is None:
                break
            message, fds = received
            pool.submit(_handle, helper, sock, send_lock, message, fds)
        pool.shutdown(wait=False, cancel_futures=True)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops first, then closes the socket
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=os.environ.get("AGENT_GATEWAY_LOG_LEVEL", "INFO").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = socket.socket(fileno=int(argv[0]))
    config = HelperConfig.from_json(argv[1])
    # The server's helper makes nothing others may read; one of a caller's own user acts as it would.
    os.umask(0o077 if config.anchors else 0o022)
    try:
        serve(sock, config)
    finally:
        sock.close()
    # Requests still running when the server went away are abandoned with it.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
