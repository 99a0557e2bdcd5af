"""``agent-gateway run NOTEBOOK.ipynb`` against a real gateway: the executed notebook has the
gateway's outputs and counts, each cell is a recorded step, nbclient's tags are honoured, a
failing cell stops the run with exit status 1, and ``--session`` runs in an existing session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from tests.conftest import GatewayProcess, run

ROOT = Path(__file__).resolve().parent.parent


def agent_gateway_run(gateway: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_GATEWAY_")}
    return subprocess.run([sys.executable, "-m", "gateway", "run", *args, "--gateway-url", gateway.url,
                           "--token", gateway.token], cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)


def write(path: Path, *cells: Any) -> Path:
    notebook = new_notebook(cells=list(cells), metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                                        "language": "python"}})
    nbformat.write(notebook, str(path))
    return path


def test_a_notebook_runs_on_a_new_session_and_is_written_executed(gateway: GatewayProcess, client: httpx.Client,
                                                                   tmp_path: Path) -> None:
    source = write(tmp_path / "analysis.ipynb",
                   new_markdown_cell("# An analysis"),
                   new_code_cell("x = 20"),
                   new_code_cell("print(x + 1)"),
                   new_code_cell("raise SystemExit('not run')", metadata={"tags": ["skip-execution"]}),
                   new_code_cell("1 / 0", metadata={"tags": ["raises-exception"]}),
                   new_code_cell("x * 2"))
    done = agent_gateway_run(gateway, str(source))
    assert done.returncode == 0, done.stderr
    executed = nbformat.read(str(tmp_path / "analysis.executed.ipynb"), as_version=4)
    nbformat.validate(executed)
    cells = executed.cells
    assert cells[2].outputs[0]["text"] == "21\n"
    assert cells[3].outputs == [] and cells[3].execution_count is None
    assert cells[4].outputs[0]["ename"] == "ZeroDivisionError"
    assert cells[5].outputs[0]["data"]["text/plain"] == "40"
    assert [c.execution_count for c in cells[1:3]] == [1, 2]
    session_id = executed.metadata["agent_gateway"]["executed_in"]
    session = client.get(f"/v1/sessions/{session_id}").json()
    assert session["state"] == "terminated" and session["labels"] == {"notebook": "analysis.ipynb"}
    steps = client.get(f"/v1/sessions/{session_id}/steps").json()["steps"]
    assert [s["code"] for s in steps] == ["x = 20", "print(x + 1)", "1 / 0", "x * 2"]
    assert nbformat.read(str(source), as_version=4).cells[2].outputs == []  # the source is left as it was


def test_a_failing_cell_stops_the_run_and_the_notebook_is_written_up_to_it(gateway: GatewayProcess,
                                                                           tmp_path: Path) -> None:
    source = write(tmp_path / "broken.ipynb", new_code_cell("a = 1"), new_code_cell("undefined_name"),
                   new_code_cell("print('after')"))
    out = tmp_path / "out.ipynb"
    done = agent_gateway_run(gateway, str(source), "--output", str(out))
    assert done.returncode == 1 and "cell 1 failed (error: NameError" in done.stderr, done.stderr
    cells = nbformat.read(str(out), as_version=4).cells
    assert cells[1].outputs[0]["ename"] == "NameError" and cells[2].outputs == []
    assert agent_gateway_run(gateway, str(source), "--output", str(out), "--allow-errors").returncode == 0
    assert nbformat.read(str(out), as_version=4).cells[2].outputs[0]["text"] == "after\n"


def test_a_notebook_runs_in_an_existing_session_which_is_kept(gateway: GatewayProcess, client: httpx.Client,
                                                              session: dict[str, Any], tmp_path: Path) -> None:
    run(client, session["id"], "base = 40")
    source = write(tmp_path / "more.ipynb", new_code_cell("base + 2"))
    done = agent_gateway_run(gateway, str(source), "--session", session["id"], "--inplace")
    assert done.returncode == 0, done.stderr
    assert nbformat.read(str(source), as_version=4).cells[0].outputs[0]["data"]["text/plain"] == "42"
    assert client.get(f"/v1/sessions/{session['id']}").json()["state"] == "idle"


def test_bad_input_exits_2_with_a_message(gateway: GatewayProcess, tmp_path: Path) -> None:
    (tmp_path / "bad.ipynb").write_text('{"cells": 1}')
    done = agent_gateway_run(gateway, str(tmp_path / "bad.ipynb"))
    assert done.returncode == 2 and done.stderr.startswith("agent-gateway run:"), done.stderr
    good = write(tmp_path / "good.ipynb", new_code_cell("1"))
    done = agent_gateway_run(gateway, str(good), "--session", "s_doesnotexist00")
    assert done.returncode == 2 and "session_not_found" in done.stderr, done.stderr
