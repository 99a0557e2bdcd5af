"""The operator's view: commands find the server's store the way ``serve`` does and never make a new
one unless asked; run as root on a live data directory they leave nothing the server's user
cannot open."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import GatewayProcess, start_gateway


def agent_gateway(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_GATEWAY_")}
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=cwd, env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=60, check=False)


def test_no_store_is_created_where_there_is_none(tmp_path: Path) -> None:
    for command in (("token", "create", "--name", "x", "--role", "agent"), ("token", "list"),
                    ("token", "revoke", "--name", "x"), ("audit", "verify"), ("audit", "export")):
        done = agent_gateway(*command, cwd=tmp_path)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "there is no gateway database at" in done.stderr and "--data-dir" in done.stderr
        assert not (tmp_path / "gateway-data").exists(), command
    created = agent_gateway("token", "create", "--name", "x", "--role", "agent", "--init", cwd=tmp_path)
    assert created.returncode == 0 and len(created.stdout.strip()) > 20, created.stderr
    assert (tmp_path / "gateway-data" / "gateway.db").stat().st_mode & 0o077 == 0


def test_a_token_made_for_the_running_server_is_accepted_by_it(gateway: GatewayProcess, client: httpx.Client,
                                                               tmp_path: Path) -> None:
    created = client.post("/v1/sessions", json={}).json()
    client.delete(f"/v1/sessions/{created['id']}")
    before = {path: (path.stat().st_uid, path.stat().st_gid) for path in gateway.data_dir.glob("gateway.db*")}
    done = agent_gateway("token", "create", "--name", "cli-agent", "--role", "agent", cwd=tmp_path,
                         env={"AGENT_GATEWAY_DATA_DIR": str(gateway.data_dir)})
    assert done.returncode == 0, done.stderr
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {done.stdout.strip()}"}) as client:
        assert client.get("/v1/sessions").status_code == 200
    owner = gateway.data_dir.stat().st_uid
    for path in gateway.data_dir.glob("gateway.db*"):
        assert path.stat().st_uid == owner, (path, before)
    verified = agent_gateway("audit", "verify", "--data-dir", str(gateway.data_dir), cwd=tmp_path)
    assert verified.returncode == 0 and verified.stdout.startswith("ok:") and " 0 events" not in verified.stdout


def test_kernel_banners_go_to_a_log_per_kernel_not_to_the_servers(gateway: GatewayProcess,
                                                                   client: httpx.Client) -> None:
    created = client.post("/v1/sessions", json={}).json()
    sid = created["id"]
    try:
        client.post(f"/v1/sessions/{sid}/execute", json={"code": "import sys; print('to the kernel log', "
                                                                 "file=sys.__stderr__, flush=True)"})
        logs = list((gateway.data_dir / "sessions" / sid / "logs").glob("kernel-*.log"))
        assert len(logs) == 1, logs  # the one kernel this session has had
        text = logs[0].read_text()
        assert "ipython kernel" in text and "to the kernel log" in text
        assert logs[0].stat().st_mode & 0o077 == 0
    finally:
        client.delete(f"/v1/sessions/{sid}")
    assert "ipython kernel" not in gateway.stderr_text()
    assert "to the kernel log" not in gateway.stderr_text()


def test_an_unisolated_kernel_restarts_with_its_log(tmp_path: Path) -> None:
    """Under ``none`` the server starts kernels itself: a restart reuses the kernel's log."""
    gateway = start_gateway(tmp_path / "data", extra_args=("--sandbox", "none", "--pool-size", "0"))
    try:
        with gateway.client() as client:
            sid = client.post("/v1/sessions", json={}).json()["id"]
            client.post(f"/v1/sessions/{sid}/execute", json={"code": "x = 1"})
            restarted = client.post(f"/v1/sessions/{sid}/restart")
            assert restarted.status_code == 200 and restarted.json()["state"] == "idle", restarted.text
            step = client.post(f"/v1/sessions/{sid}/execute", json={"code": "'x' in dir()"}).json()
            assert step["result"] == "False"
            logs = list((gateway.data_dir / "sessions" / sid / "logs").glob("kernel-*.log"))
            assert len(logs) == 1 and logs[0].read_text().count("ipython kernel") == 2
    finally:
        assert gateway.stop() == 0
