"""The privilege split: the server that parses requests runs as an unprivileged user; only the
privileged helper runs as root, and it refuses every request outside its narrow rules.

Attacked from three sides, with real processes: a session's kernel (its environment must reach
no root process, its files no server), the server's user (it can reach no kernel's tree, no
signal a kernel), and a compromised server (requests naming the host, root, other uids, links
planted in the server's own directories)."""

from __future__ import annotations

import asyncio
import contextlib

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil
import pytest

from gateway import helper_wire, host, safefs
from gateway.host import HelperConfig, HelperRefused
from tests.conftest import GatewayProcess, isolated_gateway, kernel_host_pid, run, running, start_gateway

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="the privilege split happens when serve starts as root")
SERVER_UID = 999_999
KERNEL_UIDS = (1_000_000, 10_000)


def status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def helper_of(gateway: GatewayProcess) -> psutil.Process:
    helpers = [p for p in psutil.Process(gateway.process.pid).children()
               if "gateway.helper" in " ".join(p.cmdline())]
    assert len(helpers) == 1, helpers
    return helpers[0]


@pytest.fixture(scope="module")
def sandboxed() -> Iterator[dict[str, Any]]:
    if os.geteuid() != 0:
        pytest.skip("the privilege split happens when serve starts as root")
    with isolated_gateway("sandbox", "--pool-size", "0", prefix="agw-privileges-") as state:
        yield state


@pytest.fixture
def admin(sandboxed: dict[str, Any]) -> Iterator[httpx.Client]:
    with sandboxed["gateway"].client() as client:
        yield client


