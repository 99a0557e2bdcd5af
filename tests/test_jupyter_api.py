"""The Jupyter face's REST routes, with Jupyter Server's shapes, on the same sessions as /v1."""

from __future__ import annotations

import re
import uuid

import httpx

from tests.conftest import GatewayProcess, error_code, run

LAST_ACTIVITY = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def assert_kernel_model(model: dict) -> None:
    assert set(model) == {"id", "name", "last_activity", "execution_state", "connections"}
    uuid.UUID(model["id"])
    assert LAST_ACTIVITY.match(model["last_activity"]), model["last_activity"]
    assert model["execution_state"] in ("starting", "idle", "busy", "restarting", "dead")
    assert isinstance(model["connections"], int)


def test_api_and_kernelspecs(client: httpx.Client) -> None:
    assert client.get("/api").json()["version"]
    specs = client.get("/api/kernelspecs").json()
    assert specs["default"] == "python3"
    python = specs["kernelspecs"]["python3"]
    assert python["name"] == "python3"
    assert isinstance(python["spec"]["argv"], list) and python["spec"]["language"] == "python"
    assert python["spec"]["display_name"] == "Python 3 (gateway)"
    assert client.get("/api/kernelspecs/python3").json() == python
    missing = client.get("/api/kernelspecs/cobol")
    assert missing.status_code == 400 and error_code(missing) == "unknown_kernel"
    logo = client.get("/kernelspecs/python3/logo-64x64.png")
    assert logo.status_code == 404 and error_code(logo) == "resource_not_found"
    assert client.get("/kernelspecs/python3/kernel.json").status_code == 404


def test_a_kernel_started_here_is_a_session_and_ends_with_delete(client: httpx.Client) -> None:
    response = client.post("/api/kernels", json={"name": "python3", "env": {
        "KERNEL_USERNAME": "dev", "KERNEL_WORKING_DIR": "/home/dev/project", "LD_PRELOAD": "/tmp/evil.so",
        "PATH": "/tmp/evil"}})
    assert response.status_code == 201
    model = response.json()
    assert_kernel_model(model)
    assert response.headers["location"] == f"/api/kernels/{model['id']}"
    sessions = client.get("/v1/sessions").json()["sessions"]
    session = next(s for s in sessions if s["kernel_id"] == model["id"])
    env = run(client, session["id"], "import os; (os.environ.get('KERNEL_USERNAME'), os.environ.get('LD_PRELOAD'), "
                                      "os.environ['PATH'] != '/tmp/evil', os.getcwd().endswith('/workspace'))")
    assert env["result"] == "('dev', None, True, True)"
    assert model["id"] in [k["id"] for k in client.get("/api/kernels").json()]
    assert client.get(f"/api/kernels/{model['id']}").json()["id"] == model["id"]
    assert client.delete(f"/api/kernels/{model['id']}").status_code == 204
    assert client.get(f"/v1/sessions/{session['id']}").json()["state"] == "terminated"
    gone = client.get(f"/api/kernels/{model['id']}")
    assert gone.status_code == 404 and error_code(gone) == "kernel_not_found"
    assert model["id"] not in [k["id"] for k in client.get("/api/kernels").json()]


def test_an_agent_session_is_a_kernel_and_a_jupyter_delete_only_lets_go(client: httpx.Client, session) -> None:
    run(client, session["id"], "agent_state = 'precious'")
    model = client.get(f"/api/kernels/{session['kernel_id']}").json()
    assert_kernel_model(model)
    assert model["execution_state"] == "idle"
    assert client.delete(f"/api/kernels/{session['kernel_id']}").status_code == 204
    assert client.get(f"/v1/sessions/{session['id']}").json()["state"] == "idle"
    assert run(client, session["id"], "agent_state")["result"] == "'precious'"
    actions = [e["action"] for e in client.get(f"/v1/sessions/{session['id']}/events").json()["events"]]
    assert "jupyter_released" in actions


def test_an_admin_can_end_an_agent_session_through_the_jupyter_api_explicitly(client: httpx.Client) -> None:
    created = client.post("/v1/sessions", json={}).json()
    assert client.delete(f"/api/kernels/{created['kernel_id']}", params={"terminate": "true"}).status_code == 204
    assert client.get(f"/v1/sessions/{created['id']}").json()["state"] == "terminated"


def test_interrupt_and_restart_through_the_jupyter_api(client: httpx.Client, session) -> None:
    run(client, session["id"], "gone_after_restart = 1")
    assert client.post(f"/api/kernels/{session['kernel_id']}/interrupt").status_code == 204
    restarted = client.post(f"/api/kernels/{session['kernel_id']}/restart")
    assert restarted.status_code == 200
    assert_kernel_model(restarted.json())
    assert run(client, session["id"], "gone_after_restart")["error"]["name"] == "NameError"


def test_jupyter_routes_need_a_token_and_give_json_errors(gateway: GatewayProcess, client: httpx.Client) -> None:
    with httpx.Client(base_url=gateway.url) as anonymous:
        for path in ("/api", "/api/kernels", "/api/kernelspecs", "/api/kernelspecs/python3",
                     "/kernelspecs/python3/logo-64x64.png", f"/api/kernels/{uuid.uuid4()}"):
            response = anonymous.get(path)
            assert response.status_code == 401 and error_code(response) == "missing_token", path
    unknown = str(uuid.uuid4())
    for method, path in (("GET", f"/api/kernels/{unknown}"), ("DELETE", f"/api/kernels/{unknown}"),
                         ("POST", f"/api/kernels/{unknown}/interrupt"), ("POST", f"/api/kernels/{unknown}/restart")):
        response = client.request(method, path)
        assert response.status_code == 404 and error_code(response) == "kernel_not_found", path
    bad = client.post("/api/kernels", json={"name": "python3", "extra": 1})
    assert bad.status_code == 400 and error_code(bad) == "unknown_field"
    unknown_kernel = client.post("/api/kernels", json={"name": "nope"})
    assert unknown_kernel.status_code == 400 and error_code(unknown_kernel) == "unknown_kernel"
