"""The kernel layer on its own (no server): one ``RunningKernel`` whether started here or
adopted from its placement, restarts on the same connection, and a kernel whose provisioner
record no longer matches a running process is never taken up. Real ipykernels, unisolated."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from gateway.executor import execute
from gateway.kernels import KernelLauncher, RunningKernel
from gateway.placement import Placement

TIMEOUT = 30.0


async def run(kernel: RunningKernel, code: str) -> Any:
    assert kernel.connection is not None
    raw = await execute(kernel.connection, code, timeout=TIMEOUT, output_limit=1 << 20, is_alive=kernel.is_alive,
                        interrupt=kernel.interrupt, interrupt_grace=2.0)
    return next((o["data"]["text/plain"] for o in raw.outputs if o["output_type"] == "execute_result"), raw.ended)


def workspace(tmp_path: Path, name: str) -> Path:
    path = tmp_path / "sessions" / name / "workspace"
    path.mkdir(parents=True)
    return path


async def start(launcher: KernelLauncher, tmp_path: Path, name: str) -> RunningKernel:
    return await launcher.start(kernel_id=name, spec_name="python3", cwd=workspace(tmp_path, name), env={},
                                ready_timeout=TIMEOUT)


def test_a_restart_keeps_the_connection_and_its_file(tmp_path: Path) -> None:
    """A restart starts the next process on the same ports and key; the manager it replaces,
    once collected, leaves the connection file alone (the next restart reads it)."""

    async def scenario() -> None:
        launcher = KernelLauncher(tmp_path / "runtime")
        kernel = await start(launcher, tmp_path, "k-restart")
        try:
            before = json.loads(Path(kernel.connection_file).read_text())
            first_pid = kernel.pid
            await run(kernel, "x = 1")
            for _ in range(2):
                await kernel.restart(TIMEOUT)
                gc.collect()  # the replaced manager is garbage now
                assert Path(kernel.connection_file).is_file()
            assert json.loads(Path(kernel.connection_file).read_text()) == before
            assert kernel.pid != first_pid
            assert await run(kernel, "'x' in dir()") == "False"
            assert await run(kernel, "1 + 1") == "2"
        finally:
            await kernel.shutdown(now=True)
        assert not Path(kernel.connection_file).exists()

    asyncio.run(scenario())


def test_a_kernel_is_adopted_from_its_placement_and_behaves_as_before(tmp_path: Path) -> None:
    """Another launcher (a gateway process after a crash) takes the kernel up from its
    placement: same process and state; interrupt, restart and shutdown work on it, and its
    death is seen although it is not that process's child."""

    async def scenario() -> None:
        first = KernelLauncher(tmp_path / "runtime")
        kernel = await start(first, tmp_path, "k-adopt")
        await run(kernel, "kept = 41")
        placement = Placement.from_dict(json.loads(json.dumps(kernel.placement().to_dict())))
        assert placement is not None and placement.provisioner["pid"] == kernel.pid
        kernel.abandon()  # the first process is gone without stopping its kernel

        again = KernelLauncher(tmp_path / "runtime")
        cwd = tmp_path / "sessions" / "k-adopt" / "workspace"
        adopted = await again.adopt(placement, spec_name="python3", cwd=cwd, env={}, isolation=None, timeout=TIMEOUT)
        assert adopted is not None
        try:
            assert adopted.pid == placement.pid and adopted.launch_id == "k-adopt"
            assert await run(adopted, "kept + 1") == "42"
            # An interrupt reaches it (through its process group, as for a kernel started here).
            assert adopted.connection is not None
            raw_task = asyncio.ensure_future(execute(
                adopted.connection, "import time; time.sleep(30)", timeout=TIMEOUT, output_limit=1 << 20,
                is_alive=adopted.is_alive, interrupt=adopted.interrupt, interrupt_grace=2.0))
            await asyncio.sleep(1.0)
            await adopted.interrupt()
            raw = await asyncio.wait_for(raw_task, 10)
            assert raw.reply is not None and raw.reply.get("ename") == "KeyboardInterrupt", raw.reply
            assert await run(adopted, "kept") == "41"
            # Its death is seen, and told as what is known of it.
            os.kill(placement.pid or 0, signal.SIGKILL)
            for _ in range(100):
                if not await adopted.is_alive():
                    break
                await asyncio.sleep(0.05)
            assert not await adopted.is_alive()
            assert "started before the gateway restarted" in adopted.exit_description()
            # A restart gives it a new process on the same connection, as for any kernel.
            await adopted.restart(TIMEOUT)
            assert adopted.pid != placement.pid
            assert await run(adopted, "'kept' in dir()") == "False"
        finally:
            await adopted.shutdown(now=True)
        assert not Path(placement.connection_file).exists()

    asyncio.run(scenario())


@pytest.mark.parametrize("change", ["pid of another process", "gone", "other connection file"])
def test_a_placement_that_does_not_match_a_running_kernel_is_not_adopted(tmp_path: Path, change: str) -> None:
    """A reused pid, a kernel that is gone, or a record naming another connection file: nothing
    is taken up, and nothing is signalled."""

    async def scenario() -> None:
        first = KernelLauncher(tmp_path / "runtime")
        kernel = await start(first, tmp_path, "k-stale")
        placement = kernel.placement()
        bystander = await asyncio.create_subprocess_exec("sleep", "30")
        try:
            if change == "pid of another process":
                info = {**placement.provisioner, "pid": bystander.pid, "pgid": bystander.pid}
                placement = Placement(**{**placement.to_dict(), "provisioner": info, "pid": bystander.pid})
            elif change == "gone":
                await kernel.shutdown(now=True)
            else:
                other = Path(placement.connection_file).with_name("kernel-other.json")
                placement = Placement(**{**placement.to_dict(), "connection_file": str(other)})
            again = KernelLauncher(tmp_path / "runtime")
            cwd = tmp_path / "sessions" / "k-stale" / "workspace"
            adopted = await again.adopt(placement, spec_name="python3", cwd=cwd, env={}, isolation=None,
                                        timeout=5.0)
            assert adopted is None
            assert bystander.returncode is None  # never signalled
        finally:
            bystander.kill()
            await bystander.wait()
            await kernel.shutdown(now=True)

    asyncio.run(scenario())
