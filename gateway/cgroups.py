"""Control groups for kernels: one ``CgroupSet`` per kernel, limiting memory, CPU and processes.

Works with cgroup v2 (``memory.max``, ``cpu.max``, ``pids.max``, ``cgroup.kill``), with v1
(``memory.limit_in_bytes``, ``cpu.cfs_quota_us``, ``pids.max``) and with hybrid hosts, where the
resource controllers are v1 and the v2 hierarchy only offers ``cgroup.kill``. Every cgroup is
created beneath the gateway's *current* cgroup of each hierarchy (``<current>/<parent>/<name>``),
so nesting is legal inside containers and delegated systemd units.

``detect()`` finds out, once, what this host allows and why not; ``CgroupSet`` does the rest.
Everything here needs write access to cgroupfs (root, or a delegated subtree).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

CONTROLLERS = ("memory", "cpu", "pids")
CPU_PERIOD_US = 100_000
DEFAULT_PARENT = "agent-gateway"
LEAF_FOR_SELF = "gateway"


@dataclass(frozen=True)
class Limits:
    """Resource limits of one kernel's cgroup; None leaves a resource unlimited."""

    memory_bytes: int | None = None
    cpu_cores: float | None = None
    pids: int | None = None


@dataclass(frozen=True)
class Support:
    """What ``detect()`` found: where each controller's kernel cgroups go, and why some cannot.

    ``controllers`` maps a controller to (version, directory of the parent cgroup); ``v2_parent``
    is the parent directory in the v2 hierarchy (for ``cgroup.kill``, and for v2 controllers).
    """

    mode: str  # "v2", "v1", "hybrid" or "none"
    parent: str
    controllers: dict[str, tuple[int, Path]] = field(default_factory=dict)
    v2_parent: Path | None = None
    kill_file: bool = False
    reasons: list[str] = field(default_factory=list)

    def has(self, controller: str) -> bool:
        return controller in self.controllers

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "parent": self.parent,
            "controllers": {name: {"version": version, "path": str(path)}
                            for name, (version, path) in self.controllers.items()},
            "v2_parent": str(self.v2_parent) if self.v2_parent else None,
            "cgroup_kill": self.kill_file,
            "reasons": list(self.reasons),
        }


# --- reading the host's cgroup layout -------------------------------------------------------

def _read(path: Path) -> str:
    return path.read_text(encoding="ascii", errors="replace")


def _write(path: Path, value: str) -> None:
    with open(path, "w", encoding="ascii") as handle:
        handle.write(value)


def parse_mounts(text: str) -> tuple[dict[str, Path], Path | None]:
    """From /proc/self/mounts: the v1 mount point of each controller, and the v2 mount point."""
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        mount_point, fs_type, options = parts[1], parts[2], parts[3].split(",")
        if fs_type == "cgroup2" and v2 is None:
            v2 = Path(mount_point)
        elif fs_type == "cgroup":
            for option in options:
                if option in CONTROLLERS and option not in v1:
                    v1[option] = Path(mount_point)
    return v1, v2


