"""A real jupyter_server in gateway mode in front of the gateway (what `jupyter lab --gateway-url`
runs), and nbclient executing a notebook on a gateway kernel through Jupyter's remote-kernel
manager and websocket client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import nbformat
import pytest
import websocket
from nbclient import NotebookClient

from tests.conftest import GatewayProcess, run

LAB_TOKEN = "lab-token-for-tests"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def lab(gateway: GatewayProcess, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """jupyter_server started with --gateway-url pointing at the gateway."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER_GATEWAY", "AGENT_GATEWAY"))}
    log = open(tmp_path / "lab.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyter_server", f"--ServerApp.port={port}", "--ServerApp.ip=127.0.0.1",
         "--ServerApp.port_retries=0", "--no-browser", "--allow-root", f"--ServerApp.root_dir={tmp_path}",
         f"--IdentityProvider.token={LAB_TOKEN}", f"--gateway-url={gateway.url}",
         f"--GatewayClient.auth_token={gateway.token}", "--GatewayClient.request_timeout=60"],
        stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/status", params={"token": LAB_TOKEN}).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError((tmp_path / "lab.log").read_text())
        time.sleep(0.2)
    else:
        process.kill()
        raise RuntimeError("jupyter_server did not start")
    yield process, url
    if process.poll() is None:
        process.kill()
        process.wait()
    log.close()


