"""Kernels that outlived a crashed gateway: finding the one each session had, and stopping the
ones nobody claims.

Kernels are started independent of the gateway process, and each live session's kernel
placement (``gateway.placement``) is in the store. After a crash, the next start hands each to
``KernelLauncher.adopt``, which takes the kernel up through its provisioner and carries on. A
kernel process that no session claims (a pooled kernel, or one whose session could not be
reattached) is stopped.
"""

from __future__ import annotations

from pathlib import Path

from gateway import host
from gateway.placement import Placement
from gateway.records import SessionRecord


def recorded_placement(record: SessionRecord) -> Placement | None:
    """Where the session's kernel ran, as its record keeps it; a session stored before
    placements were has only the pid and connection file of an unisolated kernel."""
    placement = Placement.from_dict(record.placement)
    if placement is not None or not record.connection_file or not record.kernel_pid:
        return placement
    return Placement(Path(record.connection_file).stem.removeprefix("kernel-"), "none", record.connection_file,
                     pid=int(record.kernel_pid))


async def kill_isolated(connection_file: Path) -> None:
    """Stop everything in an isolated kernel's cgroups and remove them and its runtime directory."""
    kernel_id = connection_file.stem.removeprefix("kernel-")
    await host.current().call("kernel.release", name=kernel_id, runtime_dir=str(connection_file.parent))


async def remove_unclaimed_containers(claimed: set[str]) -> list[str]:
    """Remove this gateway's kernel containers whose connection file no session claims."""
    kernels = sorted(Path(path).stem.removeprefix("kernel-") for path in claimed)
    removed: list[str] = await host.current().call("container.remove_unclaimed", claimed=kernels)
    return removed


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
