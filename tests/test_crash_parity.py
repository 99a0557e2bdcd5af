"""After kill -9 and a restart, a session behaves exactly as it did before, under every
isolation profile: its reattached kernel keeps its uid, workspace owner, exchange directory and
limits (the placement kept with the session, taken up again through the kernel's provisioner),
so uploads, downloads, pause and resume, fork, restart, interrupt, the death of the kernel and a
later clean stop all work as for a kernel that never went through a crash."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from gateway import cgroups
from gateway.cgroups import CgroupSet
from tests.conftest import GatewayProcess, isolated_gateway, kernel_host_pid, run, start_gateway

MEMORY = 300 * 1024 * 1024


def placement_of(data_dir: Path, session_id: str) -> dict[str, Any]:
    with sqlite3.connect(f"file:{data_dir / 'gateway.db'}?mode=ro", uri=True) as db:
        row = db.execute("SELECT placement FROM sessions WHERE id = ?", [session_id]).fetchone()
    assert row and row[0], f"no placement recorded for {session_id}"
    return dict(json.loads(row[0]))


def memory_limit(launch_id: str) -> int | None:
    """The memory limit of a kernel's cgroup, read on the host."""
    group = CgroupSet(cgroups.detect_cached(cgroups.DEFAULT_PARENT), launch_id)
    directory = group.paths.get("memory")
    if directory is None:
        return None
    name = "memory.max" if group.version("memory") == 2 else "memory.limit_in_bytes"
    return int((directory / name).read_text())


