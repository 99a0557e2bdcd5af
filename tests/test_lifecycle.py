"""Session lifecycle with real kernels: pause, resume, fork, warm pool, idle pausing, capacity,
and sessions surviving a clean restart of the gateway."""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import nbformat
import psutil
import pytest

from tests.conftest import GatewayProcess, error_code, kernel_cwd, kernel_host_pid, run, start_gateway

STATE = """
import numpy as np, pandas as pd, threading, sqlite3, socket
import json as jj
arr = np.arange(1_000_000, dtype=np.int64)
alias = arr
frame = pd.DataFrame({'a': range(5), 'b': list('vwxyz')})
double = lambda x: x * 2
def add_one(y):
    return y + 1
class Box:
    def __init__(self, v):
        self.v = v
box = Box(7)
numbers = [1, 2, 3]
gen = (i for i in range(3))
conn = sqlite3.connect(':memory:')
lock = threading.Lock()
sock = socket.socket()
"""
CHECK = "(int(arr.sum()), int(frame.a.sum()), ''.join(frame.b), double(21), add_one(1), box.v, alias is arr, jj.dumps(numbers))"
EXPECTED = "(499999500000, 10, 'vwxyz', 42, 2, 7, True, '[1, 2, 3]')"


def test_pause_frees_the_kernel_and_resume_restores_state(gateway: GatewayProcess, client: httpx.Client,
                                                          session) -> None:
    sid = session["id"]
    assert run(client, sid, STATE)["status"] == "ok"
    pid = kernel_host_pid(gateway.data_dir, sid)
    rss = psutil.Process(pid).memory_info().rss
    assert rss > 30 * 1024 * 1024
    response = client.post(f"/v1/sessions/{sid}/pause")
    assert response.status_code == 200
    paused = response.json()
    assert paused["state"] == "paused"
    unsaved = {(u["name"], u["type"]) for u in paused["snapshot"]["unsaved"]}
    assert unsaved == {("gen", "builtins.generator"), ("conn", "sqlite3.Connection"), ("lock", "_thread.lock"),
                       ("sock", "socket.socket")}
    assert {"arr", "frame", "double", "add_one", "Box", "box", "np", "jj"} <= set(paused["snapshot"]["saved"])
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert client.get(f"/v1/sessions/{sid}").json()["state"] == "paused"
    assert session["kernel_id"] not in [k["id"] for k in client.get("/api/kernels").json()]
    listed = client.get("/v1/sessions", params={"state": "paused"}).json()["sessions"]
    assert sid in [s["id"] for s in listed]

    resumed = client.post(f"/v1/sessions/{sid}/resume")
    assert resumed.status_code == 200 and resumed.json()["state"] == "idle"
    assert {n["name"] for n in resumed.json()["snapshot"]["not_restored"]} == {"gen", "conn", "lock", "sock"}
    check = run(client, sid, CHECK)
    assert check["result"] == EXPECTED
    assert run(client, sid, "gen")["error"]["name"] == "NameError"
    events = [e["action"] for e in client.get(f"/v1/sessions/{sid}/events").json()["events"]]
    assert "session_paused" in events and "session_resumed" in events
    paused_event = [e for e in client.get(f"/v1/sessions/{sid}/events").json()["events"]
                    if e["action"] == "session_paused"][0]
    assert {u["name"] for u in paused_event["details"]["unsaved"]} == {"gen", "conn", "lock", "sock"}


def test_execute_resumes_a_paused_session_and_the_counter_continues(client: httpx.Client, session) -> None:
    sid = session["id"]
    first = run(client, sid, "x = 20")
    run(client, sid, "y = x + 1")
    client.post(f"/v1/sessions/{sid}/pause")
    after = run(client, sid, "x + y")
    assert after["result"] == "41"
    assert after["execution_count"] == first["execution_count"] + 2
    history = run(client, sid, "_ih[-3:]")["result"]
    assert "x = 20" in history or "y = x + 1" in history
    # Files can be changed while paused, and the kernel sees them after.
    client.post(f"/v1/sessions/{sid}/pause")
    assert client.put(f"/v1/sessions/{sid}/files/while-paused.txt", content=b"p").status_code == 201
    assert run(client, sid, "open('while-paused.txt').read()")["result"] == "'p'"


