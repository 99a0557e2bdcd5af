"""The isolation building blocks with real kernels: cgroups, uids, bubblewrap, the provisioner.

Every kernel here is a real ipykernel started by jupyter_client through ``SandboxProvisioner``
with the ipc transport. Each test skips, saying why, when its profile does not work on this host
(``sandbox.probe_profiles()``). Cgroups go under a parent named for this test run, removed at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import replace
from pathlib import Path
from queue import Empty
from typing import Any, Iterator

import psutil
import pytest
from jupyter_client import AsyncKernelManager, KernelManager
from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.kernelspec import KernelSpecManager

from gateway import cgroups, doctor, sandbox
from gateway.cgroups import CgroupSet, Support
from gateway.sandbox import Limits, SandboxSpec, UidPool
from gateway.sandbox_provisioner import SandboxProvisioner, connection_settings, register, spec_metadata
from tests.conftest import running

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="isolation needs the tests to run as root")
PARENT = f"agw-test-{os.getpid()}"
SPEC_NAME = "agw-isolation-test"
FIRST_UID = 1_100_000
MIB = 1 << 20
LIMITS = Limits(memory_bytes=256 * MIB, cpu_cores=1.0, pids=64, file_size_bytes=1 * MIB)


# --- fixtures -----------------------------------------------------------------------------------

class Layout:
    """A data dir shaped like the gateway's: a database, other sessions, runtime dirs, kernel specs."""

    def __init__(self, base: Path):
        self.base = base
        self.data = base / "data"
        self.secret = self.data / "gateway.sqlite"
        self.other = self.data / "sessions" / "other" / "workspace" / "notes.txt"
        self.specs = base / "specs"

    def build(self) -> None:
        self.data.mkdir(mode=0o711)
        self.secret.write_text("tokens and trajectories")
        os.chmod(self.secret, 0o600)
        self.other.parent.mkdir(parents=True)
        self.other.write_text("another session's file")
        os.chmod(self.other.parent.parent, 0o700)
        os.chown(self.other.parent.parent, FIRST_UID + 99, FIRST_UID + 99)
        (self.specs / SPEC_NAME).mkdir(parents=True)
        argv = ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}", "--HistoryManager.hist_file=:memory:"]
        kernel_json = {"argv": argv, "display_name": "isolation test", "language": "python",
                       "interrupt_mode": "signal", "metadata": spec_metadata()}
        (self.specs / SPEC_NAME / "kernel.json").write_text(json.dumps(kernel_json))

    def workspace(self, name: str) -> Path:
        return self.data / "sessions" / name / "workspace"

    def runtime(self, name: str) -> Path:
        return self.data / "run" / name


@pytest.fixture(scope="module")
def layout() -> Iterator[Layout]:
    base = Path(tempfile.mkdtemp(prefix="agw-iso-"))
    os.chmod(base, 0o711)
    built = Layout(base)
    built.build()
    yield built
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def support() -> Iterator[Support]:
    found = cgroups.detect_cached(PARENT)  # the same Support the provisioner will use
    yield found
    _remove_test_cgroups(found)


def _remove_test_cgroups(found: Support) -> None:
    """Kill and remove every cgroup left under this run's parent, then the parent itself."""
    parents = {path for _, path in found.controllers.values()} | ({found.v2_parent} if found.v2_parent else set())
    names = {child.name for parent in parents if parent.is_dir() for child in parent.iterdir() if child.is_dir()}
    for name in names:
        CgroupSet(found, name).remove()
    assert not cgroups.remove_parent(found), "a test cgroup parent could not be removed"


@pytest.fixture(scope="module")
def profiles(support: Support) -> dict[str, sandbox.ProfileStatus]:
    return sandbox.probe_profiles(refresh=True, cgroup_parent=PARENT)


@pytest.fixture(scope="module")
def uids() -> UidPool:
    return UidPool(FIRST_UID, 90)


