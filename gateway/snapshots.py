"""Saving and restoring a kernel's state, by running ``kernels/snapshot.py`` inside it.

Called by the lifecycle service when a session is paused, resumed or forked. The code runs as
a silent execution (no cell, no history, no execution count) in a private namespace.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gateway import executor, host, safefs
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
RESULT_FILE = "restore.json"
REPORT_LIMIT = 16 * 1024 * 1024  # snapshot.json and restore.json are reports, not data


async def save(kernel: RunningKernel, directory: Path, timeout: float) -> dict[str, Any]:
    """Save the user namespace, imports, counter and history to ``directory``; returns what was saved.

    An isolated kernel cannot see ``directory``: it writes into its exchange directory, which it
    can change at any moment, so the helper opens each file there without following links and
    passes the descriptor; the server copies from it into ``directory``, out of the kernel's reach."""
    directory.mkdir(parents=True, exist_ok=True)
    if kernel.exchange_dir is None:
        await _run(kernel, "save", directory, timeout)
        return _saved_report((directory / "snapshot.json").read_bytes())
    try:
        await _clear(kernel)
    except OSError as exc:
        raise SnapshotError(f"the kernel's exchange directory could not be prepared ({exc.strerror}: "
                            f"{exc.filename})") from None
    await _run(kernel, "save", kernel.exchange_dir, timeout)
    try:
        try:
            for name in SNAPSHOT_FILES:
                fd = await _open(kernel, name)
                with safefs.opened(fd):
                    _copy_to(fd, directory / name)
        finally:
            await _clear(kernel)
    except OSError as exc:
        raise SnapshotError(f"the kernel's snapshot files could not be taken ({exc.strerror}: {exc.filename})") from None
    return _saved_report((directory / "snapshot.json").read_bytes())


async def load(kernel: RunningKernel, directory: Path, timeout: float) -> dict[str, Any]:
    """Restore a saved state into a fresh kernel; returns what was restored and what was not."""
    if kernel.exchange_dir is None:
        await _run(kernel, "load", directory, timeout)
        return _restore_report((directory / RESULT_FILE).read_bytes())
    try:
        await _clear(kernel)
        for name in SNAPSHOT_FILES:
            with safefs.opened(os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)) as fd:
                await host.current().call("file.install", (fd,), root=str(kernel.exchange_dir), parts=[name],
                                          owner=list(kernel.owner) if kernel.owner else None)
        await _run(kernel, "load", kernel.exchange_dir, timeout)
        try:
            fd = await _open(kernel, RESULT_FILE)
            with safefs.opened(fd):
                report = os.read(fd, REPORT_LIMIT + 1) if os.fstat(fd).st_size <= REPORT_LIMIT else b""
        finally:
            await _clear(kernel)
    except OSError as exc:
        raise SnapshotError(f"the snapshot could not be exchanged with the kernel ({exc.strerror}: "
                            f"{exc.filename})") from None
    return _restore_report(report)


async def _open(kernel: RunningKernel, name: str) -> int:
    """A read descriptor of a regular file of the kernel's exchange directory (no link followed)."""
    reply = await host.current().call_fds("file.open", root=str(kernel.exchange_dir), parts=[name])
    for extra in reply.fds[1:]:
        os.close(extra)
    return reply.fds[0]


async def clear_exchange(kernel: RunningKernel) -> None:
    """Empty an isolated kernel's exchange directory (after a crash)."""
    try:
        await _clear(kernel)
    except OSError:
        pass  # the kernel made it something else: the next save or load says so


async def _clear(kernel: RunningKernel) -> None:
    """Make the kernel's exchange directory (its own) if missing, and empty it."""
    await host.current().call("tree.clear", root=str(kernel.exchange_dir), names=[*SNAPSHOT_FILES, RESULT_FILE],
                              owner=list(kernel.owner) if kernel.owner else None)


def _copy_to(fd: int, destination: Path) -> None:
    """Copy what ``fd`` holds to ``destination`` (the server's own directory), atomically."""
    partial = destination.with_name(f".{destination.name}.partial")
    partial.unlink(missing_ok=True)
    with open(partial, "xb") as out:
        while chunk := os.read(fd, 1 << 20):
            out.write(chunk)
    os.replace(partial, destination)


def _saved_report(raw: bytes) -> dict[str, Any]:
    """What ``snapshot.json`` (written by the kernel, so not trusted) says was saved."""
    try:
        state = json.loads(raw)
        report = {"saved": [str(n) for n in state["saved"]], "modules": {str(k): str(v) for k, v in state["modules"].items()},
                  "unsaved": [{"name": str(u["name"]), "type": str(u["type"]), "error": str(u.get("error", ""))}
                              for u in state["failed"]],
                  "bytes": int(state["bytes"]), "execution_count": int(state["execution_count"])}
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as exc:
        raise SnapshotError(f"the kernel's snapshot report is malformed ({type(exc).__name__})") from None
    return report


def _restore_report(raw: bytes) -> dict[str, Any]:
    """What ``restore.json`` (written by the kernel) says was restored and what was not."""
    try:
        result = json.loads(raw)
        return {"restored": [str(n) for n in result["restored"]],
                "failed": [{"name": str(f["name"]), "type": str(f["type"]), "error": str(f.get("error", ""))}
                           for f in result["failed"]]}
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as exc:
        raise SnapshotError(f"the kernel's restore report is malformed ({type(exc).__name__})") from None


def exists(directory: Path) -> bool:
    return (directory / "snapshot.json").is_file() and (directory / "namespace.pkl").is_file()
