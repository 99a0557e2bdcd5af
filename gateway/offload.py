"""Worker processes for the gateway's long file-system walks (listing, measuring, deleting and
copying workspaces), so that no walk holds up the event loop, whatever the size of the tree.

The workers are spawned (not forked: the server has threads), run at a lower CPU priority
than the kernels and the server, and are stopped with the server (or killed by the system
when the server dies). A function run here must be
defined at module level (it is sent by name).
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import resource_tracker
from typing import Any, Callable, TypeVar

T = TypeVar("T")

WORKERS = 2
NICENESS = 10
PR_SET_PDEATHSIG = 1  # linux/prctl.h

_workers: ProcessPoolExecutor | None = None


async def offload(function: Callable[..., T], *args: Any) -> T:
    """Run ``function(*args)`` in a worker process and return its result (or raise its error)."""
    return await asyncio.get_running_loop().run_in_executor(_pool(), function, *args)


def stop_workers() -> None:
    """Stop the worker processes (at shutdown)."""
    global _workers
    if _workers is not None:
        _workers.shutdown(wait=True, cancel_futures=True)
        _workers = None
        # multiprocessing's helper process would otherwise outlive the server by a moment
        resource_tracker._resource_tracker._stop()  # type: ignore[attr-defined]


def _pool() -> ProcessPoolExecutor:
    global _workers
    if _workers is None:
        _workers = ProcessPoolExecutor(WORKERS, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_start_worker, initargs=(os.getpid(),))
    return _workers


def _start_worker(server_pid: int) -> None:
    """In each worker: walks are background work (they get the CPU after the kernels and the
    server), and a worker ends with the server, even one killed with SIGKILL."""
    os.nice(NICENESS)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server_pid:  # the server was gone before the line above took effect
        os._exit(0)