def test_a_paused_session_refuses_restart_and_can_be_terminated(client: httpx.Client, session) -> None:
    sid = session["id"]
    client.post(f"/v1/sessions/{sid}/pause")
    response = client.post(f"/v1/sessions/{sid}/restart")
    assert response.status_code == 409 and error_code(response) == "session_paused"
    assert client.post(f"/v1/sessions/{sid}/pause").json()["state"] == "paused"  # pausing twice is fine
    ended = client.delete(f"/v1/sessions/{sid}")
    assert ended.status_code == 200 and ended.json()["state"] == "terminated"
    refused = client.post(f"/v1/sessions/{sid}/execute", json={"code": "1"})
    assert refused.status_code == 409 and error_code(refused) == "session_ended"
    assert client.post(f"/v1/sessions/{sid}/resume").status_code == 409


def test_fork_copies_state_and_files_and_the_two_are_independent(client: httpx.Client, session) -> None:
    sid = session["id"]
    run(client, sid, "shared = {'n': 1}\nopen('notes.txt', 'w').write('parent')")
    response = client.post(f"/v1/sessions/{sid}/fork")
    assert response.status_code == 201
    child = response.json()
    try:
        assert child["parent"] == {"session_id": sid, "step": 1}
        assert child["owner"] == "admin" and child["state"] == "idle"
        assert run(client, child["id"], "shared['n']")["result"] == "1"
        assert run(client, child["id"], "open('notes.txt').read()")["result"] == "'parent'"
        run(client, child["id"], "shared['n'] = 2\nopen('notes.txt', 'w').write('child')")
        assert run(client, sid, "shared['n'], open('notes.txt').read()")["result"] == "(1, 'parent')"
        run(client, sid, "shared['n'] = 3")
        assert run(client, child["id"], "shared['n'], open('notes.txt').read()")["result"] == "(2, 'child')"
        nb = nbformat.reads(client.get(f"/v1/sessions/{child['id']}/notebook").text, as_version=4)
        assert nb.metadata.gateway.parent == {"session_id": sid, "step": 1}
        forked = [e for e in client.get(f"/v1/sessions/{sid}/events").json()["events"] if e["action"] == "session_forked"]
        assert forked[0]["details"]["child"] == child["id"]
    finally:
        client.delete(f"/v1/sessions/{child['id']}")


def test_a_paused_session_can_be_forked(client: httpx.Client, session) -> None:
    sid = session["id"]
    run(client, sid, "kept = 'from the snapshot'")
    client.post(f"/v1/sessions/{sid}/pause")
    child = client.post(f"/v1/sessions/{sid}/fork").json()
    try:
        assert run(client, child["id"], "kept")["result"] == "'from the snapshot'"
        assert client.get(f"/v1/sessions/{sid}").json()["state"] == "paused"
    finally:
        client.delete(f"/v1/sessions/{child['id']}")


