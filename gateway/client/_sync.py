"""The synchronous client: ``Gateway``, its ``Session``s and their ``Files``."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

import httpx

from gateway.client import calls
from gateway.client.errors import GatewayError, from_response
from gateway.client.models import Execution, FileInfo, Handler, SessionInfo, StreamHandlers


class Gateway:
    """A connection to an Agent Kernel Gateway. ``token`` defaults to ``$AGENT_GATEWAY_TOKEN``;
    ``timeout`` bounds each request's wait for the server (a step streams keepalives, so a long
    step does not hit it); ``GET`` requests are retried ``retries`` times on a transport error
    or a 503, nothing else is."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 60.0, retries: int = 3,
                 transport: httpx.BaseTransport | None = None):
        token = token or os.environ.get("AGENT_GATEWAY_TOKEN", "")
        self.retries = retries
        self._http = httpx.Client(base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {token}"},
                                  timeout=httpx.Timeout(timeout, connect=10.0), transport=transport)

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def send(self, call: calls.Call) -> httpx.Response:
        """Carry out ``call``; an error answer raises its ``GatewayError``."""
        for attempt in range(self.retries + 1 if call.retryable else 1):
            try:
                response = self._http.request(call.method, call.path, json=call.json, params=call.params,
                                              content=call.content, headers=call.headers)
            except httpx.TransportError:
                if attempt >= self.retries or not call.retryable:
                    raise
                time.sleep(calls.backoff(attempt, None))
                continue
            if response.status_code == 503 and call.retryable and attempt < self.retries:
                time.sleep(calls.backoff(attempt, response.headers.get("Retry-After")))
                continue
            if response.status_code >= 400:
                raise from_response(response)
            return response
        raise AssertionError("unreachable")

    def json(self, call: calls.Call) -> Any:
        return self.send(call).json()

    def health(self) -> dict[str, Any]:
        return self.json(calls.health())

    def create_session(self, *, kernel: str | None = None, labels: dict[str, str] | None = None,
                       env: dict[str, str] | None = None, setup: str | None = None, sandbox: str | None = None,
                       limits: dict[str, Any] | None = None, egress: list[str] | None = None) -> Session:
        """A new session (its kernel started, ``setup`` run as step 0)."""
        return Session(self, self.json(calls.create(kernel=kernel, labels=labels, env=env, setup=setup,
                                                    sandbox=sandbox, limits=limits, egress=egress)))

    def session(self, session_id: str) -> Session:
        """An existing session (``NotFoundError`` if this principal may not see it)."""
        return Session(self, self.json(calls.get(session_id)))

    def sessions(self, *, state: str | None = None, label: tuple[str, str] | None = None) -> Iterator[SessionInfo]:
        """The sessions this principal sees, newest first, page after page."""
        cursor = None
        while True:
            page = self.json(calls.page(state=state, label=label, cursor=cursor))
            yield from (SessionInfo.from_json(s) for s in page["sessions"])
            cursor = page.get("next")
            if not cursor:
                return


