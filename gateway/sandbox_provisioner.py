"""The jupyter_client kernel provisioner of every kernel the gateway starts on this host.

Use it from a kernel spec (``metadata.kernel_provisioner.provisioner_name`` set to
``agent-gateway-sandbox``, registered by ``register()`` or by an entry point in the
``jupyter_client.kernel_provisioners`` group). Without a ``sandbox`` argument it launches the
kernel as LocalProvisioner does; with a per-kernel ``SandboxSpec`` it starts it under that
isolation profile::

    manager = AsyncKernelManager(kernel_name=..., kernel_spec_manager=..., **connection_settings(runtime_dir))
    await manager.start_kernel(sandbox=SandboxSpec(...), env=..., independent=True)

Everything that needs root is asked of the privileged helper (``gateway.host``): it prepares the
kernel's directories and cgroups, hands it the connection file the provisioner wrote, launches
it, and signals it through its cgroup (never by process group: bubblewrap calls ``setsid``). The
provisioner holds a ``HelperProcess`` in place of a ``Popen``: a pidfd tells when the launcher
ended, the helper (its parent) tells the exit code. The spec's interrupt mode becomes
``message``. The final cleanup removes the cgroups and the runtime directory; ``oom_killed()``
tells whether the kernel died at its memory limit.

A kernel survives a crash of the gateway. ``get_provisioner_info()`` is what the gateway keeps
of it, and ``load_provisioner_info()`` takes it up again in a new gateway process: the
provisioner then holds the running kernel (an ``AdoptedProcess``, or a ``HelperProcess`` the
helper adopted) and every manager operation works on it as on a kernel started here.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import time
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

from jupyter_client.provisioning import LocalProvisioner
from jupyter_client.provisioning.factory import KernelProvisionerFactory

from gateway import cgroups, host
from gateway.cgroups import CgroupSet
from gateway.sandbox import CONTAINER, SandboxSpec, kernel_pidfd

PROVISIONER_NAME = "agent-gateway-sandbox"
ENTRY_POINT = "gateway.sandbox_provisioner:SandboxProvisioner"
UNKNOWN_EXIT = -1  # what poll() answers for a process whose exit code went to another parent


def register() -> None:
    """Make ``agent-gateway-sandbox`` known to jupyter_client without installing an entry point."""
    factory = KernelProvisionerFactory.instance()
    if PROVISIONER_NAME not in factory.provisioners:
        factory.provisioners[PROVISIONER_NAME] = EntryPoint(PROVISIONER_NAME, ENTRY_POINT,
                                                            KernelProvisionerFactory.GROUP_NAME)


def spec_metadata() -> dict[str, Any]:
    """The ``metadata`` stanza of a kernel spec that uses this provisioner."""
    return {"kernel_provisioner": {"provisioner_name": PROVISIONER_NAME, "config": {}}}


def connection_settings(runtime_dir: Path) -> dict[str, str]:
    """Kernel manager settings: ipc transport, with the connection file and sockets in ``runtime_dir``."""
    return {"transport": "ipc", "connection_file": str(runtime_dir / "connection.json"),
            "ip": str(runtime_dir / "ipc")}


def _inside(path: str, directory: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(directory))


def limits_args(spec: SandboxSpec) -> dict[str, Any]:
    return {name: getattr(spec.limits, name) for name in spec.limits.__dataclass_fields__}


class HelperProcess:
    """A kernel's launcher, started (or, after a crash, adopted) by the helper: what
    jupyter_client asks of a ``Popen``. ``exit_known`` is False for a launcher another helper
    started: its exit code went to that one."""

    stdin = stdout = stderr = None

    def __init__(self, name: str, pid: int | None, pidfd: int):
        self.name, self.pid, self.pidfd = name, pid, pidfd
        self.returncode: int | None = None
        self.exit_known = True
        self.oom_killed = False

    def exited(self) -> bool:
        """Whether the launcher has ended (its pidfd is readable then)."""
        return _pidfd_exited(self.pidfd)

    async def refresh(self) -> int | None:
        """The exit code, asked of the helper once the pidfd says the launcher ended."""
        if self.returncode is None and self.exited():
            state = await host.current().call("kernel.poll", name=self.name)
            self.oom_killed = self.oom_killed or bool(state["oom_killed"])
            if state["returncode"] is not None:
                self.returncode = int(state["returncode"])
            elif state["exited"]:
                self.returncode, self.exit_known = UNKNOWN_EXIT, False
            if self.returncode is not None:
                self.close()
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class ContainerProcess(HelperProcess):
    """A kernel's container on the engine (``gateway.containers``), started here or before a
    crash: answered by a pidfd of the container's init (``pid``, on this host; -1 when there is
    none) and, once that ended or where there is none, by the engine through the helper."""

    async def refresh(self) -> int | None:
        if self.returncode is None and self.exited():
            state = await host.current().call("container.poll", name=self.name)
            if state.get("unreachable"):
                return None  # the engine did not answer: the kernel is taken as running
            self.oom_killed = self.oom_killed or bool(state["oom_killed"])
            if not state["running"]:
                self.returncode = UNKNOWN_EXIT if state["returncode"] is None else int(state["returncode"])
                self.exit_known = state["returncode"] is not None
                self.close()
        return self.returncode


class AdoptedProcess:
    """A kernel process of the ``none`` profile that an earlier gateway process started: what
    jupyter_client asks of a ``Popen``, through a pidfd (so a reused pid is never signalled).
    It is not this process's child, so its exit code is not known."""

    stdin = stdout = stderr = None
    exit_known = False

    def __init__(self, pid: int, pidfd: int):
        self.pid, self.pidfd = pid, pidfd
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and _pidfd_exited(self.pidfd):
            self.returncode = UNKNOWN_EXIT
            os.close(self.pidfd)
            self.pidfd = -1
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            signal.pidfd_send_signal(self.pidfd, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def _pidfd_exited(pidfd: int) -> bool:
    return pidfd < 0 or bool(select.select([pidfd], [], [], 0)[0])


class SandboxProvisioner(LocalProvisioner):
    """LocalProvisioner whose isolated kernels the privileged helper launches and signals (by
    cgroup), and that takes up a kernel an earlier gateway process started."""

    spec: SandboxSpec | None = None
    profile: str = "none"
    launch_name: str | None = None  # the kernel's name with the helper: its cgroups, its plan
    runtime_dir: Path | None = None
    cgroup_name: str | None = None
    cgroup_parent: str = cgroups.DEFAULT_PARENT
    last_oom_killed: bool = False

    @property
    def isolated(self) -> bool:
        return self.profile in ("process", "sandbox", CONTAINER)

    @property
    def in_container(self) -> bool:
        return self.profile == CONTAINER

    @property
    def cgroup(self) -> CgroupSet | None:
        """The kernel's cgroups, to look at (the helper changes them)."""
        if self.cgroup_name is None:
            return None
        return CgroupSet(cgroups.detect_cached(self.cgroup_parent), self.cgroup_name)

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        spec = kwargs.pop("sandbox", None)
        if spec is None:  # a plain local launch
            self.spec, self.profile, self.runtime_dir = None, "none", None
            return await super().pre_launch(**kwargs)
        if not isinstance(spec, SandboxSpec):
            raise ValueError(f"{PROVISIONER_NAME} takes start_kernel(sandbox=SandboxSpec(...))")
        self.spec, self.profile, self.launch_name = spec, spec.profile, spec.name
        self.runtime_dir, self.cgroup_parent = spec.runtime_dir, spec.cgroup_parent
        if spec.profile == "none":  # as the caller's own user, in the spec's directories
            spec.workspace.mkdir(parents=True, exist_ok=True)
            spec.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            kwargs.setdefault("cwd", str(spec.workspace))
            return await super().pre_launch(**kwargs)
        self._check_connection(spec)
        prepared = await host.current().call(
            "kernel.prepare", name=spec.name, profile=spec.profile, workspace=str(spec.workspace),
            runtime_dir=str(spec.runtime_dir), uid=spec.uid, limits=limits_args(spec), hostname=spec.hostname,
            cgroup_parent=spec.cgroup_parent, environment=spec.environment)
        self.last_oom_killed = False
        self.cgroup_name = prepared["cgroup"]
        self.enforced: dict[str, str] = prepared["enforced"]
        try:
            kwargs = await super().pre_launch(**kwargs)
        except BaseException:
            await self._release(final=False)
            raise
        self.kernel_spec.interrupt_mode = "message"
        kwargs["independent"] = True  # ipykernel's parent poller would see bwrap's init as pid 1
        return kwargs

    def _check_connection(self, spec: SandboxSpec) -> None:
        """The kernel must find its connection file and sockets at the same paths as the gateway."""
        manager = self.parent
        if manager is None:
            return
        if manager.transport != "ipc" and spec.profile in ("sandbox", CONTAINER):
            raise ValueError(f"the {spec.profile} profile has no network: use transport='ipc' (connection_settings())")
        paths = [("connection file", manager.connection_file)]
        if manager.transport == "ipc":
            paths.append(("ipc path", manager.ip))
        for what, path in paths:
            if not _inside(path, spec.runtime_dir):
                raise ValueError(f"the {what} {path} must be inside the kernel's runtime dir {spec.runtime_dir}")

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
        """Have the helper start an isolated kernel: it keeps the launcher as its child."""
        if self.spec is None or not self.isolated:
            return await super().launch_kernel(cmd, **kwargs)
        assert self.parent is not None
        connection = Path(self.parent.connection_file)
        if connection.parent != self.spec.runtime_dir:
            raise ValueError("the connection file must be directly in the kernel's runtime dir")
        reply = await host.current().call_fds("kernel.launch", name=self.spec.name, argv=list(cmd),
                                              env=dict(kwargs.get("env") or {}), connection_file=connection.name,
                                              log_file=str(self.spec.log_file) if self.spec.log_file else None)
        if self.in_container:
            started: HelperProcess = ContainerProcess(self.spec.name, reply.result["pid"],
                                                      reply.fds[0] if reply.fds else -1)
        else:
            started = HelperProcess(self.spec.name, int(reply.result["pid"]), reply.fds[0])
        process = started
        self.process = process  # type: ignore[assignment]  # what jupyter_client asks of a Popen
        self.pid, self.pgid = process.pid, None
        self.cwd = str(self.spec.workspace)
        return self.connection_info

    async def poll(self) -> int | None:
        process = self.process
        if isinstance(process, HelperProcess):
            code = await process.refresh()
            self.last_oom_killed = self.last_oom_killed or process.oom_killed
            return code
        return await super().poll()

    async def wait(self) -> int | None:
        import asyncio

        process = self.process
        if not isinstance(process, HelperProcess):
            return await super().wait()
        while await self.poll() is None:
            await asyncio.sleep(0.05)
        self.process = None
        return process.returncode

    async def send_signal(self, signum: int) -> None:
        """Signal an isolated kernel's processes through its cgroup (SIGKILL: all of them, bwrap
        included)."""
        if isinstance(self.process, AdoptedProcess) and self.process.poll() is not None:
            return  # gone: its pid and process group may be another's by now
        if isinstance(self.process, ContainerProcess):
            await host.current().call("container.signal", name=self.process.name, signum=int(signum))
        elif not isinstance(self.process, HelperProcess):
            await super().send_signal(signum)
        else:
            await host.current().call("kernel.signal", name=self.process.name, signum=int(signum))

    async def kill(self, restart: bool = False) -> None:
        if not isinstance(self.process, HelperProcess):
            await super().kill(restart)
        else:
            await self.send_signal(signal.SIGKILL)

    async def terminate(self, restart: bool = False) -> None:
        if not isinstance(self.process, HelperProcess):
            await super().terminate(restart)
        else:
            await self.send_signal(signal.SIGTERM)

    def oom_killed(self) -> bool:
        """Whether the kernel's memory cgroup recorded an OOM kill (also after cleanup)."""
        return self.last_oom_killed

    async def cleanup(self, restart: bool = False) -> None:
        """Remove the cgroups (killing leftovers); at the final cleanup also the runtime dir."""
        await super().cleanup(restart=restart)
        await self._release(final=not restart)

    async def _release(self, final: bool) -> None:
        if self.runtime_dir is None:
            return
        if not self.isolated:
            if final:
                shutil.rmtree(self.runtime_dir, ignore_errors=True)
            return
        if self.in_container:
            log_file = self.spec.log_file if self.spec is not None else None
            state = await host.current().call("container.release", name=self.launch_name,
                                              runtime_dir=str(self.runtime_dir) if final else None,
                                              log_file=str(log_file) if log_file else None)
        else:
            state = await host.current().call("kernel.release", name=self.launch_name,
                                              runtime_dir=str(self.runtime_dir) if final else None)
        self.last_oom_killed = self.last_oom_killed or bool(state["oom_killed"])
        if isinstance(self.process, HelperProcess) and final:
            self.process.close()

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info["sandbox"] = {"profile": self.profile, "name": self.launch_name, "cgroup": self.cgroup_name,
                           "cgroup_parent": self.cgroup_parent,
                           "runtime_dir": str(self.runtime_dir) if self.runtime_dir else None}
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Take up the kernel described by ``provisioner_info`` (kept by an earlier gateway
        process); ``has_process`` is False afterwards when it no longer runs."""
        await super().load_provisioner_info(provisioner_info)
        saved = provisioner_info.get("sandbox") or {}
        self.profile = str(saved.get("profile") or "none")
        self.launch_name = saved.get("name")
        self.cgroup_name = saved.get("cgroup")
        self.cgroup_parent = saved.get("cgroup_parent") or cgroups.DEFAULT_PARENT
        self.runtime_dir = Path(saved["runtime_dir"]) if saved.get("runtime_dir") else None
        connection_file = str(self.parent.connection_file) if self.parent is not None else ""
        if not self.pid or not connection_file:
            return
        if self.in_container:
            if self.launch_name:
                reply = await host.current().call_fds("container.adopt", name=self.launch_name)
                if reply.result["running"] is not False:  # running, or the engine did not answer (it may again)
                    self.process = ContainerProcess(  # type: ignore[assignment]
                        self.launch_name, reply.result.get("pid"), reply.fds[0] if reply.fds else -1)
                else:
                    reply.close()
        elif self.isolated:
            if not self.launch_name:
                return
            reply = await host.current().call_fds("kernel.adopt", name=self.launch_name, pid=int(self.pid),
                                                  connection_file=connection_file)
            if reply.fds:
                self.process = HelperProcess(self.launch_name, int(self.pid), reply.fds[0])  # type: ignore[assignment]
        else:
            pidfd = kernel_pidfd(int(self.pid), connection_file)
            if pidfd is not None:
                self.process = AdoptedProcess(int(self.pid), pidfd)  # type: ignore[assignment]