def new_session(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/sessions", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def as_server_user(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run a command as the server's user, with no groups (what the server itself can do)."""
    return subprocess.run(["setpriv", f"--reuid={SERVER_UID}", f"--regid={SERVER_UID}", "--clear-groups", "--",
                           *argv], capture_output=True, text=True, timeout=30, check=False)


# --- the server's process ---------------------------------------------------------------------

@ROOT_ONLY
def test_the_server_runs_unprivileged_and_only_the_helper_is_root(sandboxed: dict[str, Any],
                                                                  admin: httpx.Client) -> None:
    gateway: GatewayProcess = sandboxed["gateway"]
    server = status_fields(gateway.process.pid)
    assert server["Uid"].split() == [str(SERVER_UID)] * 4
    assert server["Gid"].split() == [str(SERVER_UID)] * 4
    assert server["Groups"] == ""
    for capabilities in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(server[capabilities], 16) == 0, capabilities
    helper = helper_of(gateway)
    assert status_fields(helper.pid)["Uid"].split()[1] == "0"
    # The kernel's launcher is the helper's child, never the server's.
    sid = new_session(admin)["id"]
    kernel = psutil.Process(kernel_host_pid(gateway.data_dir, sid))
    ancestors = [p.pid for p in kernel.parents()]
    assert helper.pid in ancestors and ancestors.index(helper.pid) < ancestors.index(gateway.process.pid)
    # What the server made is its user's; the admin token is in no process's environment.
    for name in ("gateway.db", "cookie_secret", "sessions"):
        info = (gateway.data_dir / name).stat()
        assert (info.st_uid, info.st_mode & 0o077) == (SERVER_UID, 0), name
    for process in (gateway.process.pid, helper.pid):
        assert gateway.token.encode() not in Path(f"/proc/{process}/environ").read_bytes()
    admin.delete(f"/v1/sessions/{sid}")


@ROOT_ONLY
def test_the_server_user_cannot_reach_a_kernels_files_or_processes(sandboxed: dict[str, Any],
                                                                    admin: httpx.Client) -> None:
    """Even a server taken over by an attacker reaches a workspace only through the helper."""
    gateway: GatewayProcess = sandboxed["gateway"]
    sid = new_session(admin)["id"]
    run(admin, sid, "open('secret.txt', 'w').write('kernel data'); import os; os.makedirs('d/e')")
    workspace = gateway.data_dir / "sessions" / sid / "workspace"
    denied = as_server_user("cat", str(workspace / "secret.txt"))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    assert as_server_user("ls", str(workspace)).returncode != 0
    assert as_server_user("touch", str(workspace / "planted")).returncode != 0
    pid = kernel_host_pid(gateway.data_dir, sid)
    assert "Operation not permitted" in as_server_user("kill", "-9", str(pid)).stderr
    assert running(pid)
    # Through the API (the helper) the same file is served.
    assert admin.get(f"/v1/sessions/{sid}/files/secret.txt").content == b"kernel data"
    admin.delete(f"/v1/sessions/{sid}")


@ROOT_ONLY
def test_a_sessions_environment_reaches_no_root_process(sandboxed: dict[str, Any], admin: httpx.Client) -> None:
    """LD_PRELOAD and friends chosen by an agent apply to its kernel only, never to bwrap or
    setpriv, which start as root."""
    gateway: GatewayProcess = sandboxed["gateway"]
    chosen = {"LD_PRELOAD": "/workspace/evil.so", "LD_LIBRARY_PATH": "/workspace", "PYTHONSTARTUP": "/x.py",
              "AGENT_MARK": "mark-7f3a"}
    sid = new_session(admin, env=chosen)["id"]
    kernel = psutil.Process(kernel_host_pid(gateway.data_dir, sid))
    parents = [p.pid for p in kernel.parents()]
    between = parents[:parents.index(helper_of(gateway).pid)]  # the launch: from the helper down to the kernel
    launchers = [psutil.Process(pid) for pid in between if psutil.Process(pid).uids().effective == 0]
    assert launchers, "bwrap runs as root in front of the kernel"
    for launcher in launchers:
        environ = Path(f"/proc/{launcher.pid}/environ").read_bytes().split(b"\0")
        names = {entry.partition(b"=")[0].decode() for entry in environ if entry}
        assert not names & set(chosen), (launcher.cmdline()[:1], names)
    seen = run(admin, sid, "import os; [os.environ.get(n) for n in ('LD_PRELOAD', 'AGENT_MARK')]")["result"]
    assert seen == "['/workspace/evil.so', 'mark-7f3a']"
    admin.delete(f"/v1/sessions/{sid}")


@ROOT_ONLY
@pytest.mark.skipif(shutil.which("cc") is None, reason="a C compiler builds the preloaded library")
def test_a_preloaded_library_from_a_workspace_never_runs_as_root(sandboxed: dict[str, Any],
                                                                 admin: httpx.Client, tmp_path: Path) -> None:
    """The attack itself: a shared library uploaded to the workspace and named in LD_PRELOAD by
    its host path. Loaded by a root process it would leave a marker owned by root on the host."""
    gateway: GatewayProcess = sandboxed["gateway"]
    marker_dir = Path(tempfile.mkdtemp(prefix="agw-preload-", dir="/tmp"))
    marker_dir.chmod(0o777)
    source = tmp_path / "evil.c"
    source.write_text('#include <stdio.h>\n#include <unistd.h>\n__attribute__((constructor)) static void hit(void) {'
                      f'char p[256]; snprintf(p, sizeof p, "{marker_dir}/uid-%d", (int)geteuid());'
                      'FILE *f = fopen(p, "w"); if (f) fclose(f); }\n')
    library = tmp_path / "evil.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True, timeout=60)
    carrier = new_session(admin)["id"]
    assert admin.put(f"/v1/sessions/{carrier}/files/evil.so", content=library.read_bytes()).status_code == 201
    host_path = gateway.data_dir / "sessions" / carrier / "workspace" / "evil.so"
    victim = admin.post("/v1/sessions", json={"env": {"LD_PRELOAD": str(host_path)}})
    if victim.status_code == 201:
        admin.delete(f"/v1/sessions/{victim.json()['id']}")
    admin.delete(f"/v1/sessions/{carrier}")
    try:
        assert not (marker_dir / "uid-0").exists(), "an agent's library ran as root"
    finally:
        shutil.rmtree(marker_dir, ignore_errors=True)


@ROOT_ONLY
def test_a_killed_server_takes_its_helper_along_and_a_restart_reattaches(tmp_path: Path) -> None:
    with isolated_gateway("sandbox", "--pool-size", "0", prefix="agw-privileges-crash-") as state:
        gateway: GatewayProcess = state["gateway"]
        with gateway.client() as client:
            sid = new_session(client)["id"]
            run(client, sid, "kept = 'before the crash'")
        helper = helper_of(gateway)
        kernel = kernel_host_pid(gateway.data_dir, sid)
        gateway.stop(signal.SIGKILL)
        helper.wait(10)
        assert running(kernel), "the kernel outlives the server and its helper"
        state["gateway"] = start_gateway(gateway.data_dir, extra_args=state["args"])
        with state["gateway"].client() as client:
            assert run(client, sid, "kept")["result"] == "'before the crash'"
            client.delete(f"/v1/sessions/{sid}")


@ROOT_ONLY
def test_a_data_dir_behind_a_closed_directory_is_reached_by_the_server_user_alone() -> None:
    """A data directory (or a checkout) under a mode 0700 directory such as /root: the server's
    user is given search permission there by an ACL entry of its own, nobody else is."""
    closed = Path(tempfile.mkdtemp(prefix="agw-closed-", dir="/tmp"))
    try:
        closed.chmod(0o700)
        gateway = start_gateway(closed / "data", extra_args=("--sandbox", "none", "--pool-size", "0"))
        try:
            assert f"search permission on {closed}" in gateway.stderr_text()
            with gateway.client() as client:
                assert client.get("/v1/health").status_code == 200
            assert stat_mode(closed) == 0o710  # the ACL's mask: search for the named user only
            assert as_server_user("ls", str(closed)).returncode != 0, "search, not list"
            other = subprocess.run(["setpriv", "--reuid=999998", "--regid=999998", "--clear-groups", "--", "ls",
                                    str(closed / "data")], capture_output=True, text=True, timeout=30, check=False)
            assert other.returncode != 0 and "Permission denied" in other.stderr
        finally:
            assert gateway.stop() == 0
    finally:
        shutil.rmtree(closed, ignore_errors=True)


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


# --- a compromised server: requests the helper must refuse ---------------------------------------

@pytest.fixture(scope="module")
def helper_base() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="agw-helper-", dir="/tmp"))
    (base / "data" / "sessions" / "s1" / "workspace").mkdir(parents=True)
    (base / "data" / "sessions" / "s1" / "workspace" / "file.txt").write_text("inside")
    (base / "outside.txt").write_text("outside the anchor")
    (base / "data" / "link").symlink_to(base)
    (base / "data" / "sessions" / "s2").symlink_to("/etc")
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def helper(helper_base: Path) -> Iterator[host.Host]:
    connection = host.start(HelperConfig(anchors=(str(helper_base / "data"),), server_owner=(SERVER_UID, SERVER_UID),
                                         kernel_uids=KERNEL_UIDS, sandbox="none", data_dir=str(helper_base / "data")))
    yield connection
    connection.close()


