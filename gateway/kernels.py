"""Kernel specs and kernel processes: the one module that drives jupyter_client's managers.

``KernelLauncher`` knows the specs the gateway offers (the ``kernels/`` directory), starts
``RunningKernel``s and, after a crash of the gateway, adopts the ones still running (from their
``Placement``); a ``RunningKernel`` owns one ``AsyncKernelManager`` and the gateway's channels to
it, and is the same whichever way it came. Every local kernel is started by the gateway's own
provisioner (``gateway.sandbox_provisioner``); remote kernels come through the spec's own
``metadata.kernel_provisioner``. Only jupyter_client's public API is used: a kernel is adopted
by handing its provisioner's saved info to a new provisioner (``load_provisioner_info``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import resource
import signal
from pathlib import Path
from typing import Any, Callable, cast

import psutil
import zmq
import zmq.asyncio
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning.factory import KernelProvisionerFactory

from gateway import connection_files, egress, host, sandbox, sandbox_provisioner
from gateway.channels import KernelConnection, Observer
from gateway.connection_files import StagedConnectionManager
from gateway.environments import DEFAULT_ROOT, Environment, EnvironmentNotBuilt, Environments, read
from gateway.errors import InvalidRequest, Unavailable
from gateway.isolation import Isolation, SessionIsolation, human_bytes, open_for_traversal
from gateway.placement import Placement

log = logging.getLogger(__name__)

# Variables of the gateway's own environment that a kernel inherits; nothing else does.
INHERITED_ENV = ("PATH", "PYTHONPATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ",
                 "TMPDIR", "SHELL", "TERM", "VIRTUAL_ENV")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
RESERVED_ENV_PREFIXES = ("AGENT_GATEWAY_", "JPY_")
ENV_VARIABLES_MAX = 128
ENV_VALUE_MAX = 32 * 1024  # characters of one value
ENV_TOTAL_MAX = 256 * 1024  # characters of all names and values: well within what exec() takes
KERNEL_NAME_MAX = 128
EXCHANGE = "exchange"  # in an isolated kernel's runtime directory: where snapshots pass through


def kernel_log(cwd: Path, kernel_id: str) -> Path:
    """Where a kernel's own output (its start banner, warnings) goes: ``logs/kernel-<id>.log``
    beside its workspace (in its session's directory; a pooled kernel's moves there when a
    session takes it), not the server's log."""
    return cwd.parent / "logs" / f"kernel-{kernel_id}.log"


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
    if len(env) > ENV_VARIABLES_MAX:
        raise InvalidRequest(f"A session takes at most {ENV_VARIABLES_MAX} environment variables; {len(env)} were "
                             "sent.", code="invalid_field", details={"field": "env", "limit": ENV_VARIABLES_MAX})
    for name, value in env.items():
        if not isinstance(name, str) or not ENV_NAME.fullmatch(name) or name.startswith(RESERVED_ENV_PREFIXES):
            shown = name[:130] if isinstance(name, str) else name
            raise InvalidRequest(f"'{shown}' is not an environment variable name a session may set (letters, "
                                 "digits and _, up to 128).", code="invalid_field",
                                 details={"field": "env", "name": shown})
        if not isinstance(value, str) or "\x00" in value or len(value) > ENV_VALUE_MAX:
            raise InvalidRequest(f"The value of env '{name}' must be a string without NUL bytes, of at most "
                                 f"{ENV_VALUE_MAX} characters.", code="invalid_field",
                                 details={"field": "env", "name": name, "limit": ENV_VALUE_MAX})
    if sum(len(name) + len(value) for name, value in env.items()) > ENV_TOTAL_MAX:
        raise InvalidRequest(f"The environment variables add up to more than {ENV_TOTAL_MAX} characters.",
                             code="invalid_field", details={"field": "env", "limit": ENV_TOTAL_MAX})
    return dict(env)


