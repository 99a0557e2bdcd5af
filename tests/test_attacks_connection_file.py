"""Attacks on an isolated kernel's connection file, which lies in a runtime directory the kernel
can write: the gateway writes it at every start and restart, and reads it when it adopts the
kernel after a crash of its own.

A kernel can put anything at that name: a link to a host file, a FIFO (which blocks whoever
opens it for reading), a directory, a huge file, JSON of any shape, sockets named anywhere, or
nothing at all. Reading it never follows a link nor waits; writing it never goes through a link
a process of the kernel raced in; and a kernel whose file cannot be used after a crash is
stopped, with its cgroups and runtime directory, while its session goes on with a new kernel
(the other sessions are taken up as before)."""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import psutil
import pytest

from gateway import connection_files
from tests.conftest import (
    ISOLATING_PROFILES,
    GatewayProcess,
    engine_args,
    isolated_gateway,
    kernel_host_pid,
    run,
    running,
    start_gateway,
)

CANARY = b"host canary " + uuid.uuid4().hex.encode()
VALID = {"transport": "ipc", "ip": "/elsewhere/ipc", "shell_port": 1, "iopub_port": 2, "stdin_port": 3,
         "control_port": 4, "hb_port": 5, "key": "k", "signature_scheme": "hmac-sha256"}


def within(seconds: float, call: Callable[[], Any]) -> Any:
    """``call()``'s result or exception, failing the test if it takes longer (a FIFO waited on)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the test below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    secret = tmp_path / "secret.json"
    secret.write_bytes(CANARY)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    return {"runtime": runtime, "file": runtime / "kernel-k.json", "secret": secret, "fifo": fifo}


def plant(kind: str, places: dict[str, Path]) -> None:
    """Put what a kernel might at the connection file's name."""
    target = places["file"]
    if kind == "link to a host file":
        places["secret"].write_text(json.dumps(VALID))
        target.symlink_to(places["secret"])
    elif kind == "link to a FIFO":
        target.symlink_to(places["fifo"])
    elif kind == "FIFO":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
        (target / "x").write_bytes(b"{}")
    elif kind == "huge file":
        target.write_bytes(b" " * (connection_files.CONNECTION_FILE_MAX + 1) + b"{}")
    elif kind == "not an object":
        target.write_text("[1, 2, 3]")
    elif kind == "not JSON":
        target.write_bytes(b"\xff\xfe{")
    else:
        raise AssertionError(kind)


KINDS = ["link to a host file", "link to a FIFO", "FIFO", "directory", "huge file", "not an object", "not JSON"]


@pytest.mark.parametrize("kind", KINDS)
def test_reading_never_follows_a_link_nor_waits(places: dict[str, Path], kind: str) -> None:
    plant(kind, places)
    with pytest.raises((OSError, ValueError)):
        within(5, lambda: connection_files.read(places["file"]))


def test_a_regular_file_is_read(places: dict[str, Path]) -> None:
    places["file"].write_text(json.dumps(VALID))
    assert within(5, lambda: connection_files.read(places["file"])) == VALID


@pytest.mark.parametrize("kind", KINDS)
def test_installing_replaces_whatever_is_there_and_writes_nothing_else(places: dict[str, Path], kind: str) -> None:
    plant(kind, places)
    secret_before = places["secret"].read_bytes()
    within(5, lambda: connection_files.install(places["file"], b'{"new": true}'))
    info = os.lstat(places["file"])
    assert (info.st_mode & 0o170000, info.st_mode & 0o777) == (0o100000, 0o600)
    assert places["file"].read_bytes() == b'{"new": true}'
    assert places["secret"].read_bytes() == secret_before


def test_installing_never_writes_through_a_link_raced_in(places: dict[str, Path]) -> None:
    """A process of the kernel's uid puts a link to a host file at the name again and again
    while the gateway writes the file (a restart): the host file is never written. (jupyter_core's
    ``secure_write``, which removes the name and opens it again, fails this test.)"""
    stop = threading.Event()
    target, secret = places["file"], places["secret"]
    staging = places["runtime"] / "staging-link"

    def racer() -> None:
        while not stop.is_set():
            try:
                os.symlink(secret, staging)
            except FileExistsError:
                pass
            try:
                os.rename(staging, target)
            except OSError:
                pass

    thread = threading.Thread(target=racer, daemon=True)
    thread.start()
    installed = refused = 0
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                connection_files.install(target, b'{"round": 1}')
                installed += 1
            except OSError as exc:
                assert exc.errno == errno.EEXIST
                refused += 1
    finally:
        stop.set()
        thread.join(5)
    assert secret.read_bytes() == CANARY
    assert installed > 0, (installed, refused)


# The same attacks from inside real kernels, against a gateway that adopts them after kill -9.

