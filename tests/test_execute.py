"""Steps: state that persists, outputs, errors, streaming, ordering and concurrency."""

from __future__ import annotations

import base64
import json
import threading
import time

import httpx

from tests.conftest import run


def test_variables_imports_functions_and_files_persist(client: httpx.Client, session) -> None:
    sid = session["id"]
    first = run(client, sid, "import json as j\ncounter = 41\ndef bump(n):\n    return n + 1\n"
                             "open('notes.txt', 'w').write('step one')")
    assert first["status"] == "ok"
    second = run(client, sid, "j.dumps({'v': bump(counter)}) + ' ' + open('notes.txt').read()")
    assert second["status"] == "ok"
    assert second["result"] == "'{\"v\": 42} step one'"
    assert second["step"] == first["step"] + 1
    assert second["execution_count"] == first["execution_count"] + 1


def test_execution_fields_stdout_stderr_result(client: httpx.Client, session) -> None:
    execution = run(client, session["id"], "import sys\nprint('out')\nprint('err', file=sys.stderr)\n6*7")
    assert execution["status"] == "ok"
    assert execution["stdout"] == "out\n"
    assert execution["stderr"] == "err\n"
    assert execution["result"] == "42"
    assert execution["error"] is None
    assert execution["truncated"] is False
    assert execution["duration_ms"] > 0
    assert execution["started_at"] <= execution["finished_at"]
    assert [o["output_type"] for o in execution["outputs"]] == ["stream", "stream", "execute_result"]


def test_error_is_reported_in_the_execution_with_a_plain_traceback(client: httpx.Client, session) -> None:
    execution = run(client, session["id"], "def f():\n    return 1/0\nf()")
    assert execution["status"] == "error"
    assert execution["error"]["name"] == "ZeroDivisionError"
    assert execution["error"]["value"] == "division by zero"
    assert "\x1b[" not in execution["error"]["traceback"]
    assert "return 1/0" in execution["error"]["traceback"]
    # The session is still usable after an error.
    assert run(client, session["id"], "2+2")["result"] == "4"


def test_carriage_returns_and_stream_chunks_are_resolved(client: httpx.Client, session) -> None:
    code = "import sys, time\nfor i in range(5):\n    print(f'\\rprogress {i}', end='', flush=True)\n    time.sleep(0.05)\nprint()\nprint('done')"
    execution = run(client, session["id"], code)
    assert execution["stdout"] == "progress 4\ndone\n"
    assert len([o for o in execution["outputs"] if o["output_type"] == "stream"]) == 1


def test_matplotlib_plot_comes_back_as_png(client: httpx.Client, session) -> None:
    code = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [3, 1, 2])\nplt.title('t')\nplt.show()"
    execution = run(client, session["id"], code)
    assert execution["status"] == "ok", execution["error"]
    pngs = [o["data"]["image/png"] for o in execution["outputs"] if o["output_type"] == "display_data"
            and "image/png" in o["data"]]
    assert len(pngs) == 1
    assert base64.b64decode(pngs[0])[:8] == b"\x89PNG\r\n\x1a\n"


def test_display_data_and_rich_results(client: httpx.Client, session) -> None:
    code = "from IPython.display import display, HTML\ndisplay(HTML('<b>bold</b>'))\n{'a': 1}"
    execution = run(client, session["id"], code)
    displays = [o for o in execution["outputs"] if o["output_type"] == "display_data"]
    assert displays[0]["data"]["text/html"] == "<b>bold</b>"
    assert execution["result"] == "{'a': 1}"


def test_ndjson_streams_outputs_as_they_arrive_then_done(client: httpx.Client, session) -> None:
    code = "import time\nprint('first', flush=True)\ntime.sleep(0.6)\nprint('second')\n1/0"
    lines = []
    arrival = []
    with client.stream("POST", f"/v1/sessions/{session['id']}/execute", json={"code": code},
                       headers={"Accept": "application/x-ndjson"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        start = time.monotonic()
        for line in response.iter_lines():
            if line:
                lines.append(json.loads(line))
                arrival.append(time.monotonic() - start)
    types = [event["type"] for event in lines]
    assert types[0] == "stdout" and lines[0]["text"] == "first\n"
    assert types[-1] == "done"
    assert "error" in types
    error = lines[types.index("error")]
    assert error["name"] == "ZeroDivisionError" and "1/0" in error["traceback"]
    # The first line came before the step finished.
    assert arrival[-1] - arrival[0] >= 0.4
    execution = lines[-1]["execution"]
    assert execution["status"] == "error"
    assert execution["stdout"] == "first\nsecond\n"
    recorded = client.get(f"/v1/sessions/{session['id']}/steps").json()["steps"][-1]
    assert recorded["step"] == execution["step"] and recorded["stdout"] == "first\nsecond\n"


def test_ndjson_sends_keepalives_during_a_quiet_step(client: httpx.Client, session) -> None:
    lines = []
    with client.stream("POST", f"/v1/sessions/{session['id']}/execute",
                       json={"code": "import time; time.sleep(11); 'awake'"},
                       headers={"Accept": "application/x-ndjson"}) as response:
        for line in response.iter_lines():
            if line:
                lines.append(json.loads(line))
    types = [event["type"] for event in lines]
    assert "keepalive" in types
    assert types[-1] == "done" and lines[-1]["execution"]["result"] == "'awake'"


def test_steps_of_one_session_run_one_at_a_time_in_arrival_order(gateway, session) -> None:
    sid = session["id"]
    results: dict[int, dict] = {}

    def send(i: int) -> None:
        with gateway.client() as own:
            results[i] = run(own, sid, f"import time; time.sleep(0.6); order = globals().get('order', []) + [{i}]; order")

    threads = []
    for i in range(4):
        thread = threading.Thread(target=send, args=(i,))
        thread.start()
        threads.append(thread)
        time.sleep(0.15)  # arrival order 0, 1, 2, 3 (spaced for a loaded machine)
    for thread in threads:
        thread.join()
    assert results[3]["result"] == "[0, 1, 2, 3]"
    spans = sorted((r["started_at"], r["finished_at"]) for r in results.values())
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start  # no overlap


def test_different_sessions_run_concurrently(gateway, client: httpx.Client) -> None:
    ids = [client.post("/v1/sessions", json={}).json()["id"] for _ in range(3)]
    try:
        durations = {}

        def sleep_step(sid: str) -> None:
            with gateway.client() as own:
                durations[sid] = run(own, sid, "import time; time.sleep(1.0)")["status"]

        start = time.monotonic()
        threads = [threading.Thread(target=sleep_step, args=(sid,)) for sid in ids]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - start
        assert set(durations.values()) == {"ok"}
        assert elapsed < 2.5, f"three 1 s steps in three sessions took {elapsed:.2f} s"
    finally:
        for sid in ids:
            client.delete(f"/v1/sessions/{sid}")