class ProvisionedSpecs(KernelSpecManager):
    """The gateway's kernel specs as its kernels are launched: a spec without a provisioner of
    its own gets the gateway's, and its Python is its environment's; for isolated kernels,
    interrupts are messages (a signal cannot reach into the sandbox)."""

    message_interrupts = False
    environments: Environments | None = None

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        spec = super().get_kernel_spec(kernel_name)
        if "kernel_provisioner" not in spec.metadata:
            spec.metadata = {**spec.metadata, **sandbox_provisioner.spec_metadata()}
            if self.message_interrupts:
                spec.interrupt_mode = "message"
            environment = self.environments.for_spec(Path(spec.resource_dir)) if self.environments else None
            if environment is not None and spec.argv and os.path.basename(spec.argv[0]) in sandbox.PYTHON_NAMES:
                spec.argv = [environment.executable, *spec.argv[1:]]
        return spec


PACKAGES_DIR = ".packages"  # in the workspace: what a session installs with pip
EGRESS_PROFILES = ("sandbox", sandbox.CONTAINER)  # no network of their own: the egress proxy is their way out


def kernel_sink(kernel: "RunningKernel", connection: egress.Connection) -> None:
    """Hand one egress attempt to whoever records the kernel's (its session), else log it."""
    if kernel.egress_sink is not None:
        kernel.egress_sink(connection)
    else:
        log.info("egress of kernel %s (no session yet): %s", kernel.label, connection.details())


def kernel_process_under(launcher_pid: int, connection_file: str) -> int | None:
    """The pid of the ipykernel started (through bwrap, setpriv or a container's shell) by ``launcher_pid``."""
    try:
        launcher = psutil.Process(launcher_pid)
        for process in [launcher, *launcher.children(recursive=True)]:
            cmdline = process.cmdline()
            program = os.path.basename(cmdline[0]) if cmdline else ""
            if connection_file in cmdline and "ipykernel_launcher" in " ".join(cmdline) and \
                    not program.startswith(("bwrap", "setpriv")) and program != "sh":  # sh: a container's wrapper
                return int(process.pid)
    except psutil.Error:
        return None
    return None


def successor(manager: AsyncKernelManager) -> AsyncKernelManager:
    """A new manager for the kernel ``manager`` managed, on the same connection file, sockets
    and key, to start its next process with."""
    staged = {"staging_dir": manager.staging_dir} if isinstance(manager, StagedConnectionManager) else {}
    fresh = type(manager)(kernel_name=manager.kernel_name, kernel_spec_manager=manager.kernel_spec_manager,
                          context=manager.context, connection_file=manager.connection_file,
                          transport=manager.transport, ip=manager.ip, **staged)
    fresh.kernel_id = manager.kernel_id
    fresh.shutdown_wait_time = manager.shutdown_wait_time
    fresh.cache_ports = False  # the ports it has, kept: none is picked anew
    fresh.load_connection_info(manager.get_connection_info())
    return fresh


