"""Scripted Jupyter message sequences for the executor, the outputs, the outcome rules and the
websocket hub (no kernel needed).

Kernel messages are built by hand, shaped as jupyter_client deserialises them, and fed into the
gateway's own machinery: ``ExecutionListener`` and ``OutputCollector`` directly; ``execute`` and
``KernelHub`` through a ``KernelConnection`` whose sockets are replaced by an outbox (what the
gateway sends is signed, serialised and decoded again) and whose incoming messages go through
the connection's own decoding and routing by parent ``msg_id``. The hub records into a real
SQLite store.
"""

from __future__ import annotations

import asyncio
import functools
import json
import itertools
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from jupyter_client.session import Session

from gateway import executor, hub as hub_module
from gateway.auth import Principal
from gateway.channels import CHANNELS, KernelConnection, decode_message
from gateway.executor import ExecutionListener, RawExecution, execute
from gateway.hub import KernelHub, Parked
from gateway.kernels import KernelLauncher
from gateway.metrics import Metrics
from gateway.outcomes import (FINAL_STATUSES, NOT_RUN, RERUN_STATUSES, STATUSES, UNFINISHED_STATUSES,
                              step_outcome)
from gateway.outputs import TRUNCATION_NOTE, OutputCollector, clean_bundle, summarise
from gateway.records import SessionRecord
from gateway.sessions import LiveSession, SessionManager
from gateway.settings import Settings
from gateway.store import Store

# messages ------------------------------------------------------------------------------------

DATE = "2026-01-01T00:00:00.000000Z"
ON_CHANNEL = {"execute_reply": "shell", "kernel_info_reply": "shell", "input_request": "stdin"}


def message(msg_type: str, parent: dict[str, Any] | None = None, sender: str = "kernel",
            **content: Any) -> dict[str, Any]:
    """One Jupyter message as jupyter_client deserialises it; ``parent`` is the message it answers."""
    header = {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "username": sender, "session": f"{sender}-session",
              "date": DATE, "version": "5.3"}
    return {"header": header, "msg_id": header["msg_id"], "msg_type": msg_type,
            "parent_header": dict(parent["header"]) if parent else {}, "metadata": {}, "content": content,
            "buffers": []}


def channel_of(msg: dict[str, Any]) -> str:
    """The channel a kernel sends this message on."""
    return ON_CHANNEL.get(msg["header"]["msg_type"], "iopub")


def status(parent: dict[str, Any], state: str) -> dict[str, Any]:
    return message("status", parent, execution_state=state)


def execute_input(parent: dict[str, Any], count: int) -> dict[str, Any]:
    return message("execute_input", parent, code=parent["content"].get("code", ""), execution_count=count)


def stream(parent: dict[str, Any], text: str, name: str = "stdout") -> dict[str, Any]:
    return message("stream", parent, name=name, text=text)


def result(parent: dict[str, Any], count: int, text: str) -> dict[str, Any]:
    return message("execute_result", parent, execution_count=count, data={"text/plain": text}, metadata={})


def display(parent: dict[str, Any], data: dict[str, Any], display_id: str | None = None) -> dict[str, Any]:
    transient = {"display_id": display_id} if display_id else {}
    return message("display_data", parent, data=data, metadata={}, transient=transient)


def update_display(parent: dict[str, Any], data: dict[str, Any], display_id: str) -> dict[str, Any]:
    return message("update_display_data", parent, data=data, metadata={}, transient={"display_id": display_id})


def clear(parent: dict[str, Any], wait: bool) -> dict[str, Any]:
    return message("clear_output", parent, wait=wait)


def error(parent: dict[str, Any], ename: str, evalue: str, traceback: list[str]) -> dict[str, Any]:
    return message("error", parent, ename=ename, evalue=evalue, traceback=traceback)


def reply(parent: dict[str, Any], state: str = "ok", count: int | None = None, **fields: Any) -> dict[str, Any]:
    content = {"status": state, **fields}
    if count is not None:
        content["execution_count"] = count
    return message("execute_reply", parent, **content)


def input_request(parent: dict[str, Any], prompt: str, password: bool = False) -> dict[str, Any]:
    return message("input_request", parent, prompt=prompt, password=password)


def execute_request(code: str, **options: Any) -> dict[str, Any]:
    """An execute_request as a Jupyter client sends it."""
    content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
               "allow_stdin": True, "stop_on_error": True, **options}
    return message("execute_request", sender="client", **content)


def ran(request: dict[str, Any], count: int, *outputs: dict[str, Any]) -> list[dict[str, Any]]:
    """What a kernel sends for a request that runs to its end: busy, execute_input, the outputs,
    the reply, idle."""
    return [status(request, "busy"), execute_input(request, count), *outputs, reply(request, count=count),
            status(request, "idle")]


def feed(listener: ExecutionListener, messages: list[dict[str, Any]]) -> list[bool]:
    """Give ``messages`` to the listener; whether it was done after each one."""
    done = []
    for msg in messages:
        listener.on_message(channel_of(msg), msg)
        done.append(listener.done.done())
    return done


def in_loop(test: Callable[..., Any]) -> Callable[..., None]:
    """Run an async test to its end on an event loop of its own."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


# a kernel connection without sockets -------------------------------------------------------


class Outbox:
    """Stands in for one channel's socket: keeps what the gateway sends, decoded (so signed right)."""

    def __init__(self, connection: "ScriptedConnection", channel: str):
        self.connection = connection
        self.channel = channel

    def send(self, frames: list[bytes]) -> None:
        self.connection.sent.append((self.channel, decode_message(self.connection.session, frames)))


class ScriptedConnection(KernelConnection):
    """A ``KernelConnection`` whose sockets are outboxes; ``push`` delivers a kernel message as the
    connection receives one (frames decoded, signature checked, routed by parent msg_id, offered
    to every observer)."""

    def __init__(self, observers: list[Any] | None = None):
        self.session = Session(key=b"scripted-signing-key", username="gateway")
        self.label = "scripted"
        self.listeners = {}
        self.observers = observers if observers is not None else []
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.streams = {channel: Outbox(self, channel) for channel in CHANNELS}  # type: ignore[misc]

    def push(self, *messages: dict[str, Any], channel: str | None = None) -> None:
        for msg in messages:
            self._receiver(channel or channel_of(msg))(self.session.serialize(msg))

    def sent_of(self, msg_type: str) -> list[tuple[str, dict[str, Any]]]:
        return [(channel, msg) for channel, msg in self.sent if msg["header"]["msg_type"] == msg_type]

    async def request(self) -> dict[str, Any]:
        """The execute_request the gateway sent (once it has)."""
        for _ in range(100):
            sent = self.sent_of("execute_request")
            if sent:
                return sent[-1][1]
            await asyncio.sleep(0)
        raise AssertionError("no execute_request was sent")


class KernelProcess:
    """The liveness and interrupt callbacks of the kernel that owns a connection."""

    def __init__(self, on_interrupt: Callable[[], None] | None = None):
        self.alive = True
        self.interrupts = 0
        self.on_interrupt = on_interrupt

    async def is_alive(self) -> bool:
        return self.alive

    async def interrupt(self) -> None:
        self.interrupts += 1
        if self.on_interrupt is not None:
            self.on_interrupt()


@pytest.fixture
def fast_liveness(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor, "LIVENESS_INTERVAL", 0.01)


