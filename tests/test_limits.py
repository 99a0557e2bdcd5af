"""Limits and failures: timeouts, interrupts, output truncation, kernel death, body size."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Iterator

import httpx
import psutil
import pytest

from tests.conftest import GatewayProcess, error_code, kernel_host_pid, run, start_gateway


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway with small limits, so the tests reach them quickly."""
    proc = start_gateway(tmp_path_factory.mktemp("tight-data"), extra_args=(
        "--max-output-bytes", "100000", "--max-body-bytes", "65536", "--max-upload-bytes", "200000",
        "--max-timeout", "5", "--interrupt-grace", "2"))
    yield proc
    assert proc.stop() == 0


@pytest.fixture
def tight_session(tight: GatewayProcess) -> Iterator[tuple[httpx.Client, str]]:
    with tight.client() as client:
        sid = client.post("/v1/sessions", json={}).json()["id"]
        yield client, sid
        client.delete(f"/v1/sessions/{sid}")


def test_timeout_interrupts_and_the_session_keeps_its_variables(client: httpx.Client, session) -> None:
    sid = session["id"]
    run(client, sid, "kept = 'yes'")
    started = time.monotonic()
    execution = run(client, sid, "while True: pass", timeout=1)
    assert time.monotonic() - started < 4
    assert execution["status"] == "timeout"
    assert "1 s" in execution["error"]["value"] and "variables are kept" in execution["error"]["value"]
    assert run(client, sid, "kept")["result"] == "'yes'"


def test_a_kernel_that_ignores_interrupts_is_restarted_after_a_timeout(tight_session) -> None:
    client, sid = tight_session
    code = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: time.sleep(0.05)"
    execution = run(client, sid, code, timeout=1)
    assert execution["status"] == "timeout"
    assert "restarted" in execution["error"]["value"]
    assert run(client, sid, "'alive'")["result"] == "'alive'"
    actions = [e["action"] for e in client.get(f"/v1/sessions/{sid}/events").json()["events"]]
    assert "kernel_restarted" in actions


def test_timeout_is_capped_by_the_server_limit(tight_session) -> None:
    client, sid = tight_session
    started = time.monotonic()
    execution = run(client, sid, "import time; time.sleep(30)", timeout=3600)
    assert execution["status"] == "timeout"
    assert "5 s" in execution["error"]["value"]
    assert time.monotonic() - started < 12


def test_interrupt_endpoint_ends_the_running_step_as_interrupted(gateway: GatewayProcess, session) -> None:
    sid = session["id"]
    outcome = {}

    def long_step() -> None:
        with gateway.client() as own:
            outcome["execution"] = run(own, sid, "import time\nfor i in range(100): time.sleep(0.1)")

    thread = threading.Thread(target=long_step)
    thread.start()
    time.sleep(1.0)
    with gateway.client() as own:
        response = own.post(f"/v1/sessions/{sid}/interrupt")
        assert response.status_code == 200 and response.json()["interrupted"] is True
    thread.join(10)
    assert outcome["execution"]["status"] == "interrupted"
    assert outcome["execution"]["error"]["name"] == "KeyboardInterrupt"
    with gateway.client() as own:
        assert own.post(f"/v1/sessions/{sid}/interrupt").json()["interrupted"] is False


def test_output_past_the_limit_is_cut_marked_and_recorded(tight: GatewayProcess, tight_session) -> None:
    client, sid = tight_session
    answers = []
    stop = threading.Event()

    def probe_health() -> None:
        with httpx.Client(base_url=tight.url) as probe:
            while not stop.is_set():
                started = time.monotonic()
                probe.get("/v1/health")
                answers.append(time.monotonic() - started)
                time.sleep(0.05)

    prober = threading.Thread(target=probe_health)
    prober.start()
    try:
        execution = run(client, sid, "for i in range(200000): print('line', i)\n'finished'")
    finally:
        stop.set()
        prober.join()
    assert execution["status"] == "ok"
    assert execution["truncated"] is True
    assert execution["result"] == "'finished'"
    assert execution["stdout"].startswith("line 0\nline 1\n")
    assert "output truncated" in execution["stdout"]
    assert len(execution["stdout"]) < 101_000
    recorded = client.get(f"/v1/sessions/{sid}/steps").json()["steps"][-1]
    assert recorded["truncated"] is True and recorded["stdout"] == execution["stdout"]
    assert answers and max(answers) < 1.0, f"health took up to {max(answers):.2f} s while output flooded"


@pytest.mark.parametrize("code, how", [
    ("import os; os._exit(3)", "exited with code 3"),
    ("import ctypes; ctypes.string_at(0)", "SIGSEGV"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "SIGKILL"),
])
def test_a_kernel_that_dies_mid_step_is_reported_and_replaced(client: httpx.Client, session, code: str,
                                                              how: str) -> None:
    sid = session["id"]
    run(client, sid, "lost = 1\nopen('survivor.txt', 'w').write('kept')")
    execution = run(client, sid, code)
    assert execution["status"] == "died"
    assert how in execution["error"]["value"]
    assert "variables and imports are gone" in execution["error"]["value"]
    assert run(client, sid, "lost")["error"]["name"] == "NameError"
    assert run(client, sid, "open('survivor.txt').read()")["result"] == "'kept'"
    actions = [e["action"] for e in client.get(f"/v1/sessions/{sid}/events").json()["events"]]
    assert "kernel_died" in actions and "kernel_restarted" in actions