class RunningKernel:
    """One kernel process and the gateway's channels to it. Owned by a live session."""

    def __init__(self, manager: AsyncKernelManager, context: zmq.Context, label: str,
                 isolation: SessionIsolation | None = None, owner: tuple[int, int] | None = None,
                 runtime_dir: Path | None = None):
        self.manager: AsyncKernelManager = manager
        self.context = context
        self.label = label
        self.connection: KernelConnection | None = None
        self.kernel_info: dict[str, Any] = {}
        self.observers: list[Observer] = []
        self.isolation = isolation
        self.owner = owner  # (uid, gid) the kernel runs as, under the process and sandbox profiles
        self.runtime_dir = runtime_dir  # connection file and ipc sockets, same path inside and out
        self.released: list[Callable[[], None]] = []  # called once when the kernel is shut down
        self.log_file: Path | None = None  # its stdout and stderr
        self.launch: dict[str, Any] = {}  # the arguments of start_kernel: a restart starts it so again
        self.provisioner_info: dict[str, Any] = {}  # its provisioner's own record (for adopting it)
        self._found: tuple[int, psutil.Process] | None = None  # (launcher pid, ipykernel) of an isolated kernel
        self.environment: Environment | None = None  # the environment it runs in (None: the spec's own provisioner)
        self.egress: egress.Proxy | None = None  # its way out, under the sandbox profile
        self.egress_sink: egress.Sink | None = None  # who records its connections (its session)

    @property
    def profile(self) -> str:
        return self.isolation.profile if self.isolation is not None else "none"

    @property
    def exchange_dir(self) -> Path | None:
        """The directory, writable by an isolated kernel, its snapshots pass through (the gateway
        reaches it only through ``gateway.snapshots``, by descriptor); None when not isolated."""
        if self.runtime_dir is None or self.owner is None:
            return None
        return self.runtime_dir / EXCHANGE

    def workspace_path(self, host_path: Path) -> str:
        """The workspace as the kernel sees it."""
        return sandbox.SANDBOX_WORKSPACE if self.profile in ("sandbox", sandbox.CONTAINER) else str(host_path)

    def launch_workspace(self) -> Path | None:
        """The workspace directory this kernel's sandbox was started on (None when not isolated)."""
        spec = self.launch.get("sandbox") if self.owner is not None else None
        return spec.workspace if isinstance(spec, sandbox.SandboxSpec) else None

    async def move_workspace(self, target: Path) -> None:
        """From now on the kernel restarts in ``target``. An isolated kernel's workspace is
        mounted when it starts: that directory is moved (with whatever ``target`` already holds)."""
        spec = self.launch.get("sandbox")
        if not isinstance(spec, sandbox.SandboxSpec):
            if "cwd" in self.launch:
                self.launch["cwd"] = str(target)
            return
        if spec.workspace == target or self.owner is None:
            return
        await host.current().call("workspace.move", current=str(spec.workspace), target=str(target),
                                  owner=list(self.owner))
        self.launch["sandbox"] = dataclasses.replace(spec, workspace=target)

    def move_log(self, target: Path) -> None:
        """The kernel's log file was moved to ``target``: a restarted process writes there."""
        self.log_file = target
        spec = self.launch.get("sandbox")
        if isinstance(spec, sandbox.SandboxSpec):
            self.launch["sandbox"] = dataclasses.replace(spec, log_file=target)

    @property
    def pid(self) -> int | None:
        """The kernel's process id on the host (for an isolated kernel: the ipykernel process
        inside the sandbox, not the launcher in front of it)."""
        process = getattr(self.manager.provisioner, "process", None)
        launched = getattr(process, "pid", None)
        if launched is None or self.owner is None:
            return launched
        if self._found is None or self._found[0] != launched:
            found = kernel_process_under(launched, self.connection_file)
            if found is None:
                return launched
            try:
                self._found = (launched, psutil.Process(found))
            except psutil.Error:
                return launched
        return int(self._found[1].pid)

    @property
    def connection_file(self) -> str:
        return str(self.manager.connection_file)

    @property
    def launch_id(self) -> str:
        """The name the kernel was launched under (its cgroups, its runtime directory)."""
        return str(self.manager.kernel_id or self.label)

    def placement(self) -> Placement:
        """Where and how this kernel runs, to be kept with its session."""
        uid, gid = self.owner if self.owner is not None else (None, None)
        cgroup = getattr(self.manager.provisioner, "cgroup_name", None)
        workspace = self.launch_workspace()
        return Placement(self.launch_id, self.profile, self.connection_file, pid=self.pid, uid=uid, gid=gid,
                         runtime_dir=str(self.runtime_dir) if self.runtime_dir else None,
                         log_file=str(self.log_file) if self.log_file else None, cgroup=cgroup,
                         workspace=str(workspace) if workspace else None, provisioner=self.provisioner_info,
                         environment=self.environment.path.name if self.environment else None)

    async def note_provisioner(self) -> None:
        """Keep the provisioner's record of the process just started (see ``placement``)."""
        provisioner = self.manager.provisioner
        info = await provisioner.get_provisioner_info() if provisioner is not None else {}
        info.pop("connection_info", None)  # the connection file holds it; its key is not for the store
        self.provisioner_info = info

    async def start_egress(self) -> None:
        """Open the kernel's egress socket (once; it stays open across restarts until shutdown)."""
        if self.egress is not None and self.egress.server is None:
            await self.egress.start()
            self.released.append(self.egress.close)

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
        """Whether the kernel runs. For an isolated kernel the ipykernel process itself is looked
        at: its launcher (bwrap) notices the kernel's death only a moment later."""
        if not await self.manager.is_alive():
            return False
        launcher = getattr(self.manager.provisioner, "process", None)
        if self._found is None or self._found[0] != getattr(launcher, "pid", None):
            return True
        try:
            if self._found[1].status() != psutil.STATUS_ZOMBIE:
                return True
        except psutil.Error:
            pass
        # The kernel is gone: give its launcher a moment to exit, so how it ended is known.
        provisioner = self.manager.provisioner
        for _ in range(50):
            if provisioner is None or await provisioner.poll() is not None:
                break
            await asyncio.sleep(0.02)
        return False

    def limit_hit(self) -> dict[str, Any] | None:
        """The limit that ended the kernel, if one did (the memory cgroup's OOM kill)."""
        provisioner = self.manager.provisioner
        oom = getattr(provisioner, "oom_killed", None)
        if oom is not None and oom() and self.isolation is not None:
            return {"limit": "memory", "value": self.isolation.memory_bytes}
        return None

    def exit_description(self) -> str:
        """How the process ended, in words ("exit code 1", "killed by SIGKILL")."""
        hit = self.limit_hit()
        if hit is not None:
            return (f"the session exceeded its {human_bytes(hit['value'])} memory limit and the kernel was stopped "
                    "by the system")
        process = getattr(self.manager.provisioner, "process", None)
        code = getattr(process, "returncode", None)
        if code is None:
            return "it stopped responding"
        if not getattr(process, "exit_known", True):
            return "its process ended (how is not known: it was started before the gateway restarted)"
        if self.owner is not None and code > 128:
            code = 128 - code  # the sandbox's launcher reports a kernel killed by signal N as 128 + N
        if code < 0:
            try:
                return f"it was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"it was killed by signal {-code}"
        return f"it exited with code {code}"

    async def interrupt(self) -> None:
        await self.manager.interrupt_kernel()

    async def restart(self, timeout: float) -> None:
        """Kill the process and start a fresh one, as it was started, on the same connection;
        wait until it answers."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        await self.manager.shutdown_kernel(now=True, restart=True)
        # A fresh manager on the same connection (same sockets and key) starts the new process:
        # the same for a kernel started here and for one adopted after a crash. The old one lets
        # go of the connection file now (the fresh one writes it again), not when it is collected.
        self.manager.cleanup_connection_file()
        self.manager = successor(self.manager)
        await self.manager.start_kernel(**self.launch)
        await self.note_provisioner()
        self.connect()
        await self.wait_ready(timeout)

    def abandon(self) -> None:
        """Let go of a kernel that could not be adopted, without stopping it or touching its
        files (what no session claims is stopped afterwards)."""
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        for release in self.released:
            release()
        self.released.clear()

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
            with contextlib.suppress(OSError):  # also one an earlier gateway process wrote (or what is there)
                Path(self.connection_file).unlink(missing_ok=True)
            for release in self.released:
                release()
            self.released.clear()


class KernelLauncher:
    """Starts kernels from the gateway's specs, and adopts those an earlier gateway process
    started. One per server."""

    def __init__(self, runtime_dir: Path, context: zmq.Context | None = None, isolation: Isolation | None = None,
                 environments: Environments | None = None):
        self.runtime_dir = runtime_dir
        self.environments = environments or Environments(Path(DEFAULT_ROOT).resolve())
        runtime_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(runtime_dir, 0o700)
        self.isolation = isolation
        sandbox_provisioner.register()
        if isolation is not None and isolation.profile != "none":
            isolation.runtime_root.mkdir(parents=True, exist_ok=True)
            os.chmod(isolation.runtime_root, 0o711 if isolation.profile == "process" else 0o700)
        self.context = context or shared_zmq_context()
        self.async_context = zmq.asyncio.Context.shadow(self.context.underlying)
        directories = [str(path) for path in self.environments.spec_dirs()]
        self.specs = KernelSpecManager(kernel_dirs=directories, ensure_native_kernel=False)  # as written
        self.launch_specs = ProvisionedSpecs(kernel_dirs=directories, ensure_native_kernel=False)
        self.isolated_specs = ProvisionedSpecs(kernel_dirs=directories, ensure_native_kernel=False)
        self.isolated_specs.message_interrupts = True
        self.launch_specs.environments = self.isolated_specs.environments = self.environments

    def isolation_defaults(self) -> SessionIsolation | None:
        return self.isolation.defaults if self.isolation is not None else None

    def spec_names(self) -> list[str]:
        return sorted(self.specs.find_kernel_specs())

    def get_spec(self, name: str) -> KernelSpec:
        """The spec called ``name``; an unknown name is a 400 listing the available ones."""
        if len(name) > KERNEL_NAME_MAX:
            raise InvalidRequest(f"Kernel names are at most {KERNEL_NAME_MAX} characters; see GET /api/kernelspecs "
                                 "for the available ones.", code="invalid_field",
                                 details={"field": "kernel", "limit": KERNEL_NAME_MAX})
        try:
            return self.specs.get_kernel_spec(name)
        except NoSuchKernel:
            available = self.spec_names()
            raise InvalidRequest(f"There is no kernel named '{name}'. Available kernels: {', '.join(available)}.",
                                 code="unknown_kernel", details={"kernel": name, "available": available}) from None

    def environment_of(self, spec_name: str) -> Environment | None:
        """The environment a new kernel of ``spec_name`` runs in; None for a spec whose own
        provisioner places its kernels. The gateway never runs a kernel in its own environment:
        a local Python spec without a built environment is refused, saying what to do."""
        spec = self.get_spec(spec_name)
        if "kernel_provisioner" in spec.metadata:
            return None
        try:
            environment = self.environments.for_spec(Path(spec.resource_dir))
        except EnvironmentNotBuilt as exc:
            raise Unavailable(str(exc), code="environment_not_built",
                              details={"kernel": spec_name, "build": f"agent-gateway env build {spec_name}"}) from None
        if environment is None and spec.argv and os.path.basename(spec.argv[0]) in sandbox.PYTHON_NAMES:
            raise Unavailable(f"Kernel spec '{spec_name}' defines no environment (a requirements.lock beside its "
                              "kernel.json), and kernels do not run in the gateway's own.",
                              code="environment_not_defined", details={"kernel": spec_name})
        return environment

    async def check_image(self, spec_name: str, isolation: SessionIsolation | None) -> None:
        """Under the container profile the engine must hold the kernel image of the spec's
        environment: 503 ``image_not_built`` (or ``engine_unavailable``) before anything is made."""
        environment = self.environment_of(spec_name)
        if isolation is None or isolation.profile != sandbox.CONTAINER or environment is None:
            return
        try:
            found = await host.current().call("container.image", environment=environment.path.name)
        except host.HelperRefused as exc:
            raise Unavailable(f"The container engine cannot be used now: {exc}", code="engine_unavailable",
                              details={"kernel": spec_name}) from None
        if not found["present"]:
            how = found.get("why") or f"run `agent-gateway image build {spec_name}`"
            raise Unavailable(f"The container engine has no kernel image of the '{spec_name}' environment "
                              f"({found['image']}): {how}.",
                              code="image_not_built", details={"kernel": spec_name, "image": found["image"],
                                                               "build": f"agent-gateway image build {spec_name}"})

    def build_env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
        env.update(extra)
        return env

    async def start(self, *, kernel_id: str, spec_name: str, cwd: Path, env: dict[str, str],
                    ready_timeout: float, isolation: SessionIsolation | None = None) -> RunningKernel:
        """Start a kernel and wait until it answers; on any failure nothing is left running.

        ``isolation`` (default: the server's) decides the profile and limits; under ``process``
        and ``sandbox`` the kernel gets its own uid, cgroups and a runtime directory with ipc
        sockets, and ``cwd`` is the workspace its sandbox shows.
        """
        spec = self.get_spec(spec_name)
        environment = self.environment_of(spec_name)
        if isolation is None and self.isolation is not None:
            isolation = self.isolation.defaults
        if self._runs_isolated(spec, isolation):
            assert isolation is not None
            kernel = await self._isolated_kernel(kernel_id, spec_name, cwd, env, isolation, uid=None,
                                                 environment=environment)
        else:
            kernel = self._plain_kernel(kernel_id, spec_name, cwd, env)
            kernel.environment = environment
        await self._launch(kernel, ready_timeout)
        return kernel

    def _runs_isolated(self, spec: KernelSpec, isolation: SessionIsolation | None) -> bool:
        """Unisolated, or a spec whose own provisioner places the kernel (a cluster): plain."""
        return isolation is not None and isolation.profile != "none" and "kernel_provisioner" not in spec.metadata

    def _manager(self, spec_name: str, isolated: bool, **settings: Any) -> AsyncKernelManager:
        """An isolated kernel's connection file lies in a directory the kernel can write: it is
        staged in the server's own runtime directory and installed there safely."""
        if isolated:
            manager: AsyncKernelManager = StagedConnectionManager(
                kernel_name=spec_name, context=self.async_context, kernel_spec_manager=self.isolated_specs,
                staging_dir=str(self.runtime_dir), **settings)
        else:
            manager = AsyncKernelManager(kernel_name=spec_name, context=self.async_context,
                                         kernel_spec_manager=self.launch_specs, **settings)
        # A kernel that does not exit within this after a shutdown request is signalled.
        manager.shutdown_wait_time = 1.0
        return manager

    def _plain_kernel(self, kernel_id: str, spec_name: str, cwd: Path, env: dict[str, str]) -> RunningKernel:
        """A kernel as the server's own user, with what it is launched with (not yet started)."""
        manager = self._manager(spec_name, False, connection_file=str(self.runtime_dir / f"kernel-{kernel_id}.json"))
        manager.kernel_id = kernel_id
        kernel = RunningKernel(manager, self.context, label=kernel_id)
        kernel.log_file = kernel_log(cwd, kernel_id)
        kernel.log_file.parent.mkdir(mode=0o700, exist_ok=True)
        # Kept open while the kernel lives: a restart launches its new process with it again.
        output = open(kernel.log_file, "ab")  # noqa: SIM115 (closed when the kernel is shut down)
        kernel.released.append(output.close)
        # Independent: the kernel outlives a crash of the gateway, which adopts it on restart.
        kernel.launch = {"cwd": str(cwd), "env": self.build_env(env), "independent": True,
                         "stdout": output, "stderr": output}
        return kernel

    async def _isolated_kernel(self, kernel_id: str, spec_name: str, cwd: Path, env: dict[str, str],
                               isolation: SessionIsolation, uid: int | None,
                               log_file: Path | None = None, environment: Environment | None = None) -> RunningKernel:
        """A kernel under its own uid (``uid``: the one it has, when adopted; else a new one),
        with what it is launched with (not yet started)."""
        assert self.isolation is not None
        runtime = self.isolation.runtime_root / kernel_id.replace("-", "")[:12]
        manager = self._manager(spec_name, True, **sandbox_provisioner.connection_settings(runtime))
        manager.connection_file = str(runtime / f"kernel-{kernel_id}.json")
        manager.kernel_id = kernel_id
        uids = self.isolation.uids
        if uid is None:
            uid = await asyncio.to_thread(uids.allocate, kernel_id)
        else:
            uids.reserve(kernel_id, uid)  # no new kernel gets this uid while it runs
        kernel = RunningKernel(manager, self.context, label=kernel_id, isolation=isolation, owner=(uid, uid),
                               runtime_dir=runtime)
        kernel.released.append(lambda: uids.release(kernel_id))
        kernel.log_file = log_file or kernel_log(cwd, kernel_id)
        launch = sandbox.SandboxSpec(isolation.profile, kernel_id, cwd, runtime, uid=uid, gid=uid,
                                     limits=isolation.kernel_limits(), log_file=kernel.log_file,
                                     environment=environment.path.name if environment else None)
        kernel.environment = environment
        variables = self.build_env(env)
        if isolation.profile in EGRESS_PROFILES:
            variables.update(self._egress(kernel, runtime, isolation))
        kernel.launch = {"env": variables, "independent": True, "sandbox": launch}
        return kernel

    def _egress(self, kernel: RunningKernel, runtime: Path, isolation: SessionIsolation) -> dict[str, str]:
        """A sandboxed kernel's egress proxy (started with it) and what tells the kernel of it
        and of its packages directory in the workspace."""
        assert self.isolation is not None
        proxy = egress.Proxy(runtime, egress.Policy.parse(isolation.egress), self.isolation.credentials,
                             sink=lambda connection: kernel_sink(kernel, connection),
                             authority=self.isolation.authority, bundle=self.isolation.kernel_bundle)
        kernel.egress = proxy
        return {"AGENT_GATEWAY_EGRESS": str(proxy.socket_path),
                # written with the socket, before the kernel runs a cell
                "AGENT_GATEWAY_CA_BUNDLE": str(proxy.socket_path.parent / egress.BUNDLE_NAME),
                "AGENT_GATEWAY_PACKAGES": f"{sandbox.SANDBOX_WORKSPACE}/{PACKAGES_DIR}"}

    async def _prepare_isolated(self, kernel: RunningKernel) -> None:
        """Before an isolated kernel's first start: its workspace, volume and log directory."""
        assert self.isolation is not None and kernel.owner is not None and kernel.isolation is not None
        spec: sandbox.SandboxSpec = kernel.launch["sandbox"]
        cwd, owner = spec.workspace, list(kernel.owner)
        assert kernel.log_file is not None
        kernel.log_file.parent.mkdir(mode=0o700, exist_ok=True)
        if kernel.isolation.profile == "process":
            cwd.mkdir(parents=True, exist_ok=True)
        self._open_the_way(kernel)
        helper = host.current()
        if self.isolation.volumes and kernel.isolation.workspace_bytes:
            await helper.call("volume.ensure", path=str(cwd), size=kernel.isolation.workspace_bytes, owner=owner)
        if cwd.exists():  # files the gateway put there (uploads, a fork's copy) become the kernel's
            await helper.call("tree.hand_over", root=str(cwd), owner=owner)

    def _open_the_way(self, kernel: RunningKernel) -> None:
        """Under ``process`` the kernel's uid reaches its workspace and runtime directory on the
        host: the directories down to them must let it pass (the server's start closes them)."""
        spec = kernel.launch.get("sandbox")
        if self.isolation is not None and isinstance(spec, sandbox.SandboxSpec) and spec.profile == "process":
            open_for_traversal(spec.workspace.parent, self.isolation.data_dir)  # the workspace itself: the helper
            open_for_traversal(self.isolation.runtime_root, self.isolation.data_dir)

    async def _launch(self, kernel: RunningKernel, ready_timeout: float) -> None:
        try:
            if "sandbox" in kernel.launch:
                await self._prepare_isolated(kernel)
            await kernel.manager.start_kernel(**kernel.launch)
            await kernel.note_provisioner()
            await kernel.start_egress()
            kernel.connect()
            await kernel.wait_ready(ready_timeout)
            if kernel.owner is not None:
                await asyncio.to_thread(lambda: kernel.pid)  # found once, off the event loop
        except BaseException:
            await kernel.shutdown(now=True)
            raise
        log.info("kernel %s started (%s, %s, pid %s)", kernel.label, kernel.manager.kernel_name, kernel.profile,
                 kernel.pid)

    async def adopt(self, placement: Placement, *, spec_name: str, cwd: Path, env: dict[str, str],
                    isolation: SessionIsolation | None, timeout: float) -> RunningKernel | None:
        """The kernel ``placement`` describes, started by an earlier gateway process (before a
        crash), taken up with the same uid, directories, log and limits; None if it is gone, does
        not answer or its connection file cannot be used (then it is stopped, with what is left
        of it)."""
        connection_file = Path(placement.connection_file)
        if placement.owner is not None and self.isolation is not None and isolation is not None:
            workspace = Path(placement.workspace) if placement.workspace else cwd
            kernel = await self._isolated_kernel(placement.launch_id, spec_name, workspace, env, isolation,
                                                 uid=placement.owner[0], log_file=self._log_path(placement),
                                                 environment=self._placed_environment(placement))
        elif placement.owner is None and connection_file.parent == self.runtime_dir:
            kernel = self._plain_kernel(placement.launch_id, spec_name, cwd, env)
            kernel.environment = self._placed_environment(placement)
        else:
            return None
        if kernel.manager.connection_file != str(connection_file):
            await self._give_up(kernel)
            return None
        try:  # the kernel may have put anything at that name, holding anything
            self._load_connection(kernel, connection_file)
            problem = None
        except Exception as exc:
            problem = repr(exc)[:300]  # what it says may come from the kernel: quoted, bounded
        if not await self._adopt_provisioner(kernel, placement):
            await self._give_up(kernel)
            return None
        if problem is not None:
            log.warning("kernel %s: its connection file cannot be used (%s); stopping it", placement.launch_id,
                        problem)
            await kernel.shutdown(now=True)
            return None
        self._open_the_way(kernel)
        try:
            await kernel.start_egress()
            kernel.connect()
            await kernel.wait_ready(timeout)
        except Exception as exc:
            log.warning("kernel %s did not answer after the restart (%s); stopping it", placement.launch_id, exc)
            await kernel.shutdown(now=True)
            return None
        return kernel

    @staticmethod
    def _load_connection(kernel: RunningKernel, connection_file: Path) -> None:
        """Load the connection info of a kernel to adopt from its file, read as a regular file
        (never through a link); an isolated kernel's must name sockets in its own runtime
        directory, where they were (the gateway removes files by those names at shutdown)."""
        info = connection_files.read(connection_file)
        if kernel.runtime_dir is not None and (info.get("transport") != "ipc" or
                                               info.get("ip") != str(kernel.runtime_dir / "ipc")):
            raise ValueError("it names sockets outside the kernel's runtime directory")
        kernel.manager.load_connection_info(cast(KernelConnectionInfo, info))

    @staticmethod
    async def _give_up(kernel: RunningKernel) -> None:
        """Let go of a kernel that cannot be adopted and whose process was not found: what is
        left of an isolated one (in its cgroups, its runtime directory) is removed by its name."""
        if kernel.owner is not None and kernel.runtime_dir is not None:
            operation = "container.release" if kernel.profile == sandbox.CONTAINER else "kernel.release"
            await host.current().call(operation, name=kernel.launch_id, runtime_dir=str(kernel.runtime_dir))
        kernel.abandon()

    def _placed_environment(self, placement: Placement) -> Environment | None:
        """The environment an adopted kernel was started in (a restart starts it there again)."""
        if placement.environment is None or "/" in placement.environment:
            return None
        return read(self.environments.root / placement.environment)

    @staticmethod
    def _log_path(placement: Placement) -> Path | None:
        return Path(placement.log_file) if placement.log_file else None

    async def _adopt_provisioner(self, kernel: RunningKernel, placement: Placement) -> bool:
        """Give the kernel's manager a provisioner holding the running process: the saved
        provisioner info handed to a new provisioner (jupyter_client's way of persisting a
        kernel). A placement kept before the info was falls back on its pid."""
        manager = kernel.manager
        info = dict(placement.provisioner)
        if not info:
            info = {"pid": placement.pid, "pgid": placement.pid if placement.owner is None else None,
                    "ip": manager.ip, "sandbox": {"profile": placement.profile, "name": placement.launch_id,
                                                  "cgroup": placement.cgroup,
                                                  "runtime_dir": placement.runtime_dir}}
        info["kernel_id"] = placement.launch_id
        info["connection_info"] = manager.get_connection_info()
        try:  # its kernel spec (or environment) may have been removed while the gateway was down
            provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
                placement.launch_id, manager.kernel_spec, parent=manager)
        except Exception as exc:
            log.warning("kernel %s: its kernel spec '%s' cannot be used any more (%s); it is not taken up",
                        placement.launch_id, manager.kernel_name, exc)
            return False
        try:
            await provisioner.load_provisioner_info(info)
        except Exception as exc:
            log.warning("kernel %s: its provisioner could not take it up (%s)", placement.launch_id, exc)
            return False
        if not provisioner.has_process:
            return False
        manager.provisioner = provisioner
        await kernel.note_provisioner()
        return True
