"""Replay: a trajectory rerun in a fresh session, judged step by step (API and command line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import GatewayProcess, run


def build(client: httpx.Client) -> str:
    sid = client.post("/v1/sessions", json={"labels": {"task": "replay-me"}}).json()["id"]
    run(client, sid, "import random, datetime\nprint('object at', hex(id(object())), datetime.datetime.now())")
    client.put(f"/v1/sessions/{sid}/files/data/in.csv", content=b"x\n1\n2\n3\n")
    run(client, sid, "total = sum(int(v) for v in open('data/in.csv').read().split()[1:])\ntotal")
    run(client, sid, "random.random()")  # not reproducible
    client.put(f"/v1/sessions/{sid}/files/tmp.txt", content=b"temporary")
    client.delete(f"/v1/sessions/{sid}/files/tmp.txt")
    run(client, sid, "import os\nos.path.exists('tmp.txt')")
    client.post(f"/v1/sessions/{sid}/restart")
    run(client, sid, "'total' in dir()")
    run(client, sid, "undefined_name")
    return sid


def test_replay_reports_each_step_and_flags_the_nondeterministic_one(client: httpx.Client) -> None:
    sid = build(client)
    response = client.post(f"/v1/sessions/{sid}/replay")
    assert response.status_code == 201, response.text
    report = response.json()
    assert report["source_session_id"] == sid and report["reproduced"] is False
    statuses = [(v["code"].splitlines()[-1], v["status"]) for v in report["steps"]]
    assert statuses == [
        ("print('object at', hex(id(object())), datetime.datetime.now())", "reproduced"),
        ("total", "reproduced"),
        ("random.random()", "different"),
        ("os.path.exists('tmp.txt')", "reproduced"),
        ("'total' in dir()", "reproduced"),
        ("undefined_name", "reproduced"),
    ]
    different = report["steps"][2]
    assert different["diff"].startswith("--- recorded") and "[execute_result]" in different["diff"]
    assert report["summary"] == {"reproduced": 5, "different": 1, "error": 0, "skipped": 0}
    replay_session = client.get(f"/v1/sessions/{report['session_id']}").json()
    assert replay_session["parent"] == {"session_id": sid, "step": 6}
    assert replay_session["labels"] == {"task": "replay-me", "replay_of": sid}
    assert [f["path"] for f in client.get(f"/v1/sessions/{report['session_id']}/files").json()["files"]] == [
        "data/in.csv"]
    actions = [e["action"] for e in client.get(f"/v1/sessions/{report['session_id']}/events").json()["events"]]
    assert "kernel_restarted" in actions and actions[-1] == "replay_report"
    client.delete(f"/v1/sessions/{report['session_id']}")
    client.delete(f"/v1/sessions/{sid}")


def test_replay_from_the_command_line_by_id_and_from_an_exported_notebook(gateway: GatewayProcess,
                                                                        client: httpx.Client, tmp_path: Path) -> None:
    env = {**os.environ, "AGENT_GATEWAY_TOKEN": gateway.token}
    sid = build(client)
    by_id = subprocess.run([sys.executable, "-m", "gateway", "replay", sid, "--gateway-url", gateway.url],
                           capture_output=True, text=True, env=env, timeout=300)
    assert by_id.returncode == 1, by_id.stderr
    assert "5 reproduced, 1 different, 0 error, 0 skipped" in by_id.stdout
    assert "6/6" in by_id.stderr  # the progress bar reached the end

    steady = client.post("/v1/sessions", json={}).json()["id"]
    run(client, steady, "values = [3, 1, 2]")
    client.put(f"/v1/sessions/{steady}/files/n.txt", content=b"41")
    run(client, steady, "sorted(values), int(open('n.txt').read()) + 1")
    exported = tmp_path / "trajectory.ipynb"
    exported.write_text(client.get(f"/v1/sessions/{steady}/notebook").text)
    from_file = subprocess.run([sys.executable, "-m", "gateway", "replay", str(exported), "--gateway-url",
                                gateway.url], capture_output=True, text=True, env=env, timeout=300)
    assert from_file.returncode == 0, from_file.stdout + from_file.stderr
    assert "2 reproduced, 0 different, 0 error, 0 skipped" in from_file.stdout
    client.delete(f"/v1/sessions/{sid}")
    client.delete(f"/v1/sessions/{steady}")


def test_replay_streams_progress_as_ndjson(client: httpx.Client, session) -> None:
    run(client, session["id"], "1 + 1")
    run(client, session["id"], "2 + 2")
    lines = []
    with client.stream("POST", f"/v1/sessions/{session['id']}/replay", json={},
                       headers={"Accept": "application/x-ndjson"}) as response:
        for line in response.iter_lines():
            if line:
                lines.append(json.loads(line))
    assert [(l["type"], l.get("done")) for l in lines] == [("step", 1), ("step", 2), ("done", None)]
    assert lines[-1]["report"]["reproduced"] is True
    client.delete(f"/v1/sessions/{lines[-1]['report']['session_id']}")