def test_the_helper_serves_what_lies_beneath_its_anchor(helper: host.Host, helper_base: Path) -> None:
    workspace = helper_base / "data" / "sessions" / "s1" / "workspace"
    reply = helper.submit("file.open", root=str(workspace), parts=["file.txt"]).result(10)
    try:
        assert os.read(reply.fds[0], 100) == b"inside"
    finally:
        reply.close()
    assert helper.call_sync("tree.size", root=str(workspace)) == len("inside")


def test_a_request_its_caller_gave_up_on_does_not_cut_the_helper_off(helper: host.Host, helper_base: Path) -> None:
    """A request whose caller was cancelled (a timed-out await) is answered into a cancelled
    future: the reply is dropped (its descriptors closed) and later requests are answered."""
    workspace = helper_base / "data" / "sessions" / "s1" / "workspace"
    given_up = []
    for _ in range(20):
        future = helper.submit("file.open", root=str(workspace), parts=["file.txt"])  # its reply carries a descriptor
        if future.cancel():
            given_up.append(future)
    assert given_up, "every reply came before its cancel: nothing was tested"

    async def cancelled_await() -> None:
        await asyncio.wait_for(helper.call("tree.size", root=str(workspace)), timeout=0)

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(cancelled_await())
    for _ in range(3):
        assert helper.call_sync("tree.size", root=str(workspace)) == len("inside")

    def open_on_the_file() -> list[str]:
        found = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}") == str(workspace / "file.txt"):
                    found.append(fd)
        return found
    assert open_on_the_file() == []  # the dropped replies' descriptors were closed