def test_the_warm_pool_hands_out_fresh_bound_kernels_quickly(gateway: GatewayProcess, client: httpx.Client) -> None:
    time.sleep(3)  # let the pool fill
    timings, ids = [], []
    try:
        for i in range(2):
            started = time.perf_counter()
            response = client.post("/v1/sessions", json={"env": {"SESSION_MARK": f"m{i}"}})
            timings.append(time.perf_counter() - started)
            ids.append(response.json()["id"])
            time.sleep(2)  # refill
        assert statistics.median(timings) < 0.3, timings
        run(client, ids[0], "leak = 'from the first session'")
        for i, sid in enumerate(ids):
            check = run(client, sid, "import os; (os.getcwd(), os.environ.get('SESSION_MARK'), 'leak' in dir())")
            cwd, mark, leaked = eval(check["result"])  # noqa: S307 (a tuple of literals the test wrote)
            assert cwd == kernel_cwd(gateway.data_dir, client.get(f"/v1/sessions/{sid}").json())
            assert mark == f"m{i}"
            assert leaked is (i == 0)
            assert run(client, sid, "open('here.txt', 'w').write('x')")["status"] == "ok"
            assert [f["path"] for f in client.get(f"/v1/sessions/{sid}/files").json()["files"]] == ["here.txt"]
    finally:
        for sid in ids:
            client.delete(f"/v1/sessions/{sid}")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway with room for two kernels and no pool."""
    proc = start_gateway(tmp_path_factory.mktemp("small-data"), extra_args=(
        "--max-live-kernels", "2", "--pool-size", "0"))
    yield proc
    assert proc.stop() == 0


def test_idle_sessions_are_paused_not_killed(tmp_path: Path) -> None:
    idle = start_gateway(tmp_path / "data", extra_args=("--idle-pause-seconds", "3", "--pool-size", "0"))
    try:
        check_idle_pause(idle)
    finally:
        assert idle.stop() == 0


def check_idle_pause(idle: GatewayProcess) -> None:
    with idle.client() as client:
        sid = client.post("/v1/sessions", json={}).json()["id"]
        run(client, sid, "remembered = 'yes'")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and client.get(f"/v1/sessions/{sid}").json()["state"] != "paused":
            time.sleep(0.3)
        session = client.get(f"/v1/sessions/{sid}").json()
        assert session["state"] == "paused" and session["snapshot"]["reason"] == "idle"
        assert run(client, sid, "remembered")["result"] == "'yes'"
        client.delete(f"/v1/sessions/{sid}")


def test_capacity_pauses_the_least_recently_used_idle_session(small: GatewayProcess) -> None:
    with small.client() as client:
        a = client.post("/v1/sessions", json={}).json()["id"]
        b = client.post("/v1/sessions", json={}).json()["id"]
        run(client, b, "who = 'b'")
        run(client, a, "who = 'a'")  # a is now the more recently used
        c = client.post("/v1/sessions", json={}).json()["id"]
        states = {sid: client.get(f"/v1/sessions/{sid}").json()["state"] for sid in (a, b, c)}
        assert states == {a: "idle", b: "paused", c: "idle"}
        assert client.get(f"/v1/sessions/{b}").json()["snapshot"]["reason"] == "capacity"
        # Resuming b makes room by pausing the least recently used of a and c.
        assert run(client, b, "who")["result"] == "'b'"
        assert client.get(f"/v1/sessions/{a}").json()["state"] == "paused"

        # With every live session busy, a new one is refused with 503 and Retry-After.
        def busy(sid: str) -> None:
            with small.client() as own:
                run(own, sid, "import time; time.sleep(3)")

        threads = [threading.Thread(target=busy, args=(sid,)) for sid in (b, c)]
        for thread in threads:
            thread.start()
        time.sleep(0.8)
        refused = client.post("/v1/sessions", json={})
        for thread in threads:
            thread.join()
        assert refused.status_code == 503 and error_code(refused) == "at_capacity"
        assert refused.headers["retry-after"] == "5"
        for sid in (a, b, c):
            client.delete(f"/v1/sessions/{sid}")


def test_replay_strategy_rebuilds_state_by_rerunning_steps(tmp_path: Path) -> None:
    proc = start_gateway(tmp_path / "data", extra_args=("--resume-strategy", "replay", "--pool-size", "0"))
    try:
        with proc.client() as client:
            sid = client.post("/v1/sessions", json={}).json()["id"]
            run(client, sid, "import itertools\ncounter = itertools.count(10)")  # cannot be pickled
            run(client, sid, "first = next(counter)")
            client.post(f"/v1/sessions/{sid}/pause")
            resumed = client.post(f"/v1/sessions/{sid}/resume").json()
            assert resumed["state"] == "idle"
            assert run(client, sid, "first, next(counter)")["result"] == "(10, 11)"
            event = [e for e in client.get(f"/v1/sessions/{sid}/events").json()["events"]
                     if e["action"] == "session_resumed"][0]
            assert event["details"]["strategy"] == "replay" and event["details"]["replayed_steps"] == 2
    finally:
        assert proc.stop() == 0


def test_a_clean_restart_of_the_gateway_pauses_and_brings_sessions_back(tmp_path: Path) -> None:
    proc = start_gateway(tmp_path / "data", extra_args=("--pool-size", "0"))
    with proc.client() as client:
        sid = client.post("/v1/sessions", json={}).json()["id"]
        run(client, sid, "survivor = [1, 2, 3]")
        pids = proc.kernel_pids()
    assert proc.stop() == 0
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    again = start_gateway(tmp_path / "data", extra_args=("--pool-size", "0"))
    try:
        with again.client() as client:
            session = client.get(f"/v1/sessions/{sid}").json()
            assert session["state"] == "paused" and session["snapshot"]["reason"] == "shutdown"
            assert client.get("/v1/health").json()["sessions"] == {"live": 0, "paused": 1}
            assert run(client, sid, "sum(survivor)")["result"] == "6"
    finally:
        assert again.stop() == 0


def test_pause_and_resume_from_the_command_line(gateway: GatewayProcess, client: httpx.Client, session) -> None:
    import json
    import subprocess
    import sys

    sid = session["id"]
    run(client, sid, "cli_value = 5")
    env = {**os.environ, "AGENT_GATEWAY_TOKEN": gateway.token}
    for action, state in (("pause", "paused"), ("resume", "idle")):
        done = subprocess.run([sys.executable, "-m", "gateway", action, sid, "--gateway-url", gateway.url],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["state"] == state
    assert run(client, sid, "cli_value")["result"] == "5"
    missing = subprocess.run([sys.executable, "-m", "gateway", "pause", "s_nope", "--gateway-url", gateway.url],
                             capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode == 1 and "404" in missing.stderr


def test_retention_removes_ended_workspaces_but_keeps_trajectories(tmp_path: Path) -> None:
    proc = start_gateway(tmp_path / "data", extra_args=(
        "--retention-days", "0.00002", "--idle-pause-seconds", "4", "--pool-size", "0"))
    try:
        with proc.client() as client:
            sid = client.post("/v1/sessions", json={}).json()["id"]
            run(client, sid, "open('out.txt', 'w').write('result')")
            client.delete(f"/v1/sessions/{sid}")
            workspace = proc.data_dir / "sessions" / sid / "workspace"
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and workspace.exists():
                time.sleep(0.3)
            assert not workspace.exists()
            assert [s["code"] for s in client.get(f"/v1/sessions/{sid}/steps").json()["steps"]] == [
                "open('out.txt', 'w').write('result')"]
            removed = [e for e in client.get(f"/v1/sessions/{sid}/events").json()["events"]
                       if e["action"] == "workspace_removed"]
            assert removed and removed[0]["details"]["removed"] == ["workspace"]
    finally:
        assert proc.stop() == 0


def test_snapshot_fallback_replays_what_could_not_be_saved(tmp_path: Path) -> None:
    proc = start_gateway(tmp_path / "data", extra_args=("--snapshot-fallback-replay", "true", "--pool-size", "0"))
    try:
        with proc.client() as client:
            sid = client.post("/v1/sessions", json={}).json()["id"]
            run(client, sid, "numbers = (i * i for i in range(10))\nplain = 'pickled'")
            paused = client.post(f"/v1/sessions/{sid}/pause").json()
            assert [u["name"] for u in paused["snapshot"]["unsaved"]] == ["numbers"]
            resumed = client.post(f"/v1/sessions/{sid}/resume").json()
            assert resumed["snapshot"]["not_restored"] == []
            assert run(client, sid, "plain, next(numbers)")["result"] == "('pickled', 0)"
    finally:
        assert proc.stop() == 0
