"""The asynchronous client: ``AsyncGateway``, its ``AsyncSession``s and their ``AsyncFiles``
(the same operations as the synchronous client, awaited)."""

from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import httpx

from gateway.client import calls
from gateway.client.errors import GatewayError, from_response
from gateway.client.models import Execution, FileInfo, Handler, SessionInfo, StreamHandlers


class AsyncGateway:
    """A connection to an Agent Kernel Gateway. ``token`` defaults to ``$AGENT_GATEWAY_TOKEN``;
    ``timeout`` bounds each request's wait for the server (a step streams keepalives, so a long
    step does not hit it); ``GET`` requests are retried ``retries`` times on a transport error
    or a 503, nothing else is."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 60.0, retries: int = 3,
                 transport: httpx.AsyncBaseTransport | None = None):
        token = token or os.environ.get("AGENT_GATEWAY_TOKEN", "")
        self.retries = retries
        self._http = httpx.AsyncClient(base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {token}"},
                                  timeout=httpx.Timeout(timeout, connect=10.0), transport=transport)

    async def __aenter__(self) -> AsyncGateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def send(self, call: calls.Call) -> httpx.Response:
        """Carry out ``call``; an error answer raises its ``GatewayError``."""
        for attempt in range(self.retries + 1 if call.retryable else 1):
            try:
                response = await self._http.request(call.method, call.path, json=call.json, params=call.params,
                                              content=call.content, headers=call.headers)
            except httpx.TransportError:
                if attempt >= self.retries or not call.retryable:
                    raise
                await asyncio.sleep(calls.backoff(attempt, None))
                continue
            if response.status_code == 503 and call.retryable and attempt < self.retries:
                await asyncio.sleep(calls.backoff(attempt, response.headers.get("Retry-After")))
                continue
            if response.status_code >= 400:
                raise from_response(response)
            return response
        raise AssertionError("unreachable")

    async def json(self, call: calls.Call) -> Any:
        return (await self.send(call)).json()

    async def health(self) -> dict[str, Any]:
        return await self.json(calls.health())

    async def create_session(self, *, kernel: str | None = None, labels: dict[str, str] | None = None,
                       env: dict[str, str] | None = None, setup: str | None = None, sandbox: str | None = None,
                       limits: dict[str, Any] | None = None, egress: list[str] | None = None) -> AsyncSession:
        """A new session (its kernel started, ``setup`` run as step 0)."""
        return AsyncSession(self, await self.json(calls.create(kernel=kernel, labels=labels, env=env, setup=setup,
                                                    sandbox=sandbox, limits=limits, egress=egress)))

    async def session(self, session_id: str) -> AsyncSession:
        """An existing session (``NotFoundError`` if this principal may not see it)."""
        return AsyncSession(self, await self.json(calls.get(session_id)))

    async def sessions(self, *, state: str | None = None,
                       label: tuple[str, str] | None = None) -> AsyncIterator[SessionInfo]:
        """The sessions this principal sees, newest first, page after page."""
        cursor = None
        while True:
            page = await self.json(calls.page(state=state, label=label, cursor=cursor))
            for data in page["sessions"]:
                yield SessionInfo.from_json(data)
            cursor = page.get("next")
            if not cursor:
                return


class AsyncSession:
    """One session: a persistent kernel, its workspace and its trajectory. As a context
    manager it is terminated at the end of the block."""

    def __init__(self, gateway: AsyncGateway, data: dict[str, Any]):
        self.gateway = gateway
        self.info = SessionInfo.from_json(data)
        self.id = self.info.id
        self.files = AsyncFiles(gateway, self.id)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.terminate()
        except GatewayError:
            pass  # already ended

    def __repr__(self) -> str:
        return f"AsyncSession({self.id!r}, state={self.info.state!r})"

    async def refresh(self) -> SessionInfo:
        self.info = SessionInfo.from_json(await self.gateway.json(calls.get(self.id)))
        return self.info

    async def run(self, code: str, *, timeout: float | None = None, stdin: list[str] | None = None,
            on_stdout: Handler | None = None, on_stderr: Handler | None = None, on_result: Handler | None = None,
            on_error: Handler | None = None) -> Execution:
        """Run one step and return its Execution; the callbacks get its output as it comes
        (``on_result``: each ``Result``, displays included). A failing step returns (check
        ``status`` and ``error``); only a refused request raises. Never retried."""
        handlers = StreamHandlers(on_stdout, on_stderr, on_result, on_error)
        call = calls.execute(self.id, code, timeout=timeout, stdin=stdin)
        async with self.gateway._http.stream(call.method, call.path, json=call.json,
                                             headers=call.headers) as response:
            if response.status_code >= 400:
                await response.aread()
                raise from_response(response)
            async for line in response.aiter_lines():
                execution = handlers.feed(line)
                if execution is not None:
                    return execution
        raise GatewayError(0, "stream_cut", "The connection ended before the step's last line; the step may still "
                                            "be running and is recorded: see the session's steps.")

    async def interrupt(self) -> None:
        await self.gateway.send(calls.action(self.id, "interrupt"))

    async def restart(self) -> SessionInfo:
        return await self._update(calls.action(self.id, "restart"))

    async def set_egress(self, rules: list[str]) -> SessionInfo:
        """Replace the hosts this session's kernel may reach (admins; sandboxed sessions)."""
        return await self._update(calls.set_egress(self.id, rules))

    async def pause(self) -> SessionInfo:
        return await self._update(calls.action(self.id, "pause"))

    async def resume(self) -> SessionInfo:
        return await self._update(calls.action(self.id, "resume"))

    async def terminate(self) -> SessionInfo:
        return await self._update(calls.terminate(self.id))

    async def fork(self) -> AsyncSession:
        """A new session of this principal's with a copy of this one's files and state."""
        return AsyncSession(self.gateway, await self.gateway.json(calls.action(self.id, "fork")))

    async def replay(self) -> dict[str, Any]:
        """Re-run the trajectory in a new session; the per-step report."""
        return await self.gateway.json(calls.action(self.id, "replay"))

    async def steps(self) -> list[Execution]:
        return [Execution.from_json(s) for s in (await self.gateway.json(calls.record(self.id, "steps")))["steps"]]

    async def notebook(self) -> dict[str, Any]:
        """The trajectory as an nbformat v4 notebook (JSON)."""
        return await self.gateway.json(calls.record(self.id, "notebook"))

    async def events(self) -> list[dict[str, Any]]:
        return (await self.gateway.json(calls.record(self.id, "events")))["events"]

    async def _update(self, call: calls.Call) -> SessionInfo:
        data = await self.gateway.json(call)
        if "id" in data:
            self.info = SessionInfo.from_json(data)
        return self.info


