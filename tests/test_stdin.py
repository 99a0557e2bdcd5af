"""Input over the agent API: ``stdin`` in an execute request answers the step's ``input()``
calls in order; the prompts and replies are recorded in the step and its notebook cell, and
``agent-gateway replay FILE.ipynb`` answers them again from the notebook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import nbformat

from tests.conftest import GatewayProcess, error_code, run


def test_stdin_answers_input_in_order_and_is_recorded(client: httpx.Client, session: dict[str, Any]) -> None:
    sid = session["id"]
    step = run(client, sid, "a = input('First? ')\nb = input('Second? ')\nprint(a + '|' + b)",
               stdin=["one", "two"])
    assert step["status"] == "ok" and step["stdout"] == "one|two\n", step
    assert step["stdin"] == [{"prompt": "First? ", "password": False, "value": "one"},
                             {"prompt": "Second? ", "password": False, "value": "two"}]
    # Past the given replies input() reads an empty line, as a replay does.
    assert run(client, sid, "input('More? ')", stdin=[])["result"] == "''"
    # Without stdin the kernel may not ask.
    assert run(client, sid, "input('? ')")["error"]["name"] == "StdinNotImplementedError"
    cell = nbformat.reads(client.get(f"/v1/sessions/{sid}/notebook").text, as_version=4).cells[-3]
    assert cell.metadata.gateway.stdin == step["stdin"]


def test_a_password_prompt_is_answered_but_never_recorded(client: httpx.Client, session: dict[str, Any]) -> None:
    step = run(client, session["id"], "import getpass\nlen(getpass.getpass('Password: '))", stdin=["hunter2"])
    assert step["result"] == "7"
    assert step["stdin"] == [{"prompt": "Password: ", "password": True, "value": None}]
    assert "hunter2" not in client.get(f"/v1/sessions/{session['id']}/notebook").text


def test_bad_stdin_is_a_400_and_runs_nothing(client: httpx.Client, session: dict[str, Any]) -> None:
    sid = session["id"]
    bad_values = ['"one"', "[1]", "[null]", json.dumps(["x"] * 1001), '["\\ud800"]', '{"a": "b"}', '[["nested"]]',
                  json.dumps(["x" * 65537])]
    for bad in bad_values:
        response = client.post(f"/v1/sessions/{sid}/execute", content='{"code": "ran = True", "stdin": %s}' % bad,
                               headers={"Content-Type": "application/json"})
        assert response.status_code == 400, (bad[:60], response.text)
        assert error_code(response) == "invalid_field"
    assert run(client, sid, "'ran' in dir()")["result"] == "False"
    assert client.get(f"/v1/sessions/{sid}/steps").json()["steps"][-1]["code"] == "'ran' in dir()"


def test_stdin_in_a_streamed_execute(client: httpx.Client, session: dict[str, Any]) -> None:
    with client.stream("POST", f"/v1/sessions/{session['id']}/execute", json={"code": "input('? ') * 2",
                       "stdin": ["ab"]}, headers={"Accept": "application/x-ndjson"}) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line]
    final = lines[-1]
    assert final["type"] == "done" and final["execution"]["result"] == "'abab'", final


def test_replaying_an_exported_notebook_answers_its_input(gateway: GatewayProcess, client: httpx.Client,
                                                          session: dict[str, Any], tmp_path: Path) -> None:
    sid = session["id"]
    run(client, sid, "n = int(input('How many? '))\nprint('twice', 2 * n)", stdin=["21"])
    notebook = tmp_path / "trajectory.ipynb"
    notebook.write_text(client.get(f"/v1/sessions/{sid}/notebook").text)
    env = {**os.environ, "AGENT_GATEWAY_TOKEN": gateway.token}
    done = subprocess.run([sys.executable, "-m", "gateway", "replay", str(notebook), "--gateway-url", gateway.url],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "step    1  reproduced" in done.stdout and "1 reproduced, 0 different" in done.stdout, done.stdout


@pytest.mark.parametrize("content", [
    json.dumps({"cells": "not a list", "nbformat": 4, "nbformat_minor": 5, "metadata": {}}),
    json.dumps({"cells": 1}),  # no version: nbformat's v2 converter fails with a TypeError
    "[]", "not json", "",
])
def test_replaying_a_file_that_is_not_a_notebook_creates_nothing(gateway: GatewayProcess, client: httpx.Client,
                                                                 tmp_path: Path, content: str) -> None:
    before = len(client.get("/v1/sessions", params={"limit": 500}).json()["sessions"])
    bogus = tmp_path / "bogus.ipynb"
    bogus.write_text(content)
    env = {**os.environ, "AGENT_GATEWAY_TOKEN": gateway.token}
    done = subprocess.run([sys.executable, "-m", "gateway", "replay", str(bogus), "--gateway-url", gateway.url],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 2 and "is not a valid notebook" in done.stderr, done.stderr
    assert len(client.get("/v1/sessions", params={"limit": 500}).json()["sessions"]) == before
