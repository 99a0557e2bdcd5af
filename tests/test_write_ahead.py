"""Write-ahead recording: a step is in the store before the kernel receives it, and nothing a
kernel ran goes unrecorded: not after a crash of the gateway, not user_expressions, not what was
typed in answer to input(); a request the kernel aborted is recorded as not run.

Scripted message sequences and a real SQLite file first; then real kernels behind a real
gateway process (killed with SIGKILL in the crash test).
"""

from __future__ import annotations

import ast
import asyncio
import json
import signal
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import nbformat
import pytest

from gateway.executor import ExecutionListener
from gateway.metrics import Metrics
from gateway.notebook import render, step_tags
from gateway.outcomes import FINAL_STATUSES, RERUN_STATUSES, STATUSES, lost_outcome, step_outcome
from gateway.outputs import OutputCollector
from gateway.recorder import expressions_record, recorded_replies
from gateway import records
from gateway.records import SessionRecord, StepRecord
from gateway.replay import SKIPPED_STATUSES
from gateway.store import Store
from tests.conftest import GatewayProcess, run, start_gateway
from tests.test_kernel_websocket import collect, connect, decode_json_frame, execute_request, request

# scripted message sequences (no kernel) ---------------------------------------------------------


def msg(channel: str, msg_type: str, **content: Any) -> tuple[str, dict[str, Any]]:
    return channel, {"header": {"msg_type": msg_type, "msg_id": uuid.uuid4().hex}, "parent_header": {"msg_id": "m"},
                     "content": content, "metadata": {}}


def listen(messages: list[tuple[str, dict[str, Any]]], **kwargs: Any) -> ExecutionListener:
    loop = asyncio.new_event_loop()
    try:
        listener = ExecutionListener(OutputCollector(1000, None), loop.create_future(), **kwargs)
        for channel, message in messages:
            listener.on_message(channel, message)
        assert listener.done.done()
        return listener
    finally:
        loop.close()


def test_a_request_the_kernel_aborted_is_not_run_not_an_error() -> None:
    aborted = listen([msg("iopub", "status", execution_state="busy"), msg("shell", "execute_reply", status="aborted"),
                      msg("iopub", "status", execution_state="idle")])
    raw = aborted.result("reply")
    assert raw.execution_count is None
    status, error = step_outcome(raw, None, False, 60, "")
    assert status == "not_run" and error is not None and error["name"] == "Aborted"
    assert "did not run" in error["value"]
    failed = listen([msg("iopub", "execute_input", execution_count=3),
                     msg("shell", "execute_reply", status="error", ename="ZeroDivisionError", evalue="division by zero",
                         traceback=[], execution_count=3),
                     msg("iopub", "status", execution_state="idle")])
    assert step_outcome(failed.result("reply"), None, False, 60, "")[0] == "error"


def test_input_requests_are_kept_with_their_replies_and_a_password_is_not() -> None:
    listener = listen([msg("stdin", "input_request", prompt="Name? ", password=False),
                       msg("stdin", "input_request", prompt="Password: ", password=True),
                       msg("shell", "execute_reply", status="ok", execution_count=1),
                       msg("iopub", "status", execution_state="idle")])
    listener.input_given("Ada")
    listener.input_given("hunter2")
    raw = listener.result("reply")
    assert raw.stdin == [{"prompt": "Name? ", "password": False, "value": "Ada"},
                         {"prompt": "Password: ", "password": True, "value": None}]
    assert recorded_replies({"stdin": json.dumps(raw.stdin)}) == ["Ada", ""]
    assert recorded_replies({"stdin": None}) is None


def test_the_listener_answers_input_itself_when_it_has_replies() -> None:
    asked: list[str] = []

    def answer(input_request: dict[str, Any]) -> str:
        asked.append(input_request["content"]["prompt"])
        return "42"

    listener = listen([msg("stdin", "input_request", prompt="n? ", password=False),
                       msg("shell", "execute_reply", status="ok", execution_count=1),
                       msg("iopub", "status", execution_state="idle")], answer=answer)
    assert asked == ["n? "] and listener.result("reply").stdin == [{"prompt": "n? ", "password": False, "value": "42"}]


