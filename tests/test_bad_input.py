"""Hostile input on every route of both faces: never a 500, nothing created or changed.

The attacks: lone surrogates (sent as raw JSON text, since JSON encoders refuse them), JSON
nested 100,000 deep, over-long fields, NUL bytes, percent-encoded bytes that are not UTF-8 in
query parameters, path arguments and form fields, and tokens under encoded parameter names.
Odd but valid Unicode (bidirectional overrides, joiners, combining marks, emoji, U+FFFF) is
kept byte-exact. Each table row is one route and field: a new route is one more row.
"""

from __future__ import annotations

import base64
import json
import re
import sqlite3
import struct
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import httpx
import pytest

from gateway.audit import GENESIS, event_hash
from gateway.handlers.base import scrub
from gateway.inputs import JSON_DEPTH_MAX, LABEL_KEY_MAX, LABEL_VALUE_MAX, LABELS_MAX
from gateway.kernels import ENV_TOTAL_MAX, ENV_VALUE_MAX, ENV_VARIABLES_MAX, KERNEL_NAME_MAX
from tests.conftest import GatewayProcess, error_code, run, start_gateway
from tests.test_kernel_websocket import V1, collect, connect, execute_request, stdout_of

SURROGATES = ["\\ud800", "\\udfff", "\\ud83d", "x\\udc00y"]  # JSON escapes of lone surrogates
NOT_UTF8 = ["%ED%A0%80", "%FF", "a%C3"]  # an encoded lone surrogate, a stray byte, a cut sequence
ODD = ("\u202eevil\u202c \u2067iso\u2069 \u200d e\u0301\u0308 \U0001F600 \U0001F469\u200d\U0001F469\u200d\U0001F467 "
       "\uffff \u00ad \ufeff \u0627\u0644\u0639\u0631\u0628\u064a\u0629")
DEEP = 100_000
XSRF_FIELD = re.compile(r'name="_xsrf" value="([^"]+)"')

# -- the routes under attack ------------------------------------------------------------------
# {sid} and {kid} are the target session's id and kernel id; "§" marks where the attack goes.

SURROGATE_BODIES = [  # (method, path, JSON text, the field the error names)
    ("POST", "/v1/sessions", '{"kernel": "§"}', "kernel"),
    ("POST", "/v1/sessions", '{"labels": {"§": "v"}}', "labels"),
    ("POST", "/v1/sessions", '{"labels": {"k": "§"}}', "labels"),
    ("POST", "/v1/sessions", '{"env": {"§": "v"}}', "env"),
    ("POST", "/v1/sessions", '{"env": {"A": "§"}}', "env"),
    ("POST", "/v1/sessions", '{"setup": "x = 1  # §"}', "setup"),
    ("POST", "/v1/sessions", '{"sandbox": "§"}', "sandbox"),
    ("POST", "/v1/sessions", '{"limits": {"memory": "1§"}}', "limits"),
    ("POST", "/v1/sessions", '{"labels": {"k": "v"}, "§": 1}', None),
    ("POST", "/v1/sessions", '{"egress": ["§"]}', "egress"),
    ("PUT", "/v1/sessions/{sid}/egress", '{"rules": ["pypi.org:443", "§"]}', "rules"),
    ("PUT", "/v1/sessions/{sid}/egress", '{"rules": [], "§": 1}', None),
    ("POST", "/v1/sessions/{sid}/execute", '{"code": "print(1)  # §"}', "code"),
    ("POST", "/v1/sessions/{sid}/execute", '{"code": "1", "§": 1}', None),
    *[("POST", f"/v1/sessions/{{sid}}/{action}", '{"why": ["§"]}', "why")
      for action in ("interrupt", "restart", "pause", "resume", "fork", "replay")],
    ("POST", "/api/kernels", '{"name": "§"}', "name"),
    ("POST", "/api/kernels", '{"env": {"KERNEL_§": "v"}}', "env"),
    ("POST", "/api/kernels", '{"env": {"KERNEL_X": "§"}}', "env"),
    ("POST", "/api/kernels", '{"path": "§"}', "path"),
    ("POST", "/api/kernels/{kid}/interrupt", '{"why": "§"}', "why"),
    ("POST", "/api/kernels/{kid}/restart", '{"why": {"deep": ["§"]}}', "why"),
]
BODY_ROUTES = sorted({(method, path) for method, path, _, _ in SURROGATE_BODIES})