SABOTAGE = {
    "link to a FIFO": "pipe = runtime / 'pipe'; os.mkfifo(pipe); os.chmod(pipe, 0o666); "
                      "os.symlink(pipe, runtime / 'l'); os.replace(runtime / 'l', conn)",
    "FIFO": "os.mkfifo(runtime / 'f'); os.replace(runtime / 'f', conn)",
    "directory": "conn.unlink(); conn.mkdir()",
    "huge file": "conn.write_bytes(b' ' * (1 << 20) + b'{}')",
    "not JSON": "conn.write_text('{')",
    "key of the wrong type": "info = json.loads(conn.read_text()); info['key'] = 5; conn.write_text(json.dumps(info))",
    "sockets elsewhere": "info = json.loads(conn.read_text()); info['ip'] = '/tmp/elsewhere/ipc'; "
                         "conn.write_text(json.dumps(info))",
    "removed": "conn.unlink()",
}
PREAMBLE = ("import json, os, pathlib\nfrom ipykernel.connect import get_connection_file\n"
            "conn = pathlib.Path(get_connection_file()); runtime = conn.parent\n")


def placement_of(data_dir: Path, session_id: str) -> dict[str, Any]:
    import sqlite3

    with sqlite3.connect(f"file:{data_dir / 'gateway.db'}?mode=ro", uri=True) as db:
        return json.loads(db.execute("SELECT placement FROM sessions WHERE id = ?", [session_id]).fetchone()[0])


@pytest.fixture(scope="module", params=ISOLATING_PROFILES)
def sabotaged(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A gateway whose sessions' kernels each spoil their connection file in one way (and one
    that does not), killed with SIGKILL and started again."""
    with isolated_gateway(request.param, "--pool-size", "0", *engine_args(request, request.param),
                          prefix="agw-connfile-") as state:
        gateway: GatewayProcess = state["gateway"]
        sessions: dict[str, str] = {}
        with gateway.client() as client:
            for kind, code in {"untouched": "", **SABOTAGE}.items():
                sid = client.post("/v1/sessions", json={}).json()["id"]
                step = run(client, sid, f"{PREAMBLE}{code}\nkept = {kind!r}")
                assert step["status"] == "ok", step
                sessions[kind] = sid
        processes = {kind: psutil.Process(kernel_host_pid(gateway.data_dir, sid)) for kind, sid in sessions.items()}
        placements = {kind: placement_of(gateway.data_dir, sid) for kind, sid in sessions.items()}
        gateway.stop(signal.SIGKILL)
        started = time.monotonic()
        state["gateway"] = start_gateway(gateway.data_dir, extra_args=state["args"])
        state.update(sessions=sessions, processes=processes, placements=placements,
                     restart_seconds=time.monotonic() - started)
        yield state


@pytest.fixture
def client(sabotaged: dict[str, Any]) -> Iterator[httpx.Client]:
    with sabotaged["gateway"].client() as http:
        yield http


def test_the_gateway_comes_back_and_takes_up_the_untouched_kernel(sabotaged: dict[str, Any],
                                                                  client: httpx.Client) -> None:
    assert sabotaged["restart_seconds"] < 30, "the restart waited on something a kernel put in its way"
    sid = sabotaged["sessions"]["untouched"]
    assert client.get(f"/v1/sessions/{sid}").json()["state"] == "idle"
    assert run(client, sid, "kept")["result"] == "'untouched'"
    assert running(sabotaged["processes"]["untouched"])


@pytest.mark.parametrize("kind", sorted(SABOTAGE))
def test_a_kernel_whose_connection_file_cannot_be_used_is_stopped(sabotaged: dict[str, Any], client: httpx.Client,
                                                                  kind: str) -> None:
    """The kernel is stopped with what is left of it; its session goes on, as after a kernel's
    death, with a new kernel: its variables are gone (and it says so), its files are kept."""
    sid = sabotaged["sessions"][kind]
    assert not running(sabotaged["processes"][kind]), f"the kernel that put a {kind} there still runs"
    assert not Path(sabotaged["placements"][kind]["runtime_dir"]).exists()
    log = sabotaged["gateway"].stderr_text() + sabotaged["gateway"].stdout_text()
    assert f"kernel {sabotaged['placements'][kind]['launch_id']}" in log
    session = client.get(f"/v1/sessions/{sid}").json()
    assert session["state"] == "paused" and session["snapshot"]["reason"] == "crash", session
    assert "variables and imports are gone" in session["snapshot"]["note"]
    step = run(client, sid, "'kept' in dir()")
    assert step["status"] == "ok" and step["result"] == "False", step
    assert client.get(f"/v1/sessions/{sid}/notebook").status_code == 200
