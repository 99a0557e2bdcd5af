"""Each operation of the agent API, described once as a ``Call``; the sync and async clients
only carry them out. Only calls that change nothing (``GET``) are marked to be retried."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

NDJSON = "application/x-ndjson"


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    content: bytes | None = None
    headers: dict[str, str] | None = None

    @property
    def retryable(self) -> bool:
        """Safe to send again after a transport error or a 503: it changes nothing."""
        return self.method == "GET"


def session_path(session_id: str, *rest: str) -> str:
    return "/".join([f"/v1/sessions/{quote(session_id, safe='')}", *rest])


def file_path(session_id: str, path: str) -> str:
    return session_path(session_id, "files", quote(path.lstrip("/"), safe="/"))


def _some(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


def health() -> Call:
    return Call("GET", "/v1/health")


def create(*, kernel: str | None, labels: dict[str, str] | None, env: dict[str, str] | None, setup: str | None,
           sandbox: str | None, limits: dict[str, Any] | None, egress: list[str] | None = None) -> Call:
    return Call("POST", "/v1/sessions", json=_some(kernel=kernel, labels=labels, env=env, setup=setup,
                                                    sandbox=sandbox, limits=limits, egress=egress))


def get(session_id: str) -> Call:
    return Call("GET", session_path(session_id))


def page(*, state: str | None, label: tuple[str, str] | None, cursor: str | None, limit: int = 100) -> Call:
    return Call("GET", "/v1/sessions", params=_some(state=state, label=f"{label[0]}:{label[1]}" if label else None,
                                                    cursor=cursor, limit=limit))


def execute(session_id: str, code: str, *, timeout: float | None, stdin: list[str] | None) -> Call:
    return Call("POST", session_path(session_id, "execute"), json=_some(code=code, timeout=timeout, stdin=stdin),
                headers={"Accept": NDJSON})


def action(session_id: str, name: str) -> Call:
    """``interrupt``, ``restart``, ``pause``, ``resume``, ``fork`` or ``replay``."""
    return Call("POST", session_path(session_id, name), json={})


def set_egress(session_id: str, rules: list[str]) -> Call:
    return Call("PUT", session_path(session_id, "egress"), json={"rules": list(rules)})


def terminate(session_id: str) -> Call:
    return Call("DELETE", session_path(session_id))


def record(session_id: str, name: str) -> Call:
    """``steps``, ``notebook`` or ``events``."""
    return Call("GET", session_path(session_id, name))


def files(session_id: str, path: str | None, cursor: str | None) -> Call:
    return Call("GET", session_path(session_id, "files"), params=_some(path=path, cursor=cursor, limit=10_000))


def read_file(session_id: str, path: str) -> Call:
    return Call("GET", file_path(session_id, path))


def write_file(session_id: str, path: str, data: bytes | str) -> Call:
    return Call("PUT", file_path(session_id, path), content=data.encode() if isinstance(data, str) else data)


def delete_file(session_id: str, path: str) -> Call:
    return Call("DELETE", file_path(session_id, path))


def backoff(attempt: int, retry_after: str | None) -> float:
    """Seconds to wait before retrying: the server's ``Retry-After``, else 0.25 s doubling, at most 5 s."""
    try:
        return min(float(retry_after), 5.0) if retry_after else min(0.25 * 2 ** attempt, 5.0)
    except ValueError:
        return min(0.25 * 2 ** attempt, 5.0)
