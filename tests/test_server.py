"""The server process: first-start token, clean shutdown on signals, and surviving a crash."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import GatewayProcess, kernel_host_pid, run, running, start_gateway


def wait_gone(pids: set[int], timeout: float = 15) -> set[int]:
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if running(pid)}
        time.sleep(0.1)
    return alive


def test_first_start_creates_an_admin_token_shown_once_and_stored_hashed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = start_gateway(data, token=None)
    try:
        lines = first.stdout_text().splitlines()
        token = lines[lines.index(next(l for l in lines if "admin token" in l)) + 2].strip()
        assert len(token) >= 40
        with httpx.Client(base_url=first.url, headers={"Authorization": f"Bearer {token}"}) as client:
            assert client.get("/v1/sessions").status_code == 200
        assert httpx.get(first.url + "/v1/sessions", headers={"Authorization": "Bearer nope"}).status_code == 401
    finally:
        assert first.stop() == 0
    assert token.encode() not in (data / "gateway.db").read_bytes()
    assert token not in first.stderr_text()
    second = start_gateway(data, token=None)
    try:
        assert "admin token" not in second.stdout_text()
        with httpx.Client(base_url=second.url, headers={"Authorization": f"Bearer {token}"}) as client:
            assert client.get("/v1/sessions").status_code == 200
    finally:
        assert second.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_shuts_down_cleanly_recording_the_running_step(tmp_path: Path, sig: int) -> None:
    proc = start_gateway(tmp_path / "data", extra_args=("--pool-size", "0"))
    client = proc.client()
    sid = client.post("/v1/sessions", json={}).json()["id"]
    run(client, sid, "before = 1")
    outcome: dict = {}

    def long_step() -> None:
        with proc.client() as own:
            try:
                outcome["response"] = own.post(f"/v1/sessions/{sid}/execute",
                                               json={"code": "import time\nfor i in range(600): time.sleep(0.1)"})
            except httpx.HTTPError as exc:
                outcome["error"] = exc

    thread = threading.Thread(target=long_step)
    thread.start()
    time.sleep(1.0)
    kernels = proc.kernel_pids()
    assert kernels
    assert proc.stop(sig) == 0
    thread.join(10)
    client.close()
    assert not wait_gone(kernels), "kernel processes outlived the gateway"
    if "response" in outcome:
        assert outcome["response"].json()["status"] == "interrupted"
    restarted = start_gateway(tmp_path / "data", extra_args=("--pool-size", "0"))
    try:
        with restarted.client() as again:
            session = again.get(f"/v1/sessions/{sid}").json()
            assert session["state"] == "paused" and session["snapshot"]["reason"] == "shutdown"
            steps = again.get(f"/v1/sessions/{sid}/steps").json()["steps"]
            assert [s["status"] for s in steps] == ["ok", "interrupted"]
            assert run(again, sid, "before")["result"] == "1"
    finally:
        assert restarted.stop() == 0


def test_after_a_crash_kernels_are_reattached_and_nothing_is_lost(tmp_path: Path) -> None:
    proc = start_gateway(tmp_path / "data", extra_args=("--pool-size", "1"))
    with proc.client() as client:
        sid = client.post("/v1/sessions", json={}).json()["id"]
        for i in range(5):
            run(client, sid, f"v{i} = {i}")
        inner_pid = run(client, sid, "import os; os.getpid()")["result"]
        kernel_pid = kernel_host_pid(proc.data_dir, sid)
        family = {kernel_pid, *(p.pid for p in psutil.Process(kernel_pid).parents())}
        paused = client.post("/v1/sessions", json={}).json()["id"]
        run(client, paused, "kept_in_snapshot = 'yes'")
        client.post(f"/v1/sessions/{paused}/pause")
        time.sleep(2)  # the pool refills
    kernels_before = proc.kernel_pids()
    proc.stop(signal.SIGKILL)
    time.sleep(1)
    assert psutil.pid_exists(kernel_pid), "the session's kernel should outlive a crash of the gateway"
    restarted = start_gateway(tmp_path / "data", extra_args=("--pool-size", "0"))
    try:
        with restarted.client() as client:
            session = client.get(f"/v1/sessions/{sid}").json()
            assert session["state"] == "idle"
            assert run(client, sid, "v0 + v1 + v2 + v3 + v4")["result"] == "10"
            assert run(client, sid, "import os; os.getpid()")["result"] == inner_pid
            assert kernel_host_pid(restarted.data_dir, sid) == kernel_pid
            steps = client.get(f"/v1/sessions/{sid}/steps").json()["steps"]
            assert [s["code"] for s in steps][:5] == [f"v{i} = {i}" for i in range(5)]
            actions = [e["action"] for e in client.get(f"/v1/sessions/{sid}/events").json()["events"]]
            assert "session_reattached" in actions
            assert client.get(f"/v1/sessions/{paused}").json()["state"] == "paused"
            assert run(client, paused, "kept_in_snapshot")["result"] == "'yes'"
            # A kernel no session claims (the pool's) was stopped; nothing is orphaned.
            orphans = [pid for pid in kernels_before - family
                       if running(pid)]
            assert orphans == []
            # Interrupt and restart work on the reattached kernel.
            client.post(f"/v1/sessions/{sid}/restart")
            assert run(client, sid, "'v0' in dir()")["result"] == "False"
            assert run(client, sid, "import os; os.getcwd().endswith('workspace')")["result"] == "True"
    finally:
        assert restarted.stop() == 0
    assert not running(kernel_pid)


def crash_taking_the_kernel(proc: GatewayProcess, sid: str) -> GatewayProcess:
    """kill -9 of the gateway and of the session's kernel; the gateway started again."""
    kernel_pid = kernel_host_pid(proc.data_dir, sid)
    proc.stop(signal.SIGKILL)
    os.kill(kernel_pid, signal.SIGKILL)
    return start_gateway(proc.data_dir, extra_args=("--pool-size", "0"))


