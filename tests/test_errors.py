"""Authentication and the error envelope on every route: clear JSON errors, nothing changed."""

from __future__ import annotations

import httpx
import pytest

from gateway.handlers import files, ops, sessions
from tests.conftest import GatewayProcess, error_code

SAMPLE_PATHS = {
    r"/v1/sessions": "/v1/sessions",
    "session": "/v1/sessions/s_doesnotexist",
}


def concrete(pattern: str, session_id: str) -> str:
    path = pattern.replace("(?P<session_id>[A-Za-z0-9_-]{1,64})", session_id)
    path = path.replace("(?P<path>.+)", "some/file.txt").replace("(?:replay)", "replay")
    return path


ALL_ROUTES = [pattern for pattern, _ in (*ops.routes, *sessions.routes, *files.routes)]
PUBLIC = [pattern for pattern, handler in (*ops.routes, *sessions.routes, *files.routes) if handler.public]


def test_only_health_and_the_api_document_are_public() -> None:
    assert PUBLIC == [r"/v1/health", r"/v1/openapi\.json"]


@pytest.mark.parametrize("pattern", [p for p in ALL_ROUTES if p not in PUBLIC])
def test_every_route_but_health_requires_a_token(gateway: GatewayProcess, pattern: str) -> None:
    path = concrete(pattern, "s_whatever")
    with httpx.Client(base_url=gateway.url) as anonymous:
        for method in ("GET", "POST", "PUT", "DELETE"):
            response = anonymous.request(method, path)
            if response.status_code == 405:
                assert error_code(response) == "method_not_allowed"
                continue
            assert response.status_code == 401, (method, path, response.text)
            assert error_code(response) == "missing_token"
        wrong = anonymous.get(path, headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code in (401, 405)
        if wrong.status_code == 401:
            assert error_code(wrong) == "invalid_token"


@pytest.mark.parametrize("pattern", [p for p in ALL_ROUTES if "session_id" in p])
def test_unknown_session_is_404_on_every_session_route(client: httpx.Client, pattern: str) -> None:
    path = concrete(pattern, "s_doesnotexist")
    for method in ("GET", "POST", "PUT", "DELETE"):
        response = client.request(method, path, json={} if method == "POST" else None)
        if response.status_code == 405:
            continue
        assert response.status_code == 404, (method, path, response.text)
        assert error_code(response) == "session_not_found"


def test_the_three_ways_to_pass_a_token(gateway: GatewayProcess) -> None:
    with httpx.Client(base_url=gateway.url) as anonymous:
        assert anonymous.get("/v1/sessions", headers={"Authorization": f"Bearer {gateway.token}"}).status_code == 200
        assert anonymous.get("/v1/sessions", headers={"Authorization": f"token {gateway.token}"}).status_code == 200
        assert anonymous.get("/v1/sessions", params={"token": gateway.token}).status_code == 200
        assert anonymous.get("/v1/health").json()["status"] == "ok"


def test_health_and_metrics(gateway: GatewayProcess, client: httpx.Client) -> None:
    health = httpx.get(gateway.url + "/v1/health").json()
    assert health["status"] == "ok" and health["version"]
    assert set(health["sessions"]) == {"live", "paused"}
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'agent_gateway_sessions{state="live"}' in metrics.text
    assert "agent_gateway_steps_total" in metrics.text


def test_unknown_route_and_wrong_method(client: httpx.Client) -> None:
    missing = client.get("/v1/nothing-here")
    assert missing.status_code == 404 and error_code(missing) == "route_not_found"
    wrong = client.patch("/v1/sessions")
    assert wrong.status_code == 405 and error_code(wrong) == "method_not_allowed"


def test_bad_bodies_get_their_own_errors_and_change_nothing(client: httpx.Client, session) -> None:
    sid = session["id"]
    url = f"/v1/sessions/{sid}/execute"
    cases = [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'{"code": 5}', "invalid_field"),
        (b'{"code": "1", "timeout": "soon"}', "invalid_field"),
        (b'{"code": "1", "timeout": -1}', "invalid_field"),
        (b'{"code": "1", "timeout": true}', "invalid_field"),
        (b'{"code": "1", "colour": "red"}', "unknown_field"),
        (b'{}', "missing_field"),
        (b'\xff\xfe', "invalid_json"),
    ]
    for body, code in cases:
        response = client.post(url, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (body, response.text)
        assert error_code(response) == code, body
    assert client.get(f"/v1/sessions/{sid}").json()["steps"] == 0
    assert client.get(f"/v1/sessions/{sid}/steps").json()["steps"] == []
    for body in (b'{"labels": {"a": 1}}', b'{"kernel": 3}', b'{"setup": ["x"]}', b'{"bogus": 1}'):
        response = client.post("/v1/sessions", content=body)
        assert response.status_code == 400, body


def test_tokens_never_reach_the_logs(gateway: GatewayProcess) -> None:
    with httpx.Client(base_url=gateway.url) as anonymous:
        anonymous.get("/v1/sessions", params={"token": gateway.token})
        anonymous.get("/v1/sessions", params={"token": "wrong-token-value-xyz"})
        anonymous.get("/v1/sessions", headers={"Authorization": "Bearer another-wrong-token"})
    logs = gateway.stderr_text() + gateway.stdout_text()
    assert "token=[redacted]" in logs
    for secret in (gateway.token, "wrong-token-value-xyz", "another-wrong-token"):
        assert secret not in logs
