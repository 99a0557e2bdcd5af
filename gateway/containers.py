"""The ``container`` profile: each kernel in a container of its own, on a Docker Engine API.

Podman's ``podman system service`` and Docker's daemon both serve that API; the gateway talks to
it through the ``docker`` package, from the privileged helper only (an engine's socket is as good
as root on its host, so the server that parses requests never holds it). The helper turns a
checked ``ContainerLaunch`` into the container's settings here, in one place:

- the image of the kernel's environment (``gateway.kernel_image``), whose root is read-only;
- no network (``network_mode=none``: the container has only its own ``lo``), so the kernel's way
  out is the egress proxy's socket in its runtime directory, as under ``sandbox``;
- the kernel's own uid (from the kernel range), no capabilities, ``no-new-privileges``, an init
  (``catatonit``) as pid 1 that passes signals on;
- the session's limits as the container's: memory (no swap on top), CPU quota, pids, largest
  file (``RLIMIT_FSIZE``), and bounded open files;
- the workspace at ``/workspace`` and the kernel's runtime directory (connection file, ipc
  sockets, egress socket) at its own path: the gateway reaches the kernel through those sockets.

Containers are named ``agent-gateway-<kernel name>`` and labelled, so a gateway started again
after a crash finds them (they run on: the engine, not the gateway, is their parent) and
``remove_unclaimed`` stops those no session claims.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.sandbox import SANDBOX_WORKSPACE

if TYPE_CHECKING:
    import docker

    from gateway.sandbox import Limits

CONTAINER_PROFILE = "container"
NAME_PREFIX = "agent-gateway-"
KERNEL_LABEL = "io.agent-gateway.kernel"  # its value: the kernel's name (its launch id)
INSTANCE_LABEL = "io.agent-gateway.instance"  # which gateway (its data directory) started it
TMP_BYTES = 256 * 1024 * 1024
OPEN_FILES = 4096
API_VERSION = "1.41"  # what podman 4 and Docker 20.10+ both serve
# The kernel runs under a shell that sets its umask, as under sandbox (its ipc sockets open to
# the server's group: the engine's API has no umask), and, when it ends, exits with OOM_EXIT if
# its memory cgroup killed something: engines do not always say (podman on cgroup v1 does not).
OOM_EXIT = 247
WRAPPER = ("/bin/sh", "-c", 'umask 007; "$0" "$@"; code=$?; '
           "grep -qs '^oom_kill [1-9]' /sys/fs/cgroup/memory/memory.oom_control /sys/fs/cgroup/memory.events "
           f'&& exit {OOM_EXIT}; exit $code')
SIGNAL_NAMES = {int(signal.SIGINT): "SIGINT", int(signal.SIGTERM): "SIGTERM", int(signal.SIGKILL): "SIGKILL",
                int(signal.SIGHUP): "SIGHUP"}


class EngineUnavailable(RuntimeError):
    """The container engine cannot be reached, or lacks what a launch needs (the image)."""


@dataclass(frozen=True)
class ContainerLaunch:
    """One kernel container, as the helper checked it."""

    kernel: str  # the kernel's name (its launch id)
    image: str
    argv: tuple[str, ...]
    env: dict[str, str]
    uid: int
    gid: int
    workspace: str  # host directory, at /workspace inside
    runtime_dir: str  # host directory, at the same path inside
    limits: "Limits"
    hostname: str = "sandbox"
    instance: str = ""

    @property
    def name(self) -> str:
        return container_name(self.kernel)


@dataclass(frozen=True)
class ContainerState:
    """What the engine says of a kernel's container."""

    running: bool
    exit_code: int | None  # None while it runs
    oom_killed: bool = False
    pid: int | None = None  # its init's pid on the engine's host (0 or None when stopped)
    id: str = ""


def container_name(kernel: str) -> str:
    return f"{NAME_PREFIX}{kernel}"


