"""The OpenAPI 3.1 document at GET /v1/openapi.json: made from the routes' own definitions, it
agrees with docs/api.md, with the SDK's calls and with what the handlers accept; and a
property-based run driven by it (schemathesis) against the live gateway finds no 500 and no
answer that breaks it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings, strategies
from schemathesis import checks

from gateway.api_spec import Body, openapi_document
from gateway.client import calls
from gateway.server import ROUTES
from tests.conftest import GatewayProcess

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = 12


@pytest.fixture(scope="module")
def document(gateway: GatewayProcess) -> dict[str, Any]:
    answer = httpx.get(f"{gateway.url}/v1/openapi.json", timeout=30)  # no token needed
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    served: dict[str, Any] = answer.json()
    return served


def template_of(path: str, document: dict[str, Any]) -> str:
    """The document's path template a concrete path falls under."""
    for template in document["paths"]:
        pattern = re.sub(r"\{path\}", ".+", re.sub(r"\{(?!path\})\w+\}", "[^/]+", template))
        if re.fullmatch(pattern, path):
            return template
    raise AssertionError(f"{path} is in no path of the document")


def test_the_document_is_the_routes_own(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    assert document == openapi_document(ROUTES, document["info"]["version"])
    served = {(method, template) for template, item in document["paths"].items() for method in item}
    for pattern, handler in ROUTES:
        if pattern.startswith("/v1"):
            for method in ("get", "post", "put", "delete"):
                if method in vars(handler):
                    assert any(m == method and t.startswith("/v1") for m, t in served), (pattern, method)
    session_post = document["paths"]["/v1/sessions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert session_post["additionalProperties"] is False and "labels" in session_post["properties"]


def test_docs_api_md_lists_exactly_the_documents_routes(document: dict[str, Any]) -> None:
    table = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    listed = set()
    for method, path in re.findall(r"^\| `(GET|POST|PUT|DELETE) (/v1/[^`]*)` \|", table, flags=re.M):
        path = path.replace("{id}", "{session_id}")
        listed.add((method.lower(), path))
    in_document = {(method, template) for template, item in document["paths"].items() for method in item}
    assert listed == in_document


def test_the_sdk_calls_only_what_the_document_has(document: dict[str, Any]) -> None:
    sid = "s_sdkcheck"
    made = [calls.health(), calls.create(kernel="python3", labels={"a": "b"}, env={"X": "1"}, setup="1",
                                         sandbox="process", limits={"memory": 1}),
            calls.get(sid), calls.page(state="idle", label=("a", "b"), cursor="c"),
            calls.execute(sid, "1", timeout=1.0, stdin=["x"]), calls.terminate(sid),
            calls.files(sid, "d", "c"), calls.read_file(sid, "d/a.txt"), calls.write_file(sid, "d/a.txt", b"x"),
            calls.delete_file(sid, "d/a.txt")]
    made += [calls.action(sid, name) for name in ("interrupt", "restart", "pause", "resume", "fork", "replay")]
    made += [calls.record(sid, name) for name in ("steps", "notebook", "events")]
    for call in made:
        operation = document["paths"][template_of(call.path, document)].get(call.method.lower())
        assert operation is not None, (call.method, call.path)
        names = {p["name"] for p in operation["parameters"] if p["in"] == "query"}
        assert set(call.params or {}) <= names, (call.path, call.params)
        if call.json:
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            assert set(call.json) <= set(schema["properties"]), (call.path, call.json)
        if call.content is not None:
            assert "application/octet-stream" in operation["requestBody"]["content"]


def test_every_documented_body_refuses_a_field_it_does_not_list(document: dict[str, Any],
                                                                gateway: GatewayProcess,
                                                                session: dict[str, Any]) -> None:
    """What the document says a body may hold is what the handler accepts: one more field is 400."""
    with gateway.client() as http:
        for template, item in document["paths"].items():
            for method, operation in item.items():
                schema = (operation.get("requestBody") or {}).get("content", {}).get("application/json", {})
                if not schema:
                    continue
                path = template.replace("{session_id}", session["id"])
                body = {"not_in_the_document": 1}
                answer = http.request(method.upper(), path, json=body)
                assert answer.status_code == 400, (method, template, answer.text)
                error = answer.json()["error"]
                assert error["code"] == "unknown_field"
                assert sorted(error["details"]["allowed"]) == sorted(schema["schema"]["properties"])


def test_a_body_declaration_is_what_json_body_checks() -> None:
    from gateway.handlers.sessions import STEP

    assert isinstance(STEP, Body) and STEP.required == ("code",)
    assert STEP.types == {"code": (str,), "timeout": (int, float), "stdin": (list,)}


CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_schema_conformance, checks.response_headers_conformance]


@pytest.mark.slow
def test_the_live_gateway_keeps_to_its_document(gateway: GatewayProcess) -> None:
    """Each operation of the document, with examples generated from it (a bounded number, in a
    fixed order), half of them on a real session of its own (a step and a file in it): never a
    500, every answer a status, media type and body the document allows."""
    api = schemathesis.openapi.from_url(f"{gateway.url}/v1/openapi.json")
    failed: dict[str, str] = {}
    ran = 0
    with gateway.client() as http:
        for loaded in api.get_all_operations():
            operation = loaded.ok()
            real = http.post("/v1/sessions", json={"labels": {"by": "openapi"}}).json()["id"]
            http.post(f"/v1/sessions/{real}/execute", json={"code": "x = 1\nprint(x)"})
            http.put(f"/v1/sessions/{real}/files/data/a.txt", content=b"a")

            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                      derandomize=True, database=None)
            @given(case=operation.as_strategy(), on_real_session=strategies.booleans())
            def exchange(case: Any, on_real_session: bool) -> None:
                if on_real_session and "session_id" in (case.path_parameters or {}):
                    case.path_parameters["session_id"] = real
                case.call_and_validate(headers={"Authorization": f"Bearer {gateway.token}"}, checks=CHECKS)

            try:
                exchange()
            except Exception as exc:  # every operation is tried; all failures are reported together
                failed[operation.label] = f"{type(exc).__name__}: {exc}"[:3000]
            ran += 1
        assert not failed, "\n\n".join(f"{label}: {text}" for label, text in failed.items())
        assert ran == sum(len(item) for item in api.raw_schema["paths"].values()) - 1  # less the document itself
        assert http.get("/v1/health").status_code == 200
        for session in http.get("/v1/sessions", params={"label": "by:openapi", "limit": 500}).json()["sessions"]:
            http.delete(f"/v1/sessions/{session['id']}")
