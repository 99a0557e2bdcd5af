"""The Python SDK (``gateway.client``) against a real gateway: sessions, steps streamed with
callbacks and typed results, errors as typed exceptions, files both ways, the lifecycle, the
records; the same through the async client."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any, Iterator

import httpx
import pytest

from gateway.client import (AsyncGateway, AuthenticationError, Execution, Gateway, InvalidRequestError,
                            NotFoundError, Result, SessionEndedError, UnavailableError)
from tests.conftest import GatewayProcess

PLOT = ("import matplotlib.pyplot as plt\n"
        "from IPython.display import display, HTML, Markdown\n"
        "display(HTML('<b>bold</b>'), Markdown('*md*'))\n"
        "fig, ax = plt.subplots(); ax.plot([1, 2, 3]); display(fig); plt.close(fig)\n"
        "{'a': 1}")


@pytest.fixture
def sdk(gateway: GatewayProcess) -> Iterator[Gateway]:
    with Gateway(gateway.url, gateway.token) as client:
        yield client


def test_a_session_keeps_its_state_and_streams_its_output(sdk: Gateway) -> None:
    with sdk.create_session(labels={"task": "sdk"}) as session:
        assert session.info.state == "idle" and session.info.labels == {"task": "sdk"}
        seen: dict[str, list[Any]] = {"stdout": [], "stderr": [], "result": []}
        first = session.run("import sys\nprint('one', flush=True)\nsys.stderr.write('two\\n')\nx = 20\nx + 1",
                            on_stdout=seen["stdout"].append, on_stderr=seen["stderr"].append,
                            on_result=seen["result"].append)
        assert isinstance(first, Execution) and first.ok and first.text == "21"
        assert (first.stdout, first.stderr) == ("one\n", "two\n")
        assert "".join(seen["stdout"]) == "one\n" and "".join(seen["stderr"]) == "two\n"
        assert [r.text for r in seen["result"]] == ["21"] and seen["result"][0].is_main_result
        second = session.run("x * 2")
        assert second.text == "40" and second.step == first.step + 1
        assert [s.text for s in session.steps()][-2:] == ["21", "40"]
        assert any(s.id == session.id for s in sdk.sessions(label=("task", "sdk")))
    assert sdk.session(session.id).info.state == "terminated"


def test_rich_results_are_typed(sdk: Gateway) -> None:
    with sdk.create_session() as session:
        step = session.run(PLOT)
        assert step.ok, step.error
        html, markdown, figure, value = step.results
        assert html.html == "<b>bold</b>" and markdown.markdown == "*md*"
        assert figure.png is not None and figure.png.startswith(b"\x89PNG") and "image/png" in figure.formats()
        assert value.is_main_result and value.text == "{'a': 1}"
        assert Result({"image/png": base64.b64encode(b"x").decode()}).png == b"x"


def test_failures_are_results_refusals_are_typed_errors(sdk: Gateway, gateway: GatewayProcess) -> None:
    errors: list[Any] = []
    with sdk.create_session() as session:
        failed = session.run("1 / 0", on_error=errors.append)
        assert failed.status == "error" and failed.error is not None and failed.error.name == "ZeroDivisionError"
        assert errors and errors[0].name == "ZeroDivisionError"
        slow = session.run("import time\ntime.sleep(5)", timeout=0.5)
        assert slow.status == "timeout" and slow.error is not None and slow.error.name == "Timeout"
        with pytest.raises(InvalidRequestError) as invalid:
            session.run("1", timeout=-1)
        assert invalid.value.status == 400 and invalid.value.code == "invalid_field"
        with pytest.raises(NotFoundError) as missing:
            session.files.read("nowhere.txt")
        assert missing.value.code == "file_not_found"
    with pytest.raises(SessionEndedError) as ended:
        session.run("1")
    assert ended.value.status == 409 and ended.value.details["state"] == "terminated"
    with pytest.raises(NotFoundError):
        sdk.session("s_doesnotexist00")
    with Gateway(gateway.url, "not-a-token") as stranger, pytest.raises(AuthenticationError) as refused:
        stranger.create_session()
    assert refused.value.status == 401


def test_files_both_ways(sdk: Gateway) -> None:
    with sdk.create_session() as session:
        assert session.files.write("data/a b.csv", "city,temp\nOslo,4\n").size == 17
        session.files.write("blob.bin", bytes(range(256)) * 1000)
        assert session.run("open('data/a b.csv').read().splitlines()[1]").text == "'Oslo,4'"
        session.run("open('made.txt', 'w').write('by the kernel')")
        assert session.files.read_text("made.txt") == "by the kernel"
        with session.files.stream("blob.bin", chunk_size=4096) as chunks:
            assert b"".join(chunks) == bytes(range(256)) * 1000
        assert [f.path for f in session.files.list()] == ["blob.bin", "data/a b.csv", "made.txt"]
        assert [f.path for f in session.files.list("data")] == ["data/a b.csv"]
        session.files.delete("made.txt")
        assert "made.txt" not in [f.path for f in session.files.list()]


def test_the_lifecycle_and_the_records(sdk: Gateway) -> None:
    with sdk.create_session() as session:
        session.run("kept = 7")
        assert session.pause().state == "paused"
        assert session.resume().state == "idle"
        assert session.run("kept").text == "7"
        with session.fork() as child:
            assert child.id != session.id and child.run("kept + 1").text == "8"
        assert session.restart().state == "idle"
        assert session.run("'kept' in dir()").text == "False"
        notebook = session.notebook()
        assert notebook["nbformat"] == 4 and any("kept = 7" in "".join(c["source"]) for c in notebook["cells"])
        assert "session_paused" in [e["action"] for e in session.events()]
        report = session.replay()
        assert report["source_session_id"] == session.id and report["summary"]["reproduced"] >= 1, report


def test_a_running_step_is_interrupted(sdk: Gateway) -> None:
    import threading
    import time

    with sdk.create_session() as session:
        outcome: dict[str, Execution] = {}
        thread = threading.Thread(target=lambda: outcome.update(step=session.run("import time\ntime.sleep(30)")))
        thread.start()
        deadline = time.monotonic() + 15
        while session.refresh().state != "busy":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        session.interrupt()
        thread.join(20)
        assert outcome["step"].status == "interrupted", outcome


def test_the_async_client_does_the_same(gateway: GatewayProcess) -> None:
    async def scenario() -> None:
        async with AsyncGateway(gateway.url, gateway.token) as client:
            async with await client.create_session() as session:
                printed: list[str] = []
                step = await session.run("print('hi')\nv = 5\nv * 2", on_stdout=printed.append)
                assert step.ok and step.text == "10" and printed == ["hi\n"]
                await session.files.write("f.txt", b"bytes")
                assert await session.files.read("f.txt") == b"bytes"
                async with session.files.stream("f.txt") as chunks:
                    assert b"".join([c async for c in chunks]) == b"bytes"
                assert [f.path for f in await session.files.list()] == ["f.txt"]
                assert (await session.pause()).state == "paused"
                assert (await session.run("v")).text == "5"  # a step resumes a paused session
                async with await session.fork() as child:
                    assert (await child.run("v + 1")).text == "6"
                assert [s.text for s in await session.steps()][-1] == "5"
                ids = [info.id async for info in client.sessions()]
                assert session.id in ids
            with pytest.raises(SessionEndedError):
                await session.run("1")

    asyncio.run(scenario())


def test_only_reads_are_retried() -> None:
    """A GET that meets a 503 is sent again; nothing that changes a session is. (The 503s come
    from a stand-in transport: a real gateway cannot be made to answer them on cue.)"""
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(f"{request.method} {request.url.path}")
        if len(sent) == 1:
            return httpx.Response(503, headers={"Retry-After": "0"},
                                  json={"error": {"code": "at_capacity", "message": "busy", "details": {}}})
        if request.method == "POST":
            return httpx.Response(503, json={"error": {"code": "at_capacity", "message": "busy", "details": {}}})
        return httpx.Response(200, json={"status": "ok"})

    with Gateway("http://gateway.invalid", "t", transport=httpx.MockTransport(handler)) as client:
        assert client.health() == {"status": "ok"}
        assert sent == ["GET /v1/health", "GET /v1/health"]
        with pytest.raises(UnavailableError) as refused:
            client.create_session()
        assert refused.value.code == "at_capacity" and sent[-1] == "POST /v1/sessions"
        assert sent.count("POST /v1/sessions") == 1


def test_the_tool_declarations_are_the_toolbox_calls() -> None:
    """Each tool's declared arguments are exactly the parameters of the call that carries it out,
    and its required ones are those without a default."""
    import inspect

    from gateway.client.tools import TOOLS, Toolbox, anthropic_tools, openai_tools

    toolbox = Toolbox(Gateway("http://127.0.0.1:9", "t"))
    for tool in TOOLS:
        signature = inspect.signature(toolbox._calls[tool.name])
        assert list(signature.parameters) == list(tool.parameters["properties"]), tool.name
        assert [n for n, p in signature.parameters.items() if p.default is inspect.Parameter.empty] \
            == tool.parameters["required"], tool.name
    assert [t["type"] for t in openai_tools()] == ["function"] * len(TOOLS)
    assert all(set(t) == {"name", "description", "input_schema"} for t in anthropic_tools())


def test_a_tool_call_is_answered_with_json_even_when_it_fails(gateway: GatewayProcess) -> None:
    from gateway.client.tools import Toolbox

    with Gateway(gateway.url, gateway.token) as client:
        toolbox = Toolbox(client)
        created = toolbox.call("create_session", "{}")
        ran = toolbox.call("run_code", json.dumps({"session_id": created["session_id"], "code": "1/0"}))
        assert ran["status"] == "error" and ran["error"]["name"] == "ZeroDivisionError"
        assert toolbox.call("run_code", "{not json")["error"]["code"] == "invalid_arguments"
        assert toolbox.call("run_code", {"session_id": "s_nope", "code": "1"})["error"]["code"] == "session_not_found"
        assert toolbox.call("read_file", {"session_id": created["session_id"], "path": "x",
                                          "extra": 1})["error"]["code"] == "invalid_arguments"
        assert toolbox.call("terminate_session", {"session_id": created["session_id"]})["state"] == "terminated"