def test_a_crash_with_the_kernel_gone_too_goes_on_with_a_new_kernel_and_says_so(tmp_path: Path) -> None:
    """As when a kernel dies between steps: the session is not lost; its next step runs in a new
    kernel, its files are kept, and its trajectory and resume say the variables are gone."""
    proc = start_gateway(tmp_path / "data", extra_args=("--pool-size", "0"))
    with proc.client() as client:
        sid = client.post("/v1/sessions", json={}).json()["id"]
        run(client, sid, "x = 1\nopen('kept.txt', 'w').write('kept')")
    restarted = crash_taking_the_kernel(proc, sid)
    try:
        with restarted.client() as client:
            session = client.get(f"/v1/sessions/{sid}").json()
            assert session["state"] == "paused" and session["snapshot"]["reason"] == "crash", session
            assert "variables and imports are gone" in session["snapshot"]["note"]
            resumed = client.post(f"/v1/sessions/{sid}/resume").json()
            assert resumed["snapshot"]["not_restored"] == [{"name": "*", "type": "namespace"}], resumed
            assert run(client, sid, "'x' in dir(), open('kept.txt').read()")["result"] == "(False, 'kept')"
            assert [s["code"] for s in client.get(f"/v1/sessions/{sid}/steps").json()["steps"]][0].startswith("x = 1")
            events = [e["action"] for e in client.get(f"/v1/sessions/{sid}/events").json()["events"]]
            assert "kernel_died" in events and "session_paused" in events and "session_failed" not in events
            notebook = client.get(f"/v1/sessions/{sid}/notebook").text
            assert "The kernel was gone when the gateway restarted after a crash" in notebook
    finally:
        assert restarted.stop() == 0


def test_a_kernel_lost_in_a_crash_never_brings_back_an_older_snapshot(tmp_path: Path) -> None:
    """A session paused (x = 1), resumed and changed (x = 2) keeps the first pause's snapshot on
    disk; when its kernel is lost in a crash, the session does not go back to x = 1 (a state it
    no longer had): it goes on with a new kernel, and says so."""
    proc = start_gateway(tmp_path / "data", extra_args=("--pool-size", "0"))
    with proc.client() as client:
        sid = client.post("/v1/sessions", json={}).json()["id"]
        run(client, sid, "x = 1")
        assert client.post(f"/v1/sessions/{sid}/pause").status_code == 200
        assert run(client, sid, "x = 2; x")["result"] == "2"  # resumed from the snapshot, then changed
    restarted = crash_taking_the_kernel(proc, sid)
    try:
        with restarted.client() as client:
            assert client.get(f"/v1/sessions/{sid}").json()["snapshot"]["saved"] == []
            assert run(client, sid, "'x' in dir()")["result"] == "False"
    finally:
        assert restarted.stop() == 0


def test_a_resume_cut_short_by_a_crash_is_paused_again_on_its_snapshot(tmp_path: Path) -> None:
    """The moment a resume was cut (its session recorded live, its kernel not yet given the
    snapshot) is set up in the store as a crash leaves it: the session is paused again, and its
    next step restores the same snapshot."""
    import sqlite3

    proc = start_gateway(tmp_path / "data", extra_args=("--pool-size", "0"))
    with proc.client() as client:
        sid = client.post("/v1/sessions", json={}).json()["id"]
        run(client, sid, "x = 41")
        assert client.post(f"/v1/sessions/{sid}/pause").status_code == 200
    assert proc.stop() == 0
    with sqlite3.connect(proc.data_dir / "gateway.db") as db:
        db.execute("UPDATE sessions SET state = 'idle' WHERE id = ?", [sid])
    restarted = start_gateway(tmp_path / "data", extra_args=("--pool-size", "0"))
    try:
        with restarted.client() as client:
            session = client.get(f"/v1/sessions/{sid}").json()
            assert session["state"] == "paused" and "cut short" in session["snapshot"]["note"], session
            assert run(client, sid, "x + 1")["result"] == "42"
    finally:
        assert restarted.stop() == 0


def test_a_stop_while_the_pool_is_still_starting_kernels_leaves_none_behind(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = start_gateway(data)  # the pool starts its kernels just after the server listens
    assert proc.stop() == 0
    time.sleep(1)
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(data) in " ".join(p.info["cmdline"] or [])]
    assert left == [], "kernel processes outlived the gateway"