TOO_LONG = [  # (method, path, JSON body, the field the error names)
    ("POST", "/v1/sessions", {"labels": {"k" * (LABEL_KEY_MAX + 1): "v"}}, "labels"),
    ("POST", "/v1/sessions", {"labels": {"k": "v" * (LABEL_VALUE_MAX + 1)}}, "labels"),
    ("POST", "/v1/sessions", {"labels": {f"k{i}": "v" for i in range(LABELS_MAX + 1)}}, "labels"),
    ("POST", "/v1/sessions", {"env": {"A" * 129: "v"}}, "env"),
    ("POST", "/v1/sessions", {"env": {"A": "v" * (ENV_VALUE_MAX + 1)}}, "env"),
    ("POST", "/v1/sessions", {"env": {f"A{i}": "v" for i in range(ENV_VARIABLES_MAX + 1)}}, "env"),
    ("POST", "/v1/sessions", {"env": {f"A{i}": "v" * (ENV_TOTAL_MAX // 50) for i in range(60)}}, "env"),
    ("POST", "/v1/sessions", {"kernel": "k" * (KERNEL_NAME_MAX + 1)}, "kernel"),
    ("PUT", "/v1/sessions/{sid}/egress", {"rules": ["a" * 5000]}, "rules"),
    ("PUT", "/v1/sessions/{sid}/egress", {"rules": ["a.org"] * 65}, "rules"),
    ("POST", "/v1/sessions", {"egress": [f"h{i}.org" for i in range(65)]}, "egress"),
    ("POST", "/api/kernels", {"name": "k" * (KERNEL_NAME_MAX + 1)}, "kernel"),
    ("POST", "/api/kernels", {"env": {"KERNEL_X": "v" * (ENV_VALUE_MAX + 1)}}, "env"),
]

ODD_BODIES = [  # valid JSON with NUL bytes or odd Unicode: (method, path, body, status, error code or None)
    ("POST", "/v1/sessions", {"env": {"A": "a\u0000b"}}, 400, "invalid_field"),
    ("POST", "/v1/sessions", {"env": {"A\u0000": "v"}}, 400, "invalid_field"),
    ("POST", "/v1/sessions", {"env": {"A\n": "v"}}, 400, "invalid_field"),
    ("POST", "/v1/sessions", {"env": {ODD: "v"}}, 400, "invalid_field"),
    ("POST", "/v1/sessions", {"kernel": "python3\u0000"}, 400, "unknown_kernel"),
    ("POST", "/v1/sessions", {"kernel": ODD}, 400, "unknown_kernel"),
    ("POST", "/v1/sessions", {"sandbox": "none\u0000"}, 400, "invalid_field"),
    ("POST", "/v1/sessions", {"limits": {"memory": ODD}}, 400, "invalid_field"),
    ("POST", "/v1/sessions", {"limits": {ODD: 1}}, 400, "invalid_field"),
    ("POST", "/v1/sessions", {"limits": {"memory": "1" + "0" * 400 + "GiB"}}, 400, "invalid_field"),
    ("POST", "/v1/sessions", {"limits": {"cpu": "1e999"}}, 400, "invalid_field"),
    ("POST", "/v1/sessions/{sid}/execute", {"code": "1", "timeout": "\u0000"}, 400, "invalid_field"),
    ("POST", "/v1/sessions/{sid}/interrupt", {ODD: 1}, 400, "unknown_field"),
    ("PUT", "/v1/sessions/{sid}/egress", {"rules": [ODD]}, 400, "invalid_field"),
    ("PUT", "/v1/sessions/{sid}/egress", {"rules": ["pypi.org\u0000"]}, 400, "invalid_field"),
    ("PUT", "/v1/sessions/{sid}/egress", {"rules": ["pypi.org:443\u202e"]}, 400, "invalid_field"),
    ("PUT", "/v1/sessions/{sid}/egress", {"rules": ["xn--e1a.org:\u0663"]}, 400, "invalid_field"),
    ("PUT", "/v1/sessions/{sid}/egress", {"rules": [{"host": "pypi.org"}]}, 400, "invalid_field"),
    ("PUT", "/v1/sessions/{sid}/egress", {"rules": None}, 400, "missing_field"),
    ("POST", "/v1/sessions", {"egress": ["*.\u0000"]}, 400, "invalid_field"),
    ("POST", "/api/kernels", {"name": "python3\u0000"}, 400, "unknown_kernel"),
    ("POST", "/api/kernels", {"name": ODD}, 400, "unknown_kernel"),
]

NUMBERS = [  # JSON numbers no field can hold (a float() of them would overflow)
    ("POST", "/v1/sessions/{sid}/execute", b'{"code": "1", "timeout": 1e999}'),
    ("POST", "/v1/sessions/{sid}/execute", b'{"code": "1", "timeout": -1e400}'),
    ("POST", "/v1/sessions/{sid}/execute", b'{"code": "1", "timeout": 1' + b"0" * 400 + b"}"),
    ("POST", "/v1/sessions", b'{"limits": {"memory": 1e999}}'),
    ("POST", "/v1/sessions", b'{"limits": {"cpu": 1' + b"0" * 400 + b"}}"),
]

QUERY_ROUTES = [  # (method, path, parameter), each read (or not) by the route
    ("GET", "/v1/health", "x"),
    ("GET", "/metrics", "x"),
    ("GET", "/v1/sessions", "state"),
    ("GET", "/v1/sessions", "label"),
    ("GET", "/v1/sessions", "owner"),
    ("GET", "/v1/sessions", "limit"),
    ("GET", "/v1/sessions", "cursor"),
    ("POST", "/v1/sessions", "x"),
    ("GET", "/v1/sessions/{sid}", "x"),
    ("DELETE", "/v1/sessions/{sid}", "x"),
    ("POST", "/v1/sessions/{sid}/execute", "x"),
    ("POST", "/v1/sessions/{sid}/restart", "x"),
    ("PUT", "/v1/sessions/{sid}/egress", "x"),
    ("GET", "/v1/sessions/{sid}/files", "path"),
    ("GET", "/v1/sessions/{sid}/steps", "x"),
    ("GET", "/v1/sessions/{sid}/notebook", "download"),
    ("GET", "/v1/sessions/{sid}/events", "x"),
    ("GET", "/api", "x"),
    ("GET", "/api/kernelspecs", "x"),
    ("GET", "/api/kernels", "x"),
    ("POST", "/api/kernels", "x"),
    ("GET", "/api/kernels/{kid}", "x"),
    ("DELETE", "/api/kernels/{kid}", "terminate"),
    ("POST", "/api/kernels/{kid}/interrupt", "x"),
    ("GET", "/api/kernels/{kid}/channels", "session_id"),
]
UI_QUERY_ROUTES = [
    ("/ui/sessions", "state"), ("/ui/sessions", "owner"), ("/ui/sessions", "label"), ("/ui/sessions", "cursor"),
    ("/ui/sessions/{sid}", "x"), ("/ui/sessions/{sid}/notebook.ipynb", "x"), ("/ui/login", "next"),
]
PATH_ROUTES = [  # (method, path with "§" for a path argument)
    ("GET", "/v1/sessions/{sid}/files/§"),
    ("PUT", "/v1/sessions/{sid}/files/§"),
    ("PUT", "/v1/sessions/{sid}/files/dir/§/file.txt"),
    ("DELETE", "/v1/sessions/{sid}/files/§"),
    ("GET", "/ui/sessions/{sid}/files/§"),
]
ODD_QUERIES = [  # valid but odd query values: (path, parameters, status, error code or None)
    ("/v1/sessions", {"label": f"suite:{ODD}"}, 200, None),
    ("/v1/sessions", {"label": "a\u0000b:\u0000"}, 200, None),
    ("/v1/sessions", {"owner": ODD}, 200, None),
    ("/v1/sessions", {"state": ODD}, 400, "invalid_query"),
    ("/v1/sessions", {"state": "idle\u202e"}, 400, "invalid_query"),
    ("/v1/sessions", {"limit": "\u00b2"}, 400, "invalid_query"),
    ("/v1/sessions", {"limit": "\u0663"}, 400, "invalid_query"),
    ("/v1/sessions", {"limit": "9" * 5000}, 400, "invalid_query"),
    ("/v1/sessions", {"cursor": ODD}, 400, "invalid_query"),
    ("/v1/sessions", {"cursor": base64.urlsafe_b64encode(b'["\\ud800", "s_x"]').decode()}, 400, "invalid_query"),
    ("/v1/sessions", {"cursor": "x" * 5000}, 400, "invalid_query"),
    ("/ui/sessions", {"label": f"k:{ODD}", "owner": ODD}, 200, None),
    ("/ui/sessions", {"cursor": base64.urlsafe_b64encode(b'["\\ud800", "s_x"]').decode()}, 400, "invalid_query"),
]


def concrete(path: str, target: dict[str, str]) -> str:
    return path.replace("{sid}", target["sid"]).replace("{kid}", target["kid"])


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target(client: httpx.Client) -> Iterator[dict[str, str]]:
    """The session (and kernel) the attacks aim at, with one step and one file; ended afterwards."""
    created = client.post("/v1/sessions", json={"labels": {"suite": "bad_input"}})
    assert created.status_code == 201, created.text
    session = created.json()
    run(client, session["id"], "x = 41")
    assert client.put(f"/v1/sessions/{session['id']}/files/kept.txt", content=b"kept").status_code in (200, 201)
    yield {"sid": session["id"], "kid": session["kernel_id"]}
    client.delete(f"/v1/sessions/{session['id']}")


def kernel_processes(gateway: GatewayProcess) -> set[int]:
    """The gateway's child processes once the warm pool has stopped starting kernels."""
    pids = gateway.kernel_pids()
    for _ in range(300):
        time.sleep(0.05)
        again = gateway.kernel_pids()
        if again == pids:
            return pids
        pids = again
    return pids


def everything(client: httpx.Client, target: dict[str, str]) -> dict[str, Any]:
    """What an attack must leave as it was: the sessions, the kernels, the target's steps, files
    and isolation (its egress rules)."""
    sessions = client.get("/v1/sessions", params={"limit": 500}).json()["sessions"]
    return {
        "sessions": sorted((s["id"], s["state"], s["steps"], json.dumps(s["labels"])) for s in sessions),
        "kernels": sorted(k["id"] for k in client.get("/api/kernels").json()),
        "steps": len(client.get(f"/v1/sessions/{target['sid']}/steps").json()["steps"]),
        "files": sorted(f["path"] for f in client.get(f"/v1/sessions/{target['sid']}/files").json()["files"]),
        "isolation": client.get(f"/v1/sessions/{target['sid']}").json().get("isolation"),
    }


@pytest.fixture
def unchanged(gateway: GatewayProcess, client: httpx.Client, target: dict[str, str]) -> Iterator[None]:
    """Checks, after the test, that nothing was created or changed and no kernel was started."""
    before, processes = everything(client, target), kernel_processes(gateway)
    yield
    assert everything(client, target) == before
    assert kernel_processes(gateway) <= processes
    assert run(client, target["sid"], "print(x + 1)")["stdout"] == "42\n"  # the kernel kept its variables


def assert_error(response: httpx.Response, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    assert error_code(response) == code, response.text[:500]
    details: dict[str, Any] = response.json()["error"]["details"]
    if field is not None:
        assert field in (details.get("field"), details.get("parameter")), details
    return details


def assert_error_page(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("text/html")
    assert f"({code})" in response.text


# -- JSON bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize(("method", "path", "body", "field"), SURROGATE_BODIES)
def test_a_lone_surrogate_anywhere_in_a_body_is_invalid_field(client: httpx.Client, target: dict[str, str],
                                                              unchanged: None, method: str, path: str, body: str,
                                                              field: str | None, surrogate: str) -> None:
    response = client.request(method, concrete(path, target), content=body.replace("§", surrogate).encode(),
                              headers={"Content-Type": "application/json"})
    details = assert_error(response, 400, "invalid_field", field)
    assert details["path"].startswith(field) if field else details["path"] == details["field"]
    assert "lone surrogate" in response.json()["error"]["message"]


@pytest.mark.parametrize("shape", ["array", "object", "in_a_field"])
@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
def test_json_nested_100000_deep_is_invalid_json(client: httpx.Client, target: dict[str, str], unchanged: None,
                                                 method: str, path: str, shape: str) -> None:
    body = {"array": "[" * DEEP + "]" * DEEP,
            "object": '{"a":' * DEEP + "1" + "}" * DEEP,
            "in_a_field": '{"labels": {"k": ' + "[" * DEEP + "]" * DEEP + "}}"}[shape]
    response = client.request(method, concrete(path, target), content=body.encode())
    details = assert_error(response, 400, "invalid_json")
    assert details["depth_limit"] == JSON_DEPTH_MAX


def test_the_depth_limit_counts_arrays_and_objects_not_brackets_in_strings(client: httpx.Client,
                                                                          target: dict[str, str]) -> None:
    kid = target["kid"]
    at_limit = '{"x": ' + "[" * (JSON_DEPTH_MAX - 1) + "]" * (JSON_DEPTH_MAX - 1) + "}"
    assert client.post(f"/api/kernels/{kid}/interrupt", content=at_limit.encode()).status_code == 204
    over = '{"x": ' + "[" * JSON_DEPTH_MAX + "]" * JSON_DEPTH_MAX + "}"
    assert_error(client.post(f"/api/kernels/{kid}/interrupt", content=over.encode()), 400, "invalid_json")
    brackets = "[{" * DEEP + '\\"\\\\'
    step = run(client, target["sid"], f"s = \"{brackets}\"\nprint(len(s))")
    assert step["status"] == "ok" and step["stdout"] == f"{len(brackets) - 2}\n"


@pytest.mark.parametrize(("method", "path", "body", "field"), TOO_LONG)
def test_over_long_fields_are_invalid_field(client: httpx.Client, target: dict[str, str], unchanged: None,
                                            method: str, path: str, body: dict[str, Any], field: str) -> None:
    response = client.request(method, concrete(path, target), json=body)
    assert_error(response, 400, "invalid_field", field)
    assert len(response.text) < 2000  # the over-long value is not echoed back


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), ODD_BODIES)
def test_nul_bytes_and_odd_unicode_in_fields_that_refuse_them(client: httpx.Client, target: dict[str, str],
                                                              unchanged: None, method: str, path: str,
                                                              body: dict[str, Any], status: int, code: str) -> None:
    assert_error(client.request(method, concrete(path, target), json=body), status, code)


@pytest.mark.parametrize(("method", "path", "body"), NUMBERS)
def test_numbers_too_large_for_any_field_are_invalid_json(client: httpx.Client, target: dict[str, str],
                                                          unchanged: None, method: str, path: str, body: bytes) -> None:
    assert_error(client.request(method, concrete(path, target), content=body), 400, "invalid_json")


def test_labels_and_env_up_to_their_limits_are_accepted(client: httpx.Client) -> None:
    labels = {f"{i:03d}" + "k" * (LABEL_KEY_MAX - 3): "v" * LABEL_VALUE_MAX for i in range(LABELS_MAX)}
    env = {"BIG": "e" * ENV_VALUE_MAX, **{f"A{i}": "v" for i in range(ENV_VARIABLES_MAX - 1)}}
    created = client.post("/v1/sessions", json={"labels": labels, "env": env})
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    try:
        assert client.get(f"/v1/sessions/{sid}").json()["labels"] == labels
        assert run(client, sid, "import os; print(len(os.environ['BIG']))")["stdout"] == f"{ENV_VALUE_MAX}\n"
        assert client.get(f"/ui/sessions/{sid}").status_code == 200
    finally:
        client.delete(f"/v1/sessions/{sid}")


def test_a_setup_that_cannot_be_sent_leaves_no_session_and_no_kernel(gateway: GatewayProcess, client: httpx.Client,
                                                                     target: dict[str, str], unchanged: None) -> None:
    response = client.post("/v1/sessions", content=b'{"setup": "print(1)\\n\\udc80", "labels": {"a": "b"}}')
    assert_error(response, 400, "invalid_field", "setup")


def test_a_setup_that_fails_in_the_kernel_is_step_0_of_a_live_session(client: httpx.Client) -> None:
    created = client.post("/v1/sessions", json={"setup": "x = 1\u0000"})
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    try:
        steps = client.get(f"/v1/sessions/{sid}/steps").json()["steps"]
        assert [(s["step"], s["status"], s["error"]["name"]) for s in steps] == [(0, "error", "SyntaxError")]
        assert client.get(f"/v1/sessions/{sid}").json()["state"] == "idle"
    finally:
        client.delete(f"/v1/sessions/{sid}")


def test_odd_unicode_runs_and_comes_back_byte_exact(client: httpx.Client) -> None:
    labels = {"odd": ODD, ODD: "key", "nul": "a\u0000b", "long": "x" * LABEL_VALUE_MAX}
    created = client.post("/v1/sessions", json={"labels": labels, "env": {"ODD": ODD}})
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    try:
        code = (f"s = '''{ODD}'''\nprint(s)\nimport os, sys\nprint(os.environ['ODD'] == s)\n"
                "print('a\\x00b', file=sys.stderr)")
        step = run(client, sid, code)
        assert step["status"] == "ok"
        assert step["stdout"] == f"{ODD}\nTrue\n"
        assert step["stderr"] == "a\u0000b\n"
        notebook = client.get(f"/v1/sessions/{sid}/notebook").json()
        cell = notebook["cells"][-1]
        assert "".join(cell["source"]) == code
        assert "".join(cell["outputs"][0]["text"]) == f"{ODD}\nTrue\n"
        assert client.get(f"/v1/sessions/{sid}").json()["labels"] == labels
        listed = client.get("/v1/sessions", params={"label": f"odd:{ODD}"}).json()["sessions"]
        assert [s["id"] for s in listed] == [sid]
        page = client.get(f"/ui/sessions/{sid}")
        assert page.status_code == 200
        assert "\u202e" not in page.text and "\\u202e" in page.text  # shown, not obeyed
        assert "\U0001F469\u200d\U0001F469\u200d\U0001F467" in page.text and "a\\u0000b" in page.text
        # files the agent named with bytes that are not UTF-8, or with an override, are listed and shown
        assert run(client, sid, "open(b'bad\\xff.txt', 'w').close(); open('\\u202eevil.txt', 'w').close()")[
            "status"] == "ok"
        assert client.get(f"/v1/sessions/{sid}/files").status_code == 200
        page = client.get(f"/ui/sessions/{sid}")
        assert page.status_code == 200 and "bad\\udcff.txt" in page.text and "\\u202eevil.txt" in page.text
    finally:
        client.delete(f"/v1/sessions/{sid}")


# -- query parameters, path arguments, forms --------------------------------------------------


@pytest.mark.parametrize("bad", NOT_UTF8)
@pytest.mark.parametrize("in_name", [False, True], ids=["value", "name"])
@pytest.mark.parametrize(("method", "path", "parameter"), QUERY_ROUTES)
def test_query_parameters_that_are_not_utf8_are_invalid_query(client: httpx.Client, target: dict[str, str],
                                                              unchanged: None, method: str, path: str,
                                                              parameter: str, in_name: bool, bad: str) -> None:
    query = f"{parameter}{bad}=1" if in_name else f"{parameter}={bad}"
    body = b"{}" if method == "POST" else None
    response = client.request(method, f"{concrete(path, target)}?{query}", content=body)
    details = assert_error(response, 400, "invalid_query")
    assert details["parameter"].startswith(parameter)


@pytest.mark.parametrize("bad", NOT_UTF8)
@pytest.mark.parametrize(("path", "parameter"), UI_QUERY_ROUTES)
def test_page_query_parameters_that_are_not_utf8_get_an_error_page(client: httpx.Client, target: dict[str, str],
                                                                   unchanged: None, path: str, parameter: str,
                                                                   bad: str) -> None:
    assert_error_page(client.get(f"{concrete(path, target)}?{parameter}={bad}"), 400, "invalid_query")


@pytest.mark.parametrize("bad", NOT_UTF8)
@pytest.mark.parametrize(("method", "path"), PATH_ROUTES)
def test_path_arguments_that_are_not_utf8_are_invalid_field(client: httpx.Client, target: dict[str, str],
                                                            unchanged: None, method: str, path: str, bad: str) -> None:
    body = b"content" if method == "PUT" else None
    response = client.request(method, concrete(path, target).replace("§", bad), content=body)
    if path.startswith("/ui/"):
        assert_error_page(response, 400, "invalid_field")
    else:
        assert_error(response, 400, "invalid_field", "path")


def test_a_session_id_that_is_not_utf8_is_no_route(client: httpx.Client, unchanged: None) -> None:
    for bad in NOT_UTF8:
        assert_error(client.get(f"/v1/sessions/{bad}"), 404, "route_not_found")
        assert_error(client.post(f"/v1/sessions/s_{bad}/execute", json={"code": "1"}), 404, "route_not_found")


@pytest.mark.parametrize(("path", "parameters", "status", "code"), ODD_QUERIES)
def test_odd_but_valid_query_values(client: httpx.Client, target: dict[str, str], unchanged: None, path: str,
                                    parameters: dict[str, str], status: int, code: str | None) -> None:
    response = client.get(path, params=parameters)
    if code is None:
        assert response.status_code == status, response.text[:500]
    elif path.startswith("/ui/"):
        assert_error_page(response, status, code)
    else:
        assert_error(response, status, code)


@contextmanager
def login_form(gateway: GatewayProcess) -> Iterator[tuple[httpx.Client, str]]:
    """A client without a token header, holding the XSRF cookie and the login form's XSRF value."""
    with httpx.Client(base_url=gateway.url, timeout=60) as browser:
        match = XSRF_FIELD.search(browser.get("/ui/login").text)
        assert match, "no XSRF field"
        yield browser, match.group(1)


@pytest.mark.parametrize("bad", NOT_UTF8)
@pytest.mark.parametrize("form", ["token={bad}&next=/ui/sessions", "token={token}&next=/ui/{bad}",
                                  "token={token}&{bad}=1"])
def test_form_fields_that_are_not_utf8_are_invalid_field(gateway: GatewayProcess, unchanged: None, form: str,
                                                         bad: str) -> None:
    with login_form(gateway) as (browser, xsrf):
        body = form.format(bad=bad, token=quote(gateway.token)) + f"&_xsrf={quote(xsrf, safe='')}"
        response = browser.post("/ui/login", content=body.encode(),
                                headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert_error_page(response, 400, "invalid_field")
        assert "agent_gateway_login" not in browser.cookies


def test_logout_form_fields_that_are_not_utf8_are_invalid_field(gateway: GatewayProcess) -> None:
    with login_form(gateway) as (browser, xsrf):
        login = browser.post("/ui/login", data={"token": gateway.token, "_xsrf": xsrf})
        assert login.status_code == 303
        response = browser.post("/ui/logout", content=f"_xsrf={quote(xsrf, safe='')}&x=%FF".encode(),
                                headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert_error_page(response, 400, "invalid_field")
        assert browser.get("/ui/sessions").status_code == 200  # still logged in


# -- kernel websocket frames -----------------------------------------------------------------


def v1_frame(channel: str, msg: dict[str, Any], content: bytes | None = None) -> bytes:
    """A v1-protocol frame; ``content`` replaces the message's content bytes when given."""
    parts = [channel.encode(), *(json.dumps(msg[key]).encode() for key in ("header", "parent_header", "metadata")),
             content if content is not None else json.dumps(msg["content"]).encode()]
    offsets = [8 * (len(parts) + 2)]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    return struct.pack(f"<{len(offsets) + 1}Q", len(offsets), *offsets) + b"".join(parts)


def bad_json_frames() -> list[str]:
    surrogate = json.dumps(execute_request("print(1)  # @@")).replace("@@", "\\ud800")
    return [surrogate, "[" * DEEP + "]" * DEEP, '{"header": ' + "[" * DEEP + "]" * DEEP + "}",
            json.dumps(execute_request("1")).replace('"silent": false', '"silent": 1' + "0" * 100)]


@pytest.mark.parametrize("protocol", ["json", "v1"])
def test_websocket_frames_with_bad_text_or_depth_are_dropped_and_the_socket_kept(
        gateway: GatewayProcess, client: httpx.Client, target: dict[str, str], protocol: str) -> None:
    steps_before = client.get(f"/v1/sessions/{target['sid']}/steps").json()["steps"]
    ws = connect(gateway, target["kid"], subprotocols=[V1] if protocol == "v1" else None)
    try:
        if protocol == "json":
            for frame in bad_json_frames():
                ws.send(frame)
        else:
            bad = execute_request("print(1)")
            ws.send_binary(v1_frame("shell", bad, b'{"code": "print(1)  # \\ud800", "silent": false}'))
            ws.send_binary(v1_frame("shell", bad, b"[" * DEEP + b"]" * DEEP))
            ws.send_binary(v1_frame("shell", {**bad, "header": ["not", "an", "object"]}))
        good = execute_request("print('still here')")
        if protocol == "json":
            ws.send(json.dumps(good))
            assert stdout_of(collect(ws, good["header"]["msg_id"])) == "still here\n"
        else:
            ws.send_binary(v1_frame("shell", good))
            deadline = time.monotonic() + 30
            while len(client.get(f"/v1/sessions/{target['sid']}/steps").json()["steps"]) == len(steps_before):
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        ws.close()
    steps = client.get(f"/v1/sessions/{target['sid']}/steps").json()["steps"]
    assert [s["code"] for s in steps[len(steps_before):]] == ["print('still here')"]
    assert steps[-1]["step"] == steps_before[-1]["step"] + 1  # no step number lost to a dropped frame
    assert "handlers/kernel_ws.py" not in gateway.stderr_text()  # no traceback through the websocket handler


# -- tokens under encoded names ---------------------------------------------------------------

TOKEN_NAMES = ["token", "tok%65n", "%74oken", "%74%6F%6B%65%6E", "%74%6f%6b%65%6e"]
REDACTED_ONLY = ["TOKEN", "To%4Ben", "%54OKEN"]  # not taken as a token (names are case-sensitive), still redacted


def every_spelling(value: str) -> list[str]:
    return [value, quote(value, safe=""), "".join(f"%{b:02X}" for b in value.encode()),
            "".join(f"%{b:02x}" for b in value.encode())]


def test_a_token_under_an_encoded_name_is_accepted_and_never_logged(gateway: GatewayProcess) -> None:
    secret = gateway.token
    with httpx.Client(base_url=gateway.url) as anonymous:
        for name in TOKEN_NAMES:
            for value in every_spelling(secret)[1:3]:
                assert anonymous.get(f"/v1/sessions?limit=1&{name}={value}").status_code == 200, name
                assert anonymous.get(f"/nowhere?{name}={value}").status_code == 404
                assert anonymous.get(f"/v1/sessions?limit=x&{name}={value}").status_code == 400
                assert anonymous.get(f"/v1/sessions?{name}={value}&x=%FF").status_code == 400
        for name in REDACTED_ONLY:
            assert anonymous.get(f"/v1/sessions?{name}={secret}").status_code == 401
    time.sleep(0.2)
    logs = gateway.stderr_text() + gateway.stdout_text()
    assert "tok%65n=[redacted]" in logs and "%74oken=[redacted]" in logs and "TOKEN=[redacted]" in logs
    for spelling in every_spelling(secret):
        assert spelling not in logs


@pytest.mark.parametrize(("uri", "scrubbed"), [
    ("/v1/sessions?token=abc", "/v1/sessions?token=[redacted]"),
    ("/v1/sessions?a=1&tok%65n=abc&b=2", "/v1/sessions?a=1&tok%65n=[redacted]&b=2"),
    ("/x?%74oken=%61bc", "/x?%74oken=[redacted]"),
    ("/x?ToKeN=abc&token", "/x?ToKeN=[redacted]&token=[redacted]"),
    ("/x?token=a&token=b", "/x?token=[redacted]&token=[redacted]"),
    ("/x?tokens=abc&xtoken=abc", "/x?tokens=abc&xtoken=abc"),
    ("/x?next=/ui&&token=abc#frag", "/x?next=/ui&&token=[redacted]"),
    ("/x", "/x"),
])
def test_the_log_scrubber_reads_parameter_names_decoded(uri: str, scrubbed: str) -> None:
    assert scrub(uri) == scrubbed


# -- stored values ----------------------------------------------------------------------------

STORED_LABELS = {"surrogate": "a\ud800b", "\udfff": "key", "rtl": ODD, "nul": "a\u0000b", "long": "L" * 10_000,
                 "control": "\u001b[31mred\u0007"}


def store_odd_session(data_dir: Path, session_id: str) -> None:
    """Write a session with odd values straight into a stopped gateway's store: labels, a step
    (code and outputs) and an audit event, as JSON with ``\\ud800`` escapes like the store's own."""
    with sqlite3.connect(data_dir / "gateway.db") as db:
        db.execute("INSERT INTO sessions (id, kernel_id, kernel, state, owner, labels, created_at, last_activity, "
                   "steps, reason, ended_at, origin) VALUES (?, ?, 'python3', 'terminated', 'admin', ?, "
                   "'2030-01-01T00:00:00.000000Z', '2030-01-01T00:00:00.000000Z', 1, ?, "
                   "'2030-01-01T00:00:01.000000Z', 'agent')",
                   [session_id, f"00000000-0000-0000-0000-{session_id[-12:]}", json.dumps(STORED_LABELS),
                    f"stopped {ODD} \u0000"])
        outputs = [{"output_type": "stream", "name": "stdout", "text": "out \ud800 " + ODD},
                   {"output_type": "execute_result", "execution_count": 1, "metadata": {},
                    "data": {"text/plain": "\udc80", "text/html": f"<b>{ODD}\ud800</b>"}}]
        db.execute("INSERT INTO steps (session_id, step, seq, execution_count, code, status, stdout, outputs, "
                   "started_at, finished_at, duration_ms, truncated, source, principal) VALUES "
                   "(?, 1, 1, 1, ?, 'ok', ?, ?, '2030-01-01T00:00:00Z', '2030-01-01T00:00:00Z', 1.0, 0, 'agent', "
                   "'admin')", [session_id, f"print({ODD!r})\u0000", ODD, json.dumps(outputs)])
        last_id, last_hash = db.execute("SELECT id, hash FROM events ORDER BY id DESC LIMIT 1").fetchone() or (
            0, GENESIS)
        event = {"id": last_id + 1, "session_id": session_id, "seq": 2, "at": "2030-01-01T00:00:00Z",
                 "principal": "admin", "action": "session_created", "details": json.dumps({"labels": STORED_LABELS})}
        db.execute("INSERT INTO events (id, session_id, seq, at, principal, action, details, prev_hash, hash) "
                   "VALUES (:id, :session_id, :seq, :at, :principal, :action, :details, :prev, :hash)",
                   {**event, "prev": last_hash, "hash": event_hash(last_hash, event)})


def test_stored_odd_values_never_break_a_page_or_a_listing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = start_gateway(data_dir)
    assert first.stop() == 0
    session_id = "s_oddvalues000000"
    store_odd_session(data_dir, session_id)
    gateway = start_gateway(data_dir)
    try:
        with gateway.client() as client:
            listed = client.get("/v1/sessions")
            assert listed.status_code == 200
            assert [s["labels"] for s in listed.json()["sessions"] if s["id"] == session_id] == [STORED_LABELS]
            one = client.get(f"/v1/sessions/{session_id}")
            assert one.status_code == 200 and one.json()["labels"] == STORED_LABELS
            assert client.get("/v1/sessions", params={"label": "rtl:" + ODD}).json()["sessions"][0]["id"] == session_id
            for page in ("/ui/sessions", f"/ui/sessions/{session_id}", f"/ui/sessions?label=rtl:{quote(ODD)}"):
                response = client.get(page)
                assert response.status_code == 200, (page, response.text[:500])
                assert "\\ud800" in response.text and "\u202e" not in response.text
            session_page = client.get(f"/ui/sessions/{session_id}").text
            assert "out \\ud800" in session_page and "\\u001b[31mred\\u0007" in session_page
            assert client.get(f"/v1/sessions/{session_id}/steps").status_code == 200
            assert client.get(f"/v1/sessions/{session_id}/events").status_code == 200
            assert client.get(f"/v1/sessions/{session_id}/notebook").status_code == 200
            assert client.get(f"/ui/sessions/{session_id}/notebook.ipynb").status_code == 200
    finally:
        assert gateway.stop() == 0
