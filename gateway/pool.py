"""A warm pool of pre-started kernels, so a new session does not wait for a kernel to boot.

Kernels in the pool have never run user code; each is handed out once, bound to its session
(working directory and environment set before the first step), and replaced in the background.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections import deque
from pathlib import Path

from gateway import host
from gateway.kernels import KernelLauncher, RunningKernel
from gateway.snapshots import run_silently

log = logging.getLogger(__name__)

# Environment variables that only take effect when the interpreter starts: a session that sets
# one gets a kernel started for it rather than a pooled one.
STARTUP_ENV_PREFIXES = ("PYTHON", "LD_", "MALLOC_")


class KernelPool:
    """Ready kernels per kernel spec. One per server."""

    def __init__(self, launcher: KernelLauncher, size: int, directory: Path, start_timeout: float,
                 specs: tuple[str, ...] = ("python3",)):
        self.launcher = launcher
        self.size = size
        self.directory = directory
        self.start_timeout = start_timeout
        self.specs = specs
        self.ready: dict[str, deque[RunningKernel]] = {spec: deque() for spec in specs}
        self.starting: dict[str, int] = {spec: 0 for spec in specs}
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def kernels(self) -> int:
        """Kernel processes the pool holds or is starting."""
        return sum(len(q) for q in self.ready.values()) + sum(self.starting.values())

    def fill(self) -> None:
        """Start kernels until every spec has ``size`` ready or starting."""
        if self.closed:
            return
        for spec in self.specs:
            while len(self.ready[spec]) + self.starting[spec] < self.size:
                self.starting[spec] += 1
                task = asyncio.get_running_loop().create_task(self._start_one(spec))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    async def _start_one(self, spec: str) -> None:
        kernel_id = str(uuid.uuid4())
        # An isolated kernel's workspace is mounted at start, so each gets a directory of its own,
        # which becomes its session's workspace when it is handed out.
        isolated = self.launcher.isolation is not None and self.launcher.isolation.profile != "none"
        cwd = self.directory / kernel_id if isolated else self.directory
        try:
            kernel = await self.launcher.start(kernel_id=kernel_id, spec_name=spec, cwd=cwd, env={},
                                               ready_timeout=self.start_timeout)
        except Exception:
            log.warning("pool: a %s kernel failed to start", spec, exc_info=True)
            return
        finally:
            self.starting[spec] -= 1
        if self.closed:
            await discard(kernel)
        else:
            self.ready[spec].append(kernel)

    async def take(self, spec: str, env: dict[str, str]) -> RunningKernel | None:
        """A ready kernel of ``spec`` (refilled in the background), or None to start one cold."""
        if spec not in self.ready or any(name.startswith(STARTUP_ENV_PREFIXES) for name in env):
            return None
        while self.ready[spec]:
            kernel = self.ready[spec].popleft()
            self.fill()
            if await kernel.is_alive():
                return kernel
            await discard(kernel)
        self.fill()
        return None

    async def close(self) -> None:
        self.closed = True
        if self.tasks:
            # A kernel being started is let finish, then stopped by its task: cancelling a launch
            # half-way could leave its process running (an isolated kernel is not our child).
            await asyncio.wait(list(self.tasks), timeout=self.start_timeout)
        for task in list(self.tasks):
            task.cancel()
        kernels = [kernel for queue in self.ready.values() for kernel in queue]
        for queue in self.ready.values():
            queue.clear()
        await asyncio.gather(*(discard(kernel) for kernel in kernels), return_exceptions=True)


async def discard(kernel: RunningKernel) -> None:
    """Stop a pooled kernel no session took, and remove its workspace (and volume)."""
    await kernel.shutdown(now=True)
    workspace = kernel.launch_workspace()
    if workspace is not None:
        helper = host.current()
        await helper.call("volume.release", path=str(workspace), remove=True)
        await helper.call("tree.remove", path=str(workspace))


async def bind(kernel: RunningKernel, workspace: Path, env: dict[str, str], timeout: float) -> None:
    """Give a pooled kernel its session's working directory and environment (not recorded)."""
    await kernel.move_workspace(workspace)
    if kernel.log_file is not None and kernel.log_file.exists():
        moved = workspace.parent / "logs" / kernel.log_file.name
        moved.parent.mkdir(mode=0o700, exist_ok=True)
        os.replace(kernel.log_file, moved)
        kernel.move_log(moved)
    inner = f"import os\nos.chdir({kernel.workspace_path(workspace)!r})\nos.environ.update({env!r})"
    code = f"exec({inner!r}, {{'__name__': '_gateway_bind'}})"
    raw = await run_silently(kernel, code, timeout)
    if raw.ended != "reply" or (raw.reply or {}).get("status") != "ok":
        raise RuntimeError("the pooled kernel could not be bound to its session")
