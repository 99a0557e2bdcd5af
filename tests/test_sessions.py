"""Session lifecycle over the agent API: create, list, get, terminate, restart, setup, env."""

from __future__ import annotations

import httpx

from tests.conftest import error_code, run


def test_create_returns_a_session_with_the_contract_fields(client: httpx.Client) -> None:
    response = client.post("/v1/sessions", json={"labels": {"task": "demo"}})
    assert response.status_code == 201
    created = response.json()
    try:
        assert created["id"].startswith("s_")
        assert set(created) >= {"id", "kernel_id", "kernel", "state", "owner", "labels", "created_at",
                                "last_activity", "steps", "parent"}
        assert created["kernel"] == "python3"
        assert created["state"] == "idle"
        assert created["owner"] == "admin"
        assert created["labels"] == {"task": "demo"}
        assert created["steps"] == 0 and created["parent"] is None
        assert response.headers["location"] == f"/v1/sessions/{created['id']}"
        assert client.get(f"/v1/sessions/{created['id']}").json()["kernel_id"] == created["kernel_id"]
    finally:
        client.delete(f"/v1/sessions/{created['id']}")


def test_setup_runs_as_step_zero_and_steps_continue_from_one(client: httpx.Client) -> None:
    created = client.post("/v1/sessions", json={"setup": "import math\nbase = 10"}).json()
    sid = created["id"]
    try:
        execution = run(client, sid, "base * math.pi")
        assert execution["step"] == 1
        assert execution["result"].startswith("31.4159")
        steps = client.get(f"/v1/sessions/{sid}/steps").json()["steps"]
        assert [s["step"] for s in steps] == [0, 1]
        assert steps[0]["status"] == "ok"
        assert client.get(f"/v1/sessions/{sid}").json()["steps"] == 2
    finally:
        client.delete(f"/v1/sessions/{sid}")


def test_env_reaches_the_kernel_but_gateway_secrets_do_not(client: httpx.Client) -> None:
    created = client.post("/v1/sessions", json={"env": {"TASK_NAME": "alpha"}}).json()
    try:
        result = run(client, created["id"], "import os; (os.environ.get('TASK_NAME'), "
                                            "sorted(k for k in os.environ if 'AGENT_GATEWAY' in k))")
        assert result["result"] == "('alpha', [])"
    finally:
        client.delete(f"/v1/sessions/{created['id']}")


def test_env_rejects_reserved_and_malformed_names(client: httpx.Client) -> None:
    before = len(client.get("/v1/sessions", params={"limit": 500}).json()["sessions"])
    for env in ({"AGENT_GATEWAY_TOKEN": "x"}, {"1BAD": "x"}, {"OK": 3}, ["A"]):
        response = client.post("/v1/sessions", json={"env": env})
        assert response.status_code == 400
        assert error_code(response) == "invalid_field"
    assert len(client.get("/v1/sessions", params={"limit": 500}).json()["sessions"]) == before


def test_unknown_kernel_is_a_400_listing_the_available_ones(client: httpx.Client) -> None:
    response = client.post("/v1/sessions", json={"kernel": "cobol"})
    assert response.status_code == 400
    assert error_code(response) == "unknown_kernel"
    assert "python3" in response.json()["error"]["details"]["available"]
    assert "python3" in response.json()["error"]["message"]


def test_list_is_newest_first_filters_and_pages(client: httpx.Client) -> None:
    ids = []
    try:
        for i in range(3):
            ids.append(client.post("/v1/sessions", json={"labels": {"batch": "paging", "n": str(i)}}).json()["id"])
        page1 = client.get("/v1/sessions", params={"label": "batch:paging", "limit": 2}).json()
        assert [s["id"] for s in page1["sessions"]] == [ids[2], ids[1]]
        assert page1["next"]
        page2 = client.get("/v1/sessions", params={"label": "batch:paging", "limit": 2, "cursor": page1["next"]}).json()
        assert [s["id"] for s in page2["sessions"]] == [ids[0]]
        assert page2["next"] is None
        client.delete(f"/v1/sessions/{ids[0]}")
        terminated = client.get("/v1/sessions", params={"label": "batch:paging", "state": "terminated"}).json()
        assert [s["id"] for s in terminated["sessions"]] == [ids[0]]
        idle = client.get("/v1/sessions", params={"label": "batch:paging", "state": "idle"}).json()
        assert {s["id"] for s in idle["sessions"]} == {ids[1], ids[2]}
    finally:
        for sid in ids:
            client.delete(f"/v1/sessions/{sid}")