def parse_self_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """From /proc/self/cgroup: the current v1 path of each controller, and the current v2 path."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        number, _, rest = line.partition(":")
        names, _, path = rest.partition(":")
        if number == "0" and names == "":
            v2 = path
        for name in names.split(","):
            if name in CONTROLLERS:
                v1[name] = path
    return v1, v2


def _under(mount: Path, current: str) -> Path:
    return mount / current.lstrip("/")


def _probe_dir(parent: Path) -> str | None:
    """Create ``parent`` and a throw-away child in it; None when that works, else why not."""
    try:
        parent.mkdir(exist_ok=True)
        probe = parent / f".probe-{os.getpid()}"
        probe.mkdir(exist_ok=True)
        probe.rmdir()
        return None
    except OSError as error:
        return f"cannot create cgroups in {parent}: {error.strerror}"


def _enable_v2(directory: Path, wanted: list[str], move_self: bool) -> tuple[list[str], str | None]:
    """Enable ``wanted`` controllers for the children of ``directory``; the ones enabled, and why not."""
    control = directory / "cgroup.subtree_control"
    enabled = _read(control).split() if control.exists() else []
    missing = [name for name in wanted if name not in enabled]
    if not missing:
        return wanted, None
    try:
        _write(directory / "cgroup.subtree_control", " ".join(f"+{name}" for name in missing))
        return wanted, None
    except OSError as error:
        if error.errno == errno.EBUSY and move_self:
            _move_processes(directory, directory / LEAF_FOR_SELF)
            return _enable_v2(directory, wanted, move_self=False)
        if error.errno == errno.EBUSY:
            return [], (f"v2: cannot enable {', '.join(missing)} below {directory}: it holds processes "
                        f"(the 'no internal processes' rule); move the gateway into a leaf cgroup first "
                        f"(detect(move_self=True) does that) or give it a delegated cgroup")
        return [], f"v2: cannot enable {', '.join(missing)} below {directory}: {error.strerror}"


def _move_processes(source: Path, leaf: Path) -> None:
    """Move every process of ``source`` into the new child ``leaf`` (v2's internal-process rule)."""
    leaf.mkdir(exist_ok=True)
    for pid in _read(source / "cgroup.procs").split():
        try:
            _write(leaf / "cgroup.procs", pid)
        except OSError:
            pass  # exited meanwhile, or a kernel thread that cannot move


def _detect_v2(mount: Path, current: str, parent: str, move_self: bool,
               reasons: list[str]) -> tuple[Path | None, list[str], bool]:
    """The v2 parent directory, the controllers usable there, and whether cgroup.kill exists."""
    base = _under(mount, current)
    if not base.is_dir():
        reasons.append(f"v2: the current cgroup {current} is not visible at {base}")
        return None, [], False
    available = _read(base / "cgroup.controllers").split()
    wanted = [name for name in CONTROLLERS if name in available]
    if not wanted:
        reasons.append(f"v2: no resource controllers are available in {base} (they may be bound to v1)")
    enabled, why = _enable_v2(base, wanted, move_self) if wanted else ([], None)
    if why:
        reasons.append(why)
    problem = _probe_dir(base / parent)
    if problem:
        reasons.append(f"v2: {problem}")
        return None, [], False
    if enabled:
        enabled, why = _enable_v2(base / parent, enabled, move_self=False)
        if why:
            reasons.append(why)
    kill = (base / parent / "cgroup.kill").exists()
    if not kill:
        reasons.append("v2: cgroup.kill is missing (Linux < 5.14); kills go process by process")
    return base / parent, enabled, kill


def _detect_v1(mounts: dict[str, Path], current: dict[str, str], parent: str, skip: list[str],
               reasons: list[str]) -> dict[str, Path]:
    """For each controller not already served by v2: its v1 parent directory, if writable."""
    found: dict[str, Path] = {}
    for name in CONTROLLERS:
        if name in skip:
            continue
        if name not in mounts or name not in current:
            reasons.append(f"v1: the {name} controller is not mounted")
            continue
        directory = _under(mounts[name], current[name]) / parent
        problem = _probe_dir(directory)
        if problem:
            reasons.append(f"v1 {name}: {problem}")
        else:
            found[name] = directory
    return found


def detect(parent: str = DEFAULT_PARENT, *, move_self: bool = False, mounts_file: str = "/proc/self/mounts",
           cgroup_file: str = "/proc/self/cgroup") -> Support:
    """Find where kernel cgroups can go on this host, creating ``<current>/<parent>`` per hierarchy.

    ``move_self`` lets a v2 gateway move itself (and every process in its cgroup) into a
    ``gateway`` leaf so controllers can be enabled for siblings; call it once, at start.
    """
    reasons: list[str] = []
    try:
        v1_mounts, v2_mount = parse_mounts(_read(Path(mounts_file)))
        v1_current, v2_current = parse_self_cgroup(_read(Path(cgroup_file)))
    except OSError as error:
        return Support("none", parent, reasons=[f"cannot read the cgroup layout: {error}"])
    controllers: dict[str, tuple[int, Path]] = {}
    v2_parent, kill = None, False
    if v2_mount is not None and v2_current is not None:
        v2_parent, v2_enabled, kill = _detect_v2(v2_mount, v2_current, parent, move_self, reasons)
        controllers.update({name: (2, v2_parent) for name in v2_enabled if v2_parent})
    else:
        reasons.append("v2: no cgroup2 hierarchy is mounted")
    v1_found = _detect_v1(v1_mounts, v1_current, parent, list(controllers), reasons)
    controllers.update({name: (1, path) for name, path in v1_found.items()})
    versions = {version for version, _ in controllers.values()}
    if v2_parent is not None:
        versions.add(2)
    mode = "none" if not versions else "hybrid" if versions == {1, 2} else f"v{versions.pop()}"
    for name in CONTROLLERS:
        if name not in controllers:
            reasons.append(f"no usable {name} controller: that limit cannot be enforced by a cgroup")
    return Support(mode, parent, controllers, v2_parent, kill, reasons)


_DETECTED: dict[str, Support] = {}


def detect_cached(parent: str = DEFAULT_PARENT, *, move_self: bool = False) -> Support:
    """``detect()`` once per parent name for this process."""
    if parent not in _DETECTED:
        _DETECTED[parent] = detect(parent, move_self=move_self)
    return _DETECTED[parent]


# --- one kernel's cgroups ---------------------------------------------------------------------

class CgroupSet:
    """The cgroups of one kernel, one directory per hierarchy, all named ``<parent>/<name>``.

    Constructing one only computes paths (so a restarted gateway can find a surviving kernel's
    cgroups again); ``create()`` makes them and writes the limits.
    """

    def __init__(self, support: Support, name: str):
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"not a cgroup name: {name!r}")
        self.support = support
        self.name = name
        self.paths: dict[str, Path] = {ctl: parent / name for ctl, (_, parent) in support.controllers.items()}
        self.v2_dir: Path | None = support.v2_parent / name if support.v2_parent else None

    @property
    def directories(self) -> list[Path]:
        """Every distinct directory of this set (a v2 directory serves several controllers)."""
        seen: list[Path] = []
        for path in [*self.paths.values(), *([self.v2_dir] if self.v2_dir else [])]:
            if path not in seen:
                seen.append(path)
        return seen

    def version(self, controller: str) -> int | None:
        entry = self.support.controllers.get(controller)
        return entry[0] if entry else None

    def exists(self) -> bool:
        return any(path.is_dir() for path in self.directories)

    def create(self, limits: Limits) -> None:
        """Make the directories and write ``limits``; on failure nothing is left behind."""
        try:
            for directory in self.directories:
                directory.mkdir(exist_ok=True)
            self._write_limits(limits)
        except BaseException:
            self.remove()
            raise

    def _write_limits(self, limits: Limits) -> None:
        if limits.memory_bytes is not None and "memory" in self.paths:
            self._limit_memory(self.paths["memory"], int(limits.memory_bytes))
        if limits.cpu_cores is not None and "cpu" in self.paths:
            self._limit_cpu(self.paths["cpu"], float(limits.cpu_cores))
        if limits.pids is not None and "pids" in self.paths:
            _write(self.paths["pids"] / "pids.max", str(int(limits.pids)))

    def _limit_memory(self, directory: Path, limit: int) -> None:
        if self.version("memory") == 2:
            _write(directory / "memory.max", str(limit))
            _write_if_present(directory / "memory.swap.max", "0")
            _write_if_present(directory / "memory.oom.group", "1")
        else:
            _write(directory / "memory.limit_in_bytes", str(limit))
            _write_if_present(directory / "memory.memsw.limit_in_bytes", str(limit))

    def _limit_cpu(self, directory: Path, cores: float) -> None:
        quota = max(1000, int(cores * CPU_PERIOD_US))
        if self.version("cpu") == 2:
            _write(directory / "cpu.max", f"{quota} {CPU_PERIOD_US}")
        else:
            _write(directory / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(directory / "cpu.cfs_quota_us", str(quota))

    def join(self, pid: int) -> None:
        """Move process ``pid`` (with its threads) into every cgroup of the set."""
        for directory in self.directories:
            _write(directory / "cgroup.procs", str(pid))

    def joiner(self) -> Callable[[], None]:
        """A function for a ``preexec_fn``: moves the calling process in, with no allocation-heavy work."""
        targets = [os.fsencode(directory / "cgroup.procs") for directory in self.directories]

        def join_self() -> None:
            pid = str(os.getpid()).encode()
            for target in targets:
                fd = os.open(target, os.O_WRONLY)
                try:
                    os.write(fd, pid)
                finally:
                    os.close(fd)

        return join_self

    def pids(self) -> set[int]:
        """Every process in any cgroup of the set."""
        found: set[int] = set()
        for directory in self.directories:
            try:
                found.update(int(pid) for pid in _read(directory / "cgroup.procs").split())
            except FileNotFoundError:
                continue
        return found

    def oom_killed(self) -> bool:
        """Whether the kernel hit its memory limit and the OOM killer killed something in it."""
        directory = self.paths.get("memory")
        if directory is None:
            return False
        name = "memory.events" if self.version("memory") == 2 else "memory.oom_control"
        try:
            counters = _counters(_read(directory / name))
        except FileNotFoundError:
            return False
        if "oom_kill" in counters:
            return counters["oom_kill"] > 0 or counters.get("oom_group_kill", 0) > 0
        return self.version("memory") == 1 and _failcnt(directory) > 0

    def memory_usage(self) -> int | None:
        """Bytes the set's memory controller charges now, or None without one."""
        directory = self.paths.get("memory")
        if directory is None:
            return None
        name = "memory.current" if self.version("memory") == 2 else "memory.usage_in_bytes"
        try:
            return int(_read(directory / name).strip())
        except (FileNotFoundError, ValueError):
            return None

    def cpu_stat(self) -> dict[str, int]:
        """The CPU controller's counters (``nr_periods``, ``nr_throttled``, ...), empty without one."""
        directory = self.paths.get("cpu")
        try:
            return _counters(_read(directory / "cpu.stat")) if directory is not None else {}
        except FileNotFoundError:
            return {}

    def kill_all(self, timeout: float = 5.0) -> bool:
        """SIGKILL every process of the set; True when none is left within ``timeout``."""
        deadline = time.monotonic() + timeout
        if self.support.kill_file and self.v2_dir is not None and self.v2_dir.is_dir():
            _write(self.v2_dir / "cgroup.kill", "1")
        while True:
            remaining = self.pids()
            if not remaining:
                return True
            if time.monotonic() > deadline:
                return False
            for pid in remaining:
                _kill(pid)
            time.sleep(0.005)

    def signal(self, signum: int, exclude: Callable[[int], bool] | None = None) -> int:
        """Send ``signum`` to every process of the set not excluded; how many were signalled."""
        sent = 0
        for pid in sorted(self.pids()):
            if exclude is not None and exclude(pid):
                continue
            try:
                os.kill(pid, signum)
                sent += 1
            except ProcessLookupError:
                continue
        return sent

    def remove(self, timeout: float = 5.0) -> None:
        """Kill what is left and remove every directory of the set (safe to call twice)."""
        self.kill_all(timeout)
        deadline = time.monotonic() + timeout
        for directory in self.directories:
            _rmdir_retrying(directory, deadline)


def _write_if_present(path: Path, value: str) -> None:
    if path.exists():
        _write(path, value)


def _counters(text: str) -> dict[str, int]:
    counters: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            counters[key] = int(value)
    return counters


def _failcnt(directory: Path) -> int:
    try:
        return int(_read(directory / "memory.failcnt").strip())
    except (FileNotFoundError, ValueError):
        return 0


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _rmdir_retrying(directory: Path, deadline: float) -> None:
    """rmdir, retrying while the kernel still counts exiting processes in the cgroup."""
    while True:
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as error:
            if error.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def remove_parent(support: Support) -> list[str]:
    """Remove the (empty) parent directories of ``support``; the ones still in use, by path."""
    busy: list[str] = []
    parents = {path for _, path in support.controllers.values()}
    if support.v2_parent is not None:
        parents.add(support.v2_parent)
    for path in parents:
        leftovers = [child.name for child in path.iterdir() if child.is_dir()] if path.is_dir() else []
        if leftovers:
            busy.append(str(path))
            continue
        try:
            path.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            busy.append(str(path))
    return busy