@pytest.fixture(scope="module", autouse=True)
def no_leftover_uid_processes() -> Iterator[None]:
    yield
    leftovers = [p for p in psutil.process_iter(["uids"]) if FIRST_UID <= p.info["uids"].real < FIRST_UID + 100]
    for process in leftovers:
        process.kill()
    assert not leftovers, f"processes of test uids were left running: {leftovers}"


def _require(profiles: dict[str, sandbox.ProfileStatus], profile: str) -> None:
    status = profiles[profile]
    if not status.works:
        pytest.skip(f"profile {profile} does not work here: {status.reason}")


class Kernel:
    """A kernel started through the provisioner, with a blocking client."""

    def __init__(self, manager: KernelManager, client: BlockingKernelClient, spec: SandboxSpec, seconds: float):
        self.manager, self.client, self.spec, self.start_seconds = manager, client, spec, seconds
        self.stopped = False

    @property
    def provisioner(self) -> SandboxProvisioner:
        assert isinstance(self.manager.provisioner, SandboxProvisioner)
        return self.manager.provisioner

    @property
    def cgroup(self) -> CgroupSet:
        assert self.provisioner.cgroup is not None
        return self.provisioner.cgroup

    def run(self, source: str, timeout: float = 20) -> tuple[dict[str, Any], str]:
        """Execute ``source``; the reply content and everything printed."""
        printed: list[str] = []

        def collect(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                printed.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                printed.append(f"{msg['content']['ename']}: {msg['content']['evalue']}")

        reply = self.client.execute_interactive(textwrap.dedent(source), timeout=timeout, output_hook=collect)
        return reply["content"], "".join(printed)

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.client.stop_channels()
        if self.manager.has_kernel:
            self.manager.shutdown_kernel(now=True)
        else:
            self.manager.cleanup_resources()


def _spec(layout: Layout, uids: UidPool, profile: str, name: str, limits: Limits = LIMITS) -> SandboxSpec:
    uid = uids.allocate(name) if profile != "none" else None
    return SandboxSpec(profile, name, layout.workspace(name), layout.runtime(name), uid=uid, limits=limits,
                       cgroup_parent=PARENT)


def start_kernel(layout: Layout, spec: SandboxSpec) -> Kernel:
    """Start a kernel for ``spec`` and wait until it answers kernel_info."""
    register()
    specs = KernelSpecManager(kernel_dirs=[str(layout.specs)], ensure_native_kernel=False)
    manager = KernelManager(kernel_name=SPEC_NAME, kernel_spec_manager=specs, **connection_settings(spec.runtime_dir))
    manager.shutdown_wait_time = 1.0
    started = time.monotonic()
    manager.start_kernel(sandbox=spec, independent=True)
    client = manager.client()
    client.start_channels()
    try:
        seconds = _first_kernel_info(manager, client) - started
        client.wait_for_ready(timeout=30)
    except BaseException:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
        raise
    return Kernel(manager, client, spec, seconds)


def _first_kernel_info(manager: KernelManager, client: BlockingKernelClient, timeout: float = 30) -> float:
    """When the kernel first answered a kernel_info_request (sent before it was listening)."""
    msg_id = client.kernel_info()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            reply = client.get_shell_msg(timeout=0.2)
        except Empty:
            assert manager.is_alive(), "the kernel died while starting"
            continue
        if reply["parent_header"].get("msg_id") == msg_id:
            return time.monotonic()
    raise TimeoutError("the kernel did not answer kernel_info")


@pytest.fixture
def kernels(layout: Layout, uids: UidPool) -> Iterator[list[Kernel]]:
    """Kernels a test starts; all stopped afterwards, whatever happened."""
    started: list[Kernel] = []
    yield started
    for kernel in started:
        try:
            kernel.stop()
        finally:
            uids.release(kernel.spec.name)


def launch(kernels: list[Kernel], layout: Layout, uids: UidPool, profile: str, name: str,
           limits: Limits = LIMITS) -> Kernel:
    kernel = start_kernel(layout, _spec(layout, uids, profile, name, limits))
    kernels.append(kernel)
    return kernel


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP server on 127.0.0.1 of the host; its port."""
    server = socket.create_server(("127.0.0.1", 0))
    yield server.getsockname()[1]
    server.close()


def _wait_dead(kernel: Kernel, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while kernel.manager.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not kernel.manager.is_alive(), "the kernel is still alive"


# --- parts without kernels ------------------------------------------------------------------------

def test_parse_cgroup_layouts() -> None:
    v2_host = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n"
    assert cgroups.parse_mounts(v2_host) == ({}, Path("/sys/fs/cgroup"))
    assert cgroups.parse_self_cgroup("0::/system.slice/agw.service\n") == ({}, "/system.slice/agw.service")
    v1_host = ("cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n"
               "cgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0\n")
    mounts, v2 = cgroups.parse_mounts(v1_host)
    assert mounts == {"cpu": Path("/sys/fs/cgroup/cpu,cpuacct"), "pids": Path("/sys/fs/cgroup/pids")} and v2 is None
    current, _ = cgroups.parse_self_cgroup("4:cpu,cpuacct:/a\n3:pids:/b\n1:name=systemd:/c\n")
    assert current == {"cpu": "/a", "pids": "/b"}


def test_limits_are_written_as_v2_and_v1_expect(tmp_path: Path) -> None:
    """The files a CgroupSet writes, on a fake tree (this host has no v2 controllers to try)."""
    v2 = Support("v2", "p", {name: (2, tmp_path / "v2") for name in cgroups.CONTROLLERS}, tmp_path / "v2", True)
    (tmp_path / "v2").mkdir()
    group = CgroupSet(v2, "k")
    group.create(cgroups.Limits(memory_bytes=100 * MIB, cpu_cores=1.5, pids=64))
    written = {name: (tmp_path / "v2" / "k" / name).read_text() for name in ("memory.max", "cpu.max", "pids.max")}
    assert written == {"memory.max": str(100 * MIB), "cpu.max": "150000 100000", "pids.max": "64"}
    (tmp_path / "v2" / "k" / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert group.oom_killed()
    v1_dirs = {name: tmp_path / name for name in cgroups.CONTROLLERS}
    for path in v1_dirs.values():
        path.mkdir()
    v1 = Support("v1", "p", {name: (1, path) for name, path in v1_dirs.items()})
    group = CgroupSet(v1, "k")
    group.create(cgroups.Limits(memory_bytes=100 * MIB, cpu_cores=0.5, pids=10))
    assert (tmp_path / "memory" / "k" / "memory.limit_in_bytes").read_text() == str(100 * MIB)
    assert (tmp_path / "cpu" / "k" / "cpu.cfs_quota_us").read_text() == "50000"
    (tmp_path / "memory" / "k" / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    assert not group.oom_killed()


def test_detect_on_a_v2_host_with_controllers(tmp_path: Path) -> None:
    """The v2 path of detect() on a fake cgroupfs (this host's controllers are bound to v1)."""
    service = tmp_path / "cg" / "system.slice" / "agw.service"
    service.mkdir(parents=True)
    (service / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (service / "cgroup.subtree_control").write_text("\n")
    (tmp_path / "mounts").write_text(f"cgroup2 {tmp_path / 'cg'} cgroup2 rw,nosuid 0 0\n")
    (tmp_path / "cgroup").write_text("0::/system.slice/agw.service\n")
    found = cgroups.detect("kernels", mounts_file=str(tmp_path / "mounts"), cgroup_file=str(tmp_path / "cgroup"))
    assert found.mode == "v2" and found.v2_parent == service / "kernels"
    assert found.controllers == {name: (2, service / "kernels") for name in cgroups.CONTROLLERS}
    assert (service / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert (service / "kernels" / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    assert not found.kill_file and any("cgroup.kill" in reason for reason in found.reasons)


@ROOT_ONLY
def test_detect_and_doctor(support: Support, profiles: dict[str, sandbox.ProfileStatus],
                           capsys: pytest.CaptureFixture[str]) -> None:
    assert support.mode in ("v1", "v2", "hybrid", "none")
    facts = doctor.diagnose(cgroup_parent=PARENT)
    json.dumps(facts)
    assert facts["profiles"]["none"]["works"]
    with capsys.disabled():
        print("\n" + doctor.format_report(facts))


@ROOT_ONLY
def test_real_cgroup_join_kill_remove(support: Support) -> None:
    if not support.controllers:
        pytest.skip(f"no cgroup controller is usable here: {support.reasons}")
    group = CgroupSet(support, "join-test")
    group.create(cgroups.Limits(memory_bytes=64 * MIB, pids=8))
    sleeper = subprocess.Popen(["sleep", "30"], preexec_fn=group.joiner())
    try:
        assert group.pids() == {sleeper.pid}
        for forced_v1 in (False, True):  # cgroup.kill, then the v1 way: SIGKILL until empty
            group.support = replace(support, kill_file=support.kill_file and not forced_v1)
            if not group.pids():
                group.join(subprocess.Popen(["sleep", "30"]).pid)
            assert group.kill_all(timeout=5) and not group.pids()
    finally:
        sleeper.kill()
        sleeper.wait()
        group.remove()
    assert not group.exists()


@ROOT_ONLY
def test_cpu_quota_throttles(support: Support) -> None:
    if not support.has("cpu"):
        pytest.skip("no cpu cgroup controller here")
    group = CgroupSet(support, "cpu-test")
    group.create(cgroups.Limits(cpu_cores=0.2))
    spinner = subprocess.Popen(["sh", "-c", "while :; do :; done"], preexec_fn=group.joiner())
    try:
        time.sleep(0.5)
        used = psutil.Process(spinner.pid).cpu_times()
    finally:
        group.remove()
        spinner.wait()
    assert used.user + used.system < 0.2, f"a 0.2-core quota let a spinner use {used.user + used.system:.2f} s in 0.5 s"
    assert not group.exists()


@ROOT_ONLY
def test_uid_pool_skips_uids_in_use() -> None:
    busy = subprocess.Popen(["setpriv", f"--reuid={FIRST_UID + 50}", f"--regid={FIRST_UID + 50}", "--clear-groups",
                             "sleep", "10"])
    try:
        time.sleep(0.1)
        pool = UidPool(FIRST_UID + 50, 3)
        first = pool.allocate("a")
        assert first == FIRST_UID + 51
        assert pool.allocate("a") == first and pool.allocate("b") == FIRST_UID + 52
        with pytest.raises(sandbox.IsolationUnavailable):
            pool.allocate("c")
        pool.release("a")
        assert pool.allocate("c") == first
    finally:
        busy.kill()
        busy.wait()


@ROOT_ONLY
def test_sandbox_refuses_to_expose_a_data_dir_inside_a_read_only_bind(layout: Layout) -> None:
    inside = Path(sys.prefix) / f"agw-test-{os.getpid()}"
    spec = SandboxSpec("sandbox", "exposed", inside / "workspace", layout.runtime("exposed"), uid=FIRST_UID + 98,
                       cgroup_parent=PARENT)
    with pytest.raises(sandbox.IsolationUnavailable, match="inside the read-only bind"):
        sandbox.prepare(spec)
    assert not inside.exists() and not layout.runtime("exposed").exists()


def test_kernel_interpreter_is_usable_by_others(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        chosen = sandbox.kernel_interpreter("process")
    except sandbox.IsolationUnavailable as error:
        pytest.skip(str(error))
    assert sandbox._denied(chosen.executable, ancestors=True) is None
    assert all(sandbox._denied(path, ancestors=True) is None for path in chosen.pythonpath)
    with capsys.disabled():
        print(f"\nprocess interpreter: {chosen.executable} PYTHONPATH={':'.join(chosen.pythonpath)}\n  {chosen.reason}")


# --- real kernels ----------------------------------------------------------------------------------

READ_DATA = """
for path in {paths!r}:
    try:
        print(path, "READ", open(path).read()[:20])
    except OSError as error:
        print(path, type(error).__name__)
"""
WRITE_OUTSIDE = """
import os
for path in {paths!r}:
    try:
        with open(path, "w") as handle:
            handle.write("x")
        print(path, "WROTE")
    except OSError as error:
        print(path, type(error).__name__)
open("/workspace/ok.txt" if os.path.isdir("/workspace") else "ok.txt", "w").write("fine")
print("workspace WROTE")
"""
CONNECT = """
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
    print("CONNECTED")
except OSError as error:
    print("REFUSED", type(error).__name__, error)
"""
BIG_FILE = """
try:
    with open("big.bin", "wb") as handle:
        handle.write(b"x" * {size})
    print("WROTE")
except OSError as error:
    print("FAILED", error.strerror)
"""
FORK_BOMB = """
import os, time
children, failure = [], None
for _ in range(10_000):
    try:
        pid = os.fork()
    except OSError as error:
        failure = error
        break
    if pid == 0:
        time.sleep(120)
        os._exit(0)
    children.append(pid)
print(len(children), type(failure).__name__)
"""


@ROOT_ONLY
@pytest.mark.parametrize("profile", ["process", "sandbox"])
def test_kernel_is_confined(profile: str, profiles: dict[str, sandbox.ProfileStatus], layout: Layout,
                            uids: UidPool, kernels: list[Kernel], listener: int) -> None:
    _require(profiles, profile)
    kernel = launch(kernels, layout, uids, profile, f"confined-{profile}")
    content, printed = kernel.run("import os; print(os.getuid(), os.getgid(), os.getgroups())")
    assert printed.split()[:2] == [str(kernel.spec.uid)] * 2 and "[]" in printed

    content, printed = kernel.run(READ_DATA.format(paths=[str(layout.secret), str(layout.other)]))
    expected_error = "FileNotFoundError" if profile == "sandbox" else "PermissionError"
    assert "READ" not in printed and printed.count(expected_error) == 2, printed

    targets = [str(layout.data / "planted.txt"), "/usr/planted.txt", str(layout.runtime("other-kernel"))]
    content, printed = kernel.run(WRITE_OUTSIDE.format(paths=targets))
    assert "workspace WROTE" in printed and printed.count("WROTE") == 1, printed
    assert not (layout.data / "planted.txt").exists()

    content, printed = kernel.run(CONNECT.format(port=listener))
    if profile == "sandbox":
        assert "REFUSED" in printed, printed
    else:
        assert "CONNECTED" in printed, "the process profile is not expected to isolate the network"

    content, printed = kernel.run(BIG_FILE.format(size=2 * LIMITS.file_size_bytes))  # type: ignore[operator]
    assert "FAILED File too large" in printed, printed
    assert kernel.run("1 + 1")[0]["status"] == "ok", "the kernel did not survive RLIMIT_FSIZE"

    _interrupt_sleep(kernel)
    processes = [p for p in map(_process_or_none, kernel.cgroup.pids()) if p is not None]
    kernel.stop()
    assert not [p.pid for p in processes if running(p)]
    assert not kernel.cgroup.exists() and not kernel.spec.runtime_dir.exists()


def _interrupt_sleep(kernel: Kernel) -> None:
    """interrupt_request on the control channel stops ``time.sleep(100)`` within a second."""
    assert kernel.manager.kernel_spec is not None and kernel.manager.kernel_spec.interrupt_mode == "message"
    msg_id = kernel.client.execute("import time; time.sleep(100)")
    time.sleep(0.3)
    asked = time.monotonic()
    kernel.manager.interrupt_kernel()
    reply = kernel.client.get_shell_msg(timeout=10)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
    assert time.monotonic() - asked < 2


@ROOT_ONLY
@pytest.mark.parametrize("profile", ["process", "sandbox"])
def test_memory_limit_kills_and_is_reported(profile: str, profiles: dict[str, sandbox.ProfileStatus],
                                            support: Support, layout: Layout, uids: UidPool,
                                            kernels: list[Kernel]) -> None:
    _require(profiles, profile)
    if not support.has("memory"):
        pytest.skip("no memory cgroup controller here")
    kernel = launch(kernels, layout, uids, profile, f"oom-{profile}")
    assert not kernel.provisioner.oom_killed()
    kernel.client.execute("hog = b'x' * (600 << 20)")
    _wait_dead(kernel)
    assert kernel.provisioner.oom_killed()
    kernel.stop()
    assert kernel.provisioner.oom_killed(), "the OOM verdict must survive the cleanup"


def _process_or_none(pid: int) -> psutil.Process | None:
    """The process (remembered with its start time, so a reused pid is told apart), if it still exists."""
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


@ROOT_ONLY
@pytest.mark.parametrize("profile", ["process", "sandbox"])
def test_fork_bomb_is_contained_and_kill_all_cleans_up(profile: str, profiles: dict[str, sandbox.ProfileStatus],
                                                       support: Support, layout: Layout, uids: UidPool,
                                                       kernels: list[Kernel]) -> None:
    _require(profiles, profile)
    kernel = launch(kernels, layout, uids, profile, f"bomb-{profile}")
    content, printed = kernel.run(FORK_BOMB, timeout=60)
    forked, failure = printed.split()
    assert int(forked) < LIMITS.pids and failure == "BlockingIOError", printed  # type: ignore[operator]
    assert subprocess.run(["true"]).returncode == 0, "the host could not start a process"
    assert kernel.run("1 + 1")[0]["status"] == "ok"
    inside = kernel.cgroup.pids()
    assert len(inside) >= int(forked)
    processes = [p for p in map(_process_or_none, inside) if p is not None]
    assert kernel.cgroup.kill_all(timeout=5)
    _wait_dead(kernel)
    deadline = time.monotonic() + 5  # a killed process may still be on its way out
    while (alive := [p.pid for p in processes if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive, f"processes survived kill_all: {alive}"
    uid_left = [p.pid for p in psutil.process_iter(["uids", "status"])
                if p.info["uids"].real == kernel.spec.uid and p.info["status"] != psutil.STATUS_ZOMBIE]
    assert not uid_left, f"processes of uid {kernel.spec.uid} survived: {uid_left}"


@ROOT_ONLY
def test_sandbox_kernel_outlives_its_launcher(profiles: dict[str, sandbox.ProfileStatus], support: Support,
                                              layout: Layout, uids: UidPool) -> None:
    """No --die-with-parent: a launcher that dies leaves the kernel running and reachable."""
    _require(profiles, "sandbox")
    spec = _spec(layout, uids, "sandbox", "orphan")
    launcher = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from pathlib import Path
        from tests.test_isolation_parts import Layout, start_kernel
        from gateway.sandbox import Limits, SandboxSpec
        spec = SandboxSpec("sandbox", "orphan", Path({str(spec.workspace)!r}), Path({str(spec.runtime_dir)!r}),
                           uid={spec.uid}, limits=Limits(pids=64), cgroup_parent={PARENT!r})
        kernel = start_kernel(Layout(Path({str(layout.base)!r})), spec)
        print(kernel.manager.connection_file, flush=True)
        os._exit(0)
    """)
    output = layout.base / "launcher-output.txt"
    with open(output, "w") as sink:  # a file, not a pipe: the kernel inherits it and keeps it open
        done = subprocess.run([sys.executable, "-c", launcher], stdout=sink, stderr=subprocess.STDOUT, timeout=60)
    assert done.returncode == 0, output.read_text()
    group = CgroupSet(support, "orphan")
    try:
        client = BlockingKernelClient(connection_file=output.read_text().strip().splitlines()[-1])
        client.load_connection_file()
        client.start_channels()
        try:
            reply = client.execute_interactive("import os; os.getppid()", timeout=10)
            assert reply["content"]["status"] == "ok"
        finally:
            client.stop_channels()
        assert group.pids(), "the kernel died with its launcher"
    finally:
        assert group.kill_all()
        group.remove()
        shutil.rmtree(spec.runtime_dir, ignore_errors=True)
        uids.release("orphan")


@ROOT_ONLY
def test_async_manager_with_sandbox(profiles: dict[str, sandbox.ProfileStatus], layout: Layout,
                                    uids: UidPool) -> None:
    """What the gateway uses: AsyncKernelManager, an async client, interrupt and shutdown."""
    _require(profiles, "sandbox")
    spec = _spec(layout, uids, "sandbox", "async")

    async def scenario() -> None:
        register()
        specs = KernelSpecManager(kernel_dirs=[str(layout.specs)], ensure_native_kernel=False)
        manager = AsyncKernelManager(kernel_name=SPEC_NAME, kernel_spec_manager=specs,
                                     **connection_settings(spec.runtime_dir))
        await manager.start_kernel(sandbox=spec, independent=True)
        client = manager.client()
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=30)
            reply = await client.execute_interactive("import os; print(os.getcwd())", timeout=10)
            assert reply["content"]["status"] == "ok"
            msg_id = client.execute("import time; time.sleep(100)")
            await asyncio.sleep(0.3)
            await manager.interrupt_kernel()
            reply = await client.get_shell_msg(timeout=10)
            assert reply["parent_header"]["msg_id"] == msg_id and reply["content"]["ename"] == "KeyboardInterrupt"
            provisioner = manager.provisioner
            assert isinstance(provisioner, SandboxProvisioner) and provisioner.cgroup is not None
            before = provisioner.cgroup.pids()
            await manager.restart_kernel(now=True)
            await client.wait_for_ready(timeout=30)
            after = provisioner.cgroup.pids()
            assert after and not before & after, "the restarted kernel should be new processes in a new cgroup"
            reply = await client.execute_interactive("import os; print(os.getuid())", timeout=10)
            assert reply["content"]["status"] == "ok"
        finally:
            client.stop_channels()
            await manager.shutdown_kernel(now=True)
        provisioner = manager.provisioner
        assert provisioner is None or not isinstance(provisioner, SandboxProvisioner) or \
            provisioner.cgroup is None or not provisioner.cgroup.exists()

    try:
        asyncio.run(scenario())
    finally:
        uids.release("async")
    assert not spec.runtime_dir.exists()


@ROOT_ONLY
def test_cold_start_times(profiles: dict[str, sandbox.ProfileStatus], layout: Layout, uids: UidPool,
                          kernels: list[Kernel], capsys: pytest.CaptureFixture[str]) -> None:
    """Start to the first kernel_info reply, four kernels per working profile, one at a time."""
    times: dict[str, list[float]] = {profile: [] for profile in sandbox.PROFILES if profiles[profile].works}
    for run in range(4):  # interleaved, so a busy moment of the machine does not land on one profile
        for profile in times:
            kernel = launch(kernels, layout, uids, profile, f"start-{profile}-{run}")
            times[profile].append(kernel.start_seconds)
            kernel.stop()
            kernels.remove(kernel)
            uids.release(kernel.spec.name)
    with capsys.disabled():
        print("\ncold start, start_kernel() to the first kernel_info reply:")
        for profile, seconds in times.items():
            shown = ", ".join(f"{s:.3f}" for s in seconds)
            print(f"  {profile:8} median {statistics.median(seconds):.3f} s  ({shown})")
    assert all(s < 10 for seconds in times.values() for s in seconds)