class Session:
    """One session: a persistent kernel, its workspace and its trajectory. As a context
    manager it is terminated at the end of the block."""

    def __init__(self, gateway: Gateway, data: dict[str, Any]):
        self.gateway = gateway
        self.info = SessionInfo.from_json(data)
        self.id = self.info.id
        self.files = Files(gateway, self.id)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.terminate()
        except GatewayError:
            pass  # already ended

    def __repr__(self) -> str:
        return f"Session({self.id!r}, state={self.info.state!r})"

    def refresh(self) -> SessionInfo:
        self.info = SessionInfo.from_json(self.gateway.json(calls.get(self.id)))
        return self.info

    def run(self, code: str, *, timeout: float | None = None, stdin: list[str] | None = None,
            on_stdout: Handler | None = None, on_stderr: Handler | None = None, on_result: Handler | None = None,
            on_error: Handler | None = None) -> Execution:
        """Run one step and return its Execution; the callbacks get its output as it comes
        (``on_result``: each ``Result``, displays included). A failing step returns (check
        ``status`` and ``error``); only a refused request raises. Never retried."""
        handlers = StreamHandlers(on_stdout, on_stderr, on_result, on_error)
        call = calls.execute(self.id, code, timeout=timeout, stdin=stdin)
        with self.gateway._http.stream(call.method, call.path, json=call.json, headers=call.headers) as response:
            if response.status_code >= 400:
                response.read()
                raise from_response(response)
            for line in response.iter_lines():
                execution = handlers.feed(line)
                if execution is not None:
                    return execution
        raise GatewayError(0, "stream_cut", "The connection ended before the step's last line; the step may still "
                                            "be running and is recorded: see the session's steps.")

    def interrupt(self) -> None:
        self.gateway.send(calls.action(self.id, "interrupt"))

    def restart(self) -> SessionInfo:
        return self._update(calls.action(self.id, "restart"))

    def set_egress(self, rules: list[str]) -> SessionInfo:
        """Replace the hosts this session's kernel may reach (admins; sandboxed sessions)."""
        return self._update(calls.set_egress(self.id, rules))

    def pause(self) -> SessionInfo:
        return self._update(calls.action(self.id, "pause"))

    def resume(self) -> SessionInfo:
        return self._update(calls.action(self.id, "resume"))

    def terminate(self) -> SessionInfo:
        return self._update(calls.terminate(self.id))

    def fork(self) -> Session:
        """A new session of this principal's with a copy of this one's files and state."""
        return Session(self.gateway, self.gateway.json(calls.action(self.id, "fork")))

    def replay(self) -> dict[str, Any]:
        """Re-run the trajectory in a new session; the per-step report."""
        return self.gateway.json(calls.action(self.id, "replay"))

    def steps(self) -> list[Execution]:
        return [Execution.from_json(s) for s in self.gateway.json(calls.record(self.id, "steps"))["steps"]]

    def notebook(self) -> dict[str, Any]:
        """The trajectory as an nbformat v4 notebook (JSON)."""
        return self.gateway.json(calls.record(self.id, "notebook"))

    def events(self) -> list[dict[str, Any]]:
        return self.gateway.json(calls.record(self.id, "events"))["events"]

    def _update(self, call: calls.Call) -> SessionInfo:
        data = self.gateway.json(call)
        if "id" in data:
            self.info = SessionInfo.from_json(data)
        return self.info


class Files:
    """A session's workspace files, by path relative to the workspace."""

    def __init__(self, gateway: Gateway, session_id: str):
        self.gateway, self.session_id = gateway, session_id

    def read(self, path: str) -> bytes:
        return self.gateway.send(calls.read_file(self.session_id, path)).content

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read(path).decode(encoding)

    @contextmanager
    def stream(self, path: str, chunk_size: int = 1 << 16) -> Iterator[Iterator[bytes]]:
        """The file's bytes as they arrive: ``with files.stream(p) as chunks: for c in chunks: ...``."""
        call = calls.read_file(self.session_id, path)
        with self.gateway._http.stream(call.method, call.path) as response:
            if response.status_code >= 400:
                response.read()
                raise from_response(response)
            yield response.iter_bytes(chunk_size)

    def write(self, path: str, data: bytes | str) -> FileInfo:
        """Upload ``data`` (text is encoded as UTF-8) to ``path``, replacing what is there."""
        answer = self.gateway.json(calls.write_file(self.session_id, path, data))
        return FileInfo(answer["path"], answer["size"], "")

    def list(self, path: str | None = None) -> list[FileInfo]:
        """Every regular file under ``path`` (the whole workspace by default), in path order."""
        found, cursor = [], None
        while True:
            page = self.gateway.json(calls.files(self.session_id, path, cursor))
            found += [FileInfo(f["path"], f["size"], f["modified"]) for f in page["files"]]
            cursor = page.get("next")
            if not cursor:
                return found

    def delete(self, path: str) -> None:
        self.gateway.send(calls.delete_file(self.session_id, path))
