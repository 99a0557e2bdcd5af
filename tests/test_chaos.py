"""kill -9 of the gateway at random moments of workloads that step, time out, upload, pause,
resume, fork and restart sessions under the `sandbox` profile; after each restart every
session is used again and must hold exactly what was acknowledged before the crash (for the
one operation of each worker that was under way, either its outcome or none), and at the end
every session's notebook re-runs top to bottom with nbclient.

The run is reproducible from its seed (printed; set AGW_CHAOS_SEED to repeat one)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx
import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import GatewayProcess, isolated_gateway, start_gateway

pytestmark = pytest.mark.slow

ROUNDS = 4
WORKERS = 2
SESSIONS_MAX = 5  # per worker, forks included
STEP = "counter = (counter if 'counter' in dir() else 0) + 1\ncounter"
LOOK = "counter if 'counter' in dir() else None"
UNCERTAIN = object()  # a value the crash may or may not have changed


@dataclass
class Expected:
    """What a session must hold: its counter (None: unset) and its files, as acknowledged."""

    counter: int | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    paused: bool = False


@dataclass
class InFlight:
    """The operation a worker had sent when the gateway was killed."""

    op: str
    session: str
    detail: Any = None


class Worker(threading.Thread):
    """Runs random operations on its own sessions until the gateway goes away."""

    def __init__(self, name: str, gateway: GatewayProcess, sessions: dict[str, Expected], rng: random.Random):
        super().__init__(name=name, daemon=True)
        self.gateway, self.sessions, self.rng = gateway, sessions, rng
        self.in_flight: InFlight | None = None
        self.failure: BaseException | None = None
        self.done = 0

    def run(self) -> None:
        with self.gateway.client() as client:
            try:
                while True:
                    self.one(client)
                    self.done += 1
            except (httpx.TransportError, OSError):
                return  # the gateway was killed: ``in_flight`` says what was under way
            except BaseException as exc:  # a wrong answer while the gateway ran
                self.failure = exc

    def one(self, client: httpx.Client) -> None:
        sid = self.rng.choice(sorted(self.sessions))
        expected = self.sessions[sid]
        ops = ["step", "step", "timeout", "upload", "pause" if not expected.paused else "resume", "restart"]
        if len(self.sessions) < SESSIONS_MAX:
            ops.append("fork")
        op = self.rng.choice(ops)
        if op == "restart" and expected.paused:
            op = "resume"
        base = f"/v1/sessions/{sid}"
        if op == "step":
            self.in_flight = InFlight(op, sid)
            answer = client.post(f"{base}/execute", json={"code": STEP})
            assert answer.status_code == 200 and answer.json()["status"] == "ok", (op, sid, answer.text)
            value = int(answer.json()["result"])
            assert value == (expected.counter or 0) + 1, (sid, value, expected)
            expected.counter, expected.paused = value, False
        elif op == "timeout":
            self.in_flight = InFlight(op, sid)
            answer = client.post(f"{base}/execute", json={"code": "import time\ntime.sleep(2)", "timeout": 0.3})
            assert answer.status_code == 200 and answer.json()["status"] == "timeout", (op, sid, answer.text)
            expected.paused = False
        elif op == "upload":
            name, content = f"f{self.rng.randrange(1000)}.txt", os.urandom(self.rng.randrange(1, 4096))
            self.in_flight = InFlight(op, sid, (name, content))
            answer = client.put(f"{base}/files/{name}", content=content)
            assert answer.status_code in (200, 201), (op, sid, answer.text)
            expected.files[name] = content
        elif op in ("pause", "resume"):
            self.in_flight = InFlight(op, sid)
            answer = client.post(f"{base}/{op}")
            assert answer.status_code == 200, (op, sid, answer.text)
            expected.paused = op == "pause"
        elif op == "restart":
            self.in_flight = InFlight(op, sid)
            answer = client.post(f"{base}/restart")
            assert answer.status_code == 200, (op, sid, answer.text)
            expected.counter = None
        else:
            self.in_flight = InFlight(op, sid)
            answer = client.post(f"{base}/fork")
            assert answer.status_code == 201, (op, sid, answer.text)
            self.sessions[answer.json()["id"]] = Expected(expected.counter, dict(expected.files))
            # a paused parent stays paused: its fork is made from its snapshot
        self.in_flight = None


def observe(client: httpx.Client, sid: str) -> tuple[dict[str, Any], int | None]:
    """The session's view and its counter, read by a step (which resumes a paused session)."""
    view = client.get(f"/v1/sessions/{sid}").json()
    if view.get("state") in ("failed", "terminated"):
        return view, None
    answer = client.post(f"/v1/sessions/{sid}/execute", json={"code": LOOK})
    assert answer.status_code == 200 and answer.json()["status"] == "ok", (sid, answer.text)
    result = answer.json()["result"]
    return view, None if result is None else int(result)