def lab_execute(lab_url: str, kernel_id: str, code: str) -> list[dict[str, Any]]:
    """Run code over the Jupyter server's own kernel websocket (which it proxies to the gateway)."""
    ws = websocket.create_connection(
        lab_url.replace("http", "ws") + f"/api/kernels/{kernel_id}/channels?token={LAB_TOKEN}", timeout=60)
    try:
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({"channel": "shell", "header": {
            "msg_id": msg_id, "msg_type": "execute_request", "username": "dev", "session": uuid.uuid4().hex,
            "version": "5.3", "date": "2026-01-01T00:00:00.000000Z"}, "parent_header": {}, "metadata": {},
            "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                        "allow_stdin": False}}))
        seen, idle, reply = [], False, False
        while not (idle and reply):
            msg = json.loads(ws.recv())
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            seen.append(msg)
            reply = reply or msg["channel"] == "shell"
            idle = idle or (msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle")
        return seen
    finally:
        ws.close()


def result_of(messages: list[dict[str, Any]]) -> str:
    return [m for m in messages if m["msg_type"] == "execute_result"][0]["content"]["data"]["text/plain"]


@pytest.mark.slow
def test_jupyter_server_in_gateway_mode_uses_and_adopts_gateway_kernels(gateway, client: httpx.Client, lab) -> None:
    process, lab_url = lab
    with httpx.Client(base_url=lab_url, params={"token": LAB_TOKEN}, timeout=60) as lab_http:
        specs = lab_http.get("/api/kernelspecs").json()
        assert specs["kernelspecs"]["python3"]["spec"]["display_name"] == "Python 3 (gateway)"

        # A notebook session started from the Jupyter server runs on a gateway kernel.
        started = lab_http.post("/api/sessions", json={"path": "debug.ipynb", "type": "notebook",
                                                       "name": "debug.ipynb", "kernel": {"name": "python3"}})
        assert started.status_code == 201, started.text
        lab_kernel = started.json()["kernel"]["id"]
        assert result_of(lab_execute(lab_url, lab_kernel, "21 * 2")) == "42"
        lab_session = next(s for s in client.get("/v1/sessions").json()["sessions"] if s["kernel_id"] == lab_kernel)
        steps = client.get(f"/v1/sessions/{lab_session['id']}/steps").json()["steps"]
        assert [(s["code"], s["source"], s["result"]) for s in steps] == [("21 * 2", "jupyter", "42")]

        # Adopting an agent's live session: the person reads what the agent built.
        agent = client.post("/v1/sessions", json={"labels": {"who": "agent"}}).json()
        run(client, agent["id"], "findings = {'rows': 1234, 'status': 'draft'}")
        adopted = lab_http.post("/api/sessions", json={"path": "adopt.ipynb", "type": "notebook",
                                                       "name": "adopt.ipynb", "kernel": {"id": agent["kernel_id"]}})
        assert adopted.status_code == 201, adopted.text
        assert adopted.json()["kernel"]["id"] == agent["kernel_id"]
        assert result_of(lab_execute(lab_url, agent["kernel_id"], "findings['rows']")) == "1234"
        agent_steps = client.get(f"/v1/sessions/{agent['id']}/steps").json()["steps"]
        assert [s["source"] for s in agent_steps] == ["agent", "jupyter"]

    # Stopping the Jupyter server (Ctrl+C twice in a terminal, or SIGTERM: both end in the same stop)
    # deletes every kernel it holds, the adopted one included.
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) is not None
    assert client.get(f"/v1/sessions/{lab_session['id']}").json()["state"] == "terminated"
    assert client.get(f"/v1/sessions/{agent['id']}").json()["state"] == "idle"
    assert run(client, agent["id"], "findings['status']")["result"] == "'draft'"
    client.delete(f"/v1/sessions/{agent['id']}")


@pytest.mark.slow
def test_nbclient_runs_a_notebook_on_a_gateway_kernel(gateway, client: httpx.Client, tmp_path: Path) -> None:
    from jupyter_server.gateway.gateway_client import GatewayClient

    from gateway.remote import RemoteKernelManager, use_gateway

    use_gateway(gateway.url, gateway.token)
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import sys\nvalues = [i * i for i in range(5)]"),
        nbformat.v4.new_code_cell("print(sum(values))"),
        nbformat.v4.new_code_cell("values[-1]"),
    ])
    from jupyter_core.utils import run_sync

    km = RemoteKernelManager()
    try:
        NotebookClient(nb, km=km, timeout=60, resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        run_sync(km.shutdown_kernel)()  # a kernel manager handed to nbclient is the caller's to end
        GatewayClient.clear_instance()
    assert nb.cells[1].outputs[0]["text"] == "30\n"
    assert nb.cells[2].outputs[0]["data"]["text/plain"] == "16"
    sessions = client.get("/v1/sessions", params={"limit": 5}).json()["sessions"]
    recorded = {s["id"]: (s["state"], [st["code"] for st in client.get(f"/v1/sessions/{s['id']}/steps").json()["steps"]])
                for s in sessions}
    assert ("terminated", [c.source for c in nb.cells]) in recorded.values(), recorded


@pytest.mark.slow
def test_attach_command_opens_an_agent_session_on_the_jupyter_server(gateway, client: httpx.Client, lab) -> None:
    _, lab_url = lab
    agent = client.post("/v1/sessions", json={}).json()
    run(client, agent["id"], "answer = 41 + 1")
    env = {**os.environ, "AGENT_GATEWAY_TOKEN": gateway.token, "JUPYTER_TOKEN": LAB_TOKEN}
    done = subprocess.run([sys.executable, "-m", "gateway", "attach", agent["id"], "--gateway-url", gateway.url,
                           "--jupyter-url", lab_url], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"{lab_url}/lab/tree/agent-sessions/{agent['id']}.ipynb" in done.stdout
    with httpx.Client(base_url=lab_url, params={"token": LAB_TOKEN}, timeout=60) as lab_http:
        sessions = lab_http.get("/api/sessions").json()
        assert agent["kernel_id"] in [s["kernel"]["id"] for s in sessions]
        stored = lab_http.get(f"/api/contents/agent-sessions/{agent['id']}.ipynb").json()["content"]
        assert [c["source"] for c in stored["cells"]] == ["answer = 41 + 1"]
    assert result_of(lab_execute(lab_url, agent["kernel_id"], "answer")) == "42"
    missing = subprocess.run([sys.executable, "-m", "gateway", "attach", "s_nope", "--gateway-url", gateway.url,
                              "--jupyter-url", lab_url], capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode == 1 and "404" in missing.stderr
    client.delete(f"/v1/sessions/{agent['id']}")