def create_settings(launch: ContainerLaunch) -> dict[str, Any]:
    """The ``containers.create`` arguments of a launch: the profile's whole contract."""
    from docker.types import Mount, Ulimit

    limits = launch.limits
    ulimits = [Ulimit(name="nofile", soft=OPEN_FILES, hard=OPEN_FILES), Ulimit(name="core", soft=0, hard=0)]
    pids = limits.pids or OPEN_FILES
    ulimits.append(Ulimit(name="nproc", soft=pids, hard=pids))  # the uid is the kernel's own
    if limits.file_size_bytes:
        ulimits.append(Ulimit(name="fsize", soft=limits.file_size_bytes, hard=limits.file_size_bytes))
    settings: dict[str, Any] = {
        "image": launch.image, "command": [*WRAPPER, *launch.argv], "name": launch.name,
        "hostname": launch.hostname,
        "environment": dict(launch.env), "user": f"{launch.uid}:{launch.gid}", "working_dir": SANDBOX_WORKSPACE,
        "network_mode": "none", "read_only": True, "init": True, "detach": True,
        "cap_drop": ["ALL"], "security_opt": ["no-new-privileges"], "ipc_mode": "private",
        "tmpfs": {"/tmp": f"rw,nosuid,nodev,size={TMP_BYTES},mode=1777",
                  "/dev/shm": f"rw,nosuid,nodev,size={TMP_BYTES},mode=1777"},
        "mounts": [Mount(target=SANDBOX_WORKSPACE, source=launch.workspace, type="bind", read_only=False),
                   Mount(target=launch.runtime_dir, source=launch.runtime_dir, type="bind", read_only=False)],
        "ulimits": ulimits, "labels": {KERNEL_LABEL: launch.kernel, INSTANCE_LABEL: launch.instance},
    }
    if limits.memory_bytes:
        settings.update(mem_limit=limits.memory_bytes, memswap_limit=limits.memory_bytes)
    if limits.cpu_cores:
        settings["nano_cpus"] = int(limits.cpu_cores * 1e9)
    if limits.pids:
        settings["pids_limit"] = limits.pids
    return settings


