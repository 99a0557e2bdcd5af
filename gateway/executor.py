"""Runs one execute_request on a kernel and gathers what it produced.

The discipline of nbclient and jupyter_client: one request, its iopub messages filtered by
parent ``msg_id``, done at ``status: idle`` plus the shell reply; always a deadline; the
kernel's liveness checked while waiting so a dead kernel never hangs a step.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable

from gateway.channels import KernelConnection
from gateway.outputs import EventSink, OutputCollector

LIVENESS_INTERVAL = 0.25


@dataclass
class RawExecution:
    """What the kernel did with one request, before it becomes a recorded step."""

    outputs: list[dict[str, Any]]
    reply: dict[str, Any] | None
    execution_count: int | None
    truncated: bool
    ended: str  # "reply"; "timeout" (stopped by the interrupt); "stuck" (ignored it); "died"; "aborted"
    stdin: list[dict[str, Any]] = field(default_factory=list)  # input() prompts and replies, in order


class ExecutionListener:
    """Gathers the messages answering one execute_request, whoever sent it.

    ``on_start`` is called when the kernel starts running the request (its ``execute_input``);
    ``done`` resolves at idle + reply. The kernel's input_requests are kept in ``stdin`` with
    the replies given (``input_given``); ``answer``, when set, replies to them itself.
    """

    def __init__(self, collector: OutputCollector, done: asyncio.Future[None],
                 on_start: Callable[[], None] | None = None,
                 answer: Callable[[dict[str, Any]], str] | None = None):
        self.collector = collector
        self.done = done
        self.on_start = on_start
        self.answer = answer
        self.started = False
        self.reply: dict[str, Any] | None = None
        self.idle = False
        self.stdin: list[dict[str, Any]] = []

    def on_message(self, channel: str, msg: dict[str, Any]) -> None:
        if channel == "iopub":
            msg_type = msg["header"]["msg_type"]
            if msg_type == "status":
                if msg["content"].get("execution_state") == "idle":
                    self.idle = True
            elif msg_type == "execute_input":
                self.collector.execution_count = msg["content"].get("execution_count")
                self.mark_started()
            else:
                self.collector.handle(msg)
        elif channel == "stdin" and msg["header"]["msg_type"] == "input_request":
            content = msg["content"]
            self.stdin.append({"prompt": str(content.get("prompt", "")), "password": bool(content.get("password"))})
            if self.answer is not None:
                self.input_given(self.answer(msg))
        elif msg["header"]["msg_type"] == "execute_reply":  # on shell, or on control when sent there
            self.reply = msg
        if self.idle and self.reply is not None and not self.done.done():
            self.done.set_result(None)

    def mark_started(self) -> None:
        if not self.started:
            self.started = True
            if self.on_start is not None:
                self.on_start()

    def input_given(self, value: str) -> None:
        """The reply to the kernel's oldest unanswered input_request; a password is not kept."""
        for exchange in self.stdin:
            if "value" not in exchange:
                exchange["value"] = None if exchange["password"] else value
                return

    def result(self, ended: str) -> RawExecution:
        """What the kernel did, once the wait has ended."""
        execution_count = self.collector.execution_count
        reply = self.reply["content"] if self.reply else None
        if reply and reply.get("execution_count") is not None:
            execution_count = reply["execution_count"]
        return RawExecution(outputs=self.collector.finish(), reply=reply, execution_count=execution_count,
                            truncated=self.collector.truncated, ended=ended, stdin=self.stdin)


