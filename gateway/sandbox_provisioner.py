"""A jupyter_client kernel provisioner that starts each kernel under an isolation profile.

Use it from a kernel spec (``metadata.kernel_provisioner.provisioner_name`` set to
``agent-gateway-sandbox``, registered by ``register()`` or by an entry point in the
``jupyter_client.kernel_provisioners`` group) and pass the per-kernel ``SandboxSpec`` to
``start_kernel``::

    manager = AsyncKernelManager(kernel_name=..., kernel_spec_manager=..., **connection_settings(runtime_dir))
    await manager.start_kernel(sandbox=SandboxSpec(...), env=..., independent=True)

The provisioner wraps the kernel command (``sandbox.prepare``), hands the connection file to the
kernel's uid, signals through the kernel's cgroup (never by process group: bubblewrap calls
``setsid``), switches the spec's interrupt mode to ``message``, and removes the cgroups and the
runtime directory at the final cleanup. ``oom_killed()`` tells whether the kernel died at its
memory limit.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import psutil
from jupyter_client.provisioning import LocalProvisioner
from jupyter_client.provisioning.factory import KernelProvisionerFactory

from gateway import cgroups, sandbox
from gateway.cgroups import CgroupSet
from gateway.sandbox import LaunchPlan, SandboxSpec

PROVISIONER_NAME = "agent-gateway-sandbox"
ENTRY_POINT = "gateway.sandbox_provisioner:SandboxProvisioner"


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


def _is_wrapper(pid: int) -> bool:
    """Whether ``pid`` is one of bubblewrap's own processes (they must not get SIGINT or SIGTERM)."""
    bwrap = shutil.which("bwrap")
    try:
        return bwrap is not None and os.readlink(f"/proc/{pid}/exe") == os.path.realpath(bwrap)
    except OSError:
        return False


def _inside(path: str, directory: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(directory))


class SandboxProvisioner(LocalProvisioner):
    """LocalProvisioner that launches through a ``LaunchPlan`` and signals through its cgroup."""

    plan: LaunchPlan | None = None
    cgroup: CgroupSet | None = None
    profile: str = "none"
    last_oom_killed: bool = False

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        spec = kwargs.pop("sandbox", None)
        if not isinstance(spec, SandboxSpec):
            raise ValueError(f"{PROVISIONER_NAME} needs start_kernel(sandbox=SandboxSpec(...))")
        self._check_connection(spec)
        self.plan = await asyncio.to_thread(sandbox.prepare, spec)
        self.cgroup, self.profile, self.last_oom_killed = self.plan.cgroup, spec.profile, False
        try:
            kwargs = await super().pre_launch(**kwargs)
            return self._wrap(self.plan, kwargs)
        except BaseException:
            await asyncio.to_thread(self.plan.release)
            raise

    def _check_connection(self, spec: SandboxSpec) -> None:
        """The kernel must find its connection file and sockets at the same paths as the gateway."""
        manager = self.parent
        if manager is None or spec.profile == "none":
            return
        if manager.transport != "ipc" and spec.profile == "sandbox":
            raise ValueError("the sandbox profile has no network: use transport='ipc' (connection_settings())")
        paths = [("connection file", manager.connection_file)]
        if manager.transport == "ipc":
            paths.append(("ipc path", manager.ip))
        for what, path in paths:
            if not _inside(path, spec.runtime_dir):
                raise ValueError(f"the {what} {path} must be inside the kernel's runtime dir {spec.runtime_dir}")

    def _wrap(self, plan: LaunchPlan, kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.parent is not None:
            plan.hand_over(self.parent.connection_file)
        kwargs["cmd"] = plan.command(kwargs["cmd"])
        kwargs.update(plan.popen_kwargs(kwargs.get("env") or {}))
        if plan.profile == "sandbox":
            kwargs["independent"] = True  # ipykernel's parent poller would see bwrap's init as pid 1
        if plan.profile != "none":
            self.kernel_spec.interrupt_mode = "message"
        return kwargs

    async def send_signal(self, signum: int) -> None:
        """Signal the kernel's processes through its cgroup (SIGKILL: all of them, bwrap included)."""
        if self.profile == "none" or not self.process:
            await super().send_signal(signum)
            return
        if self.cgroup is not None:
            if signum == signal.SIGKILL:
                await asyncio.to_thread(self.cgroup.kill_all)
            else:
                self.cgroup.signal(signum, exclude=_is_wrapper)
            return
        self._signal_tree(signum)

    def _signal_tree(self, signum: int) -> None:
        """Without a cgroup: signal the launched process and its descendants (bwrap only with SIGKILL)."""
        assert self.process is not None
        try:
            root = psutil.Process(self.process.pid)
            targets = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for process in targets:
            if signum == signal.SIGKILL or not _is_wrapper(process.pid):
                try:
                    process.send_signal(signum)
                except psutil.Error:
                    continue

    def oom_killed(self) -> bool:
        """Whether the kernel's memory cgroup recorded an OOM kill (also after cleanup)."""
        return self.last_oom_killed or (self.cgroup is not None and self.cgroup.oom_killed())

    async def cleanup(self, restart: bool = False) -> None:
        """Remove the cgroups (killing leftovers); at the final cleanup also the runtime dir."""
        await super().cleanup(restart=restart)
        if self.cgroup is not None:
            self.last_oom_killed = self.oom_killed()
            await asyncio.to_thread(self.cgroup.remove)
        if not restart and self.plan is not None:
            shutil.rmtree(self.plan.spec.runtime_dir, ignore_errors=True)

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        info["sandbox"] = {"profile": self.profile, "cgroup": self.cgroup.name if self.cgroup else None,
                           "cgroup_parent": self.cgroup.support.parent if self.cgroup else None}
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        await super().load_provisioner_info(provisioner_info)
        saved = provisioner_info.get("sandbox") or {}
        self.profile = saved.get("profile", "none")
        if saved.get("cgroup"):
            self.cgroup = CgroupSet(cgroups.detect_cached(saved["cgroup_parent"]), saved["cgroup"])
