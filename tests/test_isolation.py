"""Isolation through the gateway: hostile code in a session's kernel, run over the agent API
and the kernel websocket.

Each check is made inside the kernel (the operation fails) and from outside (nothing changed,
the limit is reported in the step, the trajectory and the audit log, no process is left).
Run under each isolating profile this machine supports, on a gateway of its own; a profile that
does not work here is skipped with the reason."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil
import pytest
import websocket

from gateway import volumes
from gateway.sandbox import probe_profile
from tests.conftest import ISOLATING_PROFILES, GatewayProcess, engine_args, isolated_gateway, run, start_gateway


@pytest.fixture(scope="module", params=ISOLATING_PROFILES)
def isolated(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A gateway of its own under each isolating profile that works on this machine: with
    workspace volumes where they work under sandbox and container, and under process with the
    limit checked between steps only (so both ways of holding the workspace limit are tested);
    container kernels on a real podman engine."""
    volumes_flag = "off" if request.param == "process" else "auto"
    with isolated_gateway(request.param, "--pool-size", "1", "--workspace-volumes", volumes_flag,
                          *engine_args(request, request.param),
                          prefix="agw-isolation-") as state:
        yield state


@pytest.fixture
def gateway(isolated: dict[str, Any]) -> GatewayProcess:
    return isolated["gateway"]


