"""Principals on every route of both faces: an agent sees only its own sessions (others are
404), a reviewer reads everything and runs nothing (403), an admin does everything.
Table-driven over the route lists, so a new route cannot be added unprotected."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import uuid
from typing import Any, Iterator

import pytest
import websocket

from gateway.handlers import files, jupyter, kernel_ws, ops, sessions, ui
from tests.conftest import GatewayProcess, error_code, run

READS = {"GET"}
PUBLIC = {r"/v1/health", r"/ui/?", r"/ui/login"}


def token_for(gateway: GatewayProcess, name: str, role: str) -> str:
    done = subprocess.run([sys.executable, "-m", "gateway", "token", "create", "--name", name, "--role", role,
                           "--data-dir", str(gateway.data_dir)], capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.fixture(scope="module")
def people(gateway: GatewayProcess) -> Iterator[dict[str, Any]]:
    suffix = uuid.uuid4().hex[:6]
    tokens = {"alice": token_for(gateway, f"alice-{suffix}", "agent"),
              "bob": token_for(gateway, f"bob-{suffix}", "agent"),
              "rita": token_for(gateway, f"rita-{suffix}", "reviewer")}
    clients = {name: gateway.client(token=token) for name, token in tokens.items()}
    session = clients["alice"].post("/v1/sessions", json={}).json()
    run(clients["alice"], session["id"], "alice_secret = 'only alice'")
    clients["alice"].put(f"/v1/sessions/{session['id']}/files/a.txt", content=b"alice's file")
    yield {"tokens": tokens, "clients": clients, "session": session}
    clients["alice"].delete(f"/v1/sessions/{session['id']}")
    for client in clients.values():
        client.close()


def concrete(pattern: str, session: dict[str, Any]) -> str:
    path = pattern.replace("(?P<session_id>[A-Za-z0-9_-]{1,64})", session["id"])
    path = path.replace("(?P<kernel_id>[0-9a-fA-F-]{1,64})", session["kernel_id"])
    path = path.replace("(?P<path>.+)", "a.txt").replace("(?:replay)", "replay").replace("\\.", ".")
    path = path.replace("(?P<name>[A-Za-z0-9._-]{1,128})", "python3").replace("(?P<filename>[^/]+)", "logo-64x64.png")
    return path


SESSION_ROUTES = [(pattern, handler) for module in (sessions, files, jupyter, kernel_ws, ui)
                  for pattern, handler in module.routes if "session_id" in pattern or "kernel_id" in pattern]
HTTP_SESSION_ROUTES = [(p, h) for p, h in SESSION_ROUTES if h is not kernel_ws.KernelChannelsHandler]
ALL_ROUTES = [(p, h) for module in (ops, sessions, files, jupyter, kernel_ws, ui) for p, h in module.routes]


def methods_of(handler: type) -> list[str]:
    import tornado.web

    return [m for m in ("GET", "POST", "PUT", "DELETE")
            if getattr(handler, m.lower()) is not getattr(tornado.web.RequestHandler, m.lower())]


def test_the_tables_cover_every_route() -> None:
    protected = {p for p, _ in ALL_ROUTES} - PUBLIC
    assert {p for p, _ in SESSION_ROUTES} | {p for p, h in ALL_ROUTES if "session_id" not in p
                                             and "kernel_id" not in p} >= protected


@pytest.mark.parametrize("pattern,handler", HTTP_SESSION_ROUTES, ids=[p for p, _ in HTTP_SESSION_ROUTES])
def test_another_agent_gets_404_on_every_session_route(people: dict[str, Any], pattern: str, handler: type) -> None:
    bob = people["clients"]["bob"]
    path = concrete(pattern, people["session"])
    for method in methods_of(handler):
        response = bob.request(method, path, json={} if method == "POST" and "execute" not in path else
                               ({"code": "alice_secret"} if method == "POST" else None),
                               content=b"x" if method == "PUT" else None)
        assert response.status_code == 404, (method, path, response.text)
        if path.startswith("/ui/"):  # the pages answer in HTML, with the same code
            assert "(session_not_found)" in response.text and "alice_secret" not in response.text
        else:
            assert error_code(response) in ("session_not_found", "kernel_not_found")


@pytest.mark.parametrize("pattern,handler", HTTP_SESSION_ROUTES, ids=[p for p, _ in HTTP_SESSION_ROUTES])
def test_a_reviewer_reads_and_cannot_write(people: dict[str, Any], pattern: str, handler: type) -> None:
    rita = people["clients"]["rita"]
    path = concrete(pattern, people["session"])
    for method in methods_of(handler):
        if method in READS:
            response = rita.get(path)
            assert response.status_code == 200, (path, response.text)
            continue
        if path.endswith("/replay"):
            continue  # not served yet (501)
        response = rita.request(method, path, json={"code": "1"} if path.endswith("/execute") else
                                ({} if method == "POST" else None), content=b"x" if method == "PUT" else None)
        assert response.status_code == 403, (method, path, response.text)
        assert error_code(response) == "forbidden"


def test_lists_show_only_what_a_principal_may_see(people: dict[str, Any]) -> None:
    sid, kid = people["session"]["id"], people["session"]["kernel_id"]
    bob, rita, alice = (people["clients"][n] for n in ("bob", "rita", "alice"))
    assert sid not in [s["id"] for s in bob.get("/v1/sessions").json()["sessions"]]
    assert sid not in [s["id"] for s in bob.get("/v1/sessions", params={"owner": people["session"]["owner"]}).json()["sessions"]]
    assert kid not in [k["id"] for k in bob.get("/api/kernels").json()]
    assert sid in [s["id"] for s in alice.get("/v1/sessions").json()["sessions"]]
    assert sid in [s["id"] for s in rita.get("/v1/sessions", params={"limit": 500}).json()["sessions"]]
    assert kid in [k["id"] for k in rita.get("/api/kernels").json()]
    assert rita.post("/v1/sessions", json={}).status_code == 403
    assert rita.post("/api/kernels", json={}).status_code == 403
    assert rita.get(f"/v1/sessions/{sid}/files/a.txt").content == b"alice's file"


def test_the_kernel_websocket_follows_the_same_rules(gateway: GatewayProcess, people: dict[str, Any]) -> None:
    url = gateway.url.replace("http://", "ws://") + f"/api/kernels/{people['session']['kernel_id']}/channels"
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(url, timeout=10, header=[f"Authorization: token {people['tokens']['bob']}"])
    assert refused.value.status_code == 404
    allowed = websocket.create_connection(url, timeout=10, header=[f"Authorization: token {people['tokens']['alice']}"])
    allowed.close()


def test_a_reviewer_watches_over_the_websocket_and_runs_nothing(gateway: GatewayProcess, people: dict[str, Any]) -> None:
    sid, kid = people["session"]["id"], people["session"]["kernel_id"]
    alice, rita = people["clients"]["alice"], people["clients"]["rita"]
    url = gateway.url.replace("http://", "ws://") + f"/api/kernels/{kid}/channels"
    watcher = websocket.create_connection(url, timeout=30, header=[f"Authorization: token {people['tokens']['rita']}"])
    try:
        steps_before = len(alice.get(f"/v1/sessions/{sid}/steps").json()["steps"])
        header = {"msg_id": uuid.uuid4().hex, "msg_type": "execute_request", "username": "rita", "session": "r",
                  "version": "5.3", "date": "2026-01-01T00:00:00.000000Z"}
        watcher.send(json.dumps({"channel": "shell", "header": header, "parent_header": {}, "metadata": {},
                                 "content": {"code": "alice_secret = 'changed'", "silent": False}}))
        reply = None
        while reply is None:
            msg = json.loads(watcher.recv())
            if msg["parent_header"].get("msg_id") == header["msg_id"]:
                reply = msg
        assert reply["msg_type"] == "execute_reply" and reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "Forbidden"
        # The reviewer sees the owner's step go by on iopub.
        execution = run(alice, sid, "print('watched')")
        seen = ""
        while "watched" not in seen:
            msg = json.loads(watcher.recv())
            if msg["msg_type"] == "stream":
                seen += msg["content"]["text"]
        assert execution["stdout"] == "watched\n"
    finally:
        watcher.close()
    assert run(alice, sid, "alice_secret")["result"] == "'only alice'"
    assert len(alice.get(f"/v1/sessions/{sid}/steps").json()["steps"]) == steps_before + 2
    denied = [e for e in rita.get(f"/v1/sessions/{sid}/events").json()["events"] if e["action"] == "access_denied"]
    assert denied and denied[-1]["details"]["code"] == "alice_secret = 'changed'" and denied[-1]["principal"].startswith("rita")


def test_an_agent_cannot_reach_anothers_kernel_by_id_through_either_face(people: dict[str, Any]) -> None:
    bob = people["clients"]["bob"]
    kid = people["session"]["kernel_id"]
    for method, path in (("GET", f"/api/kernels/{kid}"), ("DELETE", f"/api/kernels/{kid}"),
                         ("POST", f"/api/kernels/{kid}/restart"), ("POST", f"/api/kernels/{kid}/interrupt")):
        assert bob.request(method, path).status_code == 404
    assert run(people["clients"]["alice"], people["session"]["id"], "alice_secret")["result"] == "'only alice'"


# The policy itself: one table, the rules every face asks (gateway.access) -------------------

POLICY = [  # role, owns the session: may see, may change, may create, may loosen isolation
    ("agent", True, True, True, True, False),
    ("agent", False, False, False, True, False),
    ("reviewer", False, True, False, False, False),
    ("admin", False, True, True, True, True),
]


@pytest.mark.parametrize("role,owns,sees,changes,creates,loosens", POLICY)
def test_the_access_policy(role: str, owns: bool, sees: bool, changes: bool, creates: bool, loosens: bool) -> None:
    from gateway import access
    from gateway.auth import Principal
    from gateway.errors import Forbidden, NotFound
    from gateway.records import SessionRecord

    principal = Principal("me", role)
    row = SessionRecord("s_x", "k", "python3", "idle", "me" if owns else "someone-else", "2026", "2026")
    assert (access.may_see(principal, row.owner), access.may_change(principal, row.owner),
            access.may_create(principal), access.may_loosen_isolation(principal)) == (sees, changes, creates, loosens)
    assert access.may_end_from_jupyter(principal, row) is (role == "admin")
    assert access.may_end_from_jupyter(principal, dataclasses.replace(row, origin="jupyter")) is True
    if sees:
        assert access.check_seen(principal, "s_x", row) is row
    else:
        with pytest.raises(NotFound):  # a session one may not see does not exist for them
            access.check_seen(principal, "s_x", row)
    with pytest.raises(NotFound):
        access.check_seen(principal, "s_x", None)
    if changes:
        access.check_change(principal, "s_x", row)
    else:
        with pytest.raises(Forbidden, match="may read session 's_x' but not resume it"):
            access.check_change(principal, "s_x", row, "resume")
    if not creates:
        with pytest.raises(Forbidden, match="cannot fork them"):
            access.check_create(principal, "fork them")