def test_a_lost_step_says_the_gateway_stopped_and_whether_the_kernel_was_reattached() -> None:
    status, error = lost_outcome(True)
    assert status == "lost" and error["name"] == "GatewayStopped"
    assert "gateway stopped while this step was running" in error["value"] and "reattached" in error["value"]
    assert "not found alive" in lost_outcome(False)[1]["value"]


def test_statuses_are_listed_once_and_rules_follow_them() -> None:
    assert list(STATUSES) == ["running", "ok", "error", "timeout", "interrupted", "died", "not_run", "lost"]
    assert "running" not in FINAL_STATUSES and set(RERUN_STATUSES) == {"ok", "error"}
    assert set(SKIPPED_STATUSES) == set(STATUSES) - {"ok", "error"}
    assert step_tags("ok") == [] and step_tags("error") == ["raises-exception"]
    assert step_tags("not_run") == ["skip-execution"]
    for status in ("timeout", "interrupted", "died", "lost", "running"):
        assert "skip-execution" in step_tags(status)
    rendered = Metrics().render(0, 0)
    assert 'agent_gateway_steps_total{status="lost"} 0' in rendered
    assert 'agent_gateway_steps_total{status="not_run"} 0' in rendered


def test_user_expressions_are_paired_with_their_results_and_large_ones_cut() -> None:
    double = {"status": "ok", "data": {"text/plain": "40"}, "metadata": {}}
    reply = {"status": "ok", "user_expressions": {
        "double": double, "big": {"status": "ok", "data": {"text/plain": "x" * 500}, "metadata": {}}}}
    record = expressions_record({"double": "a * 2", "big": "'x' * 500", "absent": "b"}, reply, 200)
    assert record["double"] == {"expression": "a * 2", "result": double}
    assert record["big"]["result"]["status"] == "truncated" and record["big"]["result"]["bytes"] > 500
    assert record["absent"] == {"expression": "b", "result": None}
    assert expressions_record({"e": "1"}, None, 200) == {"e": {"expression": "1", "result": None}}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    db = Store(tmp_path / "gateway.db")
    db.insert_session(SessionRecord("s_1", "k", "python3", "idle", "a", "2026-01-01T00:00:00.000000Z",
                                    "2026-01-01T00:00:00.000000Z"))
    yield db
    db.close()


def session_row(store: Store) -> SessionRecord:
    row = store.get_session("s_1")
    assert row is not None
    return row


def running_row(step: int, code: str) -> dict[str, Any]:
    return {"session_id": "s_1", "step": step, "seq": step, "code": code, "status": "running", "stdout": "",
            "stderr": "", "outputs": "[]", "truncated": 0, "started_at": "2026-01-01T00:00:01.000000Z",
            "source": "jupyter", "principal": "a", "user_expressions": None}