@pytest.fixture(scope="module", params=["sandbox", "process", "none"])
def crashed(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A gateway under each profile with two sessions (one with state and files, one with no
    step yet), killed with SIGKILL and started again on the same data directory."""
    with isolated_gateway(request.param, "--pool-size", "0", prefix="agw-parity-") as state:
        gateway: GatewayProcess = state["gateway"]
        with gateway.client() as client:
            used = client.post("/v1/sessions", json={"limits": {"memory": MEMORY}}).json()
            assert run(client, used["id"], "x = 41\nopen('made.txt', 'w').write('by the kernel')")["status"] == "ok"
            fresh = client.post("/v1/sessions", json={}).json()
        before = {sid: placement_of(gateway.data_dir, sid) for sid in (used["id"], fresh["id"])}
        gateway.stop(signal.SIGKILL)
        state["gateway"] = start_gateway(gateway.data_dir, extra_args=state["args"])
        state.update(used=used["id"], fresh=fresh["id"], before=before)
        yield state


@pytest.fixture
def client(crashed: dict[str, Any]) -> Iterator[httpx.Client]:
    with crashed["gateway"].client() as http:
        yield http


def test_the_reattached_kernel_keeps_its_placement(crashed: dict[str, Any], client: httpx.Client) -> None:
    sid = crashed["used"]
    before = crashed["before"][sid]
    after = placement_of(crashed["gateway"].data_dir, sid)
    assert after["profile"] == crashed["profile"]
    assert (after["uid"], after["runtime_dir"], after["launch_id"], after["cgroup"], after["provisioner"]) == \
        (before["uid"], before["runtime_dir"], before["launch_id"], before["cgroup"], before["provisioner"])
    uid = before["uid"] if before["uid"] is not None else 999999  # the server's own user under none
    assert run(client, sid, "import os; (x + 1, os.getuid())")["result"] == f"(42, {uid})"
    events = [e["action"] for e in client.get(f"/v1/sessions/{sid}/events").json()["events"]]
    assert "session_reattached" in events


def test_files_go_both_ways_after_the_crash(crashed: dict[str, Any], client: httpx.Client) -> None:
    sid = crashed["used"]
    assert client.put(f"/v1/sessions/{sid}/files/sent/up.txt", content=b"from outside").status_code == 201
    step = run(client, sid, "import os; open('sent/up.txt').read(), os.stat('sent/up.txt').st_uid == os.getuid()")
    assert step["result"] == "('from outside', True)", step
    assert client.get(f"/v1/sessions/{sid}/files/made.txt").content == b"by the kernel"
    run(client, sid, "open('sent/up.txt', 'a').write(' and back')")
    assert client.get(f"/v1/sessions/{sid}/files/sent/up.txt").content == b"from outside and back"


def test_a_session_without_steps_goes_on_at_step_one(crashed: dict[str, Any], client: httpx.Client) -> None:
    assert run(client, crashed["fresh"], "'first'")["step"] == 1


def test_interrupt_pause_resume_and_fork_after_the_crash(crashed: dict[str, Any], client: httpx.Client) -> None:
    sid = crashed["used"]
    started = time.monotonic()
    step = client.post(f"/v1/sessions/{sid}/execute", json={"code": "import time; time.sleep(60)", "timeout": 2})
    assert step.json()["status"] == "timeout" and time.monotonic() - started < 20
    paused = client.post(f"/v1/sessions/{sid}/pause").json()
    assert "state" in paused, paused
    assert paused["state"] == "paused" and "x" in paused["snapshot"]["saved"], paused["snapshot"]
    assert "error" not in paused["snapshot"]
    assert client.post(f"/v1/sessions/{sid}/resume").json()["state"] == "idle"
    assert run(client, sid, "x")["result"] == "41"
    child = client.post(f"/v1/sessions/{sid}/fork")
    assert child.status_code == 201, child.text
    try:
        assert run(client, child.json()["id"], "x, open('made.txt').read()")["result"] == "(41, 'by the kernel')"
    finally:
        client.delete(f"/v1/sessions/{child.json()['id']}")


def test_a_restart_keeps_the_sessions_limits(crashed: dict[str, Any], client: httpx.Client) -> None:
    sid = crashed["fresh"]
    data_dir = crashed["gateway"].data_dir
    # The fresh session's kernel was reattached (never paused): restart it there.
    assert "session_reattached" in [e["action"] for e in client.get(f"/v1/sessions/{sid}/events").json()["events"]]
    limits = client.get(f"/v1/sessions/{sid}").json()["isolation"]["limits"]
    restarted = client.post(f"/v1/sessions/{sid}/restart")
    assert restarted.status_code == 200, restarted.text
    placement = placement_of(data_dir, sid)
    assert placement["pid"] == kernel_host_pid(data_dir, sid)
    assert placement["uid"] == crashed["before"][sid]["uid"]  # the kernel keeps its uid
    if placement["cgroup"] and cgroups.detect_cached(cgroups.DEFAULT_PARENT).has("memory"):
        assert memory_limit(placement["launch_id"]) == limits["memory"]
    assert client.get(f"/v1/sessions/{sid}").json()["isolation"]["limits"] == limits
    used = crashed["used"]
    # The session with its own, lower limit: after a restart its kernel has that limit still.
    assert client.post(f"/v1/sessions/{used}/restart").status_code == 200
    placement = placement_of(data_dir, used)
    if placement["cgroup"] and cgroups.detect_cached(cgroups.DEFAULT_PARENT).has("memory"):
        assert memory_limit(placement["launch_id"]) == MEMORY
    assert run(client, used, "open('made.txt').read()")["result"] == "'by the kernel'"


def test_a_kernel_that_dies_after_the_crash_is_noticed_and_replaced(crashed: dict[str, Any],
                                                                    client: httpx.Client) -> None:
    """The adopted kernel is not the new gateway's child: its death is still seen (through a
    pidfd), the step says so, and the session goes on with a new kernel under its own limits."""
    sid = crashed["fresh"]
    data_dir = crashed["gateway"].data_dir
    created = client.post("/v1/sessions", json={}).json()  # a session the crash never touched, to compare
    try:
        expected = client.get(f"/v1/sessions/{created['id']}").json()["isolation"]
        client.post(f"/v1/sessions/{sid}/restart")  # so that it is not the kernel the previous tests used
        run(client, sid, "doomed = True")
        gateway: GatewayProcess = crashed["gateway"]
        gateway.stop(signal.SIGKILL)
        gateway = crashed["gateway"] = start_gateway(data_dir, extra_args=crashed["args"])
        with gateway.client() as again:
            assert run(again, sid, "doomed")["result"] == "True"
            os.kill(kernel_host_pid(data_dir, sid), signal.SIGKILL)
            step = again.post(f"/v1/sessions/{sid}/execute", json={"code": "import time; time.sleep(30)"}).json()
            if step["status"] == "died":  # the kernel was seen dying during the step
                assert step["error"]["name"] == "KernelDied", step
            else:  # or before it, when the new kernel ran it
                events = again.get(f"/v1/sessions/{sid}/events").json()["events"]
                died = [e for e in events if e["action"] == "kernel_died"]
                assert died and "started before the gateway restarted" in died[-1]["details"]["message"], died
            after = run(again, sid, "'doomed' in dir()")
            assert after["result"] == "False"
            assert again.get(f"/v1/sessions/{sid}").json()["isolation"]["profile"] == expected["profile"]
    finally:
        with crashed["gateway"].client() as http:
            http.delete(f"/v1/sessions/{created['id']}")


def test_a_clean_stop_after_the_crash_keeps_every_sessions_state(crashed: dict[str, Any]) -> None:
    gateway: GatewayProcess = crashed["gateway"]
    with gateway.client() as client:
        run(client, crashed["used"], "kept = 'over a clean stop'")
    assert gateway.stop() == 0
    crashed["gateway"] = start_gateway(gateway.data_dir, extra_args=crashed["args"])
    with crashed["gateway"].client() as client:
        assert run(client, crashed["used"], "kept")["result"] == "'over a clean stop'"


@pytest.mark.slow
def test_a_fork_cut_by_a_crash_is_complete_or_failed_and_leaves_nothing_behind() -> None:
    """kill -9 at several moments of a fork of a session holding 150 MB of state: afterwards each
    child either has the parent's state or is failed with the reason; no staging copy and no
    snapshot file in the exchange directory is left."""
    import threading

    with isolated_gateway("sandbox", "--pool-size", "0", prefix="agw-forkcrash-") as state:
        with state["gateway"].client() as client:
            parent = client.post("/v1/sessions", json={}).json()["id"]
            run(client, parent, "import numpy as np\nblob = np.random.default_rng(1).random(150 * 2**20 // 8)\n"
                                "open('file.txt', 'w').write('parent file')\ntotal = float(blob.sum())")
        outcomes = []
        for delay in (0.05, 0.3, 0.8, 1.6, 3.0):
            gateway: GatewayProcess = state["gateway"]
            thread = threading.Thread(target=lambda: _try(gateway, f"/v1/sessions/{parent}/fork"))
            thread.start()
            time.sleep(delay)
            gateway.stop(signal.SIGKILL)
            thread.join(30)
            state["gateway"] = start_gateway(gateway.data_dir, extra_args=state["args"])
            data_dir = gateway.data_dir
            assert not list((data_dir / "sessions" / parent / "forks").glob("*")), "a staging copy was left"
            runtime = placement_of(data_dir, parent)["runtime_dir"]
            assert not [p.name for p in (Path(runtime) / "exchange").glob("*")], "snapshot files were left"
            with state["gateway"].client() as client:
                children = [s for s in client.get("/v1/sessions", params={"limit": 500}).json()["sessions"]
                            if (s.get("parent") or {}).get("session_id") == parent and s["id"] not in outcomes]
                for child in children:
                    outcomes.append(child["id"])
                    if child["state"] == "failed":
                        assert "being forked" in child["reason"], child
                        continue
                    check = run(client, child["id"], "float(blob.sum()) == total, open('file.txt').read()")
                    assert check["result"] == "(True, 'parent file')", (delay, check)
                assert run(client, parent, "float(blob.sum()) == total")["result"] == "True"
        assert outcomes, "no fork got as far as making its child"


def _try(gateway: GatewayProcess, path: str) -> None:
    try:
        with gateway.client() as client:
            client.post(path, timeout=60)
    except httpx.HTTPError:
        pass  # the gateway was killed under it
