"""Saving and restoring a kernel's state, by running ``kernels/snapshot.py`` inside it.

Called by the lifecycle service when a session is paused, resumed or forked. The code runs as
a silent execution (no cell, no history, no execution count) in a private namespace.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from gateway import executor
from gateway.kernels import RunningKernel, kernels_dir


class SnapshotError(Exception):
    """The kernel could not save or load its state; the message says why."""


def _source() -> str:
    return (kernels_dir() / "snapshot.py").read_text(encoding="utf-8")


async def run_silently(kernel: RunningKernel, code: str, timeout: float) -> executor.RawExecution:
    """Run code that is not a step: nothing is recorded, nothing counted."""
    if kernel.connection is None:
        raise SnapshotError("the kernel is not connected")
    return await executor.execute(kernel.connection, code, timeout=timeout, output_limit=64 * 1024,
                                  is_alive=kernel.is_alive, interrupt=kernel.interrupt, interrupt_grace=2.0,
                                  silent=True, store_history=False)


async def _run(kernel: RunningKernel, action: str, directory: Path, timeout: float) -> None:
    code = (f"exec(compile({_source()!r}, 'gateway-snapshot', 'exec'), "
            f"{{'ACTION': {action!r}, 'DIRECTORY': {str(directory)!r}, 'get_ipython': get_ipython, "
            f"'__name__': '_gateway_snapshot'}})")
    raw = await run_silently(kernel, code, timeout)
    reply = raw.reply or {}
    if raw.ended != "reply" or reply.get("status") != "ok":
        why = f"{reply.get('ename', raw.ended)}: {reply.get('evalue', '')}".strip(": ")
        raise SnapshotError(f"the kernel could not {action} its state ({why})")


SNAPSHOT_FILES = ("snapshot.json", "namespace.pkl")


async def save(kernel: RunningKernel, directory: Path, timeout: float) -> dict[str, Any]:
    """Save the user namespace, imports, counter and history to ``directory``; returns what was saved.

    An isolated kernel cannot see ``directory``: it writes into its exchange directory, and the
    files are moved from there (out of its reach)."""
    directory.mkdir(parents=True, exist_ok=True)
    exchange = kernel.exchange_dir
    await _run(kernel, "save", exchange or directory, timeout)
    if exchange is not None:
        for name in SNAPSHOT_FILES:
            if (exchange / name).exists():
                shutil.move(str(exchange / name), str(directory / name))
                os.chown(directory / name, os.getuid(), os.getgid())
    state: dict[str, Any] = json.loads((directory / "snapshot.json").read_text())
    return {"saved": state["saved"], "modules": state["modules"], "unsaved": state["failed"],
            "bytes": state["bytes"], "execution_count": state["execution_count"]}


async def load(kernel: RunningKernel, directory: Path, timeout: float) -> dict[str, Any]:
    """Restore a saved state into a fresh kernel; returns what was restored and what was not."""
    exchange = kernel.exchange_dir
    if exchange is None:
        await _run(kernel, "load", directory, timeout)
        return dict(json.loads((directory / "restore.json").read_text()))
    try:
        for name in SNAPSHOT_FILES:
            shutil.copyfile(directory / name, exchange / name)
            if kernel.owner is not None:
                os.chown(exchange / name, *kernel.owner)
        await _run(kernel, "load", exchange, timeout)
        return dict(json.loads((exchange / "restore.json").read_text()))
    finally:
        for name in (*SNAPSHOT_FILES, "restore.json"):
            (exchange / name).unlink(missing_ok=True)


def exists(directory: Path) -> bool:
    return (directory / "snapshot.json").is_file() and (directory / "namespace.pkl").is_file()