def check_files(client: httpx.Client, sid: str, expected: Expected, uncertain: tuple[str, bytes] | None) -> None:
    for name, content in expected.files.items():
        got = client.get(f"/v1/sessions/{sid}/files/{name}")
        assert got.status_code == 200 and got.content == content, (sid, name, got.status_code)
    if uncertain is not None:
        name, content = uncertain
        got = client.get(f"/v1/sessions/{sid}/files/{name}")
        assert got.status_code == 404 or got.content == content, (sid, name, "a half-made upload")
        if got.status_code == 200:
            expected.files[name] = content


def check_after_crash(client: httpx.Client, workers: list[Worker]) -> None:
    """Every acknowledged session holds what was acknowledged; a fork under way left a
    complete child or a failed one."""
    known = {sid for worker in workers for sid in worker.sessions}
    listed = client.get("/v1/sessions", params={"limit": 200}).json()["sessions"]
    for worker in workers:
        flight = worker.in_flight
        for sid, expected in list(worker.sessions.items()):
            view, counter = observe(client, sid)
            assert view["state"] not in ("failed", "terminated"), (sid, view.get("reason"), flight)
            possible = {expected.counter}
            if flight is not None and flight.session == sid:
                if flight.op == "step":
                    possible.add((expected.counter or 0) + 1)
                elif flight.op == "restart":
                    possible.add(None)
            assert counter in possible, (sid, counter, possible, flight)
            expected.counter, expected.paused = counter, False
            check_files(client, sid, expected,
                        flight.detail if flight is not None and flight.session == sid and flight.op == "upload"
                        else None)
        if flight is not None and flight.op == "fork":
            parent = worker.sessions[flight.session]
            for child in [s for s in listed if s["id"] not in known and (s.get("parent") or {}).get("session_id")
                          == flight.session]:
                if child["state"] == "failed":
                    assert child.get("reason"), child
                    continue
                _, counter = observe(client, child["id"])
                assert counter == parent.counter, (child["id"], counter, parent)
                check_files(client, child["id"], parent, None)
                worker.sessions[child["id"]] = Expected(counter, dict(parent.files))
        worker.in_flight = None
    running = [s for s in client.get("/v1/sessions", params={"limit": 200}).json()["sessions"]
               if s["state"] == "starting"]
    assert not running, running


@pytest.fixture
def chaos_gateway() -> Iterator[dict[str, Any]]:
    with isolated_gateway("sandbox", "--pool-size", "1", prefix="agw-chaos-") as state:
        yield state


def test_sessions_come_back_as_acknowledged_after_kill_9_at_random_moments(chaos_gateway: dict[str, Any],
                                                                           tmp_path: Path) -> None:
    seed = int(os.environ.get("AGW_CHAOS_SEED") or random.randrange(1 << 30))
    print(f"chaos seed: {seed}")
    rng = random.Random(seed)
    gateway: GatewayProcess = chaos_gateway["gateway"]
    models: list[dict[str, Expected]] = []
    with gateway.client() as client:
        for _ in range(WORKERS):
            sid = client.post("/v1/sessions", json={}).json()["id"]
            models.append({sid: Expected()})
    total = 0
    for round_number in range(ROUNDS):
        workers = [Worker(f"worker-{i}", gateway, models[i], random.Random(rng.random())) for i in range(WORKERS)]
        for worker in workers:
            worker.start()
        time.sleep(rng.uniform(1.0, 5.0))
        gateway.stop(signal.SIGKILL)
        for worker in workers:
            worker.join(60)
            assert not worker.is_alive(), f"{worker.name} still waits after the gateway was killed"
            assert worker.failure is None, f"round {round_number}, seed {seed}: {worker.failure!r}"
            total += worker.done
        gateway = chaos_gateway["gateway"] = start_gateway(gateway.data_dir, extra_args=chaos_gateway["args"])
        with gateway.client() as client:
            check_after_crash(client, workers)
    assert total >= ROUNDS * WORKERS, f"too few operations ran before the crashes ({total})"
    # Every trajectory (forks, timeouts, restarts, uploads, lost steps) re-runs on its own.
    with gateway.client() as client:
        for sid in sorted(sid for model in models for sid in model):
            text = client.get(f"/v1/sessions/{sid}/notebook").text
            nb = nbformat.reads(text, as_version=4)
            nbformat.validate(nb)
            where = tmp_path / sid
            where.mkdir()
            NotebookClient(nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(where)}}).execute()
