"""The kernel websocket with real clients: both protocols, buffers, replay, several clients, limits."""

from __future__ import annotations

import json
import struct
import threading
import time
import uuid
from typing import Any

import httpx
import pytest
import websocket

from tests.conftest import GatewayProcess, run

V1 = "v1.kernel.websocket.jupyter.org"


def ws_url(gateway: GatewayProcess, kernel_id: str, client_id: str | None = None) -> str:
    url = gateway.url.replace("http://", "ws://") + f"/api/kernels/{kernel_id}/channels"
    return url + (f"?session_id={client_id}" if client_id else "")


def connect(gateway: GatewayProcess, kernel_id: str, client_id: str | None = None,
            subprotocols: list[str] | None = None) -> websocket.WebSocket:
    return websocket.create_connection(ws_url(gateway, kernel_id, client_id), timeout=30,
                                       header=[f"Authorization: token {gateway.token}"], subprotocols=subprotocols)


def request(msg_type: str, content: dict[str, Any], channel: str = "shell") -> dict[str, Any]:
    header = {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "username": "tester", "session": "s",
              "version": "5.3", "date": "2026-01-01T00:00:00.000000Z"}
    return {"channel": channel, "header": header, "parent_header": {}, "metadata": {}, "content": content}


def execute_request(code: str, **extra: Any) -> dict[str, Any]:
    return request("execute_request", {"code": code, "silent": False, "store_history": True,
                                       "user_expressions": {}, "allow_stdin": False, **extra})


def decode_json_frame(frame: str | bytes) -> dict[str, Any]:
    """The default protocol, decoded here independently of the gateway's own code."""
    if isinstance(frame, str):
        return json.loads(frame)
    count = struct.unpack("!I", frame[:4])[0]
    offsets = list(struct.unpack(f"!{count}I", frame[4:4 * (count + 1)])) + [len(frame)]
    msg = json.loads(frame[offsets[0]:offsets[1]])
    msg["buffers"] = [frame[offsets[i]:offsets[i + 1]] for i in range(1, count)]
    return msg


