"""docs/api.md documents every route the server serves, with its methods, and every error code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tornado.web

from gateway.handlers import files, jupyter, kernel_ws, ops, sessions, ui
from gateway.handlers.base import STATUS_CODES

ROOT = Path(__file__).resolve().parent.parent
API_DOC = ROOT / "docs" / "api.md"
HTTP_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH")
PLACEHOLDERS = {"session_id": "{id}", "path": "{path}", "kernel_id": "{kernel_id}", "name": "{name}",
                "filename": "{file}"}
ROUTES = [(pattern, handler) for module in (ops, sessions, files, jupyter, kernel_ws, ui)
          for pattern, handler in module.routes]


def _group_end(pattern: str, start: int) -> int:
    """The index just past the parenthesised group that opens at ``pattern[start]``."""
    depth, index, in_class = 0, start, False
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            index += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    raise ValueError(f"unbalanced group in {pattern!r}")


def documented_paths(pattern: str) -> list[str]:
    """A route's regex as the paths the docs write: named groups become ``{id}``/``{path}``,
    and an alternation ``(?:a|b)`` becomes one path per alternative."""
    named = re.search(r"\(\?P<(\w+)>", pattern)
    if named:
        end = _group_end(pattern, named.start())
        placeholder = PLACEHOLDERS.get(named.group(1), "{" + named.group(1) + "}")
        return documented_paths(pattern[:named.start()] + placeholder + pattern[end:])
    alternation = pattern.find("(?:")
    if alternation >= 0:
        end = _group_end(pattern, alternation)
        choices = pattern[alternation + 3:end - 1].split("|")
        return [path for choice in choices
                for path in documented_paths(pattern[:alternation] + choice + pattern[end:])]
    pattern = pattern.replace("\\.", ".").replace("/?", "/")
    assert re.fullmatch(r"[/A-Za-z0-9_.{}-]+", pattern), f"cannot turn {pattern!r} into a documented path"
    return [pattern]


def served_methods(handler: type[tornado.web.RequestHandler]) -> list[str]:
    """The HTTP methods a handler class implements (the others answer 405)."""
    return [method for method in HTTP_METHODS
            if getattr(handler, method.lower()) is not getattr(tornado.web.RequestHandler, method.lower())]


def endpoint_in_doc(method: str, path: str, doc: str) -> bool:
    """``METHOD /path`` written literally, and not merely as the start of a longer path."""
    return re.search(rf"\b{method} {re.escape(path)}(?![\w/{{}}-])", doc) is not None


@pytest.fixture(scope="module")
def doc() -> str:
    return API_DOC.read_text(encoding="utf-8")


def test_conversion_of_route_patterns() -> None:
    sid = r"(?P<session_id>[A-Za-z0-9_-]{1,64})"
    assert documented_paths(r"/v1/sessions") == ["/v1/sessions"]
    assert documented_paths(rf"/v1/sessions/{sid}/files/(?P<path>.+)") == ["/v1/sessions/{id}/files/{path}"]
    assert documented_paths(rf"/v1/sessions/{sid}/(?:pause|resume)") == [
        "/v1/sessions/{id}/pause", "/v1/sessions/{id}/resume"]


def test_the_route_lists_are_not_empty() -> None:
    paths = [path for pattern, _ in ROUTES for path in documented_paths(pattern)]
    assert "/v1/sessions/{id}/execute" in paths
    assert "/v1/sessions/{id}/files/{path}" in paths
    assert {"/v1/sessions/{id}/pause", "/v1/sessions/{id}/replay"} <= set(paths)


@pytest.mark.parametrize("pattern,handler", ROUTES, ids=[pattern for pattern, _ in ROUTES])
def test_every_route_is_documented_with_a_method(pattern: str, handler: type, doc: str) -> None:
    for path in documented_paths(pattern):
        assert any(endpoint_in_doc(method, path, doc) for method in HTTP_METHODS), \
            f"docs/api.md does not document {path} as 'METHOD {path}'"


@pytest.mark.parametrize("pattern,handler", ROUTES, ids=[pattern for pattern, _ in ROUTES])
def test_every_served_method_is_documented(pattern: str, handler: type, doc: str) -> None:
    methods = served_methods(handler)
    assert methods, f"{handler.__name__} serves no method"
    for path in documented_paths(pattern):
        missing = [f"{method} {path}" for method in methods if not endpoint_in_doc(method, path, doc)]
        assert not missing, f"docs/api.md does not document {missing}"


def test_every_error_code_is_documented(doc: str) -> None:
    source = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "gateway").rglob("*.py")))
    codes = set(re.findall(r"""\bcode\s*=\s*["']([a-z_]+)["']""", source)) | set(STATUS_CODES.values())
    assert {"session_not_found", "invalid_path", "at_capacity", "body_too_large"} <= codes
    missing = sorted(code for code in codes if f"`{code}`" not in doc)
    assert not missing, f"docs/api.md does not mention the error codes {missing}"


# Event kinds: one list (gateway.events), every one recorded is in it, and api.md documents each --

ROOT = Path(__file__).resolve().parent.parent


def test_every_event_the_code_records_is_a_listed_kind() -> None:
    from gateway.events import EVENTS

    source = "\n".join(path.read_text() for path in (ROOT / "gateway").rglob("*.py"))
    literal = set(re.findall(r'record_event\([^,()]*(?:\([^()]*\))?[^,()]*, "([a-z_]+)"', source))
    literal |= {"auth_failed", "access_denied", "session_terminated", "session_failed", "kernel_died",
                "kernel_restarted"}  # recorded through variables (base.audit_refusal, SessionManager)
    assert len(literal) > 20
    assert literal <= set(EVENTS), sorted(literal - set(EVENTS))


def test_every_kind_of_event_is_documented_and_nothing_else() -> None:
    from gateway.events import EVENTS

    text = (ROOT / "docs" / "api.md").read_text()
    table = text[text.index("| action | details |"):text.index("## Routes")]
    documented = set(re.findall(r"`([a-z_]+)`", "\n".join(line.split("|")[1] for line in table.splitlines()
                                                          if line.startswith("| `"))))
    documented |= set(re.findall(r"`(auth_failed|access_denied|ui_login)`", table))
    assert documented == set(EVENTS), (sorted(set(EVENTS) - documented), sorted(documented - set(EVENTS)))


def test_an_unknown_kind_of_event_is_refused() -> None:
    from gateway.events import check_kind

    assert check_kind("execute") == "execute"
    with pytest.raises(ValueError, match="not a kind of audit event"):
        check_kind("exeucte")