async def execute(connection: KernelConnection, code: str, *, timeout: float, output_limit: int,
                  is_alive: Any, interrupt: Any, interrupt_grace: float,
                  sink: EventSink | None = None, silent: bool = False, store_history: bool = True,
                  abort: asyncio.Future[str] | None = None,
                  on_send: Callable[[], None] | None = None,
                  on_start: Callable[[], None] | None = None,
                  input_replies: list[str] | None = None) -> RawExecution:
    """Run ``code`` with a listener of its own (see ``run``) and return what the kernel did.
    Without ``input_replies`` the kernel may not ask for input (``input()`` raises); with them,
    its input_requests are answered with them in order (then with empty strings)."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    answer = None if input_replies is None else replier(connection, input_replies)
    listener = ExecutionListener(OutputCollector(output_limit, sink), done, on_start, answer)
    ended = await run(connection, listener, code, timeout=timeout, is_alive=is_alive, interrupt=interrupt,
                      interrupt_grace=interrupt_grace, silent=silent, store_history=store_history, abort=abort,
                      on_send=on_send)
    return listener.result(ended)


async def run(connection: KernelConnection, listener: ExecutionListener, code: str, *, timeout: float,
              is_alive: Any, interrupt: Any, interrupt_grace: float, silent: bool = False,
              store_history: bool = True, abort: asyncio.Future[str] | None = None,
              on_send: Callable[[], None] | None = None, queue_timeout: float = 0.0) -> str:
    """Send ``code`` and wait until the kernel is idle again, the time budget is spent, or the
    kernel died; returns how it ended ("reply", "timeout", "stuck", "died", "aborted").

    The budget of ``timeout`` seconds counts from when the kernel begins the request: one
    waiting behind requests sent by others (a websocket client's) does not interrupt them. It
    waits so for at most ``queue_timeout`` seconds in all; then, or when its own time is up,
    the kernel is interrupted and given ``interrupt_grace`` seconds to finish. When ``abort``
    resolves first (restart, terminate), the wait ends with "aborted". ``is_alive`` and
    ``interrupt`` are coroutine functions of the kernel; ``on_send`` is called just before the
    request goes out (if it raises, nothing is sent).
    """
    loop = asyncio.get_running_loop()
    begun: list[float] = []
    first_start = listener.on_start

    def began() -> None:
        begun.append(loop.time())
        if first_start is not None:
            first_start()

    listener.on_start = began
    request = connection.session.msg("execute_request", {
        "code": code, "silent": silent, "store_history": store_history,
        "user_expressions": {}, "allow_stdin": listener.answer is not None, "stop_on_error": True,
    })
    msg_id = request["header"]["msg_id"]
    if on_send is not None:
        on_send()
    sent = loop.time()

    def deadline() -> float:
        if begun:
            return min(begun[0] + timeout, sent + max(timeout, queue_timeout))
        return sent + max(timeout, queue_timeout)

    connection.send("shell", request, listener)
    try:
        ended = await _wait(listener.done, deadline, is_alive, abort)
        if ended == "timeout":
            await interrupt()
            grace = loop.time() + interrupt_grace
            after = await _wait(listener.done, lambda: grace, is_alive, abort)
            ended = {"reply": "timeout", "timeout": "stuck"}.get(after, after)
    finally:
        connection.forget(msg_id)
    return ended


def replier(connection: KernelConnection, replies: list[str]) -> Callable[[dict[str, Any]], str]:
    """Answers each input_request with the next of ``replies`` (an empty string once they run out)."""
    remaining = iter(replies)

    def answer(input_request: dict[str, Any]) -> str:
        value = next(remaining, "")
        connection.send("stdin", connection.session.msg("input_reply", {"value": value},
                                                        parent=input_request["header"]))
        return value

    return answer


async def _wait(done: asyncio.Future[None], deadline: Callable[[], float], is_alive: Any,
                abort: asyncio.Future[str] | None) -> str:
    """Wait for ``done`` until ``deadline()`` (looked at again as the wait goes on); "reply",
    "timeout", "died" or "aborted"."""
    loop = asyncio.get_running_loop()
    waitables: set[asyncio.Future[Any]] = {done} if abort is None else {done, abort}
    while True:
        remaining = deadline() - loop.time()
        if remaining <= 0:
            return "timeout"
        await asyncio.wait(waitables, timeout=min(remaining, LIVENESS_INTERVAL),
                           return_when=asyncio.FIRST_COMPLETED)
        if done.done():
            return "reply"
        if abort is not None and abort.done():
            return "aborted"
        if not await is_alive():
            # Messages already in flight may still land; give them a moment.
            await asyncio.sleep(0.05)
            return "reply" if done.done() else "died"