@pytest.fixture
def admin(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with gateway.client() as client:
        yield client


def new_session(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/sessions", json=body)
    assert response.status_code == 201, response.text
    return response.json()


def uid_of(client: httpx.Client, sid: str) -> int:
    return int(run(client, sid, "import os; os.getuid()")["result"])


def processes_of(uid: int) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid]


def test_a_session_cannot_reach_the_store_tokens_or_other_sessions(gateway: GatewayProcess, admin: httpx.Client,
                                                                   isolated: dict[str, Any]) -> None:
    victim = new_session(admin)
    attacker = new_session(admin)
    try:
        admin.put(f"/v1/sessions/{victim['id']}/files/secret.txt", content=b"victim's secret")
        secret = gateway.data_dir / "sessions" / victim["id"] / "workspace" / "secret.txt"
        database = gateway.data_dir / "gateway.db"
        before = database.stat().st_size, secret.read_bytes()
        for target in (secret, database, gateway.data_dir / "cookie_secret", Path("/etc/shadow")):
            result = run(admin, attacker["id"], f"open({str(target)!r}, 'rb').read(64)")
            assert result["status"] == "error", (target, result)
            assert result["error"]["name"] in ("FileNotFoundError", "PermissionError"), result["error"]
        for target in (secret, gateway.data_dir / "planted.txt", Path("/usr/planted.txt")):
            result = run(admin, attacker["id"], f"open({str(target)!r}, 'w').write('x')")
            assert result["status"] == "error", (target, result)
        listing = run(admin, attacker["id"], f"import os; os.listdir({str(gateway.data_dir / 'sessions')!r})")
        assert listing["status"] == "error"  # sandbox: no such directory; process: not listable
        # From outside: nothing changed, nothing planted.
        assert secret.read_bytes() == before[1] == b"victim's secret"
        assert not (gateway.data_dir / "planted.txt").exists() and not Path("/usr/planted.txt").exists()
        # The session's own workspace works, at the path its kernel sees, uploads included.
        assert run(admin, attacker["id"], "open('mine.txt', 'w').write('ok')")["status"] == "ok"
        assert admin.put(f"/v1/sessions/{attacker['id']}/files/deep/er/up.txt", content=b"up").status_code == 201
        edit = run(admin, attacker["id"], "open('deep/er/up.txt', 'a').write('!'); open('deep/er/new.txt', 'w').write('n')")
        assert edit["status"] == "ok", edit
        assert admin.get(f"/v1/sessions/{attacker['id']}/files/deep/er/up.txt").content == b"up!"
        assert admin.get(f"/v1/sessions/{attacker['id']}/files/mine.txt").content == b"ok"
        env = run(admin, attacker["id"], "import os; sorted(k for k in os.environ if 'TOKEN' in k or 'AGENT' in k)")
        assert env["result"] == "[]"
    finally:
        admin.delete(f"/v1/sessions/{victim['id']}")
        admin.delete(f"/v1/sessions/{attacker['id']}")


def test_no_network_not_even_the_gateways_port(gateway: GatewayProcess, admin: httpx.Client,
                                               isolated: dict[str, Any]) -> None:
    if isolated["profile"] == "process":
        pytest.skip("the process profile shares the host's network")
    port = int(gateway.url.rsplit(":", 1)[1])
    session = new_session(admin)
    try:
        for host, target in (("127.0.0.1", port), ("1.1.1.1", 80), ("8.8.8.8", 53)):
            result = run(admin, session["id"], f"import socket\nsocket.create_connection(({host!r}, {target}), timeout=3)")
            assert result["status"] == "error", (host, result)
            assert result["error"]["name"] in ("ConnectionRefusedError", "OSError", "TimeoutError"), result["error"]
        interfaces = run(admin, session["id"], "import socket; sorted(name for _, name in socket.if_nameindex())")
        assert interfaces["result"] == "['lo']"
        # From outside: the gateway's port is open to the host all along.
        with socket.create_connection(("127.0.0.1", port), timeout=3):
            pass
    finally:
        admin.delete(f"/v1/sessions/{session['id']}")


def test_the_memory_limit_ends_the_kernel_and_says_so(gateway: GatewayProcess, admin: httpx.Client,
                                                      isolated: dict[str, Any]) -> None:
    greedy = new_session(admin, limits={"memory": "300MiB"})
    bystander = new_session(admin)
    try:
        assert greedy["isolation"]["limits"]["memory"] == 300 << 20
        run(admin, greedy["id"], "kept = 1\nopen('notes.txt', 'w').write('kept')")
        result = run(admin, greedy["id"], "hog = bytearray(1 << 30)\nhog[::4096] = b'x' * len(hog[::4096])")
        assert result["status"] == "died", result
        assert "exceeded its 300 MiB memory limit" in result["error"]["value"]
        assert "files in the workspace are kept" in result["error"]["value"]
        # The session goes on with a new kernel; the file is still there; the other session never noticed.
        assert run(admin, greedy["id"], "open('notes.txt').read()")["result"] == "'kept'"
        assert run(admin, bystander["id"], "21 * 2")["result"] == "42"
        events = admin.get(f"/v1/sessions/{greedy['id']}/events").json()["events"]
        limit_events = [e for e in events if e["action"] == "limit_exceeded"]
        assert limit_events and limit_events[0]["details"] == {"limit": "memory", "value": 300 << 20}
        died = [e for e in events if e["action"] == "kernel_died"]
        assert died and died[0]["details"]["limit"]["limit"] == "memory"
        notebook = admin.get(f"/v1/sessions/{greedy['id']}/notebook").json()
        assert any("300 MiB memory limit" in json.dumps(cell) for cell in notebook["cells"])
    finally:
        admin.delete(f"/v1/sessions/{greedy['id']}")
        admin.delete(f"/v1/sessions/{bystander['id']}")


FORK_BOMB = """
import os, time
children = 0
try:
    for _ in range(5000):
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        children += 1
except OSError as error:
    print('stopped after', children, type(error).__name__)
    raise
"""


def test_a_fork_bomb_is_contained_and_terminate_leaves_nothing(gateway: GatewayProcess, admin: httpx.Client,
                                                               isolated: dict[str, Any]) -> None:
    bomber = new_session(admin, limits={"pids": 40})
    bystander = new_session(admin)
    try:
        uid = uid_of(admin, bomber["id"])
        assert uid != 0
        result = run(admin, bomber["id"], FORK_BOMB, timeout=60)
        assert result["status"] == "error" and "stopped after" in result["stdout"], result
        assert int(result["stdout"].split()[2]) < 40
        assert "(the session's process and thread limit is 40)" in result["error"]["value"]
        # From outside: the session's processes are capped, and others still run steps.
        assert 0 < len(processes_of(uid)) <= 40
        assert run(admin, bystander["id"], "sum(range(10))")["result"] == "45"
    finally:
        admin.delete(f"/v1/sessions/{bomber['id']}")
        admin.delete(f"/v1/sessions/{bystander['id']}")
    deadline = time.monotonic() + 10
    while processes_of(uid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of(uid) == []


def test_a_file_past_the_size_limit_fails_clearly(gateway: GatewayProcess, admin: httpx.Client,
                                                  isolated: dict[str, Any]) -> None:
    session = new_session(admin, limits={"file_size": "1MiB"})
    try:
        result = run(admin, session["id"], "open('big.bin', 'wb').write(b'x' * (2 << 20))")
        assert result["status"] == "error" and "File too large" in result["error"]["value"], result
        assert "(the session's largest file limit is 1 MiB)" in result["error"]["value"]
        events = admin.get(f"/v1/sessions/{session['id']}/events").json()["events"]
        assert {"limit": "file_size", "value": 1 << 20} in [e["details"] for e in events if e["action"] == "limit_exceeded"]
        assert run(admin, session["id"], "1 + 1")["result"] == "2"  # the kernel survives
        size = (gateway.data_dir / "sessions" / session["id"] / "workspace" / "big.bin").stat().st_size
        assert size <= 1 << 20
    finally:
        admin.delete(f"/v1/sessions/{session['id']}")


def test_a_full_workspace_refuses_steps_and_uploads_until_files_go(gateway: GatewayProcess, admin: httpx.Client,
                                                                   isolated: dict[str, Any]) -> None:
    session = new_session(admin, limits={"workspace": "1MiB"})
    sid = session["id"]
    try:
        filled = run(admin, sid, "open('fill.bin', 'wb').write(b'x' * (2 << 20))")
        if volumes.is_mounted(gateway.data_dir / "sessions" / sid / "workspace"):
            # A volume of the limit's size: the write fails during the step, naming the limit.
            assert filled["status"] == "error", filled
            assert "No space left on device" in filled["error"]["value"]
            assert "(the session's workspace size limit is 1 MiB)" in filled["error"]["value"]
            upload = admin.put(f"/v1/sessions/{sid}/files/more.bin", content=b"m" * (2 << 20))
            assert upload.status_code == 507 and upload.json()["error"]["code"] == "workspace_full"
        else:
            assert filled["status"] == "ok"
            deadline = time.monotonic() + 10  # the workspace is measured just after the step's response
            while (refused := admin.post(f"/v1/sessions/{sid}/execute", json={"code": "1"})).status_code == 200:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert refused.status_code == 507 and refused.json()["error"]["code"] == "workspace_full"
            assert "over its 1 MiB limit" in refused.json()["error"]["message"]
            assert refused.json()["error"]["details"]["limit_bytes"] == 1 << 20
            upload = admin.put(f"/v1/sessions/{sid}/files/more.txt", content=b"more")
            assert upload.status_code == 507
        assert admin.delete(f"/v1/sessions/{sid}/files/fill.bin").status_code == 200
        assert run(admin, sid, "open('small.txt', 'w').write('ok')")["status"] == "ok"
        actions = [e["action"] for e in admin.get(f"/v1/sessions/{sid}/events").json()["events"]]
        assert "limit_exceeded" in actions
    finally:
        admin.delete(f"/v1/sessions/{sid}")


def ws_execute(ws: Any, code: str) -> dict[str, Any]:
    """Send an execute_request over a kernel websocket; its execute_reply's content."""
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({"channel": "shell", "header": {
        "msg_id": msg_id, "msg_type": "execute_request", "username": "t", "session": "s", "version": "5.3",
        "date": "2026-01-01T00:00:00.000000Z"}, "parent_header": {}, "metadata": {},
        "content": {"code": code, "silent": False, "stop_on_error": False}}))
    while True:
        msg = json.loads(ws.recv())
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_reply":
            return dict(msg["content"])


def test_the_workspace_limit_holds_over_the_websocket_too(gateway: GatewayProcess, admin: httpx.Client,
                                                          isolated: dict[str, Any]) -> None:
    session = new_session(admin, limits={"workspace": "1MiB"})
    sid = session["id"]
    url = gateway.url.replace("http://", "ws://") + f"/api/kernels/{session['kernel_id']}/channels"
    ws = websocket.create_connection(url, timeout=30, header=[f"Authorization: token {gateway.token}"])
    try:
        filled = ws_execute(ws, "open('fill.bin', 'wb').write(b'x' * (2 << 20))")
        deadline = time.monotonic() + 10  # completed once the kernel is idle again, just after its reply
        while (recorded := admin.get(f"/v1/sessions/{sid}/steps").json()["steps"][-1])["status"] == "running":
            assert time.monotonic() < deadline, recorded
            time.sleep(0.05)
        if volumes.is_mounted(gateway.data_dir / "sessions" / sid / "workspace"):
            assert filled["status"] == "error" and filled["ename"] == "OSError", filled
            # The websocket step's record names the limit, as an agent step's does.
            assert "(the session's workspace size limit is 1 MiB)" in recorded["error"]["value"], recorded
        else:
            assert filled["status"] == "ok", filled
            deadline = time.monotonic() + 10  # measured just after the step, on either face
            while (refused := ws_execute(ws, "1"))["status"] == "ok":
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert refused["ename"] == "WorkspaceFull" and "over its 1 MiB limit" in refused["evalue"], refused
            http = admin.post(f"/v1/sessions/{sid}/execute", json={"code": "1"})
            assert http.status_code == 507
            denied = [e["details"] for e in admin.get(f"/v1/sessions/{sid}/events").json()["events"]
                      if e["action"] == "access_denied"]
            assert denied and denied[-1]["code"] == "workspace_full" and denied[-1]["msg_type"] == "execute_request"
            assert admin.delete(f"/v1/sessions/{sid}/files/fill.bin").status_code == 200
            assert ws_execute(ws, "2")["status"] == "ok"
        actions = [e["action"] for e in admin.get(f"/v1/sessions/{sid}/events").json()["events"]]
        assert "limit_exceeded" in actions
    finally:
        ws.close()
        admin.delete(f"/v1/sessions/{sid}")


def test_only_admins_loosen_isolation(gateway: GatewayProcess, admin: httpx.Client, isolated: dict[str, Any]) -> None:
    import subprocess
    import sys

    token = subprocess.run([sys.executable, "-m", "gateway", "token", "create", "--name", f"agent-{uuid.uuid4().hex[:6]}",
                            "--role", "agent", "--data-dir", str(gateway.data_dir)], capture_output=True, text=True,
                           check=True).stdout.strip()
    with gateway.client(token=token) as agent:
        assert agent.post("/v1/sessions", json={"sandbox": "none"}).status_code == 403
        assert agent.post("/v1/sessions", json={"limits": {"memory": "64GiB"}}).status_code == 403
        bad = agent.post("/v1/sessions", json={"limits": {"memory": "lots"}})
        assert bad.status_code == 400 and bad.json()["error"]["details"]["name"] == "memory"
        assert agent.post("/v1/sessions", json={"limits": {"disk": 1}}).status_code == 400
        tighter = new_session(agent, limits={"memory": "512MiB", "cpu": 0.5})
        assert tighter["isolation"]["limits"]["cpu"] == 0.5
        agent.delete(f"/v1/sessions/{tighter['id']}")
    unisolated = new_session(admin, sandbox="none")
    try:
        assert unisolated["isolation"]["profile"] == "none"
        # "none": the server's own user, which is not root when the server was started as root.
        assert uid_of(admin, unisolated["id"]) == psutil.Process(gateway.process.pid).uids().real != 0
    finally:
        admin.delete(f"/v1/sessions/{unisolated['id']}")


def test_the_websocket_face_runs_in_the_same_sandbox(gateway: GatewayProcess, admin: httpx.Client,
                                                     isolated: dict[str, Any]) -> None:
    kernel = admin.post("/api/kernels", json={"name": "python3"}).json()
    url = gateway.url.replace("http://", "ws://") + f"/api/kernels/{kernel['id']}/channels"
    client = websocket.create_connection(url, timeout=30, header=[f"Authorization: token {gateway.token}"])
    try:
        started_running = threading.Event()

        def execute(code: str, stop_on_error: bool = True) -> tuple[dict[str, Any], str]:
            msg_id = uuid.uuid4().hex
            client.send(json.dumps({"channel": "shell", "header": {
                "msg_id": msg_id, "msg_type": "execute_request", "username": "t", "session": "s", "version": "5.3",
                "date": "2026-01-01T00:00:00.000000Z"}, "parent_header": {}, "metadata": {},
                "content": {"code": code, "silent": False, "stop_on_error": stop_on_error}}))
            text = ""
            while True:
                msg = json.loads(client.recv())
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] in ("stream", "error"):
                    text += msg["content"].get("text", "") + msg["content"].get("ename", "")
                    if "started" in text:
                        started_running.set()
                if msg["msg_type"] == "execute_reply":
                    return msg["content"], text

        reply, text = execute(f"print(open({str(gateway.data_dir / 'gateway.db')!r}, 'rb').read(4))", stop_on_error=False)
        assert reply["status"] == "error" and ("FileNotFoundError" in text or "PermissionError" in text)
        reply, text = execute("import os; print(os.getuid())")
        assert reply["status"] == "ok" and int(text.strip()) != 0
        # An interrupt reaches the sandboxed kernel (as a control message).
        result: dict[str, Any] = {}
        code = "import time; print('started', flush=True); time.sleep(60)"
        worker = threading.Thread(target=lambda: result.update(zip(("reply", "text"), execute(code))))
        worker.start()
        assert started_running.wait(30), "the step did not start"
        started = time.monotonic()
        assert admin.post(f"/api/kernels/{kernel['id']}/interrupt").status_code == 204
        worker.join(20)
        assert result["reply"]["status"] == "error" and "KeyboardInterrupt" in result["text"]
        assert time.monotonic() - started < 10
    finally:
        client.close()
        admin.delete(f"/api/kernels/{kernel['id']}", params={"terminate": "true"})


def test_the_none_profile_is_announced_loudly(tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path / "data", extra_args=("--sandbox", "none", "--pool-size", "0"))
    try:
        assert "WARNING" in gateway.stderr_text() and "UNISOLATED" in gateway.stderr_text()
        with gateway.client() as client:
            session = new_session(client)
            assert session["isolation"]["profile"] == "none"
    finally:
        assert gateway.stop() == 0


def test_a_profile_that_cannot_work_stops_the_server_with_the_reason(tmp_path: Path) -> None:
    import subprocess
    import sys

    # pytest's temporary directories are mode 0700: a kernel's own uid could not reach a data
    # directory inside one, so `process` cannot work there.
    done = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "0", "--sandbox", "process",
                           "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "The 'process' sandbox profile does not work here" in done.stderr
    assert "Traceback" not in done.stderr
    if probe_profile("process").works:  # then the data directory is the one reason
        assert "cannot traverse it" in done.stderr