def collect(ws: websocket.WebSocket, msg_id: str, decode=decode_json_frame) -> list[dict[str, Any]]:
    """Messages answering ``msg_id`` until both its idle status and its shell reply arrived."""
    seen, idle, reply = [], False, False
    while not (idle and reply):
        msg = decode(ws.recv())
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        seen.append(msg)
        if msg["channel"] == "shell":
            reply = True
        elif msg["header"]["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            idle = True
    return seen


def stdout_of(messages: list[dict[str, Any]]) -> str:
    return "".join(m["content"]["text"] for m in messages if m["header"]["msg_type"] == "stream")


def test_json_protocol_execution_is_recorded_as_a_jupyter_step(gateway, client: httpx.Client, session) -> None:
    run(client, session["id"], "base = 40")
    ws = connect(gateway, session["kernel_id"])
    try:
        message = execute_request("print('from jupyter')\nbase + 2")
        ws.send(json.dumps(message))
        got = collect(ws, message["header"]["msg_id"])
    finally:
        ws.close()
    assert stdout_of(got) == "from jupyter\n"
    result = [m for m in got if m["header"]["msg_type"] == "execute_result"][0]
    assert result["content"]["data"]["text/plain"] == "42"
    assert [m for m in got if m["channel"] == "shell"][0]["content"]["status"] == "ok"
    run(client, session["id"], "base + 3")
    steps = client.get(f"/v1/sessions/{session['id']}/steps").json()["steps"]
    assert [(s["code"], s["source"], s["principal"]) for s in steps] == [
        ("base = 40", "agent", "admin"), ("print('from jupyter')\nbase + 2", "jupyter", "admin"),
        ("base + 3", "agent", "admin")]
    assert steps[1]["stdout"] == "from jupyter\n" and steps[1]["result"] == "42"
    assert [s["step"] for s in steps] == [1, 2, 3]


def test_v1_protocol_is_negotiated_and_speaks_binary_frames(gateway, session) -> None:
    ws = connect(gateway, session["kernel_id"], subprotocols=[V1])
    assert ws.getsubprotocol() == V1
    header = {"msg_id": uuid.uuid4().hex, "msg_type": "execute_request", "username": "t", "session": "s",
              "version": "5.3", "date": "2026-01-01T00:00:00.000000Z"}
    parts = [json.dumps(p).encode() for p in (header, {}, {}, {"code": "6*7", "silent": False,
                                                                  "store_history": True, "allow_stdin": False})]
    channel = b"shell"
    offsets = [8 * (1 + 2 + len(parts)), 8 * (1 + 2 + len(parts)) + len(channel)]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    ws.send_binary(struct.pack(f"<{len(offsets) + 1}Q", len(offsets), *offsets) + channel + b"".join(parts))

    def decode_v1(frame: bytes) -> dict[str, Any]:
        assert isinstance(frame, bytes)
        n = struct.unpack("<Q", frame[:8])[0]
        offs = struct.unpack(f"<{n}Q", frame[8:8 * (n + 1)])
        pieces = [frame[offs[i]:offs[i + 1]] for i in range(n - 1)]
        names = ("header", "parent_header", "metadata", "content")
        msg = {name: json.loads(piece) for name, piece in zip(names, pieces[1:5])}
        msg["channel"] = pieces[0].decode()
        return msg

    try:
        got = collect(ws, header["msg_id"], decode_v1)
    finally:
        ws.close()
    result = [m for m in got if m["header"]["msg_type"] == "execute_result"][0]
    assert result["content"]["data"]["text/plain"] == "42"


def test_binary_buffers_both_ways(gateway, session) -> None:
    ws = connect(gateway, session["kernel_id"])
    try:
        setup = execute_request(
            "from comm import create_comm\nreceived = []\n"
            "c = create_comm(target_name='probe', data={'k': 1}, buffers=[b'\\x00\\x01payload'])\n"
            "c.on_msg(lambda m: received.append([bytes(b) for b in m['buffers']]))\nc.comm_id")
        ws.send(json.dumps(setup))
        got = collect(ws, setup["header"]["msg_id"])
        opened = [m for m in got if m["header"]["msg_type"] == "comm_open"][0]
        assert opened["buffers"] == [b"\x00\x01payload"]
        comm_id = opened["content"]["comm_id"]
        # Client to kernel: a comm message with a buffer, in a binary frame.
        outgoing = request("comm_msg", {"comm_id": comm_id, "data": {"x": 1}})
        body = json.dumps(outgoing).encode()
        buffer = b"\xff\xfeclient-bytes"
        offsets = [12, 12 + len(body)]
        ws.send_binary(struct.pack("!3I", 2, *offsets) + body + buffer)
        time.sleep(0.5)
        check = execute_request("received")
        ws.send(json.dumps(check))
        got = collect(ws, check["header"]["msg_id"])
    finally:
        ws.close()
    result = [m for m in got if m["header"]["msg_type"] == "execute_result"][0]
    assert result["content"]["data"]["text/plain"] == "[[b'\\xff\\xfeclient-bytes']]"


def test_a_reconnecting_client_gets_what_it_missed(gateway, client: httpx.Client, session) -> None:
    ws = connect(gateway, session["kernel_id"], client_id="returning-client")
    message = execute_request("import time\ntime.sleep(1.0)\nprint('while you were away')")
    ws.send(json.dumps(message))
    ws.close()  # disconnect mid-execution
    time.sleep(2.0)
    again = connect(gateway, session["kernel_id"], client_id="returning-client")
    try:
        got = collect(again, message["header"]["msg_id"])
    finally:
        again.close()
    assert stdout_of(got) == "while you were away\n"
    steps = client.get(f"/v1/sessions/{session['id']}/steps").json()["steps"]
    assert steps[-1]["stdout"] == "while you were away\n" and steps[-1]["source"] == "jupyter"


def test_a_client_that_disconnects_mid_execution_still_has_its_step_recorded(gateway, client, session) -> None:
    ws = connect(gateway, session["kernel_id"])
    ws.send(json.dumps(execute_request("import time\ntime.sleep(0.5)\nleft_behind = 'done'")))
    ws.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        steps = client.get(f"/v1/sessions/{session['id']}/steps").json()["steps"]
        if steps and steps[-1]["status"] != "running":  # recorded as running before it was sent
            break
        time.sleep(0.1)
    assert steps and steps[-1]["code"].endswith("left_behind = 'done'") and steps[-1]["status"] == "ok"
    assert run(client, session["id"], "left_behind")["result"] == "'done'"


def test_two_clients_and_an_agent_share_a_kernel_without_mixing_outputs(gateway, client, session) -> None:
    first = connect(gateway, session["kernel_id"], client_id="first")
    second = connect(gateway, session["kernel_id"], client_id="second")
    try:
        assert client.get(f"/api/kernels/{session['kernel_id']}").json()["connections"] == 2
        outcome: dict[str, Any] = {}

        def agent() -> None:
            with gateway.client() as own:
                outcome["agent"] = run(own, session["id"], "import time\nfor i in range(5):\n    print('agent', i)\n"
                                                            "    time.sleep(0.05)")

        thread = threading.Thread(target=agent)
        thread.start()
        message = execute_request("for i in range(5):\n    print('person', i)")
        first.send(json.dumps(message))
        mine = collect(first, message["header"]["msg_id"])
        thread.join()
        # The second client saw the first client's outputs on iopub, but not its shell reply.
        theirs = collect_iopub_until_idle(second, message["header"]["msg_id"])
    finally:
        first.close()
        second.close()
    assert stdout_of(mine) == "".join(f"person {i}\n" for i in range(5))
    assert outcome["agent"]["stdout"] == "".join(f"agent {i}\n" for i in range(5))
    assert stdout_of(theirs) == stdout_of(mine)
    assert not [m for m in theirs if m["channel"] == "shell"]


def collect_iopub_until_idle(ws: websocket.WebSocket, msg_id: str) -> list[dict[str, Any]]:
    seen = []
    while True:
        msg = decode_json_frame(ws.recv())
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        seen.append(msg)
        if msg["header"]["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return seen


def test_silent_executions_are_audit_events_not_cells(gateway, client, session) -> None:
    ws = connect(gateway, session["kernel_id"])
    try:
        for extra in ({"silent": True}, {"store_history": False}):
            message = execute_request(f"inspected = {extra!r}", **extra)
            ws.send(json.dumps(message))
            collect(ws, message["header"]["msg_id"])
    finally:
        ws.close()
    assert client.get(f"/v1/sessions/{session['id']}/steps").json()["steps"] == []
    events = client.get(f"/v1/sessions/{session['id']}/events").json()["events"]
    silent = [e["details"]["code"] for e in events if e["action"] == "silent_execution"]
    assert silent == ["inspected = {'silent': True}", "inspected = {'store_history': False}"]


def test_websocket_auth_and_unknown_kernels_fail_before_the_upgrade(gateway, session) -> None:
    url = ws_url(gateway, session["kernel_id"])
    with pytest.raises(websocket.WebSocketBadStatusException) as missing:
        websocket.create_connection(url, timeout=10)
    assert missing.value.status_code == 401
    with pytest.raises(websocket.WebSocketBadStatusException) as unknown:
        websocket.create_connection(ws_url(gateway, str(uuid.uuid4())), timeout=10,
                                    header=[f"Authorization: token {gateway.token}"])
    assert unknown.value.status_code == 404
    by_query = websocket.create_connection(url + f"?token={gateway.token}", timeout=10)
    by_query.close()


def test_a_flooding_client_does_not_take_the_gateway_down(gateway, client, session) -> None:
    flood = connect(gateway, session["kernel_id"], client_id="flood")
    for _ in range(1500):
        flood.send(json.dumps(request("kernel_info_request", {})))
    flood.close()
    assert client.get("/v1/health").json()["status"] == "ok"
    assert run(client, session["id"], "'still fine'")["result"] == "'still fine'"


def test_a_client_that_never_reads_does_not_stall_the_agent(gateway, client, session) -> None:
    idle_reader = connect(gateway, session["kernel_id"], client_id="never-reads")
    try:
        started = time.monotonic()
        for _ in range(5):
            execution = run(client, session["id"], "print('z' * 200_000)")
            assert len(execution["stdout"]) == 200_001
        assert time.monotonic() - started < 20
    finally:
        idle_reader.close()


def test_a_restart_during_a_client_step_records_it_as_interrupted(gateway, client: httpx.Client, session) -> None:
    ws = connect(gateway, session["kernel_id"])
    try:
        message = execute_request("import time\ntime.sleep(30)")
        ws.send(json.dumps(message))
        time.sleep(1.0)
        assert client.post(f"/v1/sessions/{session['id']}/restart").status_code == 200
        states = []
        while "restarting" not in states:
            msg = decode_json_frame(ws.recv())
            if msg["header"]["msg_type"] == "status":
                states.append(msg["content"]["execution_state"])
    finally:
        ws.close()
    step = client.get(f"/v1/sessions/{session['id']}/steps").json()["steps"][-1]
    assert step["code"] == "import time\ntime.sleep(30)" and step["source"] == "jupyter"
    assert step["status"] == "interrupted" and "restarted during this step" in step["error"]["value"]


def test_an_agent_step_waiting_behind_a_client_step_neither_interrupts_it_nor_times_out(gateway, client,
                                                                                        session) -> None:
    """Both faces' steps go through one runner and the kernel runs them in the order sent: an
    agent step sent while a client's 3 s step runs has its 1.5 s timeout counted from when the
    kernel begins it, so the client's step is not interrupted and both are recorded in order."""
    ws = connect(gateway, session["kernel_id"], client_id="long")
    try:
        message = execute_request("import time\ntime.sleep(3)\nprint('client done')")
        ws.send(json.dumps(message))
        time.sleep(0.5)  # the kernel is running the client's step
        began = time.monotonic()
        agent = client.post(f"/v1/sessions/{session['id']}/execute", json={"code": "print('agent')", "timeout": 1.5})
        waited = time.monotonic() - began
        mine = collect(ws, message["header"]["msg_id"])
    finally:
        ws.close()
    assert agent.status_code == 200 and agent.json()["status"] == "ok", agent.text
    assert agent.json()["stdout"] == "agent\n" and waited > 2.0
    assert stdout_of(mine) == "client done\n"
    steps = client.get(f"/v1/sessions/{session['id']}/steps").json()["steps"]
    assert [(s["source"], s["status"]) for s in steps[-2:]] == [("jupyter", "ok"), ("agent", "ok")]
