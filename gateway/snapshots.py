"""Saving and restoring a kernel's state, by running ``kernels/snapshot.py`` inside it.

Called by the lifecycle service when a session is paused, resumed or forked. The code runs as
a silent execution (no cell, no history, no execution count) in a private namespace.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from gateway import executor, safefs
from gateway.kernels import EXCHANGE, RunningKernel, kernels_dir


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
    can change at any moment, so the files are copied out of it through descriptors (never by a
    path inside it) into ``directory``, out of its reach."""
    directory.mkdir(parents=True, exist_ok=True)
    if kernel.exchange_dir is None:
        await _run(kernel, "save", directory, timeout)
        return _saved_report((directory / "snapshot.json").read_bytes())
    with _exchange(kernel) as exchange:
        _clear(exchange)
    await _run(kernel, "save", kernel.exchange_dir, timeout)
    try:
        with _exchange(kernel) as exchange:
            try:
                for name in SNAPSHOT_FILES:
                    safefs.copy_out(exchange, name, directory / name)
            finally:
                _clear(exchange)
    except OSError as exc:
        raise SnapshotError(f"the kernel's snapshot files could not be taken ({exc.strerror}: {exc.filename})") from None
    return _saved_report((directory / "snapshot.json").read_bytes())


async def load(kernel: RunningKernel, directory: Path, timeout: float) -> dict[str, Any]:
    """Restore a saved state into a fresh kernel; returns what was restored and what was not."""
    if kernel.exchange_dir is None:
        await _run(kernel, "load", directory, timeout)
        return _restore_report((directory / RESULT_FILE).read_bytes())
    try:
        with _exchange(kernel) as exchange:
            _clear(exchange)
            for name in SNAPSHOT_FILES:
                safefs.write_new(exchange, name, directory / name, kernel.owner)
        await _run(kernel, "load", kernel.exchange_dir, timeout)
        with _exchange(kernel) as exchange:
            try:
                report = safefs.read_bytes(exchange, RESULT_FILE, REPORT_LIMIT)
            finally:
                _clear(exchange)
    except OSError as exc:
        raise SnapshotError(f"the snapshot could not be exchanged with the kernel ({exc.strerror}: "
                            f"{exc.filename})") from None
    return _restore_report(report)


@contextmanager
def _exchange(kernel: RunningKernel) -> Iterator[int]:
    """A descriptor of the kernel's exchange directory (made if missing), reached beneath its
    runtime directory without following links."""
    assert kernel.runtime_dir is not None
    with safefs.opened(safefs.open_root(kernel.runtime_dir)) as runtime:
        with safefs.opened(safefs.open_dir(runtime, (EXCHANGE,), create=True, owner=kernel.owner,
                                           mode=0o700)) as exchange:
            yield exchange


def _clear(exchange: int) -> None:
    for name in (*SNAPSHOT_FILES, RESULT_FILE):
        safefs.remove_entry(exchange, name, missing_ok=True)


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
