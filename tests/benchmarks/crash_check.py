"""kill -9 the gateway at random moments of a concurrent workload, restart it, and compare what
each kernel ran (its own ``In`` history) with the session's recorded trajectory.

    python tests/benchmarks/crash_check.py [--rounds 20] [--sessions 8] [--lifecycle 2] [--seed N]

Each round starts a gateway on a fresh data directory, runs steps in every session from one
thread each (half of the sessions over HTTP execute, half as execute_requests over the kernel
websocket; a step sets a variable and sleeps a random few milliseconds), kills
the gateway with SIGKILL after a random 0.5-3 s, starts it again on the same directory and,
per session: every cell in the kernel's ``In`` must be a recorded step, in the same order; every
step recorded as run (``ok``/``error``) must be in ``In``; no step may still be ``running``; a
step recorded ``lost`` may or may not have run.

``--lifecycle N`` adds N sessions driven through their whole life meanwhile: a step setting
``mark``, an upload, pause, resume, fork, restart, in a loop. After the restart every one of them
and every fork child they made must be usable: ``failed`` with a reason, or answering a step (a
paused one is resumed), with ``mark`` as its trajectory says (the ``mark = N`` steps recorded ``ok``,
the restarts, the pauses, and a crash's return to the last snapshot, in time order; a fork
child has ``mark`` if its restored names say so)
and every file it recorded an upload of.

Prints one line per round and a summary; exits 1 on any mismatch. Stops every gateway it started.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import websocket

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conftest import start_gateway  # noqa: E402


def workload(url: str, token: str, sid: str, stop: threading.Event, rng: random.Random) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        step = 0
        while not stop.is_set():
            step += 1
            code = f"v_{step} = {step}\nimport time; time.sleep({rng.randint(0, 30) / 1000})"
            try:
                client.post(f"/v1/sessions/{sid}/execute", json={"code": code})
            except httpx.HTTPError:
                return


def websocket_workload(url: str, token: str, kernel_id: str, stop: threading.Event, rng: random.Random) -> None:
    """Steps sent as execute_requests over the kernel websocket (the Jupyter face), one at a time."""
    ws_url = url.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels"
    try:
        ws = websocket.create_connection(ws_url, timeout=30, header=[f"Authorization: token {token}"])
    except (OSError, websocket.WebSocketException):
        return
    step = 0
    try:
        while not stop.is_set():
            step += 1
            msg_id = uuid.uuid4().hex
            code = f"w_{step} = {step}\nimport time; time.sleep({rng.randint(0, 30) / 1000})"
            ws.send(json.dumps({"channel": "shell", "parent_header": {}, "metadata": {}, "buffers": [],
                                "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "crash",
                                           "session": "crash", "version": "5.3"},
                                "content": {"code": code, "silent": False, "store_history": True,
                                            "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}))
            while True:
                msg = json.loads(ws.recv())
                if msg.get("parent_header", {}).get("msg_id") == msg_id and msg.get("channel") == "shell":
                    break
    except (OSError, ValueError, websocket.WebSocketException):
        return
    finally:
        ws.close()


def lifecycle_workload(url: str, token: str, sid: str, stop: threading.Event) -> None:
    """A session's whole life, over and over: a step, an upload, pause, resume, fork, restart."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        turn = 0
        try:
            while not stop.is_set():
                turn += 1
                client.post(f"/v1/sessions/{sid}/execute", json={"code": f"mark = {turn}"})
                client.put(f"/v1/sessions/{sid}/files/up/{turn}.txt", content=f"upload {turn}".encode())
                for action in ("pause", "resume", "fork", "restart"):
                    if stop.is_set():
                        return
                    client.post(f"/v1/sessions/{sid}/{action}", json={})
        except httpx.HTTPError:
            return


def expected_marks(steps: list[dict], events: list[dict]) -> set[int | None]:
    """The values ``mark`` may have as the trajectory says, replayed in time order: set by an
    ``ok`` step, gone at a restart or a death, saved at a pause. A crash sends a session back to
    the snapshot on disk: the one of its last recorded pause, or a newer one whose pause the
    crash cut short (its files complete, its event not yet written), so any value set since."""
    timeline = [(s["finished_at"] or "", "step", s) for s in steps if s["code"].startswith("mark = ")]
    timeline += [(e["at"], "event", e) for e in events]
    possible: set[int | None] = {None}
    saved: set[int | None] = {None}
    since_pause: set[int | None] = set()
    for _at, kind, item in sorted(timeline, key=lambda entry: entry[0]):
        if kind == "step":
            if item["status"] == "ok":
                possible = {int(item["code"].split("=")[1])}
                since_pause |= possible
        elif item["action"] in ("kernel_restarted", "kernel_died"):
            possible = {None}
            since_pause.add(None)
        elif item["action"] == "session_paused":
            if item["details"].get("reason") == "crash":
                possible = saved | since_pause
            else:
                saved, since_pause = set(possible), set()
    return possible


