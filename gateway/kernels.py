"""Kernel specs and kernel processes: the one module that drives jupyter_client's managers.

``KernelLauncher`` knows the specs the gateway offers (the ``kernels/`` directory) and starts
``RunningKernel``s; a ``RunningKernel`` owns one ``AsyncKernelManager`` and the gateway's
channels to it. Remote kernels come through the spec's ``metadata.kernel_provisioner``.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import signal
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager

from gateway.channels import KernelConnection, Observer
from gateway.errors import InvalidRequest

log = logging.getLogger(__name__)

# Variables of the gateway's own environment that a kernel inherits; nothing else does.
INHERITED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
                 "SHELL", "TERM", "VIRTUAL_ENV")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
RESERVED_ENV_PREFIXES = ("AGENT_GATEWAY_", "JPY_")


def kernels_dir() -> Path:
    """Where the kernel specs live: inside the installed package, or the source tree's ``kernels/``."""
    packaged = Path(__file__).parent / "_kernels"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "kernels"


def shared_zmq_context() -> zmq.Context:
    """The process-wide ZMQ context, with room for far more than the default 1,023 sockets."""
    context: zmq.Context = zmq.Context.instance()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target = soft
    context.set(zmq.MAX_SOCKETS, max(min(target, 1 << 16), 1024))
    return context


def validate_env(env: Any) -> dict[str, str]:
    """Check a caller-supplied kernel environment; raises ``InvalidRequest`` naming the bad entry."""
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise InvalidRequest("'env' must be an object of string names to string values.", code="invalid_field",
                             details={"field": "env"})
    for name, value in env.items():
        if not isinstance(name, str) or not ENV_NAME.match(name) or name.startswith(RESERVED_ENV_PREFIXES):
            raise InvalidRequest(f"'{name}' is not an environment variable name a session may set.",
                                 code="invalid_field", details={"field": "env", "name": name})
        if not isinstance(value, str) or "\x00" in value:
            raise InvalidRequest(f"The value of env '{name}' must be a string without NUL bytes.",
                                 code="invalid_field", details={"field": "env", "name": name})
    return dict(env)


class RunningKernel:
    """One kernel process and the gateway's channels to it. Owned by a live session."""

    def __init__(self, manager: AsyncKernelManager, context: zmq.Context, label: str):
        self.manager: AsyncKernelManager = manager
        self.context = context
        self.label = label
        self.connection: KernelConnection | None = None
        self.kernel_info: dict[str, Any] = {}
        self.observers: list[Observer] = []

    @property
    def pid(self) -> int | None:
        process = getattr(self.manager.provisioner, "process", None)
        return getattr(process, "pid", None)

    @property
    def connection_file(self) -> str:
        return str(self.manager.connection_file)

    def connect(self) -> KernelConnection:
        if self.connection is not None:
            self.connection.close()
        self.connection = KernelConnection(self.context, self.manager.get_connection_info(session=False),
                                           self.manager.session, self.label, self.observers)
        return self.connection

    async def wait_ready(self, timeout: float) -> None:
        assert self.connection is not None
        self.kernel_info = await self.connection.wait_ready(timeout, self.is_alive)

    async def is_alive(self) -> bool:
        return bool(await self.manager.is_alive())

    def exit_description(self) -> str:
        """How the process ended, in words ("exit code 1", "killed by SIGKILL")."""
        process = getattr(self.manager.provisioner, "process", None)
        code = getattr(process, "returncode", None)
        if code is None:
            return "it stopped responding"
        if code < 0:
            try:
                return f"it was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"it was killed by signal {-code}"
        return f"it exited with code {code}"

    async def interrupt(self) -> None:
        await self.manager.interrupt_kernel()

    async def restart(self, timeout: float) -> None:
        """Kill the process and start a fresh one on the same connection; wait until it answers."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        await self.manager.restart_kernel(now=True)
        self.connect()
        await self.wait_ready(timeout)

    async def shutdown(self, now: bool = False) -> None:
        """Stop the kernel process and close the channels; safe to call twice."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        try:
            if self.manager.has_kernel:
                await self.manager.shutdown_kernel(now=now)
        except Exception:
            log.warning("kernel %s: shutdown failed; killing it", self.label, exc_info=True)
            try:
                await self.manager.shutdown_kernel(now=True)
            except Exception:
                log.exception("kernel %s: could not be killed", self.label)
        finally:
            self.manager.cleanup_connection_file()


class KernelLauncher:
    """Starts kernels from the gateway's specs. One per server."""

    def __init__(self, runtime_dir: Path, context: zmq.Context | None = None):
        self.runtime_dir = runtime_dir
        runtime_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(runtime_dir, 0o700)
        self.context = context or shared_zmq_context()
        self.async_context = zmq.asyncio.Context.shadow(self.context.underlying)
        self.specs = KernelSpecManager(kernel_dirs=[str(kernels_dir())], ensure_native_kernel=False)

    def spec_names(self) -> list[str]:
        return sorted(self.specs.find_kernel_specs())

    def get_spec(self, name: str) -> KernelSpec:
        """The spec called ``name``; an unknown name is a 400 listing the available ones."""
        try:
            return self.specs.get_kernel_spec(name)
        except NoSuchKernel:
            available = self.spec_names()
            raise InvalidRequest(f"There is no kernel named '{name}'. Available kernels: {', '.join(available)}.",
                                 code="unknown_kernel", details={"kernel": name, "available": available}) from None

    def build_env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
        env.update(extra)
        return env

    async def start(self, *, kernel_id: str, spec_name: str, cwd: Path, env: dict[str, str],
                    ready_timeout: float) -> RunningKernel:
        """Start a kernel and wait until it answers; on any failure nothing is left running."""
        self.get_spec(spec_name)
        manager = AsyncKernelManager(
            kernel_name=spec_name,
            kernel_spec_manager=self.specs,
            context=self.async_context,
            connection_file=str(self.runtime_dir / f"kernel-{kernel_id}.json"),
        )
        manager.kernel_id = kernel_id
        # A kernel that does not exit within this after a shutdown request is signalled.
        manager.shutdown_wait_time = 1.0
        kernel = RunningKernel(manager, self.context, label=kernel_id)
        try:
            # Independent: the kernel outlives a crash of the gateway, which reattaches it on restart.
            await manager.start_kernel(cwd=str(cwd), env=self.build_env(env), independent=True)
            kernel.connect()
            await kernel.wait_ready(ready_timeout)
        except BaseException:
            await kernel.shutdown(now=True)
            raise
        log.info("kernel %s started (%s, pid %s)", kernel_id, spec_name, kernel.pid)
        return kernel
