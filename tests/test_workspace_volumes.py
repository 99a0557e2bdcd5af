"""The workspace limit holds during a step: each isolated workspace is a file system of the
limit's size, so a write past it fails in the kernel with ENOSPC and the step says which limit.

Run under each isolating profile this machine supports, with a warm pool (the pooled kernel's
volume moves to its session) and across a restart of the gateway."""

from __future__ import annotations

import os
from typing import Any, Iterator

import pytest

from gateway import volumes
from tests.conftest import GatewayProcess, isolated_gateway, run, start_gateway

LIMIT = 8 << 20
WRITE_TOO_MUCH = ("data = b'x' * (1 << 20)\nwritten = 0\nwith open('big.bin', 'wb') as handle:\n"
                  "    for _ in range(32):\n        handle.write(data)\n        handle.flush()\n"
                  "        written += len(data)\n")


@pytest.fixture(scope="module", params=["sandbox", "process"])
def isolated(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    why = volumes.support()
    if why:
        pytest.skip(f"workspace volumes do not work here: {why}")
    with isolated_gateway(request.param, "--pool-size", "1", "--workspace-limit", str(LIMIT),
                          "--workspace-volumes", "on", prefix="agw-volumes-") as state:
        yield state
    assert not volumes.mounted_below(state["base"]), "a volume was left mounted after the gateway stopped"


def test_a_write_past_the_workspace_limit_fails_in_the_step(isolated: dict[str, Any]) -> None:
    gateway: GatewayProcess = isolated["gateway"]
    with gateway.client() as client:
        sid = client.post("/v1/sessions", json={}).json()["id"]  # a pooled kernel: its volume moved here
        workspace = gateway.data_dir / "sessions" / sid / "workspace"
        assert volumes.is_mounted(workspace)
        assert run(client, sid, "import os; sorted(os.listdir('.'))")["result"] == "[]"  # no lost+found
        step = run(client, sid, WRITE_TOO_MUCH)
        assert step["status"] == "error" and step["error"]["name"] == "OSError", step
        assert "No space left on device" in step["error"]["value"]
        assert "the session's workspace size limit is 8 MiB" in step["error"]["value"]
        assert os.path.getsize(workspace / "big.bin") <= LIMIT
        assert 4 << 20 < int(run(client, sid, "written")["result"]) <= LIMIT
        events = [e["action"] for e in client.get(f"/v1/sessions/{sid}/events").json()["events"]]
        assert "limit_exceeded" in events
        # The kernel lives on; once room is made, writes work again.
        assert run(client, sid, "1+1")["result"] == "2"
        assert client.delete(f"/v1/sessions/{sid}/files/big.bin").status_code == 200
        assert run(client, sid, "open('small.bin', 'wb').write(b'y' * (1 << 20))")["result"] == str(1 << 20)
        # A session not taken from the pool gets a volume of its own limit.
        other = client.post("/v1/sessions", json={"limits": {"workspace": "4MiB"}}).json()["id"]
        assert run(client, other, WRITE_TOO_MUCH)["status"] == "error"
        assert int(run(client, other, "written")["result"]) <= 4 << 20
        client.delete(f"/v1/sessions/{other}")
        client.delete(f"/v1/sessions/{sid}")


def test_a_pooled_kernel_whose_volume_went_away_is_not_handed_out(isolated: dict[str, Any]) -> None:
    """A pooled kernel whose volume is no longer mounted (unmounted behind the gateway's back)
    would see files other than its session's: it is not bound, the session gets a kernel of its
    own, and an upload is seen by the kernel."""
    import subprocess
    import time
    from pathlib import Path

    gateway: GatewayProcess = isolated["gateway"]
    pool = gateway.data_dir / "pool"

    def ready() -> list[Path]:  # pooled kernels that have started, on their volumes
        return [p for p in pool.glob("*") if p.is_dir() and volumes.is_mounted(p)
                and f"kernel {p.name} started" in gateway.stderr_text()]

    deadline = time.monotonic() + 30
    while not ready() and time.monotonic() < deadline:
        time.sleep(0.1)
    pooled = ready()
    assert pooled, "the pool holds no started kernel on a volume"
    assert subprocess.run(["umount", "--lazy", str(pooled[0])]).returncode == 0
    assert not volumes.is_mounted(pooled[0])
    with gateway.client() as client:
        sid = client.post("/v1/sessions", json={}).json()["id"]
        workspace = gateway.data_dir / "sessions" / sid / "workspace"
        assert volumes.is_mounted(workspace)
        assert client.put(f"/v1/sessions/{sid}/files/seen.txt", content=b"by the kernel").status_code == 201
        assert run(client, sid, "open('seen.txt').read()")["result"] == "'by the kernel'"
        client.delete(f"/v1/sessions/{sid}")


def test_a_volume_is_never_moved_onto_a_workspace_that_has_its_own(tmp_path: Any) -> None:
    """A pooled kernel's volume moved onto a session's workspace whose own volume is not
    mounted (a paused session after a clean restart) would replace that volume's image, and
    the session's files with it: refused, and both images are kept."""
    why = volumes.support()
    if why:
        pytest.skip(f"workspace volumes do not work here: {why}")
    pooled, session = tmp_path / "pool" / "k" / "workspace", tmp_path / "s" / "workspace"
    pooled.parent.mkdir(parents=True)
    session.mkdir(parents=True)
    volumes.ensure(pooled, 4 << 20, (0, 0))
    try:
        volumes.image_of(session).write_bytes(b"the session's own volume")
        with pytest.raises(volumes.VolumeError, match="already has a volume"):
            volumes.move(pooled, session)
        assert volumes.image_of(session).read_bytes() == b"the session's own volume"
        assert volumes.is_mounted(pooled) and volumes.image_of(pooled).exists()
    finally:
        volumes.release(pooled, remove=True)


def test_a_session_paused_over_a_clean_restart_resumes_on_its_own_volume(isolated: dict[str, Any]) -> None:
    """After a clean stop the paused session's volume is unmounted; resumed while the pool has a
    kernel ready (and before anything mounts its volume again), it gets a kernel of its own on
    its volume: its files and its variables are there, and no pooled kernel is wasted."""
    import time

    gateway: GatewayProcess = isolated["gateway"]
    with gateway.client() as client:
        sid = client.post("/v1/sessions", json={}).json()["id"]
        assert run(client, sid, "open('kept.txt', 'w').write('kept'); kept = 8")["status"] == "ok"
        assert client.post(f"/v1/sessions/{sid}/pause").status_code == 200
    assert gateway.stop() == 0
    restarted = isolated["gateway"] = start_gateway(gateway.data_dir, extra_args=isolated["args"])
    deadline = time.monotonic() + 30
    while restarted.stderr_text().count(" started (python3") < 1 and time.monotonic() < deadline:
        time.sleep(0.1)  # the pool's kernel is ready
    with restarted.client() as client:
        assert client.post(f"/v1/sessions/{sid}/resume").status_code == 200
        assert run(client, sid, "kept, open('kept.txt').read()")["result"] == "(8, 'kept')"
        assert client.get(f"/v1/sessions/{sid}/files/kept.txt").content == b"kept"
        client.delete(f"/v1/sessions/{sid}")
    assert "could not be bound" not in restarted.stderr_text()


def test_files_and_limit_survive_pause_restart_and_termination(isolated: dict[str, Any]) -> None:
    gateway: GatewayProcess = isolated["gateway"]
    with gateway.client() as client:
        sid = client.post("/v1/sessions", json={}).json()["id"]
        assert run(client, sid, "open('kept.txt', 'w').write('kept'); kept = 7")["status"] == "ok"
        assert client.post(f"/v1/sessions/{sid}/pause").status_code == 200
        assert client.get(f"/v1/sessions/{sid}/files/kept.txt").content == b"kept"
    # A clean stop unmounts every volume; the next start mounts them again when needed.
    assert gateway.stop() == 0
    workspace = gateway.data_dir / "sessions" / sid / "workspace"
    assert not volumes.is_mounted(workspace)
    restarted = start_gateway(gateway.data_dir, extra_args=isolated["args"])
    isolated["gateway"] = restarted
    with restarted.client() as client:
        assert client.get(f"/v1/sessions/{sid}/files/kept.txt").content == b"kept"
        assert client.post(f"/v1/sessions/{sid}/resume").status_code == 200
        assert run(client, sid, "kept, open('kept.txt').read()")["result"] == "(7, 'kept')"
        assert run(client, sid, WRITE_TOO_MUCH)["status"] == "error"
        client.delete(f"/v1/sessions/{sid}/files/big.bin")
        client.delete(f"/v1/sessions/{sid}")
        assert client.get(f"/v1/sessions/{sid}/files/kept.txt").content == b"kept"