def check_lifecycle(client: httpx.Client, sid: str, child: bool) -> list[str]:
    session = client.get(f"/v1/sessions/{sid}").json()
    if session["state"] == "failed":
        return [] if session.get("reason") else [f"{sid}: failed without a reason"]
    steps = client.get(f"/v1/sessions/{sid}/steps").json()["steps"]
    events = client.get(f"/v1/sessions/{sid}/events").json()["events"]
    probe = client.post(f"/v1/sessions/{sid}/execute", json={"code": "globals().get('mark')"}).json()
    if probe.get("status") != "ok":
        return [f"{sid}: not usable after the crash: {str(probe)[:200]}"]
    found = ast.literal_eval(probe["result"])
    problems = []
    if child:
        restored = [e["details"] for e in events if e["action"] == "state_restored"]
        if restored and ("mark" in restored[-1].get("restored", [])) != (found is not None):
            problems.append(f"{sid} (a fork): mark is {found!r}, its restored names say {restored[-1]['restored']}")
    else:
        expected = expected_marks(steps, events)
        paused_by_replay = any(e["action"] == "session_resumed" and e["details"].get("replayed_steps") for e in events)
        if found not in expected and not paused_by_replay:
            problems.append(f"{sid}: mark is {found!r}, its trajectory says one of {sorted(expected, key=str)}")
    for event in events:
        if event["action"] == "file_upload":
            path = event["details"]["path"]
            if client.get(f"/v1/sessions/{sid}/files/{path}").status_code != 200:
                problems.append(f"{sid}: the uploaded {path} is gone")
    return problems


def check_session(client: httpx.Client, sid: str) -> tuple[list[str], dict[str, int]]:
    steps = client.get(f"/v1/sessions/{sid}/steps").json()["steps"]
    history = client.post(f"/v1/sessions/{sid}/execute", json={"code": "In[1:-1]"}).json()
    if history.get("status") != "ok":
        return [f"{sid}: its kernel's history could not be read: {history}"], {}
    ran_in_kernel = [cell.strip() for cell in ast.literal_eval(history["result"])]
    problems = []
    recorded = [s for s in steps if s["code"] != "In[1:-1]"]
    counts: dict[str, int] = {}
    for step in recorded:
        counts[step["status"]] = counts.get(step["status"], 0) + 1
    codes = [s["code"].strip() for s in recorded]
    position = 0
    for cell in ran_in_kernel:
        try:
            position = codes.index(cell, position) + 1
        except ValueError:
            problems.append(f"{sid}: ran but not recorded (or out of order): {cell[:40]!r}")
    for step in recorded:
        if step["status"] in ("ok", "error") and step["code"].strip() not in ran_in_kernel:
            problems.append(f"{sid}: recorded {step['status']} but not in the kernel's history: step {step['step']}")
        if step["status"] == "running":
            problems.append(f"{sid}: step {step['step']} still running after the restart")
    return problems, counts


def one_round(base: Path, sessions: int, rng: random.Random,
              lifecycle: int = 0) -> tuple[list[str], dict[str, int], float]:
    data = base / "data"
    token = f"crash-{rng.getrandbits(64):x}"
    gateway = start_gateway(data, token=token, extra_args=("--pool-size", "2"))
    stop = threading.Event()
    try:
        with gateway.client() as client:
            created = [client.post("/v1/sessions", json={}).json() for _ in range(sessions)]
            living = [client.post("/v1/sessions", json={}).json()["id"] for _ in range(lifecycle)]
        ids = [session["id"] for session in created]
        # Every other session is driven over the kernel websocket, the others over HTTP.
        threads = [threading.Thread(target=websocket_workload if index % 2 else workload,
                                    args=(gateway.url, token, session["kernel_id"] if index % 2 else session["id"],
                                          stop, random.Random(rng.random())))
                   for index, session in enumerate(created)]
        threads += [threading.Thread(target=lifecycle_workload, args=(gateway.url, token, sid, stop)) for sid in living]
        for thread in threads:
            thread.start()
        delay = rng.uniform(0.5, 8.0 if lifecycle else 3.0)  # a whole life (pause ... restart) takes seconds
        time.sleep(delay)
        gateway.stop(signal.SIGKILL)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    except BaseException:
        gateway.stop(signal.SIGKILL)
        raise
    restarted = start_gateway(data, token=token, extra_args=("--pool-size", "0"))
    problems: list[str] = []
    totals: dict[str, int] = {}
    try:
        with restarted.client() as client:
            for sid in ids:
                found, counts = check_session(client, sid)
                problems += found
                for status, count in counts.items():
                    totals[status] = totals.get(status, 0) + count
            listed = client.get("/v1/sessions", params={"limit": 500}).json()["sessions"]
            for sid in living:
                problems += check_lifecycle(client, sid, child=False)
                for child in [s["id"] for s in listed if (s.get("parent") or {}).get("session_id") == sid]:
                    problems += check_lifecycle(client, child, child=True)
                    totals["forks"] = totals.get("forks", 0) + 1
    finally:
        if restarted.stop() != 0:
            problems.append("the restarted gateway did not stop cleanly")
    return problems, totals, delay


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--lifecycle", type=int, default=0, help="sessions paused, resumed, forked, restarted")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"crash check: {args.rounds} rounds of {args.sessions} sessions (+{args.lifecycle} through their whole "
          f"life), seed {seed}")
    failures = 0
    all_totals: dict[str, int] = {}
    for number in range(1, args.rounds + 1):
        base = Path(tempfile.mkdtemp(prefix="agw-crash-", dir="/tmp"))
        base.chmod(0o711)
        try:
            problems, totals, delay = one_round(base, args.sessions, rng, args.lifecycle)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        for status, count in totals.items():
            all_totals[status] = all_totals.get(status, 0) + count
        failures += bool(problems)
        summary = ", ".join(f"{status} {count}" for status, count in sorted(totals.items()))
        print(f"round {number:2}: killed after {delay:.2f} s; steps {summary}; "
              f"{'OK' if not problems else 'MISMATCH'}")
        for problem in problems:
            print(f"    {problem}")
    summary = ", ".join(f"{status} {count}" for status, count in sorted(all_totals.items()))
    print(f"{args.rounds - failures} of {args.rounds} rounds matched; steps {summary}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