def test_a_step_is_written_ahead_then_completed_in_place(store: Store) -> None:
    store.open_step(running_row(1, "x = 1"))
    store.open_step(running_row(2, "y = input()"))
    store.update_step("s_1", 2, stdin=json.dumps([{"prompt": "", "password": False, "value": "v"}]))
    assert [(r["step"], r["status"]) for r in store.running_steps()] == [(1, "running"), (2, "running")]
    assert session_row(store).steps == 0  # the counter counts finished steps
    store.finish_step("s_1", 1, {"status": "ok", "execution_count": 1, "finished_at": "2026-01-01T00:00:02.000000Z"},
                      code="x = 1", source="jupyter", principal="a", at="2026-01-01T00:00:02.000000Z",
                      last_activity="2026-01-01T00:00:02.000000Z")
    _, error = lost_outcome(False)
    store.finish_step("s_1", 2, {"status": "lost", "error": json.dumps(error)}, code="y = input()",
                      source="jupyter", principal="a", at="2026-01-01T00:00:09.000000Z", last_activity=None)
    assert store.running_steps() == []
    rows = store.list_steps("s_1")
    assert [(r["seq"], r["status"]) for r in rows] == [(1, "ok"), (2, "lost")]
    lost = StepRecord.from_row(rows[1]).view(with_code=True)
    assert lost["finished_at"] is None and lost["error"]["name"] == "GatewayStopped"
    assert lost["stdin"] == [{"prompt": "", "password": False, "value": "v"}] and "user_expressions" not in lost
    session = session_row(store)
    assert session.steps == 2 and session.last_activity == "2026-01-01T00:00:02.000000Z"
    audit = [(e["seq"], e["details"]["status"]) for e in store.list_events("s_1") if e["action"] == "execute"]
    assert audit == [(1, "ok"), (2, "lost")]
    text = render(session_row(store), "Python 3", store.timeline("s_1"))
    notebook = nbformat.reads(text, as_version=4)
    nbformat.validate(notebook)
    assert [c.metadata.gateway.status for c in notebook.cells] == ["ok", "lost"]
    assert notebook.cells[1].metadata.gateway.stdin[0]["value"] == "v"
    assert "skip-execution" in notebook.cells[1].metadata.tags


def test_a_step_is_one_record_from_its_running_row_to_its_view(store: Store) -> None:
    """The record written ahead, read back, completed and read back again is the same typed
    record each time; its view is the Execution (code, source and principal only in the list)."""
    record = StepRecord("s_1", 1, 1, "n = input()", "jupyter", "a", started_at="2026-01-01T00:00:01.000000Z",
                        user_expressions=expressions_record({"n": "n"}, None, 0))
    store.open_step(record.row())
    assert StepRecord.from_row(store.list_steps("s_1")[0]) == record
    record.status, record.execution_count, record.stdout = "error", 3, "asked\n"
    record.error = {"name": "ValueError", "value": "no", "traceback": "ValueError: no"}
    record.outputs = [{"output_type": "stream", "name": "stdout", "text": "asked\n"}]
    record.stdin = [{"prompt": "? ", "password": False, "value": "x"}]
    record.finished_at, record.duration_ms, record.truncated = "2026-01-01T00:00:02.000000Z", 1000.0, True
    store.finish_step("s_1", 1, record.completion(), code=record.code, source=record.source, principal="a",
                      at=record.finished_at, last_activity=record.finished_at)
    again = StepRecord.from_row(store.list_steps("s_1")[0])
    assert again == record
    view = again.view()
    assert list(view) == [*records.VIEW_FIELDS, "user_expressions", "stdin"]
    assert (view["error"]["name"], view["truncated"], view["outputs"][0]["text"]) == ("ValueError", True, "asked\n")
    assert {"code", "source", "principal"} <= set(again.view(with_code=True)) and "code" not in view


def test_a_running_step_renders_as_a_cell_that_is_not_rerun(store: Store) -> None:
    store.open_step({**running_row(1, "slow()"), "user_expressions": json.dumps(
        expressions_record({"n": "len(data)"}, None, 100))})
    notebook = nbformat.reads(render(session_row(store), "Python 3", store.timeline("s_1")), as_version=4)
    nbformat.validate(notebook)
    cell = notebook.cells[0]
    assert cell.metadata.gateway.status == "running" and cell.metadata.gateway.finished_at is None
    assert cell.metadata.gateway.user_expressions == {"n": {"expression": "len(data)", "result": None}}
    assert "skip-execution" in cell.metadata.tags


# real kernels behind a real gateway --------------------------------------------------------------


def steps_of(client: httpx.Client, sid: str) -> list[dict[str, Any]]:
    return client.get(f"/v1/sessions/{sid}/steps").json()["steps"]