@pytest.mark.parametrize("op, args", [
    ("file.open", {"root": "/etc", "parts": ["shadow"]}),
    ("file.open", {"root": "{base}/data/../outside.txt", "parts": ["x"]}),
    ("file.open", {"root": "{base}/data/link", "parts": ["outside.txt"]}),
    ("file.open", {"root": "{base}/data/sessions/s2", "parts": ["passwd"]}),
    ("file.open", {"root": "{base}/data/sessions/s1/workspace", "parts": ["..", "..", "..", "..", "outside.txt"]}),
    ("file.open", {"root": "{base}/data/sessions/s1/workspace", "parts": ["a/../../x"]}),
    ("file.open", {"root": "relative/path", "parts": ["x"]}),
    ("tree.copy", {"source": "/root", "target": "{base}/data/copy", "owner": None}),
    ("tree.copy", {"source": "{base}/data/sessions/s1/workspace", "target": "/tmp/agw-stolen", "owner": None}),
    ("tree.remove", {"path": "/etc/hostname"}),
    ("tree.remove", {"path": "{base}/data/sessions/s2/hostname"}),
    ("tree.hand_over", {"root": "{base}/data/sessions/s1/workspace", "owner": [0, 0]}),
    ("tree.hand_over", {"root": "{base}/data/sessions/s1/workspace", "owner": [SERVER_UID, SERVER_UID]}),
    ("tree.clear", {"root": "/etc", "names": ["hostname"], "owner": None}),
    ("tree.list", {"root": "{base}/data/sessions/s1/workspace", "parts": [], "after": None, "limit": 10 ** 9,
                   "max_depth": 32}),
    ("volume.ensure", {"path": "/etc", "size": 1 << 20, "owner": [KERNEL_UIDS[0], KERNEL_UIDS[0]]}),
    ("volume.ensure", {"path": "{base}/data/link/x", "size": 1 << 20, "owner": [KERNEL_UIDS[0], KERNEL_UIDS[0]]}),
    ("volume.release", {"path": "/proc"}),
    ("kernel.prepare", {"name": "k1", "profile": "sandbox", "workspace": "{base}/data/w", "runtime_dir": "{base}/data/r",
                        "uid": 0, "limits": {}}),
    ("kernel.prepare", {"name": "k1", "profile": "sandbox", "workspace": "{base}/data/w", "runtime_dir": "{base}/data/r",
                        "uid": SERVER_UID, "limits": {}}),
    ("kernel.prepare", {"name": "k1", "profile": "none", "workspace": "{base}/data/w", "runtime_dir": "{base}/data/r",
                        "uid": KERNEL_UIDS[0], "limits": {}}),
    ("kernel.prepare", {"name": "../../etc", "profile": "sandbox", "workspace": "{base}/data/w",
                        "runtime_dir": "{base}/data/r", "uid": KERNEL_UIDS[0], "limits": {}}),
    ("kernel.prepare", {"name": "k1", "profile": "sandbox", "workspace": "{base}/data/w", "runtime_dir": "{base}/data/r",
                        "uid": KERNEL_UIDS[0], "limits": {"memory_bytes": -1}}),
    ("kernel.prepare", {"name": "k1", "profile": "sandbox", "workspace": "{base}/data/w", "runtime_dir": "{base}/data/r",
                        "uid": KERNEL_UIDS[0], "limits": {}, "cgroup_parent": "../../.."}),
    ("kernel.launch", {"name": "never-prepared", "argv": ["sh", "-c", "id"], "env": {},
                       "connection_file": "kernel-x.json"}),
    ("kernel.signal", {"name": "k1", "signum": 19}),
    ("kernel.signal", {"name": "k1", "signum": "9"}),
    ("kernel.release", {"name": "k1", "runtime_dir": "/etc"}),
    ("kernel.kill_unclaimed", {"connection_files": ["/proc/self/cmdline"]}),
    ("kernel.kill_unclaimed", {"connection_files": ["/tmp/kernel-x.json"]}),
    ("no.such.operation", {}),
    ("file.open", {"root": "{base}/data", "parts": ["x"], "_fds": [0]}),
])
def test_the_helper_refuses_requests_outside_its_rules(helper: host.Host, helper_base: Path, op: str,
                                                       args: dict[str, Any]) -> None:
    filled = json.loads(json.dumps(args).replace("{base}", str(helper_base)))
    with pytest.raises((HelperRefused, safefs.UnsafeEntry, OSError)):
        helper.call_sync(op, **filled)
    assert not Path("/tmp/agw-stolen").exists()
    assert Path("/etc/hostname").exists()
    assert os.stat(helper_base / "data" / "sessions" / "s1" / "workspace").st_uid == os.geteuid()


def test_a_helper_given_garbage_stops_without_acting(helper_base: Path) -> None:
    """Bytes that are not a message end the conversation; nothing before them is lost."""
    connection = host.start(HelperConfig(anchors=(str(helper_base / "data"),), kernel_uids=KERNEL_UIDS,
                                         sandbox="none"))
    assert connection.call_sync("tree.size", root=str(helper_base / "data" / "sessions" / "s1" / "workspace")) == 6
    connection.sock.sendmsg([b"\xff not json"])
    assert connection.process is not None
    assert connection.process.wait(10) == 0
    with pytest.raises(host.HelperFailed):
        connection.call_sync("tree.size", root=str(helper_base / "data"), timeout=5)
    connection.close()


def test_messages_larger_than_a_datagram_pass_through_a_memfd() -> None:
    left, right = helper_wire.pair()
    try:
        big = {"text": "é" * (3 * helper_wire.DATAGRAM_MAX)}
        reader, writer = os.pipe()
        helper_wire.send(left, big, [writer])
        received = helper_wire.receive(right)
        assert received is not None
        message, fds = received
        assert message == big and len(fds) == 1
        for fd in (*fds, reader, writer):
            os.close(fd)
        right.sendmsg([b"[1, 2]"])
        with pytest.raises(helper_wire.WireError):
            helper_wire.receive(left)
        right.sendmsg([json.dumps({helper_wire.MEMFD_KEY: 10}).encode()])
        with pytest.raises(helper_wire.WireError):
            helper_wire.receive(left)
    finally:
        left.close()
        right.close()
    closed = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    closed[1].close()
    assert helper_wire.receive(closed[0]) is None
    closed[0].close()
    time.sleep(0)