def test_list_rejects_bad_queries(client: httpx.Client) -> None:
    for params, code in (({"state": "sleeping"}, "invalid_query"), ({"limit": "0"}, "invalid_query"),
                         ({"limit": "abc"}, "invalid_query"), ({"cursor": "%%%"}, "invalid_query"),
                         ({"label": "nocolon"}, "invalid_query")):
        response = client.get("/v1/sessions", params=params)
        assert response.status_code == 400, params
        assert error_code(response) == code


def test_terminate_stops_the_kernel_and_keeps_the_trajectory(gateway, client: httpx.Client) -> None:
    created = client.post("/v1/sessions", json={}).json()
    sid = created["id"]
    run(client, sid, "y = 5")
    pids_before = gateway.kernel_pids()
    response = client.delete(f"/v1/sessions/{sid}")
    assert response.status_code == 200
    assert response.json()["state"] == "terminated"
    assert len(pids_before - gateway.kernel_pids()) >= 1
    after = client.post(f"/v1/sessions/{sid}/execute", json={"code": "y"})
    assert after.status_code == 409
    assert error_code(after) == "session_ended"
    assert client.get(f"/v1/sessions/{sid}").json()["state"] == "terminated"
    steps = client.get(f"/v1/sessions/{sid}/steps").json()["steps"]
    assert [(s["code"], s["status"], s["source"], s["principal"]) for s in steps] == [("y = 5", "ok", "agent", "admin")]
    assert client.delete(f"/v1/sessions/{sid}").status_code == 409
    actions = [e["action"] for e in client.get(f"/v1/sessions/{sid}/events").json()["events"]]
    assert actions[0] == "session_created" and actions[-1] == "session_terminated"


def test_restart_gives_a_new_kernel_with_the_same_workspace(client: httpx.Client, session) -> None:
    sid = session["id"]
    run(client, sid, "v = 1\nopen('kept.txt', 'w').write('still here')")
    response = client.post(f"/v1/sessions/{sid}/restart")
    assert response.status_code == 200
    assert response.json()["kernel_id"] == session["kernel_id"]
    gone = run(client, sid, "v")
    assert gone["status"] == "error" and gone["error"]["name"] == "NameError"
    assert run(client, sid, "open('kept.txt').read()")["result"] == "'still here'"
    actions = [e["action"] for e in client.get(f"/v1/sessions/{sid}/events").json()["events"]]
    assert "kernel_restarted" in actions


def test_different_sessions_do_not_share_variables(client: httpx.Client) -> None:
    a = client.post("/v1/sessions", json={}).json()["id"]
    b = client.post("/v1/sessions", json={}).json()["id"]
    try:
        run(client, a, "secret = 'a-only'")
        assert run(client, b, "secret")["error"]["name"] == "NameError"
        run(client, a, "open('mine.txt', 'w').write('a')")
        assert run(client, b, "import os; os.path.exists('mine.txt')")["result"] == "False"
    finally:
        client.delete(f"/v1/sessions/{a}")
        client.delete(f"/v1/sessions/{b}")


def test_state_filter_sees_live_states(gateway, client: httpx.Client, session) -> None:
    import threading
    import time

    sid = session["id"]
    thread = threading.Thread(target=lambda: run(gateway.client(), sid, "import time; time.sleep(1.5)"))
    thread.start()
    try:
        time.sleep(0.6)
        busy = [s["id"] for s in client.get("/v1/sessions", params={"state": "busy"}).json()["sessions"]]
        idle = [s["id"] for s in client.get("/v1/sessions", params={"state": "idle"}).json()["sessions"]]
        assert sid in busy and sid not in idle
    finally:
        thread.join()
    assert sid in [s["id"] for s in client.get("/v1/sessions", params={"state": "idle"}).json()["sessions"]]


def test_a_token_created_while_the_server_runs_works_at_once(gateway) -> None:
    import subprocess
    import sys

    created = subprocess.run([sys.executable, "-m", "gateway", "token", "create", "--name", "late-agent",
                              "--role", "agent", "--data-dir", str(gateway.data_dir)],
                             capture_output=True, text=True, check=True)
    token = created.stdout.strip()
    with gateway.client(token=token) as late:
        response = late.get("/v1/sessions")
        assert response.status_code == 200
        assert response.json()["sessions"] == []  # an agent sees only its own sessions