def start(connection: ScriptedConnection, process: KernelProcess, code: str = "run()",
          **options: Any) -> "asyncio.Task[RawExecution]":
    options = {"timeout": 5.0, "output_limit": 10_000, "interrupt_grace": 5.0, **options}
    return asyncio.create_task(execute(connection, code, is_alive=process.is_alive, interrupt=process.interrupt,
                                       **options))


# the execution listener --------------------------------------------------------------------


def listener_for(output_limit: int = 10_000, **kwargs: Any) -> ExecutionListener:
    loop = asyncio.new_event_loop()
    try:
        return ExecutionListener(OutputCollector(output_limit), loop.create_future(), **kwargs)
    finally:
        loop.close()


def test_a_normal_sequence_gives_ordered_outputs_and_the_execution_count() -> None:
    """busy, execute_input, three stream chunks, execute_result, idle, reply: done only at the
    reply; the chunks are one stream output before the result; the count comes from the kernel."""
    request = execute_request("print('a'); print('b'); 'c'")
    started: list[str] = []
    listener = listener_for(on_start=lambda: started.append("started"))
    sequence = [status(request, "busy"), execute_input(request, 3), stream(request, "a\n"), stream(request, "b\n"),
                stream(request, "c"), result(request, 3, "'c'"), status(request, "idle"), reply(request, count=3)]
    assert feed(listener, sequence) == [False] * 7 + [True]
    raw = listener.result("reply")
    assert raw.outputs == [
        {"output_type": "stream", "name": "stdout", "text": "a\nb\nc"},
        {"output_type": "execute_result", "data": {"text/plain": "'c'"}, "metadata": {}, "execution_count": 3},
    ]
    assert (raw.execution_count, raw.ended, raw.truncated, raw.stdin) == (3, "reply", False, [])
    assert raw.reply == {"status": "ok", "execution_count": 3}
    assert started == ["started"]
    assert step_outcome(raw, None, False, 60, "") == ("ok", None)


@pytest.mark.parametrize("order", ["reply_before_idle", "reply_after_idle"])
def test_done_needs_both_the_idle_status_and_the_reply(order: str) -> None:
    """Shell and iopub are separate sockets: whichever of reply and idle comes last ends the wait."""
    request = execute_request("1")
    head = [status(request, "busy"), execute_input(request, 1), result(request, 1, "1")]
    tail = [reply(request, count=1), status(request, "idle")]
    if order == "reply_after_idle":
        tail.reverse()
    listener = listener_for()
    assert feed(listener, head + tail) == [False, False, False, False, True]
    raw = listener.result("reply")
    assert [o["output_type"] for o in raw.outputs] == ["execute_result"] and raw.execution_count == 1


def test_a_duplicated_idle_changes_nothing() -> None:
    """Two idles before the reply do not end the step early; more after it are harmless."""
    request = execute_request("x = 1")
    listener = listener_for()
    sequence = [status(request, "busy"), execute_input(request, 2), status(request, "idle"), status(request, "idle"),
                reply(request, count=2), status(request, "idle")]
    assert feed(listener, sequence) == [False, False, False, False, True, True]
    raw = listener.result("reply")
    assert (raw.outputs, raw.execution_count) == ([], 2)


def test_the_replys_execution_count_wins_over_execute_input() -> None:
    request = execute_request("1")
    listener = listener_for()
    feed(listener, [execute_input(request, 4), reply(request, count=5), status(request, "idle")])
    assert listener.result("reply").execution_count == 5


def test_an_error_reply_gives_an_error_output_and_an_error_step() -> None:
    """The iopub error becomes an output with ANSI codes stripped; the reply's ename, evalue and
    traceback become the step's error."""
    request = execute_request("x")
    traceback = ["\x1b[0;31mNameError\x1b[0m                Traceback (most recent call last)",
                 "\x1b[0;31mNameError\x1b[0m: name 'x' is not defined"]
    listener = listener_for()
    feed(listener, [status(request, "busy"), execute_input(request, 7),
                    error(request, "NameError", "name 'x' is not defined", traceback),
                    reply(request, "error", count=7, ename="NameError", evalue="name 'x' is not defined",
                          traceback=traceback),
                    status(request, "idle")])
    raw = listener.result("reply")
    plain = ["NameError                Traceback (most recent call last)", "NameError: name 'x' is not defined"]
    assert raw.outputs == [{"output_type": "error", "ename": "NameError", "evalue": "name 'x' is not defined",
                            "traceback": plain}]
    assert raw.execution_count == 7
    assert step_outcome(raw, None, False, 60, "") == (
        "error", {"name": "NameError", "value": "name 'x' is not defined", "traceback": "\n".join(plain)})


def test_an_aborted_reply_is_a_step_that_did_not_run() -> None:
    """A request aborted behind a failing one (stop_on_error) never starts: no count, no outputs."""
    request = execute_request("after_the_error()")
    started: list[bool] = []
    listener = listener_for(on_start=lambda: started.append(True))
    feed(listener, [status(request, "busy"), reply(request, "aborted"), status(request, "idle")])
    raw = listener.result("reply")
    assert (raw.outputs, raw.execution_count, started) == ([], None, [])
    step, step_error = step_outcome(raw, None, False, 60, "")
    assert step == NOT_RUN == "not_run"
    assert step_error is not None and step_error["name"] == "Aborted"


def test_input_requests_are_answered_and_kept_with_prompt_password_and_reply() -> None:
    """``answer`` replies to each input_request; the record keeps prompt, password flag and the
    value given, except a password's."""
    request = execute_request("name = input('Name? '); pin = getpass('PIN: ')")
    answers = iter(["Ada", "1234"])
    asked: list[str] = []

    def answer(msg: dict[str, Any]) -> str:
        asked.append(msg["content"]["prompt"])
        return next(answers)

    listener = listener_for(answer=answer)
    feed(listener, [status(request, "busy"), execute_input(request, 1), input_request(request, "Name? "),
                    input_request(request, "PIN: ", password=True), reply(request, count=1),
                    status(request, "idle")])
    assert asked == ["Name? ", "PIN: "]
    assert listener.result("reply").stdin == [{"prompt": "Name? ", "password": False, "value": "Ada"},
                                              {"prompt": "PIN: ", "password": True, "value": None}]


# execute(): one request on a connection, with a deadline and liveness checks ------------------