class AsyncFiles:
    """A session's workspace files, by path relative to the workspace."""

    def __init__(self, gateway: AsyncGateway, session_id: str):
        self.gateway, self.session_id = gateway, session_id

    async def read(self, path: str) -> bytes:
        return (await self.gateway.send(calls.read_file(self.session_id, path))).content

    async def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return (await self.read(path)).decode(encoding)

    @asynccontextmanager
    async def stream(self, path: str, chunk_size: int = 1 << 16) -> AsyncIterator[AsyncIterator[bytes]]:
        """The file's bytes as they arrive: ``async with files.stream(p) as chunks: async for c in chunks``."""
        call = calls.read_file(self.session_id, path)
        async with self.gateway._http.stream(call.method, call.path) as response:
            if response.status_code >= 400:
                await response.aread()
                raise from_response(response)
            yield response.aiter_bytes(chunk_size)

    async def write(self, path: str, data: bytes | str) -> FileInfo:
        """Upload ``data`` (text is encoded as UTF-8) to ``path``, replacing what is there."""
        answer = await self.gateway.json(calls.write_file(self.session_id, path, data))
        return FileInfo(answer["path"], answer["size"], "")

    async def list(self, path: str | None = None) -> list[FileInfo]:
        """Every regular file under ``path`` (the whole workspace by default), in path order."""
        found, cursor = [], None
        while True:
            page = await self.gateway.json(calls.files(self.session_id, path, cursor))
            found += [FileInfo(f["path"], f["size"], f["modified"]) for f in page["files"]]
            cursor = page.get("next")
            if not cursor:
                return found

    async def delete(self, path: str) -> None:
        await self.gateway.send(calls.delete_file(self.session_id, path))