class Engine:
    """One Docker Engine API endpoint (``unix:///run/podman/podman.sock``)."""

    def __init__(self, url: str, timeout: float = 60.0, instance: str = ""):
        self.url, self.instance = url, instance
        self.timeout = timeout
        self._client: "docker.DockerClient | None" = None

    @property
    def client(self) -> "docker.DockerClient":
        if self._client is None:
            try:
                import docker
            except ImportError:
                raise EngineUnavailable("the container profile needs the docker package "
                                        "(pip install 'agent-kernel-gateway[server]')") from None
            self._client = docker.DockerClient(base_url=self.url, version=API_VERSION, timeout=self.timeout)
        return self._client

    def _errors(self) -> tuple[type[BaseException], ...]:
        import docker.errors
        import requests

        return docker.errors.DockerException, requests.RequestException, OSError

    def describe(self) -> str:
        """The engine's name and version; raises ``EngineUnavailable`` when it does not answer."""
        try:
            version = self.client.version()
        except self._errors() as exc:
            raise EngineUnavailable(f"the container engine at {self.url} does not answer: {exc}") from None
        components = {part.get("Name"): part.get("Version") for part in version.get("Components") or []}
        name = "Podman Engine" if "Podman Engine" in components else "Docker Engine"
        return f"{name} {components.get(name) or version.get('Version', '?')} at {self.url}"

    def has_image(self, image: str) -> bool:
        import docker.errors

        try:
            self.client.images.get(image)
            return True
        except docker.errors.ImageNotFound:
            return False
        except self._errors() as exc:
            raise EngineUnavailable(f"the container engine at {self.url}: {exc}") from None

    def run(self, launch: ContainerLaunch) -> ContainerState:
        """Create and start the kernel's container (one left by an earlier start of it is removed)."""
        if not self.has_image(launch.image):
            raise EngineUnavailable(f"the engine at {self.url} has no image {launch.image}: build it with "
                                    f"`agent-gateway image build` (see docs/operations.md)")
        self.remove(launch.kernel)
        try:
            container = self.client.containers.create(**create_settings(launch))
            container.start()
        except self._errors() as exc:
            self.remove(launch.kernel)
            raise EngineUnavailable(f"the engine at {self.url} could not start the kernel's container: {exc}") \
                from None
        state = self.state(launch.kernel)
        if state is None:
            raise EngineUnavailable(f"the kernel's container {launch.name} is gone right after its start")
        return state

    def state(self, kernel: str) -> ContainerState | None:
        """The kernel's container as the engine sees it; None when there is none."""
        import docker.errors

        try:
            attributes = self.client.api.inspect_container(container_name(kernel))
        except docker.errors.NotFound:
            return None
        except self._errors() as exc:
            raise EngineUnavailable(f"the container engine at {self.url}: {exc}") from None
        return _state(attributes)

    def signal(self, kernel: str, signum: int) -> bool:
        """Send ``signum`` to the container's processes (through its init); whether it ran."""
        import docker.errors

        try:
            self.client.api.kill(container_name(kernel), signal=SIGNAL_NAMES[signum])
            return True
        except docker.errors.APIError:  # not running (any more), or gone
            return False
        except self._errors() as exc:
            raise EngineUnavailable(f"the container engine at {self.url}: {exc}") from None

    def logs(self, kernel: str, limit: int = 256 * 1024) -> bytes:
        """The last of what the kernel printed (its start banner, a crash's traceback)."""
        import docker.errors

        try:
            data = self.client.api.logs(container_name(kernel), stdout=True, stderr=True, tail=2000)
        except (docker.errors.APIError, *self._errors()):
            return b""
        return bytes(data)[-limit:]

    def remove(self, kernel: str) -> ContainerState | None:
        """Stop (SIGKILL) and remove the kernel's container; what it was, or None if there was none."""
        import docker.errors

        state = self.state(kernel)
        if state is None:
            return None
        try:
            self.client.api.remove_container(container_name(kernel), force=True)
        except docker.errors.NotFound:
            pass
        except self._errors() as exc:
            raise EngineUnavailable(f"the container engine at {self.url} could not remove {kernel}: {exc}") \
                from None
        return state

    def kernels(self) -> list[str]:
        """The kernel names of this gateway's containers on the engine, running or not."""
        try:
            found = self.client.api.containers(all=True, filters={"label": f"{INSTANCE_LABEL}={self.instance}"})
        except self._errors() as exc:
            raise EngineUnavailable(f"the container engine at {self.url}: {exc}") from None
        return sorted(str((row.get("Labels") or {}).get(KERNEL_LABEL)) for row in found
                      if (row.get("Labels") or {}).get(KERNEL_LABEL))

    def remove_unclaimed(self, claimed: set[str]) -> list[str]:
        """Remove the gateway's containers whose kernel no session claims; their names."""
        removed = [kernel for kernel in self.kernels() if kernel not in claimed]
        for kernel in removed:
            self.remove(kernel)
        return removed


def instance_of(data_dir: str | None) -> str:
    """The label that tells one gateway's containers from another's on a shared engine."""
    import hashlib

    return hashlib.sha256(str(data_dir or "").encode()).hexdigest()[:16]


def probe(url: str | None) -> tuple[str | None, str | None]:
    """The engine at ``url`` described, and why the container profile cannot work with it (None: it can)."""
    import os

    if not url:
        return None, "no container engine is configured (--container-engine URL)"
    if os.geteuid() != 0:
        return None, "the container profile needs the gateway to start as root (kernels get uids of their own)"
    try:
        return Engine(url, timeout=10).describe(), None
    except EngineUnavailable as exc:
        return None, str(exc)


def _state(attributes: dict[str, Any]) -> ContainerState:
    status = attributes.get("State") or {}
    running = bool(status.get("Running")) and not status.get("Paused")
    code = None if running or status.get("ExitCode") is None else int(status["ExitCode"])
    oom = bool(status.get("OOMKilled")) or code == OOM_EXIT
    if code == OOM_EXIT:
        code = 128 + int(signal.SIGKILL)  # what the OOM killer did to the kernel
    return ContainerState(running=running, exit_code=code, oom_killed=oom, pid=int(status.get("Pid") or 0) or None,
                          id=str(attributes.get("Id") or ""))