@in_loop
async def test_execute_sends_one_request_and_returns_at_idle_and_reply() -> None:
    """The request carries the code and the gateway's options; the answer is routed to it by
    parent msg_id; its listener is forgotten afterwards."""
    connection, process = ScriptedConnection(), KernelProcess()
    task = start(connection, process, "print('hi'); 6 * 7")
    request = await connection.request()
    assert request["content"] == {"code": "print('hi'); 6 * 7", "silent": False, "store_history": True,
                                  "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}
    assert [channel for channel, _ in connection.sent] == ["shell"]
    assert list(connection.listeners) == [request["header"]["msg_id"]]
    connection.push(*ran(request, 1, stream(request, "hi\n"), result(request, 1, "42")))
    raw = await task
    assert raw.ended == "reply" and raw.execution_count == 1
    assert summarise(raw.outputs) == {"stdout": "hi\n", "stderr": "", "result": "42", "error": None}
    assert connection.listeners == {} and process.interrupts == 0


@in_loop
async def test_messages_of_another_request_never_reach_the_execution() -> None:
    """Another client's busy, stream, result, reply and idle, and a status with no parent, do not
    end this step or add to its outputs; observers still see every message."""
    observed: list[str] = []
    connection = ScriptedConnection([lambda channel, msg, frames: observed.append(msg["header"]["msg_type"])])
    task = start(connection, KernelProcess())
    request = await connection.request()
    other = execute_request("someone_else()")
    connection.push(status(request, "busy"), execute_input(request, 2), stream(request, "mine\n"))
    connection.push(message("status", None, execution_state="starting"), *ran(other, 9, stream(other, "theirs\n"),
                                                                             result(other, 9, "'theirs'")))
    await asyncio.sleep(0.02)
    assert not task.done()
    connection.push(reply(request, count=2), status(request, "idle"))
    raw = await task
    assert raw.outputs == [{"output_type": "stream", "name": "stdout", "text": "mine\n"}]
    assert raw.execution_count == 2
    assert len(observed) == 3 + 1 + 6 + 2


@in_loop
async def test_input_requests_are_answered_in_order_then_with_empty_strings() -> None:
    """With ``input_replies`` the request allows stdin; each input_request gets an input_reply on
    stdin, parented to it, with the next reply ("" once they run out)."""
    connection = ScriptedConnection()
    task = start(connection, KernelProcess(), input_replies=["Ada", "1234"])
    request = await connection.request()
    assert request["content"]["allow_stdin"] is True
    asks = [input_request(request, "Name? "), input_request(request, "PIN: ", password=True),
            input_request(request, "More? ")]
    connection.push(status(request, "busy"), execute_input(request, 1), *asks, reply(request, count=1),
                    status(request, "idle"))
    raw = await task
    replies = connection.sent_of("input_reply")
    assert [channel for channel, _ in replies] == ["stdin"] * 3
    assert [msg["content"] for _, msg in replies] == [{"value": "Ada"}, {"value": "1234"}, {"value": ""}]
    assert [msg["parent_header"]["msg_id"] for _, msg in replies] == [ask["msg_id"] for ask in asks]
    assert raw.stdin == [{"prompt": "Name? ", "password": False, "value": "Ada"},
                         {"prompt": "PIN: ", "password": True, "value": None},
                         {"prompt": "More? ", "password": False, "value": ""}]


@in_loop
async def test_a_timeout_the_interrupt_stops_ends_as_timeout() -> None:
    """Past the deadline the kernel is interrupted once; it stops (KeyboardInterrupt), so the wait
    ends "timeout" with what it printed and the interrupt's error kept."""
    connection = ScriptedConnection()
    holder: dict[str, dict[str, Any]] = {}

    def obey() -> None:
        request = holder["request"]
        connection.push(error(request, "KeyboardInterrupt", "", ["KeyboardInterrupt: "]),
                        reply(request, "error", count=1, ename="KeyboardInterrupt", evalue="", traceback=[]),
                        status(request, "idle"))

    process = KernelProcess(on_interrupt=obey)
    began = time.monotonic()
    task = start(connection, process, "while True: pass", timeout=0.05, interrupt_grace=2.0)
    holder["request"] = request = await connection.request()
    connection.push(status(request, "busy"), execute_input(request, 1), stream(request, "working\n"))
    raw = await task
    assert time.monotonic() - began < 1.0
    assert (raw.ended, process.interrupts, raw.execution_count) == ("timeout", 1, 1)
    assert [o["output_type"] for o in raw.outputs] == ["stream", "error"]
    assert raw.outputs[1]["ename"] == "KeyboardInterrupt"
    assert step_outcome(raw, None, False, 0.05, "") == ("timeout", {
        "name": "Timeout", "traceback": "",
        "value": "The step did not finish within its 0.05 s time limit. The kernel was interrupted; the session's "
                 "variables are kept."})


@in_loop
async def test_a_timeout_the_kernel_ignores_ends_as_stuck() -> None:
    """A kernel that answers neither the request nor the interrupt within the grace: "stuck"."""
    connection, process = ScriptedConnection(), KernelProcess()
    began = time.monotonic()
    task = start(connection, process, "ignore_sigint()", timeout=0.05, interrupt_grace=0.05)
    request = await connection.request()
    connection.push(status(request, "busy"), execute_input(request, 3), stream(request, "partial"))
    raw = await task
    assert time.monotonic() - began >= 0.1
    assert (raw.ended, process.interrupts, raw.reply, raw.execution_count) == ("stuck", 1, None, 3)
    assert raw.outputs == [{"output_type": "stream", "name": "stdout", "text": "partial"}]
    step, step_error = step_outcome(raw, None, False, 0.05, "")
    assert step == "timeout" and step_error is not None
    assert step_error["value"].endswith("The kernel ignored the interrupt and was restarted: variables and imports "
                                        "are gone; files are kept.")
    assert connection.listeners == {}


def start_queued(connection: ScriptedConnection, process: KernelProcess, *, timeout: float,
                 queue_timeout: float) -> "asyncio.Task[str]":
    """``executor.run`` of one request that may wait behind others for ``queue_timeout`` s."""
    listener = ExecutionListener(OutputCollector(10_000), asyncio.get_running_loop().create_future())
    return asyncio.create_task(executor.run(connection, listener, "queued()", timeout=timeout,
                                            is_alive=process.is_alive, interrupt=process.interrupt,
                                            interrupt_grace=0.05, queue_timeout=queue_timeout))


@in_loop
async def test_waiting_behind_another_clients_request_does_not_count_against_the_timeout() -> None:
    """The kernel runs someone else's request first (no execute_input for this one yet): past
    this step's own timeout nothing is interrupted; once it begins, it runs to its end."""
    connection, process = ScriptedConnection(), KernelProcess()
    task = start_queued(connection, process, timeout=0.1, queue_timeout=5.0)
    request = await connection.request()
    await asyncio.sleep(0.4)
    assert process.interrupts == 0 and not task.done()
    connection.push(*ran(request, 7))
    assert (await task, process.interrupts) == ("reply", 0)


@in_loop
async def test_the_time_budget_counts_from_when_the_kernel_begins_the_step() -> None:
    connection = ScriptedConnection()
    interrupted_at: list[float] = []
    process = KernelProcess(on_interrupt=lambda: interrupted_at.append(time.monotonic()))
    task = start_queued(connection, process, timeout=0.2, queue_timeout=5.0)
    request = await connection.request()
    await asyncio.sleep(0.3)
    began = time.monotonic()
    connection.push(status(request, "busy"), execute_input(request, 1))
    assert await task == "stuck"
    assert len(interrupted_at) == 1 and interrupted_at[0] - began >= 0.19


@in_loop
async def test_a_step_that_never_begins_is_interrupted_after_the_queue_timeout() -> None:
    connection = ScriptedConnection()
    interrupted_at: list[float] = []
    process = KernelProcess(on_interrupt=lambda: interrupted_at.append(time.monotonic()))
    sent = time.monotonic()
    task = start_queued(connection, process, timeout=0.05, queue_timeout=0.3)
    assert await task == "stuck"
    assert len(interrupted_at) == 1 and 0.29 <= interrupted_at[0] - sent < 1.0


@in_loop
async def test_a_kernel_dying_mid_step_ends_it_as_died(fast_liveness: None) -> None:
    """The liveness check says the kernel is gone: the wait ends "died" long before the deadline,
    with the outputs that arrived before."""
    connection, process = ScriptedConnection(), KernelProcess()
    began = time.monotonic()
    task = start(connection, process, "os._exit(1)", timeout=30.0)
    request = await connection.request()
    connection.push(status(request, "busy"), execute_input(request, 4), stream(request, "bye\n", "stderr"))
    process.alive = False
    raw = await task
    assert time.monotonic() - began < 2.0
    assert (raw.ended, raw.reply, raw.execution_count, process.interrupts) == ("died", None, 4, 0)
    assert raw.outputs == [{"output_type": "stream", "name": "stderr", "text": "bye\n"}]
    step, step_error = step_outcome(raw, None, False, 30, "it exited with code 1")
    assert step == "died" and step_error is not None and step_error["name"] == "KernelDied"
    assert step_error["value"].startswith("The kernel process ended during this step (it exited with code 1).")


@in_loop
async def test_a_reply_in_flight_when_the_kernel_dies_still_counts(fast_liveness: None) -> None:
    """A kernel that exits right after finishing: its reply and idle, landing just after the
    liveness check, make the step a normal "reply"."""
    connection = ScriptedConnection()
    holder: dict[str, dict[str, Any]] = {}

    async def dead_after_answering() -> bool:
        request = holder["request"]
        asyncio.get_running_loop().call_later(0.01, connection.push, reply(request, count=1), status(request, "idle"))
        return False

    task = asyncio.create_task(execute(connection, "sys.exit()", timeout=30.0, output_limit=100,
                                       is_alive=dead_after_answering, interrupt=KernelProcess().interrupt,
                                       interrupt_grace=1.0))
    holder["request"] = request = await connection.request()
    connection.push(status(request, "busy"), execute_input(request, 1))
    raw = await task
    assert (raw.ended, raw.reply, raw.execution_count) == ("reply", {"status": "ok", "execution_count": 1}, 1)


@in_loop
async def test_an_abort_ends_the_wait_as_aborted() -> None:
    """A restart while the step runs resolves ``abort``: the wait ends "aborted", not interrupted."""
    connection, process = ScriptedConnection(), KernelProcess()
    abort: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = start(connection, process, "sleep(60)", timeout=30.0, abort=abort)
    request = await connection.request()
    connection.push(status(request, "busy"), execute_input(request, 1))
    abort.set_result("restart")
    raw = await task
    assert (raw.ended, process.interrupts) == ("aborted", 0)
    assert step_outcome(raw, "restart", False, 30, "") == ("interrupted", {
        "name": "Interrupted", "value": "The kernel was restarted during this step: variables and imports are gone.",
        "traceback": ""})


@in_loop
async def test_output_past_the_limit_is_cut_and_marked() -> None:
    """16 bytes kept: the stream is cut at the limit with the note, later streams and displays
    are dropped, the result is still kept, and the step is marked truncated."""
    connection = ScriptedConnection()
    task = start(connection, KernelProcess(), output_limit=16)
    request = await connection.request()
    connection.push(*ran(request, 1, stream(request, "0123456789"), stream(request, "ABCDEFGHIJ"),
                         stream(request, "dropped"), display(request, {"text/plain": "dropped too"}),
                         result(request, 1, "'kept'")))
    raw = await task
    assert raw.truncated is True
    assert raw.outputs == [
        {"output_type": "stream", "name": "stdout", "text": "0123456789ABCDEF" + TRUNCATION_NOTE.format(limit=16)},
        {"output_type": "execute_result", "data": {"text/plain": "'kept'"}, "metadata": {}, "execution_count": 1},
    ]


@in_loop
async def test_nothing_is_sent_when_on_send_refuses() -> None:
    connection = ScriptedConnection()

    def refuse() -> None:
        raise RuntimeError("not recorded")

    with pytest.raises(RuntimeError, match="not recorded"):
        await start(connection, KernelProcess(), on_send=refuse)
    assert connection.sent == [] and connection.listeners == {}


# outputs -------------------------------------------------------------------------------------

CELL = execute_request("cell()")


def collect(messages: list[dict[str, Any]], limit: int = 10_000,
            events: list[dict[str, Any]] | None = None) -> OutputCollector:
    collector = OutputCollector(limit, events.append if events is not None else None)
    for msg in messages:
        collector.handle(msg)
    return collector


def test_consecutive_streams_of_one_name_are_coalesced() -> None:
    """Chunks of one stream join (carriage returns resolved across chunks); a display between
    them starts a new stream output; every chunk is still streamed to the sink."""
    events: list[dict[str, Any]] = []
    collector = collect([stream(CELL, "10%\r"), stream(CELL, "50%\r"), stream(CELL, "100%\n"),
                         display(CELL, {"text/plain": "<figure>"}), stream(CELL, "after\n")], events=events)
    assert collector.finish() == [
        {"output_type": "stream", "name": "stdout", "text": "100%\n"},
        {"output_type": "display_data", "data": {"text/plain": "<figure>"}, "metadata": {}},
        {"output_type": "stream", "name": "stdout", "text": "after\n"},
    ]
    assert [event["type"] for event in events] == ["stdout", "stdout", "stdout", "display", "stdout"]


def test_stdout_and_stderr_interleaving_is_kept_in_order() -> None:
    collector = collect([stream(CELL, "a"), stream(CELL, "b", "stderr"), stream(CELL, "c"),
                         stream(CELL, "d", "stderr"), stream(CELL, "e", "stderr"), stream(CELL, "f", "other")])
    outputs = collector.finish()
    assert [(o["name"], o["text"]) for o in outputs] == [("stdout", "a"), ("stderr", "b"), ("stdout", "c"),
                                                          ("stderr", "de"), ("stdout", "f")]
    assert (summarise(outputs)["stdout"], summarise(outputs)["stderr"]) == ("acf", "bde")


@pytest.mark.parametrize("sequence, expected", [
    pytest.param([stream(CELL, "old"), clear(CELL, wait=True)], [("stream", "old")],
                 id="wait-keeps-outputs-until-a-new-one"),
    pytest.param([stream(CELL, "old"), clear(CELL, wait=True), stream(CELL, "new")], [("stream", "new")],
                 id="wait-clears-at-the-next-stream"),
    pytest.param([stream(CELL, "old"), clear(CELL, wait=True), display(CELL, {"text/plain": "img"})],
                 [("display_data", "img")], id="wait-clears-at-the-next-display"),
    pytest.param([stream(CELL, "old"), clear(CELL, wait=True), error(CELL, "E", "v", [])], [("error", "E")],
                 id="wait-clears-at-the-next-error"),
    pytest.param([stream(CELL, "1"), clear(CELL, wait=True), stream(CELL, "2"), clear(CELL, wait=True),
                  stream(CELL, "3"), stream(CELL, "4")], [("stream", "34")], id="a-progress-loop-keeps-its-last-frame"),
    pytest.param([stream(CELL, "old"), clear(CELL, wait=False)], [], id="no-wait-clears-at-once"),
    pytest.param([display(CELL, {"text/plain": "v1"}, "d"), clear(CELL, wait=True),
                  update_display(CELL, {"text/plain": "v2"}, "d")], [("display_data", "v2")],
                 id="an-update-is-not-a-new-output"),
])
def test_clear_output(sequence: list[dict[str, Any]], expected: list[tuple[str, str]]) -> None:
    """clear_output(wait=True) clears when the next output arrives (as Jupyter front ends do);
    without wait it clears at once."""
    outputs = collect(sequence).finish()
    shown = [(o["output_type"], o.get("text") or o.get("ename") or o.get("data", {}).get("text/plain"))
             for o in outputs]
    assert shown == expected


def test_update_display_data_replaces_every_output_with_its_display_id() -> None:
    """Both displays with id "p" take the update's data and metadata; the other display and an
    update for an unknown id change nothing; the display ids are not part of the outputs."""
    events: list[dict[str, Any]] = []
    collector = collect([display(CELL, {"text/plain": "0%"}, "p"), display(CELL, {"text/plain": "other"}, "q"),
                         stream(CELL, "between\n"), display(CELL, {"text/plain": "0% again"}, "p"),
                         update_display(CELL, {"text/plain": "100%", "text/html": "<b>100%</b>"}, "p"),
                         update_display(CELL, {"text/plain": "ghost"}, "missing")], events=events)
    assert collector.finish() == [
        {"output_type": "display_data", "data": {"text/plain": "100%", "text/html": "<b>100%</b>"}, "metadata": {}},
        {"output_type": "display_data", "data": {"text/plain": "other"}, "metadata": {}},
        {"output_type": "stream", "name": "stdout", "text": "between\n"},
        {"output_type": "display_data", "data": {"text/plain": "100%", "text/html": "<b>100%</b>"}, "metadata": {}},
    ]
    assert [event["type"] for event in events] == ["display", "display", "stdout", "display", "display", "display"]


def test_ansi_codes_are_stripped_from_errors_streams_and_plain_results() -> None:
    """What agents and reviewers see is text: colour codes, cursor moves and terminal links go
    from tracebacks, error values, streams (also a code split across two messages) and
    text/plain results. (A websocket client gets the kernel's own messages, colours and all.)"""
    collector = collect([stream(CELL, "\x1b[1;32mgreen\x1b[0m\n"), stream(CELL, "split \x1b[3"),
                         stream(CELL, "1mred\x1b[0m \x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\\n"),
                         error(CELL, "ValueError", "\x1b[31mbad\x1b[0m", ["\x1b[0;31mValueError\x1b[0m: bad",
                                                                        "\x1b[?25hcursor"])])
    outputs = collector.finish()
    assert outputs[0]["text"] == "green\nsplit red link\n"
    assert outputs[1] == {"output_type": "error", "ename": "ValueError", "evalue": "bad",
                          "traceback": ["ValueError: bad", "cursor"]}
    assert clean_bundle({"text/plain": "\x1b[1mbold\x1b[0m", "text/html": "<b>\x1b[1m</b>"}) == {
        "text/plain": "bold", "text/html": "<b>\x1b[1m</b>"}


def test_the_budget_counts_utf8_bytes() -> None:
    """Ten bytes of "é" fill a 10-byte budget exactly; one more byte is cut, with the note; a cut
    never splits a character."""
    exact = collect([stream(CELL, "ééééé")], limit=10)
    assert (exact.used, exact.truncated, exact.finish()[0]["text"]) == (10, False, "ééééé")
    over = collect([stream(CELL, "ééééé"), stream(CELL, "x")], limit=10)
    assert over.truncated is True
    assert over.finish()[0]["text"] == "ééééé" + TRUNCATION_NOTE.format(limit=10)
    split = collect([stream(CELL, "ééé")], limit=5)
    assert split.finish()[0]["text"] == "éé" + TRUNCATION_NOTE.format(limit=5)


def test_a_display_over_the_budget_is_dropped_and_nothing_after_it_kept() -> None:
    """A display that does not fit is dropped whole; streams after the cut are dropped; results
    and errors are always kept."""
    collector = collect([stream(CELL, "12345"), display(CELL, {"text/plain": "x" * 20}), stream(CELL, "later"),
                         result(CELL, 1, "r" * 50), error(CELL, "E", "v", [])], limit=10)
    assert collector.truncated is True
    assert [(o["output_type"], o.get("text")) for o in collector.finish()] == [
        ("stream", "12345"), ("execute_result", None), ("error", None)]


def test_an_update_display_data_is_held_to_the_output_budget() -> None:
    """A 1-byte display updated with 10 000 bytes under a 100-byte budget: the step should be
    marked truncated and keep no more than its budget."""
    collector = collect([display(CELL, {"text/plain": "x"}, "d"), update_display(CELL, {"text/plain": "y" * 10_000}, "d")],
                        limit=100)
    outputs = collector.finish()
    assert collector.truncated is True
    assert sum(len(value) for output in outputs for value in output["data"].values()) <= 100


# outcome rules -------------------------------------------------------------------------------

REPLIES: dict[str, dict[str, Any] | None] = {
    "ok": {"status": "ok", "execution_count": 1},
    "error": {"status": "error", "ename": "ValueError", "evalue": "bad", "traceback": ["ValueError: bad"]},
    "keyboard_interrupt": {"status": "error", "ename": "KeyboardInterrupt", "evalue": "", "traceback": []},
    "aborted": {"status": "aborted"},
    "none": None,
}
BY_END = {"timeout": ("timeout", "Timeout"), "stuck": ("timeout", "Timeout"), "died": ("died", "KernelDied"),
          "aborted": ("interrupted", "Interrupted")}
BY_REPLY = {  # when the wait ended with the reply: (reply, interrupt_requested) -> (status, error name)
    ("ok", False): ("ok", None), ("ok", True): ("ok", None),
    ("error", False): ("error", "ValueError"), ("error", True): ("error", "ValueError"),
    ("keyboard_interrupt", False): ("error", "KeyboardInterrupt"),
    ("keyboard_interrupt", True): ("interrupted", "KeyboardInterrupt"),
    ("aborted", False): (NOT_RUN, "Aborted"), ("aborted", True): (NOT_RUN, "Aborted"),
}
ENDED = ("reply", "timeout", "stuck", "died", "aborted")
OUTCOME_CASES = [case for case in itertools.product(ENDED, (None, "restart", "terminated"), (False, True), REPLIES)
                 if not (case[0] == "reply" and case[3] == "none")]  # the wait ends "reply" only with a reply


def raw_execution(ended: str, reply_content: dict[str, Any] | None) -> RawExecution:
    return RawExecution(outputs=[], reply=reply_content, execution_count=None, truncated=False, ended=ended)


@pytest.mark.parametrize("ended, aborted_by, interrupt_requested, reply_kind", OUTCOME_CASES)
def test_outcome_rules(ended: str, aborted_by: str | None, interrupt_requested: bool, reply_kind: str) -> None:
    """How the wait ended decides first; only a wait that ended with the reply looks at it; a
    KeyboardInterrupt is "interrupted" only when someone asked for the interrupt."""
    expected = BY_END[ended] if ended != "reply" else BY_REPLY[(reply_kind, interrupt_requested)]
    status, step_error = step_outcome(raw_execution(ended, REPLIES[reply_kind]), aborted_by, interrupt_requested,
                                      60, "it was killed by SIGKILL")
    assert (status, step_error["name"] if step_error else None) == expected
    assert status in STATUSES and status in FINAL_STATUSES
    assert (status in UNFINISHED_STATUSES) == (ended != "reply" or expected[0] == "interrupted")
    assert (status in RERUN_STATUSES) == (ended == "reply" and expected[0] in ("ok", "error"))


def test_the_outcome_rules_reach_every_status_but_running_and_lost() -> None:
    reached = {step_outcome(raw_execution(ended, REPLIES[kind]), by, asked, 60, "")[0]
               for ended, by, asked, kind in OUTCOME_CASES}
    assert reached == set(STATUSES) - {"running", "lost"}


@pytest.mark.parametrize("ended, aborted_by, limit, value", [
    ("died", None, 60, "The kernel process ended during this step (it was killed by SIGKILL). A new kernel was "
                       "started for this session: variables and imports are gone; files in the workspace are kept."),
    ("timeout", None, 2.5, "The step did not finish within its 2.5 s time limit. The kernel was interrupted; the "
                           "session's variables are kept."),
    ("stuck", None, 3600, "The step did not finish within its 3600 s time limit. The kernel ignored the interrupt "
                          "and was restarted: variables and imports are gone; files are kept."),
    ("aborted", "restart", 60, "The kernel was restarted during this step: variables and imports are gone."),
    ("aborted", "terminated", 60, "The session was terminated during this step."),
    ("aborted", "paused", 60, "The session was paused during this step."),
    ("aborted", None, 60, "The session was stopped during this step."),
])
def test_outcome_messages(ended: str, aborted_by: str | None, limit: float, value: str) -> None:
    _, step_error = step_outcome(raw_execution(ended, None), aborted_by, False, limit, "it was killed by SIGKILL")
    assert step_error is not None and step_error["value"] == value and step_error["traceback"] == ""


def test_an_error_replys_ansi_codes_are_stripped_and_its_traceback_joined() -> None:
    raw = raw_execution("reply", {"status": "error", "ename": "KeyError", "evalue": "\x1b[31m'k'\x1b[0m",
                                  "traceback": ["\x1b[1mTraceback\x1b[0m", "KeyError: 'k'"]})
    assert step_outcome(raw, None, False, 60, "") == (
        "error", {"name": "KeyError", "value": "'k'", "traceback": "Traceback\nKeyError: 'k'"})


# the websocket hub ---------------------------------------------------------------------------

ADA = Principal("ada", "agent")
RITA = Principal("rita", "reviewer")
MALLORY = Principal("mallory", "agent")


@dataclass
class Client:
    """A websocket client as the hub sees it; ``open`` False makes deliveries fail."""

    client_id: str
    principal: Principal
    open: bool = True
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    on_deliver: Callable[[str, dict[str, Any]], None] | None = None

    def deliver(self, channel: str, msg: dict[str, Any], frames: list[bytes]) -> bool:
        if not self.open:
            return False
        if self.on_deliver is not None:
            self.on_deliver(channel, msg)
        self.received.append((channel, msg))
        return True

    def refuse(self, reason: str) -> None:
        self.refused.append(reason)

    def seen(self) -> list[tuple[str, str, str | None]]:
        """(channel, msg_type, parent msg_id) of each message received, in order."""
        return [(channel, msg["header"]["msg_type"], msg["parent_header"].get("msg_id"))
                for channel, msg in self.received]


class SessionKernel:
    """What the hub uses of a session's kernel: its observers, connection and kernel_info."""

    def __init__(self) -> None:
        self.observers: list[Any] = []
        self.connection = ScriptedConnection(self.observers)
        self.kernel_info = {"status": "ok", "protocol_version": "5.3", "implementation": "scripted",
                            "language_info": {"name": "python"}}


@dataclass
class Scene:
    """One live session (its row in a real SQLite store) with a hub and a scripted kernel."""

    manager: SessionManager
    live: LiveSession
    kernel: ScriptedConnection
    hub: KernelHub

    def client(self, client_id: str, principal: Principal = ADA) -> Client:
        client = Client(client_id, principal)
        self.hub.attach(client)
        return client

    def send(self, client: Client, msg: dict[str, Any], channel: str = "shell") -> dict[str, Any]:
        """A client message through the hub, as the channels handler passes it (JSON protocol)."""

        def send(listener: Any) -> None:
            self.kernel.send(channel, msg, listener)

        self.hub.from_client(client, channel, msg["header"], msg["content"], send, msg["parent_header"])
        return msg

    def forwarded(self) -> list[tuple[str, str]]:
        return [(channel, msg["header"]["msg_type"]) for channel, msg in self.kernel.sent]

    def steps(self) -> list[dict[str, Any]]:
        return self.manager.store.list_steps(self.live.id)

    def events(self, action: str) -> list[dict[str, Any]]:
        return [event["details"] for event in self.manager.store.list_events(self.live.id)
                if event["action"] == action]


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    settings = Settings(data_dir=str(tmp_path / "data"), notebook_write_delay=3600.0, max_output_bytes=1000)
    store = Store(settings.data_path / "gateway.db")
    manager = SessionManager(settings, store, KernelLauncher(tmp_path / "runtime"), Metrics())
    row = SessionRecord("s_scripted", str(uuid.uuid4()), "python3", "idle", ADA.name, DATE, DATE)
    store.insert_session(row)
    live = manager.register(row, manager.trajectory_of(row.id))
    kernel = SessionKernel()
    live.kernel = kernel  # type: ignore[assignment]
    yield Scene(manager, live, kernel.connection, KernelHub(manager, live, replay_seconds=60.0))
    store.close()


def info_request() -> dict[str, Any]:
    return message("kernel_info_request", sender="client")


def info_reply(request: dict[str, Any]) -> dict[str, Any]:
    return message("kernel_info_reply", request, status="ok", protocol_version="5.3")


@in_loop
async def test_replies_go_to_the_requesting_client_and_iopub_to_every_client(scene: Scene) -> None:
    """A's kernel_info_request is forwarded once; its reply reaches only A, its busy and idle
    reach A and B; afterwards nothing is left waiting."""
    a, b = scene.client("a"), scene.client("b")
    request = scene.send(a, info_request())
    assert scene.forwarded() == [("shell", "kernel_info_request")]
    scene.kernel.push(status(request, "busy"), info_reply(request), status(request, "idle"))
    msg_id = request["msg_id"]
    assert a.seen() == [("iopub", "status", msg_id), ("shell", "kernel_info_reply", msg_id), ("iopub", "status", msg_id)]
    assert b.seen() == [("iopub", "status", msg_id), ("iopub", "status", msg_id)]
    assert (scene.hub.requests, scene.hub.pending_by_client, scene.kernel.listeners) == ({}, {}, {})


@in_loop
async def test_a_client_execution_is_recorded_as_a_step_before_and_after_it_runs(scene: Scene) -> None:
    """The step is in the store as running before the kernel answers, and complete (ok, outputs,
    count) by the time the client sees the kernel idle again."""
    a = scene.client("a")
    at_idle: list[str] = []
    a.on_deliver = lambda channel, msg: at_idle.append(scene.steps()[0]["status"]) if (
        msg["header"]["msg_type"] == "status" and msg["content"]["execution_state"] == "idle") else None
    request = scene.send(a, execute_request("print('hi'); 6 * 7"))
    [running] = scene.steps()
    assert (running["status"], running["code"], running["source"], running["principal"], running["step"]) == (
        "running", "print('hi'); 6 * 7", "jupyter", "ada", 1)
    scene.kernel.push(*ran(request, 1, stream(request, "hi\n"), result(request, 1, "42")))
    [step] = scene.steps()
    assert (step["status"], step["execution_count"], step["stdout"], step["result"], step["truncated"]) == (
        "ok", 1, "hi\n", "42", 0)
    assert at_idle == ["ok"]
    assert [msg_type for _, msg_type, _ in a.seen()] == ["status", "execute_input", "stream", "execute_result",
                                                          "execute_reply", "status"]
    assert scene.events("execute") == [{"step": 1, "code": "print('hi'); 6 * 7", "status": "ok", "source": "jupyter"}]
    assert scene.live.record.steps == 1 and scene.hub.requests == {}


@pytest.mark.parametrize("kernel_reply, expected", [
    ({"state": "error", "ename": "ZeroDivisionError", "evalue": "division by zero", "traceback": []},
     ("error", "ZeroDivisionError")),
    ({"state": "error", "ename": "KeyboardInterrupt", "evalue": "", "traceback": []},
     ("interrupted", "KeyboardInterrupt")),
    ({"state": "aborted"}, (NOT_RUN, "Aborted")),
])
@in_loop
async def test_a_client_executions_outcome_follows_its_reply(scene: Scene, kernel_reply: dict[str, Any],
                                                             expected: tuple[str, str]) -> None:
    """A client's KeyboardInterrupt counts as asked for (only clients can send the interrupt)."""
    a = scene.client("a")
    request = scene.send(a, execute_request("go()"))
    scene.kernel.push(status(request, "busy"), reply(request, **kernel_reply), status(request, "idle"))
    [step] = scene.steps()
    assert (step["status"], step["error"] and json.loads(step["error"])["name"]) == expected


@in_loop
async def test_a_silent_execution_is_an_event_not_a_step(scene: Scene) -> None:
    a = scene.client("a")
    request = scene.send(a, execute_request("%who", silent=True, user_expressions={"n": "len(x)"}))
    assert scene.steps() == []
    assert scene.events("silent_execution") == [{"code": "%who", "client": "a",
                                                 "user_expressions": {"n": "len(x)"}}]
    assert scene.forwarded() == [("shell", "execute_request")]
    scene.kernel.push(status(request, "busy"), reply(request, count=None), status(request, "idle"))
    assert scene.hub.requests == {} and scene.steps() == []
    assert ("shell", "execute_reply", request["msg_id"]) in a.seen()


@in_loop
async def test_what_a_client_types_is_recorded_with_the_step_before_it_reaches_the_kernel(scene: Scene) -> None:
    """The kernel's input_request goes to the client that ran the code; its input_reply is kept in
    the running step's stdin, then forwarded; a password's value is not kept."""
    a, b = scene.client("a"), scene.client("b")
    request = scene.send(a, execute_request("name = input('Name? '); pin = getpass('PIN: ')"))
    scene.kernel.push(status(request, "busy"), execute_input(request, 1))
    name_prompt = input_request(request, "Name? ")
    scene.kernel.push(name_prompt)
    assert ("stdin", "input_request", request["msg_id"]) in a.seen()
    assert [seen for seen in b.seen() if seen[0] == "stdin"] == []
    scene.send(a, message("input_reply", name_prompt, sender="client", value="Ada"), channel="stdin")
    assert json.loads(scene.steps()[0]["stdin"]) == [{"prompt": "Name? ", "password": False,
                                                                    "value": "Ada"}]
    pin_prompt = input_request(request, "PIN: ", password=True)
    scene.kernel.push(pin_prompt)
    scene.send(a, message("input_reply", pin_prompt, sender="client", value="1234"), channel="stdin")
    forwarded = scene.kernel.sent_of("input_reply")
    assert [msg["content"]["value"] for _, msg in forwarded] == ["Ada", "1234"]
    scene.kernel.push(reply(request, count=1), status(request, "idle"))
    [step] = scene.steps()
    assert step["status"] == "ok"
    assert json.loads(step["stdin"]) == [{"prompt": "Name? ", "password": False, "value": "Ada"},
                                                       {"prompt": "PIN: ", "password": True, "value": None}]


@in_loop
async def test_what_a_client_types_for_a_silent_execution_is_an_event(scene: Scene) -> None:
    a = scene.client("a")
    request = scene.send(a, execute_request("input('? ')", store_history=False))
    prompt = input_request(request, "? ")
    scene.kernel.push(prompt)
    scene.send(a, message("input_reply", prompt, sender="client", value="yes"), channel="stdin")
    assert scene.events("silent_input") == [{"client": "a", "request": request["msg_id"], "prompt": "? ",
                                             "password": False, "value": "yes"}]
    assert scene.steps() == []


@in_loop
async def test_a_parked_client_gets_what_it_missed_in_order(scene: Scene) -> None:
    """A disconnects with a request pending; the iopub messages and the reply it misses are kept
    and replayed when it comes back under the same id; B, connected, is not affected."""
    a, b = scene.client("a"), scene.client("b")
    request = scene.send(a, info_request())
    scene.hub.detach(a)
    scene.kernel.push(status(request, "busy"), info_reply(request), status(request, "idle"))
    assert b.seen() == [("iopub", "status", request["msg_id"])] * 2
    back = Client("a", ADA)
    assert scene.hub.attach(back) == 3
    assert back.seen() == [("iopub", "status", request["msg_id"]), ("shell", "kernel_info_reply", request["msg_id"]),
                           ("iopub", "status", request["msg_id"])]
    assert a.received == [] and scene.hub.parked == {}
    assert scene.events("jupyter_detached") == [{"client": "a"}]
    assert scene.events("jupyter_attached")[-1] == {"client": "a", "replayed": 3, "dropped": 0}


@in_loop
async def test_a_parked_buffer_goes_only_to_the_principal_it_was_kept_for(scene: Scene) -> None:
    a = scene.client("a")
    scene.hub.detach(a)
    scene.kernel.push(status(CELL, "busy"))
    intruder = Client("a", MALLORY)
    assert scene.hub.attach(intruder) == 0
    assert intruder.received == [] and scene.hub.parked == {}


@in_loop
async def test_a_parked_buffer_keeps_the_newest_messages_within_its_count(scene: Scene,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_module, "PARKED_MAX_MESSAGES", 3)
    scene.hub.detach(scene.client("a"))
    texts = [f"line {n}\n" for n in range(5)]
    scene.kernel.push(*(stream(CELL, text) for text in texts))
    parked = scene.hub.parked["a"]
    assert (len(parked.messages), parked.dropped) == (3, 2)
    back = Client("a", ADA)
    assert scene.hub.attach(back) == 3
    assert [msg["content"]["text"] for _, msg in back.received] == texts[2:]
    assert scene.events("jupyter_attached")[-1] == {"client": "a", "replayed": 3, "dropped": 2}


def test_a_parked_buffer_keeps_the_newest_messages_within_its_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sizes are the frames' bytes; the oldest go first; a message larger than the whole bound
    is not kept at all."""
    monkeypatch.setattr(hub_module, "PARKED_MAX_BYTES", 100)
    parked = Parked(ADA, expires_at=time.monotonic() + 60)
    for n in range(4):
        parked.keep("iopub", {"n": n}, [b"h" * 10, b"c" * 20])  # 30 bytes each
    assert [msg["n"] for _, msg, _ in parked.messages] == [1, 2, 3]
    assert (parked.size, parked.dropped) == (90, 1)
    parked.keep("iopub", {"n": 4}, [b"x" * 10])
    assert [msg["n"] for _, msg, _ in parked.messages] == [1, 2, 3, 4] and parked.size == 100
    parked.keep("iopub", {"n": 5}, [b"y" * 101])
    assert (list(parked.messages), parked.size, parked.dropped) == ([], 0, 6)


@in_loop
async def test_a_parked_client_whose_time_is_up_is_dropped(scene: Scene) -> None:
    scene.hub.detach(scene.client("a"))
    scene.kernel.push(status(CELL, "busy"))
    scene.hub.parked["a"].expires_at = time.monotonic() - 1
    scene.kernel.push(status(CELL, "idle"))
    assert scene.hub.parked == {}
    assert scene.hub.attach(Client("a", ADA)) == 0


@in_loop
async def test_a_client_that_cannot_take_an_iopub_message_is_parked_with_it(scene: Scene) -> None:
    a = scene.client("a")
    a.open = False
    scene.kernel.push(stream(CELL, "one\n"), stream(CELL, "two\n"))
    assert "a" not in scene.hub.clients and "a" in scene.hub.parked
    back = Client("a", ADA)
    assert scene.hub.attach(back) == 2
    assert [msg["content"]["text"] for _, msg in back.received] == ["one\n", "two\n"]


@in_loop
async def test_a_reply_that_could_not_be_delivered_is_replayed(scene: Scene) -> None:
    """A's connection breaks just after the busy status: the reply it could not take, and the idle
    after it, should both be replayed when it comes back."""
    a = scene.client("a")
    request = scene.send(a, info_request())
    scene.kernel.push(status(request, "busy"))
    a.open = False
    scene.kernel.push(info_reply(request), status(request, "idle"))
    back = Client("a", ADA)
    scene.hub.attach(back)
    assert back.seen() == [("shell", "kernel_info_reply", request["msg_id"]), ("iopub", "status", request["msg_id"])]


@in_loop
async def test_a_client_with_too_many_requests_waiting_is_refused(scene: Scene,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound is per client: past it the connection is refused and the request not forwarded;
    once a reply frees a place, requests go through again."""
    monkeypatch.setattr(hub_module, "MAX_PENDING_REQUESTS", 3)
    a, b = scene.client("a"), scene.client("b")
    requests = [scene.send(a, info_request()) for _ in range(3)]
    scene.send(a, info_request())
    assert a.refused == ["more than 3 requests waiting for replies"]
    assert len(scene.forwarded()) == 3 and scene.hub.pending_by_client == {"a": 3}
    scene.send(b, info_request())
    assert b.refused == [] and len(scene.forwarded()) == 4
    scene.kernel.push(info_reply(requests[0]))
    scene.send(a, info_request())
    assert a.refused == ["more than 3 requests waiting for replies"] and len(scene.forwarded()) == 5
    assert scene.hub.pending_by_client == {"a": 3, "b": 1}


@in_loop
async def test_a_msg_id_still_waiting_is_refused_with_an_error_reply(scene: Scene) -> None:
    a = scene.client("a")
    first = scene.send(a, execute_request("slow()"))
    scene.send(a, first)
    assert scene.forwarded() == [("shell", "execute_request")] and len(scene.steps()) == 1
    [(channel, refusal)] = a.received
    assert (channel, refusal["header"]["msg_type"], refusal["parent_header"]["msg_id"]) == (
        "shell", "execute_reply", first["msg_id"])
    assert (refusal["content"]["status"], refusal["content"]["ename"]) == ("error", "DuplicateMessageId")


@in_loop
async def test_a_reviewer_may_watch_but_not_run(scene: Scene) -> None:
    """A reviewer's execute_request gets a Forbidden reply and an access_denied event; its
    kernel_info_request is answered by the gateway; nothing reaches the kernel."""
    rita = scene.client("r", RITA)
    refused = scene.send(rita, execute_request("steal()"))
    asked = scene.send(rita, info_request())
    assert scene.forwarded() == [] and scene.steps() == []
    (_, denial), (_, info) = rita.received
    assert (denial["header"]["msg_type"], denial["parent_header"]["msg_id"], denial["content"]["ename"]) == (
        "execute_reply", refused["msg_id"], "Forbidden")
    assert (info["header"]["msg_type"], info["parent_header"]["msg_id"], info["content"]["implementation"]) == (
        "kernel_info_reply", asked["msg_id"], "scripted")
    assert scene.events("access_denied") == [{"msg_type": "execute_request", "client": "r", "code": "steal()",
                                              "reason": "read-only websocket client"}]


@in_loop
async def test_a_shutdown_request_is_ignored(scene: Scene) -> None:
    a = scene.client("a")
    scene.send(a, message("shutdown_request", sender="client", restart=False), channel="control")
    assert scene.forwarded() == [] and a.received == [] and scene.hub.requests == {}


@in_loop
async def test_messages_that_are_not_requests_are_forwarded_without_a_listener(scene: Scene) -> None:
    a = scene.client("a")
    scene.send(a, message("comm_msg", sender="client", comm_id="c", data={}))
    assert scene.forwarded() == [("shell", "comm_msg")]
    assert scene.hub.requests == {} and scene.kernel.listeners == {}


@in_loop
async def test_a_full_workspace_refuses_an_execution(scene: Scene) -> None:
    scene.live.record.isolation = {"limits": {"workspace": 10}}
    scene.live.workspace_bytes = 11
    a = scene.client("a")
    request = scene.send(a, execute_request("write_more()"))
    assert scene.forwarded() == [] and scene.steps() == []
    [(_, refusal)] = a.received
    assert (refusal["parent_header"]["msg_id"], refusal["content"]["ename"]) == (request["msg_id"], "WorkspaceFull")
    assert scene.events("access_denied") == [{"status": 507, "code": "workspace_full", "msg_type": "execute_request",
                                              "client": "a"}]


@pytest.mark.parametrize("died, expected", [
    (True, ("died", "KernelDied", "The kernel process ended during this step (it was killed by SIGKILL).")),
    (False, ("interrupted", "Interrupted", "The kernel was restarted during this step")),
])
@in_loop
async def test_a_replaced_kernel_ends_the_client_steps(scene: Scene, died: bool, expected: tuple[str, str, str]) -> None:
    """Running client executions end as died or interrupted with what they printed; other waiting
    requests are forgotten; every client is told the kernel is restarting."""
    a, b = scene.client("a"), scene.client("b")
    running = scene.send(a, execute_request("crash()"))
    scene.send(b, info_request())
    scene.kernel.push(status(running, "busy"), execute_input(running, 5), stream(running, "before\n"))
    scene.hub.kernel_replaced(died, "it was killed by SIGKILL")
    [step] = scene.steps()
    step_error = json.loads(step["error"])
    assert (step["status"], step_error["name"]) == expected[:2] and step_error["value"].startswith(expected[2])
    assert (step["execution_count"], step["stdout"]) == (5, "before\n")
    assert scene.hub.requests == {} and scene.hub.pending_by_client == {} and scene.kernel.listeners == {}
    for client in (a, b):
        _, last = client.received[-1]
        assert (last["header"]["msg_type"], last["content"]) == ("status", {"execution_state": "restarting"})


@in_loop
async def test_closing_the_hub_ends_running_steps_and_every_client(scene: Scene) -> None:
    a, b = scene.client("a"), scene.client("b")
    scene.send(a, execute_request("forever()"))
    scene.hub.detach(b)
    scene.hub.close_all("the session was terminated", "terminated")
    [step] = scene.steps()
    assert (step["status"], json.loads(step["error"])["value"]) == (
        "interrupted", "The session was terminated during this step.")
    assert a.refused == ["the session was terminated"] and b.refused == []
    assert scene.hub.clients == {} and scene.hub.parked == {} and scene.hub.requests == {}


@in_loop
async def test_a_second_connection_with_the_same_id_replaces_the_first(scene: Scene) -> None:
    first = scene.client("a")
    second = scene.client("a")
    assert first.refused == ["another connection with the same session_id replaced this one"]
    scene.kernel.push(status(CELL, "busy"))
    assert (len(first.received), len(second.received)) == (0, 1)
    assert scene.hub.connections == 1
