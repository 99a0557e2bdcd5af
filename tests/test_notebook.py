"""The trajectory notebook: what it records, that it validates, and that it reruns top to bottom."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import nbformat
from nbclient import NotebookClient

from tests.conftest import GatewayProcess, run


def build_trajectory(client: httpx.Client, sid: str) -> None:
    run(client, sid, "import math\nradius = 2")
    client.put(f"/v1/sessions/{sid}/files/input/data.csv", content=b"a,b\n1,2\n3,4\n")
    run(client, sid, "rows = open('input/data.csv').read().splitlines()\nprint(len(rows))")
    run(client, sid, "undefined_name")
    run(client, sid, "while True: pass", timeout=1)
    run(client, sid, "area = math.pi * radius ** 2\nround(area, 3)")
    client.put(f"/v1/sessions/{sid}/files/scratch.txt", content=b"temporary")
    client.delete(f"/v1/sessions/{sid}/files/scratch.txt")
    client.post(f"/v1/sessions/{sid}/restart")
    run(client, sid, "import os\nsorted(os.listdir('input'))")


def test_notebook_records_every_step_in_order_and_validates(client: httpx.Client, session) -> None:
    sid = session["id"]
    build_trajectory(client, sid)
    response = client.get(f"/v1/sessions/{sid}/notebook")
    assert response.headers["content-type"].startswith("application/x-ipynb+json")
    nb = nbformat.reads(response.text, as_version=4)
    nbformat.validate(nb)
    meta = nb.metadata.gateway
    assert meta.session_id == sid and meta.owner == "admin" and meta.kernel == "python3"
    assert meta.created_at == session["created_at"] and meta.parent is None
    assert nb.metadata.kernelspec.name == "python3"
    assert nb.metadata.language_info.name == "python"
    steps = [c for c in nb.cells if c.cell_type == "code" and "step" in c.metadata.gateway]
    assert [c.source for c in steps] == [
        "import math\nradius = 2",
        "rows = open('input/data.csv').read().splitlines()\nprint(len(rows))",
        "undefined_name",
        "while True: pass",
        "area = math.pi * radius ** 2\nround(area, 3)",
        "import os\nsorted(os.listdir('input'))",
    ]
    assert [c.metadata.gateway.status for c in steps] == ["ok", "ok", "error", "timeout", "ok", "ok"]
    assert [c.execution_count for c in steps] == [1, 2, 3, 4, 5, 1]
    for cell in steps:
        gw = cell.metadata.gateway
        assert gw.source == "agent" and gw.principal == "admin"
        assert gw.started_at <= gw.finished_at and gw.duration_ms >= 0
    assert steps[1].outputs[0].text == "3\n"
    assert steps[2].metadata.tags == ["raises-exception"]
    assert "skip-execution" in steps[3].metadata.tags
    assert steps[4].outputs[0].data["text/plain"] == "12.566"
    events = [c.metadata.gateway["event"] for c in nb.cells if "event" in c.metadata.gateway]
    assert events == ["file_upload", "file_upload", "file_delete", "kernel_restarted"]
    kinds = [(c.cell_type, c.metadata.gateway.get("event") or c.metadata.gateway.get("status")) for c in nb.cells]
    assert kinds.index(("code", "file_upload")) < kinds.index(("code", "ok"), 1)


def test_the_notebook_file_on_disk_matches_and_is_replaced_atomically(gateway: GatewayProcess,
                                                                      client: httpx.Client) -> None:
    sid = client.post("/v1/sessions", json={}).json()["id"]
    run(client, sid, "x = 1")
    path = gateway.data_dir / "sessions" / sid / "trajectory.ipynb"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not path.exists():
        time.sleep(0.1)
    assert path.exists()
    run(client, sid, "x + 1")
    client.delete(f"/v1/sessions/{sid}")  # terminating writes the file at once
    on_disk = nbformat.read(path, as_version=4)
    nbformat.validate(on_disk)
    served = nbformat.reads(client.get(f"/v1/sessions/{sid}/notebook").text, as_version=4)
    assert on_disk == served
    assert [c.source for c in on_disk.cells if c.cell_type == "code"] == ["x = 1", "x + 1"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".trajectory-")]


def test_the_notebook_reruns_top_to_bottom_with_nbclient(client: httpx.Client, session, tmp_path: Path) -> None:
    sid = session["id"]
    build_trajectory(client, sid)
    nb = nbformat.reads(client.get(f"/v1/sessions/{sid}/notebook").text, as_version=4)
    NotebookClient(nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    # The upload cell recreated the file, so the steps that read it got the same results.
    assert (tmp_path / "input" / "data.csv").read_bytes() == b"a,b\n1,2\n3,4\n"
    assert not (tmp_path / "scratch.txt").exists()
    by_source = {c.source: c for c in nb.cells if c.cell_type == "code"}
    assert by_source["rows = open('input/data.csv').read().splitlines()\nprint(len(rows))"].outputs[0].text == "3\n"
    assert by_source["area = math.pi * radius ** 2\nround(area, 3)"].outputs[0].data["text/plain"] == "12.566"


def test_recording_is_committed_before_the_response(gateway: GatewayProcess, client: httpx.Client, session) -> None:
    import sqlite3

    sid = session["id"]
    execution = run(client, sid, "'committed'")
    db = sqlite3.connect(gateway.data_dir / "gateway.db")
    try:
        row = db.execute("SELECT status, result, code FROM steps WHERE session_id = ? AND step = ?",
                         (sid, execution["step"])).fetchone()
    finally:
        db.close()
    assert row == ("ok", "'committed'", "'committed'")


def test_a_forks_notebook_carries_its_ancestors_cells_and_reruns_alone(client: httpx.Client, session,
                                                                        tmp_path: Path) -> None:
    sid = session["id"]
    run(client, sid, "a = 1")
    assert client.put(f"/v1/sessions/{sid}/files/notes.txt", content=b"from the parent").status_code == 201
    run(client, sid, "b = a + 1")
    child = client.post(f"/v1/sessions/{sid}/fork").json()["id"]
    run(client, sid, "a = 'changed in the parent after the fork'")
    grandchild = None
    try:
        run(client, child, "c = b * 10")
        grandchild = client.post(f"/v1/sessions/{child}/fork").json()["id"]
        run(client, grandchild, "open('notes.txt').read(), a, b, c")
        nb = nbformat.reads(client.get(f"/v1/sessions/{grandchild}/notebook").text, as_version=4)
        nbformat.validate(nb)
        code = [(c.source, c.metadata.get("gateway", {}).get("inherited_from")) for c in nb.cells
                if c.cell_type == "code" and "step" in c.metadata.get("gateway", {})]
        assert code == [("a = 1", sid), ("b = a + 1", sid), ("c = b * 10", child),
                        ("open('notes.txt').read(), a, b, c", None)]
        forked_here = [c for c in nb.cells if c.get("id") == "forked-here"]
        assert forked_here and child in forked_here[0].source
        assert len({c.id for c in nb.cells}) == len(nb.cells)
        NotebookClient(nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
        last = [c for c in nb.cells if c.cell_type == "code"][-1]
        assert last.outputs[0].data["text/plain"] == "('from the parent', 1, 2, 20)"
    finally:
        for session_id in (grandchild, child):
            if session_id:
                client.delete(f"/v1/sessions/{session_id}")


def test_cells_after_a_step_that_is_not_rerun_are_marked_and_the_rerun_goes_on(client: httpx.Client, session,
                                                                               tmp_path: Path) -> None:
    sid = session["id"]
    timed_out = client.post(f"/v1/sessions/{sid}/execute", json={"code": "y = 5\nimport time\ntime.sleep(30)",
                                                                 "timeout": 1}).json()
    assert timed_out["status"] == "timeout"
    assert run(client, sid, "y + 1")["result"] == "6"  # the kernel kept what the step did before it stopped
    client.post(f"/v1/sessions/{sid}/restart")
    run(client, sid, "z = 'after the restart'")
    run(client, sid, "z")
    nb = nbformat.reads(client.get(f"/v1/sessions/{sid}/notebook").text, as_version=4)
    steps = {c.source: c for c in nb.cells if c.cell_type == "code" and "step" in c.metadata.get("gateway", {})}
    after = steps["y + 1"]
    assert "raises-exception" in after.metadata.tags and "step 1" in after.metadata.gateway.rerun
    assert "rerun" not in steps["z"].metadata.gateway  # a fresh kernel since: nothing is missing
    NotebookClient(nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert steps["z"].outputs[0].data["text/plain"] == "'after the restart'"