def test_a_kernel_killed_between_steps_is_replaced_and_recorded(gateway: GatewayProcess, client: httpx.Client,
                                                                session) -> None:
    sid = session["id"]
    run(client, sid, "x = 1")
    pid = kernel_host_pid(gateway.data_dir, sid)
    os.kill(pid, signal.SIGKILL)
    psutil.wait_procs([psutil.Process(pid)], timeout=5) if psutil.pid_exists(pid) else None
    execution = run(client, sid, "'x' in dir()")
    assert execution["status"] == "ok" and execution["result"] == "False"
    assert kernel_host_pid(gateway.data_dir, sid) != pid
    events = client.get(f"/v1/sessions/{sid}/events").json()["events"]
    died = [e for e in events if e["action"] == "kernel_died"]
    assert died and "SIGKILL" in died[0]["details"]["message"]


def test_a_body_over_the_limit_is_413_and_changes_nothing(tight_session) -> None:
    client, sid = tight_session
    before = client.get(f"/v1/sessions/{sid}").json()["steps"]
    response = client.post(f"/v1/sessions/{sid}/execute", json={"code": "x = '" + "a" * 70000 + "'"})
    assert response.status_code == 413
    assert error_code(response) == "body_too_large"
    assert response.json()["error"]["details"]["limit_bytes"] == 65536
    upload = client.put(f"/v1/sessions/{sid}/files/big.bin", content=b"\0" * 200001)
    assert upload.status_code == 413
    for bad in ('{"code": "1", "timeout": NaN}', '{"code": "1", "timeout": Infinity}'):
        response = client.post(f"/v1/sessions/{sid}/execute", content=bad)
        assert response.status_code == 400 and error_code(response) == "invalid_json"
    assert client.get(f"/v1/sessions/{sid}/files").json()["files"] == []
    assert client.get(f"/v1/sessions/{sid}").json()["steps"] == before
    assert run(client, sid, "1")["result"] == "1"


def test_a_huge_or_endless_body_is_refused_early_with_json(tight: GatewayProcess, tight_session) -> None:
    import socket

    client, sid = tight_session
    host, port = tight.url.removeprefix("http://").split(":")
    # Announced far past the limit: answered at once, before the body is read.
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall((f"PUT /v1/sessions/{sid}/files/huge.bin HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {tight.token}\r\nContent-Length: {300 * 1024 * 1024}\r\n\r\n").encode())
        head = raw.recv(65536).decode()
    assert head.startswith("HTTP/1.1 413") and '"body_too_large"' in head

    # Chunked, with no announced length: cut off once it passes the limit.
    def endless():
        for _ in range(2000):
            yield b"\0" * 65536

    try:
        response = client.put(f"/v1/sessions/{sid}/files/endless.bin", content=endless())
        assert response.status_code == 413 and error_code(response) == "body_too_large"
    except httpx.TransportError:
        pass  # the server may close while the client is still sending; what matters is below
    uploads = tight.data_dir / "sessions" / sid / "uploads"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and list(uploads.glob("upload-*")):
        time.sleep(0.1)
    assert list(uploads.glob("upload-*")) == [], "a refused upload left its temporary file"
    assert client.get(f"/v1/sessions/{sid}/files").json()["files"] == []


def test_display_data_that_nbformat_would_reject_is_cleaned_not_fatal(client: httpx.Client, session) -> None:
    code = ("from IPython.display import display\n"
            "display({'text/plain': 'ok', 'application/vnd.example': {'a': 1}}, raw=True)\nprint('after')")
    execution = run(client, session["id"], code, timeout=10)
    assert execution["status"] == "ok"
    assert execution["stdout"] == "after\n"
    display = [o for o in execution["outputs"] if o["output_type"] == "display_data"][0]
    assert display["data"] == {"text/plain": "ok", "application/vnd.example": '{"a": 1}'}
    import nbformat

    nbformat.validate(nbformat.reads(client.get(f"/v1/sessions/{session['id']}/notebook").text, as_version=4))


@pytest.mark.slow
def test_fifty_live_sessions_at_once(tight: GatewayProcess) -> None:
    with tight.client() as client:
        ids: list[str] = []
        errors: list[str] = []

        def create(count: int) -> None:
            with tight.client() as own:
                for _ in range(count):
                    response = own.post("/v1/sessions", json={"labels": {"load": "fifty"}})
                    if response.status_code == 201:
                        ids.append(response.json()["id"])
                    else:
                        errors.append(response.text)

        threads = [threading.Thread(target=create, args=(10,)) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        try:
            assert errors == [] and len(ids) == 50
            assert client.get("/v1/health").json()["sessions"]["live"] >= 50
            for sid in ids[::7]:
                assert run(client, sid, "21*2")["result"] == "42"
        finally:
            for sid in ids:
                client.delete(f"/v1/sessions/{sid}")