def wait_for(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def collect_all(ws: Any, msg_ids: list[str]) -> list[dict[str, Any]]:
    """The shell replies to several requests in flight at once, in the order of ``msg_ids``, once
    each has its reply and its idle status (shell and iopub messages may interleave)."""
    replies: dict[str, dict[str, Any]] = {}
    idle: set[str] = set()
    while len(replies) < len(msg_ids) or len(idle) < len(msg_ids):
        message = decode_json_frame(ws.recv())
        parent = message["parent_header"].get("msg_id")
        if parent not in msg_ids:
            continue
        if message["channel"] == "shell":
            replies[parent] = message
        elif message["header"]["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
            idle.add(parent)
    return [replies[msg_id] for msg_id in msg_ids]


@pytest.mark.slow
def test_after_a_crash_every_step_the_kernels_ran_is_in_the_trajectory(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = start_gateway(data, extra_args=("--pool-size", "0"))
    sessions: list[dict[str, Any]] = []
    with proc.client() as client:
        for n in range(3):
            sessions.append(client.post("/v1/sessions", json={}).json())
            run(client, sessions[n]["id"], f"before_{n} = {n}")

        def in_flight(sid: str, code: str) -> None:
            with proc.client() as own:
                try:
                    own.post(f"/v1/sessions/{sid}/execute", json={"code": code})
                except httpx.HTTPError:
                    pass  # the gateway is killed under it

        agent_codes = {n: f"import time\nx_{n} = {n}\ntime.sleep(4)" for n in (0, 1)}
        for n, code in agent_codes.items():
            threading.Thread(target=in_flight, args=(sessions[n]["id"], code), daemon=True).start()
        ws = connect(proc, sessions[2]["kernel_id"])
        client_codes = ["import time\ny_2 = 2\ntime.sleep(4)", "z_2 = 'queued behind the sleep'"]
        for code in client_codes:
            ws.send(json.dumps(execute_request(code)))
        # Every step the kernels received is already in the steps list, as running.
        wait_for(lambda: all(steps_of(client, s["id"])[-1]["status"] == "running" for s in sessions))
        assert [s["status"] for s in steps_of(client, sessions[2]["id"])] == ["ok", "running", "running"]
        running = steps_of(client, sessions[0]["id"])[-1]
        assert running["code"] == agent_codes[0] and running["started_at"] and running["finished_at"] is None
        time.sleep(0.5)
    proc.stop(signal.SIGKILL)
    ws.close()
    restarted = start_gateway(data, extra_args=("--pool-size", "0"))
    try:
        with restarted.client() as client:
            for n, session in enumerate(sessions):
                sid = session["id"]
                assert client.get(f"/v1/sessions/{sid}").json()["state"] == "idle"
                steps = steps_of(client, sid)
                assert all(s["status"] in FINAL_STATUSES for s in steps)
                lost = [s for s in steps if s["status"] == "lost"]
                expected = [agent_codes[n]] if n in agent_codes else client_codes
                assert [s["code"] for s in lost] == expected
                for step in lost:
                    assert step["error"]["name"] == "GatewayStopped" and "reattached" in step["error"]["value"]
                    assert step["finished_at"] is None and step["source"] == ("agent" if n < 2 else "jupyter")
                # What the kernel itself says it ran (its input history, read after the
                # reattach, behind the steps still running in it) is all in the trajectory.
                history = ast.literal_eval(run(client, sid, "In[1:-1]")["result"])
                recorded = [s["code"] for s in steps]
                assert [code.rstrip("\n") for code in history] == [code.rstrip("\n") for code in recorded]
                notebook = nbformat.reads(client.get(f"/v1/sessions/{sid}/notebook").text, as_version=4)
                nbformat.validate(notebook)
                cells = [c for c in notebook.cells if "step" in c.metadata.get("gateway", {})]
                assert [c.metadata.gateway.status for c in cells] == [s["status"] for s in steps_of(client, sid)]
                audit = [e["details"]["status"] for e in client.get(f"/v1/sessions/{sid}/events").json()["events"]
                         if e["action"] == "execute"]
                assert audit.count("lost") == len(expected)
            assert run(client, sessions[0]["id"], "x_0")["result"] == "0"
            assert run(client, sessions[2]["id"], "y_2, z_2")["result"] == "(2, 'queued behind the sleep')"
            on_disk = json.loads((data / "sessions" / sessions[1]["id"] / "trajectory.ipynb").read_text())
            assert "lost" in [c["metadata"]["gateway"].get("status") for c in on_disk["cells"]]
    finally:
        assert restarted.stop() == 0


def test_steps_are_numbered_in_the_order_the_kernel_runs_them(gateway: GatewayProcess, client: httpx.Client,
                                                                session: dict[str, Any]) -> None:
    sid = session["id"]
    outcome: dict[str, Any] = {}

    def agent() -> None:
        with gateway.client() as own:
            outcome["agent"] = run(own, sid, "import time\ntime.sleep(1)\norder = ['agent']")

    thread = threading.Thread(target=agent)
    thread.start()
    wait_for(lambda: bool(steps_of(client, sid)) and steps_of(client, sid)[-1]["status"] == "running")
    ws = connect(gateway, session["kernel_id"])
    try:
        first = execute_request("order.append('first client step')")
        second = execute_request("order.append('second client step')")
        ws.send(json.dumps(first))  # both queued in the kernel behind the agent's running step
        ws.send(json.dumps(second))
        collect_all(ws, [first["header"]["msg_id"], second["header"]["msg_id"]])
    finally:
        ws.close()
        thread.join()
    steps = steps_of(client, sid)
    assert [(s["source"], s["status"]) for s in steps] == [("agent", "ok"), ("jupyter", "ok"), ("jupyter", "ok")]
    assert [s["step"] for s in steps] == [1, 2, 3] and outcome["agent"]["step"] == 1
    counts = [s["execution_count"] for s in steps]
    assert counts == sorted(counts) and len(set(counts)) == 3
    assert run(client, sid, "order")["result"] == "['agent', 'first client step', 'second client step']"


@pytest.fixture(scope="module")
def replaying(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway whose paused sessions come back by re-running their steps."""
    proc = start_gateway(tmp_path_factory.mktemp("replaying"), extra_args=("--resume-strategy", "replay",
                                                                           "--pool-size", "0"))
    yield proc
    assert proc.stop() == 0


@pytest.fixture
def replaying_session(replaying: GatewayProcess) -> Iterator[tuple[httpx.Client, dict[str, Any]]]:
    with replaying.client() as client:
        session = client.post("/v1/sessions", json={}).json()
        yield client, session
        client.delete(f"/v1/sessions/{session['id']}")


def test_user_expressions_are_recorded_with_their_values(gateway: GatewayProcess, client: httpx.Client,
                                                         session: dict[str, Any]) -> None:
    sid = session["id"]
    ws = connect(gateway, session["kernel_id"])
    try:
        step = execute_request("a = 20", user_expressions={"double": "a * 2", "broken": "1/0"})
        ws.send(json.dumps(step))
        reply = [m for m in collect(ws, step["header"]["msg_id"]) if m["channel"] == "shell"][0]
        peek = execute_request("", silent=True, user_expressions={"peek": "a"})
        ws.send(json.dumps(peek))
        collect(ws, peek["header"]["msg_id"])
    finally:
        ws.close()
    recorded = steps_of(client, sid)[-1]
    assert recorded["code"] == "a = 20" and recorded["status"] == "ok"
    expressions = recorded["user_expressions"]
    assert expressions["double"]["expression"] == "a * 2"
    assert expressions["double"]["result"] == reply["content"]["user_expressions"]["double"]
    assert expressions["double"]["result"]["data"]["text/plain"] == "40"
    assert expressions["broken"]["result"]["status"] == "error"
    assert expressions["broken"]["result"]["ename"] == "ZeroDivisionError"
    notebook = nbformat.reads(client.get(f"/v1/sessions/{sid}/notebook").text, as_version=4)
    assert notebook.cells[-1].metadata.gateway.user_expressions == expressions
    silent = [e["details"] for e in client.get(f"/v1/sessions/{sid}/events").json()["events"]
              if e["action"] == "silent_execution"]
    assert silent[-1]["code"] == "" and silent[-1]["user_expressions"] == {"peek": "a"}
    assert "user_expressions" not in run(client, sid, "a")


@pytest.mark.slow
def test_a_request_the_kernel_aborted_is_recorded_as_not_run_and_not_rerun(
        replaying: GatewayProcess, replaying_session: tuple[httpx.Client, dict[str, Any]]) -> None:
    client, session = replaying_session
    sid = session["id"]
    run(client, sid, "kept = 'yes'")
    ws = connect(replaying, session["kernel_id"])
    try:
        failing = execute_request("import time\ntime.sleep(0.5)\n1/0")
        skipped = execute_request("never = 1")
        ws.send(json.dumps(failing))
        ws.send(json.dumps(skipped))  # queued in the kernel behind the failing one: aborted (stop_on_error)
        replies = collect_all(ws, [failing["header"]["msg_id"], skipped["header"]["msg_id"]])
    finally:
        ws.close()
    assert [r["content"]["status"] for r in replies] == ["error", "aborted"]
    steps = steps_of(client, sid)
    assert [(s["code"], s["status"]) for s in steps][1:] == [(failing["content"]["code"], "error"),
                                                              ("never = 1", "not_run")]
    assert steps[2]["error"]["name"] == "Aborted" and steps[2]["execution_count"] is None
    notebook = nbformat.reads(client.get(f"/v1/sessions/{sid}/notebook").text, as_version=4)
    assert notebook.cells[-1].metadata.tags == ["skip-execution"]
    report = client.post(f"/v1/sessions/{sid}/replay").json()
    assert [v["status"] for v in report["steps"]] == ["reproduced", "reproduced", "skipped"]
    client.delete(f"/v1/sessions/{report['session_id']}")
    client.post(f"/v1/sessions/{sid}/pause")
    client.post(f"/v1/sessions/{sid}/resume")
    resumed = [e for e in client.get(f"/v1/sessions/{sid}/events").json()["events"] if e["action"] == "session_resumed"]
    assert resumed[-1]["details"]["replayed_steps"] == 2
    assert run(client, sid, "kept, 'never' in dir()")["result"] == "('yes', False)"


def answer_input(ws: Any, msg_id: str, answers: list[str]) -> list[dict[str, Any]]:
    """Messages answering ``msg_id``; each input_request is answered with the next of ``answers``."""
    pending = iter(answers)
    seen, idle, reply = [], False, False
    while not (idle and reply):
        message = decode_json_frame(ws.recv())
        if message["parent_header"].get("msg_id") != msg_id:
            continue
        seen.append(message)
        if message["channel"] == "stdin" and message["header"]["msg_type"] == "input_request":
            answer = request("input_reply", {"value": next(pending)}, channel="stdin")
            answer["parent_header"] = message["header"]
            ws.send(json.dumps(answer))
        elif message["channel"] == "shell":
            reply = True
        elif message["header"]["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
            idle = True
    return seen


@pytest.mark.slow
def test_input_typed_over_the_websocket_is_recorded_and_answered_again_on_replay(
        replaying: GatewayProcess, replaying_session: tuple[httpx.Client, dict[str, Any]]) -> None:
    client, session = replaying_session
    sid = session["id"]
    code = ("import getpass\nname = input('Name? ')\nsecret = getpass.getpass('Password: ')\n"
            "print('hello', name, 'with a password' if secret else 'without one')")
    ws = connect(replaying, session["kernel_id"])
    try:
        message = execute_request(code, allow_stdin=True)
        ws.send(json.dumps(message))
        seen = answer_input(ws, message["header"]["msg_id"], ["Ada", "hunter2"])
    finally:
        ws.close()
    assert [m["content"]["prompt"] for m in seen if m["header"]["msg_type"] == "input_request"] == [
        "Name? ", "Password: "]
    step = steps_of(client, sid)[-1]
    assert step["status"] == "ok" and step["stdout"] == "hello Ada with a password\n"
    assert step["stdin"] == [{"prompt": "Name? ", "password": False, "value": "Ada"},
                             {"prompt": "Password: ", "password": True, "value": None}]
    notebook = nbformat.reads(client.get(f"/v1/sessions/{sid}/notebook").text, as_version=4)
    assert notebook.cells[-1].metadata.gateway.stdin == step["stdin"]
    database = replaying.data_dir / "gateway.db"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        dumped = "\n".join(db.iterdump())
    assert "Ada" in dumped and "hunter2" not in dumped
    # The agent API has no stdin: input() raises there, as it says.
    assert run(client, sid, "input('? ')")["error"]["name"] == "StdinNotImplementedError"
    # Replay answers the kernel's input requests with what was typed (a password with "").
    report = client.post(f"/v1/sessions/{sid}/replay").json()
    assert report["steps"][0]["status"] == "different"  # no password the second time
    replayed = steps_of(client, report["session_id"])[0]
    assert replayed["stdout"] == "hello Ada without one\n"
    assert replayed["stdin"] == [{"prompt": "Name? ", "password": False, "value": "Ada"},
                                 {"prompt": "Password: ", "password": True, "value": None}]
    client.delete(f"/v1/sessions/{report['session_id']}")
    # Resuming by replay answers them too.
    client.post(f"/v1/sessions/{sid}/pause")
    client.post(f"/v1/sessions/{sid}/resume")
    assert run(client, sid, "name")["result"] == "'Ada'"


@pytest.mark.slow
def test_replay_reproduces_a_step_that_read_input(replaying: GatewayProcess,
                                                  replaying_session: tuple[httpx.Client, dict[str, Any]]) -> None:
    client, session = replaying_session
    sid = session["id"]
    ws = connect(replaying, session["kernel_id"])
    try:
        message = execute_request("n = int(input('How many? '))\nprint('twice', 2 * n)", allow_stdin=True)
        ws.send(json.dumps(message))
        answer_input(ws, message["header"]["msg_id"], ["21"])
    finally:
        ws.close()
    assert steps_of(client, sid)[-1]["stdout"] == "twice 42\n"
    report = client.post(f"/v1/sessions/{sid}/replay").json()
    assert report["reproduced"] is True and [v["status"] for v in report["steps"]] == ["reproduced"]
    client.delete(f"/v1/sessions/{report['session_id']}")


@pytest.mark.slow
def test_input_typed_for_a_silent_execution_is_an_audit_event(
        replaying: GatewayProcess, replaying_session: tuple[httpx.Client, dict[str, Any]]) -> None:
    client, session = replaying_session
    sid = session["id"]
    steps_before = len(steps_of(client, sid))
    ws = connect(replaying, session["kernel_id"])
    try:
        message = execute_request("import getpass\nquiet = input('Quiet? ') + getpass.getpass('Key: ')", silent=True,
                                  allow_stdin=True)
        ws.send(json.dumps(message))
        answer_input(ws, message["header"]["msg_id"], ["shh", "k3y"])
    finally:
        ws.close()
    events = [e for e in client.get(f"/v1/sessions/{sid}/events").json()["events"]
              if e["action"] in ("silent_execution", "silent_input")]
    assert [e["action"] for e in events[-3:]] == ["silent_execution", "silent_input", "silent_input"]
    typed = [e["details"] for e in events[-2:]]
    assert [(d["prompt"], d["password"], d["value"]) for d in typed] == [("Quiet? ", False, "shh"),
                                                                            ("Key: ", True, None)]
    assert all(d["request"] == message["header"]["msg_id"] for d in typed)
    assert len(steps_of(client, sid)) == steps_before  # not a step
    with sqlite3.connect(f"file:{replaying.data_dir / 'gateway.db'}?mode=ro", uri=True) as db:
        assert "k3y" not in "\n".join(db.iterdump())
    assert run(client, sid, "len(quiet)")["result"] == "6"

