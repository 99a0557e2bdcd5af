"""Kernels that outlived a crashed gateway: reattaching them, and stopping the ones nobody claims.

Kernels are started independent of the gateway process, and each live session's kernel pid and
connection file are in the store. After a crash, the next start finds each such kernel by its
pid (checking that the process is the ipykernel of that connection file, so a reused pid is
never mistaken for it), connects to it again and carries on. A kernel process that no session
claims (a pooled kernel, or one whose session could not be reattached) is stopped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import uuid
from pathlib import Path

import psutil
from jupyter_client.manager import AsyncKernelManager

from gateway import host
from gateway.isolation import SessionIsolation
from gateway.kernels import KernelLauncher, RunningKernel
from gateway.placement import Placement

log = logging.getLogger(__name__)


def kernel_process(pid: int | None, connection_file: str | None) -> psutil.Process | None:
    """The running process with this pid, if it is the kernel of this connection file."""
    if not pid or not connection_file:
        return None
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE or connection_file not in process.cmdline():
            return None
        return process
    except psutil.Error:
        return None


class AdoptedKernel(RunningKernel):
    """A kernel this gateway process did not start: known by pid, signalled directly.

    A restart starts a new kernel (through the launcher) and from then on behaves as one
    started here.
    """

    def __init__(self, manager: AsyncKernelManager, launcher: KernelLauncher, label: str, process: psutil.Process,
                 spec_name: str, cwd: Path, env: dict[str, str], placement: Placement | None = None,
                 isolation: SessionIsolation | None = None):
        isolated = placement is not None and placement.owner is not None
        super().__init__(manager, launcher.context, label, isolation=isolation if isolated else None,
                         owner=placement.owner if placement is not None else None,
                         runtime_dir=placement.runtime_path if placement is not None else None)
        if placement is not None and placement.log_file:
            self.log_file = Path(placement.log_file)
        self.launcher = launcher
        self.process: psutil.Process | None = process
        self.launch = (spec_name, cwd, env)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else super().pid

    async def is_alive(self) -> bool:
        if self.process is None:
            return await super().is_alive()
        try:
            return self.process.is_running() and self.process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def exit_description(self) -> str:
        if self.process is None:
            return super().exit_description()
        return "its process is gone"

    @property
    def isolated(self) -> bool:
        """Started under process or sandbox: not our child's group; signalled through its cgroup."""
        return Path(self.manager.connection_file).parent != self.launcher.runtime_dir

    @property
    def launch_id(self) -> str:
        return Path(self.manager.connection_file).stem.removeprefix("kernel-")

    async def interrupt(self) -> None:
        if self.process is None:
            await super().interrupt()
            return
        if self.isolated:
            manager = self.manager
            manager._connect_control_socket()
            manager.session.send(manager._control_socket, manager.session.msg("interrupt_request", content={}))
            return
        try:
            os.killpg(os.getpgid(self.process.pid), signal.SIGINT)
        except (ProcessLookupError, PermissionError):
            pass

    async def _kill(self) -> None:
        if self.process is None:
            return
        if self.isolated:
            await kill_isolated(Path(self.manager.connection_file))
            self.process = None
            return
        try:
            os.killpg(os.getpgid(self.process.pid), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process = None

    async def restart(self, timeout: float) -> None:
        if self.process is None:
            await super().restart(timeout)
            return
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        await self._kill()
        spec_name, cwd, env = self.launch
        # The session's own profile and limits, as for any restart.
        fresh = await self.launcher.start(kernel_id=str(uuid.uuid4()), spec_name=spec_name, cwd=cwd, env=env,
                                          ready_timeout=timeout, isolation=self.isolation)
        if fresh.connection is not None:
            fresh.connection.close()
        self.manager = fresh.manager
        self.isolation, self.owner, self.runtime_dir = fresh.isolation, fresh.owner, fresh.runtime_dir
        self.released, self.log_file = fresh.released, fresh.log_file
        self.connect()
        await self.wait_ready(timeout)

    async def shutdown(self, now: bool = False) -> None:
        if self.process is None:
            await super().shutdown(now)
            return
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        process = self.process
        try:
            if self.isolated:
                await host.current().call("kernel.signal", name=self.label,
                                          signum=int(signal.SIGTERM if not now else signal.SIGKILL))
            else:
                os.killpg(os.getpgid(process.pid), signal.SIGTERM if not now else signal.SIGKILL)
            await asyncio.get_running_loop().run_in_executor(None, lambda: psutil.wait_procs([process], timeout=2))
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
        await self._kill()
        self.manager.cleanup_connection_file()


async def adopt(launcher: KernelLauncher, *, pid: int | None, connection_file: str | None, spec_name: str,
                cwd: Path, env: dict[str, str], timeout: float, placement: Placement | None = None,
                isolation: SessionIsolation | None = None) -> AdoptedKernel | None:
    """Reconnect to a kernel left running by a previous gateway process; None if it is gone.
    ``placement`` and ``isolation`` (kept with the session) give it back its uid, directories
    and limits."""
    process = kernel_process(pid, connection_file)
    if process is None or connection_file is None or not Path(connection_file).is_file():
        return None
    manager = AsyncKernelManager(kernel_name=spec_name, kernel_spec_manager=launcher.specs,
                                 context=launcher.async_context, connection_file=connection_file)
    manager.load_connection_file()
    runtime = Path(connection_file).parent
    if runtime != launcher.runtime_dir and (manager.transport != "ipc" or manager.ip != str(runtime / "ipc")):
        # An isolated kernel owns its connection file: its sockets must be where it was started.
        log.warning("kernel pid %s: its connection file names sockets outside its runtime directory; "
                    "stopping it", pid)
        await kill_isolated(Path(connection_file))
        return None
    if placement is not None and placement.connection_file != connection_file:
        placement = None  # a record of an earlier kernel of the session
    kernel = AdoptedKernel(manager, launcher, Path(connection_file).stem.removeprefix("kernel-"), process,
                           spec_name, cwd, env, placement, isolation)
    if kernel.owner is not None and launcher.isolation is not None:
        uids, name = launcher.isolation.uids, kernel.launch_id
        uids.reserve(name, kernel.owner[0])  # no new kernel gets this uid while it runs
        kernel.released.append(lambda: uids.release(name))
    try:
        kernel.connect()
        await kernel.wait_ready(timeout)
    except Exception as exc:
        log.warning("kernel pid %s did not answer after the restart (%s); stopping it", pid, exc)
        await kernel.shutdown(now=True)
        return None
    return kernel


async def kill_isolated(connection_file: Path) -> None:
    """Stop everything in an isolated kernel's cgroups and remove them and its runtime directory."""
    kernel_id = connection_file.stem.removeprefix("kernel-")
    await host.current().call("kernel.release", name=kernel_id, runtime_dir=str(connection_file.parent))


async def stop_unclaimed(runtime_dir: Path, claimed: set[str]) -> list[int]:
    """Stop kernels whose connection files are in ``runtime_dir`` (isolated ones: in a directory
    of their own there) but that no session claims."""
    found = [*runtime_dir.glob("kernel-*.json"), *runtime_dir.glob("*/kernel-*.json")]
    unclaimed = {str(path) for path in found} - claimed
    if not unclaimed:
        return []
    stopped: list[int] = await host.current().call("kernel.kill_unclaimed", connection_files=sorted(unclaimed))
    for path in unclaimed:
        if Path(path).parent != runtime_dir:
            await kill_isolated(Path(path))
        Path(path).unlink(missing_ok=True)
    return stopped
