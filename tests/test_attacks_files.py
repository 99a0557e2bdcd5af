"""Attacks on the gateway's file operations from inside a session: a kernel thread swaps
workspace and exchange entries between real files or directories and links to host paths while
a client drives every files route and every lifecycle operation.

The gateway runs as root, so each operation that followed a link would read, write, delete or
chown a host file: the host canaries (root-only files and a directory outside every session) are
checked after every race, and no answer may be a 500. Each race is bounded in time. Run under
each isolating profile this machine supports, on a gateway of its own."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.conftest import (
    ISOLATING_PROFILES,
    GatewayProcess,
    engine_args,
    error_code,
    isolated_gateway,
    run,
    start_gateway,
)

RACE_SECONDS = 6.0
CANARY = b"host canary: root only " + uuid.uuid4().hex.encode()
CANARY_OWNER = (4242, 4242)  # no kernel's uid; a chown through a link would show


@pytest.fixture(scope="module", params=ISOLATING_PROFILES)
def isolated(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    # A token of its own: the suite's fixed one is written in files every user can read.
    with isolated_gateway(request.param, "--pool-size", "0", *engine_args(request, request.param),
                          token=f"attacks-{uuid.uuid4().hex}",
                          prefix="agw-attacks-") as state:
        yield state


@pytest.fixture
def gateway(isolated: dict[str, Any]) -> GatewayProcess:
    return isolated["gateway"]


@pytest.fixture
def client(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with gateway.client() as http:
        yield http


@pytest.fixture
def canaries(isolated: dict[str, Any]) -> Iterator[dict[str, Path]]:
    """Root-only host files and a directory the kernel must never reach through the gateway."""
    base: Path = isolated["base"] / f"canaries-{uuid.uuid4().hex[:8]}"
    base.mkdir(mode=0o700)
    secret = base / "secret.txt"
    secret.write_bytes(CANARY)
    secret.chmod(0o600)
    os.chown(secret, *CANARY_OWNER)
    directory = base / "dir"
    directory.mkdir(mode=0o700)
    (directory / "x").write_bytes(CANARY)
    yield {"base": base, "secret": secret, "dir": directory}
    shutil.rmtree(base, ignore_errors=True)


def assert_canaries_intact(canaries: dict[str, Path]) -> None:
    for path, owner in ((canaries["secret"], CANARY_OWNER), (canaries["dir"] / "x", (0, 0))):
        info = path.lstat()
        assert path.read_bytes() == CANARY, path
        assert (info.st_uid, info.st_gid) == owner, f"{path} was chowned to {info.st_uid}"
    assert sorted(p.name for p in canaries["dir"].iterdir()) == ["x"], "something landed in the host directory"
    assert canaries["dir"].stat().st_uid == 0


def new_session(client: httpx.Client) -> str:
    response = client.post("/v1/sessions", json={})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


SWAPPER = r'''
import os, threading, time
def _swap(stop, secret, host_dir, deadline):
    os.makedirs("realdir", exist_ok=True)
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            # a file that is sometimes a regular file, sometimes a link to a host file
            with open("f.new", "wb") as handle:
                handle.write(b"kernel bytes")
            os.replace("f.new", "f")
            os.symlink(secret, "f.link")
            os.replace("f.link", "f")
            # a directory that is sometimes real, sometimes a link to a host directory
            if os.path.islink("d"):
                os.unlink("d")
            elif os.path.isdir("d"):
                os.rename("d", "d.away")
                os.symlink(host_dir, "d")
                continue
            if os.path.isdir("d.away"):
                os.rename("d.away", "d")
            else:
                os.makedirs("d", exist_ok=True)
            with open("d/x", "wb") as handle:
                handle.write(b"kernel bytes")
        except OSError:
            pass
_stop = threading.Event()
_thread = threading.Thread(target=_swap, args=(_stop, SECRET, HOST_DIR, time.monotonic() + LIFETIME), daemon=True)
_thread.start()
'''


def start_swapper(client: httpx.Client, sid: str, canaries: dict[str, Path], lifetime: float) -> None:
    code = (f"SECRET = {str(canaries['secret'])!r}\nHOST_DIR = {str(canaries['dir'])!r}\nLIFETIME = {lifetime}\n"
            + SWAPPER)
    assert run(client, sid, code)["status"] == "ok"


@pytest.mark.slow
def test_files_routes_never_follow_a_link_the_kernel_swaps_in(client: httpx.Client, canaries: dict[str, Path]) -> None:
    sid = new_session(client)
    start_swapper(client, sid, canaries, RACE_SECONDS + 5)
    statuses: dict[tuple[str, int], int] = {}
    leaked = 0
    deadline = time.monotonic() + RACE_SECONDS
    calls = 0
    while time.monotonic() < deadline:
        calls += 1
        for method, path, body in (("GET", "f", None), ("GET", "d/x", None), ("PUT", "d/up.txt", b"upload"),
                                   ("PUT", "f", b"upload"), ("DELETE", "d/x", None), ("GET", "", None)):
            url = f"/v1/sessions/{sid}/files" + (f"/{path}" if path else "")
            response = client.request(method, url, content=body)
            statuses[(method, response.status_code)] = statuses.get((method, response.status_code), 0) + 1
            assert response.status_code < 500, (method, path, response.text)
            if CANARY in response.content:
                leaked += 1
        if calls % 10 == 0:
            assert client.delete(f"/v1/sessions/{sid}/files/f").status_code in (200, 400, 404)
    assert leaked == 0, f"{leaked} answers held the host file's bytes"
    assert_canaries_intact(canaries)
    # The race really ran both ways: some downloads were served, some refused as links.
    assert statuses.get(("GET", 200), 0) > 0 and statuses.get(("GET", 400), 0) > 0, statuses
    assert calls > 20, calls


def test_links_fifos_and_foreign_hard_links_are_never_used(gateway: GatewayProcess, client: httpx.Client,
                                                           canaries: dict[str, Path]) -> None:
    sid = new_session(client)
    code = (f"import os\nos.symlink({str(canaries['secret'])!r}, 'to-secret')\n"
            f"os.symlink({str(canaries['dir'])!r}, 'to-dir')\nos.mkfifo('pipe')\n"
            "open('own.txt', 'w').write('own'); os.link('own.txt', 'own-link.txt')")
    assert run(client, sid, code)["status"] == "ok"
    workspace = gateway.data_dir / "sessions" / sid / "workspace"
    # What a kernel could do where fs.protected_hardlinks is off: a hard link to a root-only file
    # (made in the workspace's own file system when it has one: links cannot cross into it).
    root_only = canaries["secret"]
    try:
        os.link(root_only, workspace / "hard-secret")
    except OSError:
        root_only = workspace / ".root-only"
        root_only.write_bytes(CANARY)
        root_only.chmod(0o600)
        os.link(root_only, workspace / "hard-secret")
    for path in ("to-secret", "to-dir/x", "pipe", "hard-secret"):
        response = client.get(f"/v1/sessions/{sid}/files/{path}", timeout=10)
        assert response.status_code == 400 and error_code(response) == "invalid_path", (path, response.text)
    for path in ("to-dir/planted", "to-dir/x"):
        assert client.put(f"/v1/sessions/{sid}/files/{path}", content=b"p").status_code == 400
        assert client.delete(f"/v1/sessions/{sid}/files/{path}").status_code == 400
    # The kernel's own hard link is its file: it downloads.
    assert client.get(f"/v1/sessions/{sid}/files/own-link.txt").content == b"own"
    listed = {f["path"] for f in client.get(f"/v1/sessions/{sid}/files").json()["files"]}
    assert listed == {"own.txt", "own-link.txt"}, listed
    # Deleting a link removes the link, never its target.
    assert client.delete(f"/v1/sessions/{sid}/files/to-secret").json()["deleted"] == "file"
    assert client.delete(f"/v1/sessions/{sid}/files/to-dir").json()["deleted"] == "file"
    os.unlink(workspace / "hard-secret")
    if root_only != canaries["secret"]:
        os.unlink(root_only)
    assert_canaries_intact(canaries)


LIFECYCLE_ATTACK = r'''
import os, threading, time
# The kernel's own snapshot code writes its files with os.replace: make each one a link to a
# host file the moment it is written.
if not hasattr(os, "_original_replace"):
    os._original_replace = os.replace
def _replace(src, dst, *args, **kwargs):
    os._original_replace(src, dst, *args, **kwargs)
    if str(dst).endswith(("namespace.pkl", "restore.json")):
        os.unlink(dst)
        os.symlink(SECRET, dst)
os.replace = _replace
# Wherever the gateway's snapshot files pass (the exchange directory), swap them for links to a
# host file, and swap the directory itself for a link to a host directory.
from ipykernel import get_connection_file
_runtime = os.path.dirname(get_connection_file())
def _attack(stop, deadline):
    exchange = os.path.join(_runtime, "exchange")
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            for name in ("snapshot.json", "namespace.pkl", "restore.json"):
                target = os.path.join(exchange, name)
                if os.path.lexists(target) and not os.path.islink(target):
                    os.symlink(SECRET, target + ".l")
                    os.replace(target + ".l", target)
            if os.path.isdir(exchange) and not os.path.islink(exchange) and not os.listdir(exchange):
                os.rename(exchange, exchange + ".away")
                os.symlink(HOST_DIR, exchange)
                time.sleep(0.001)
                os.unlink(exchange)
                os.rename(exchange + ".away", exchange)
        except OSError:
            pass
_stops = globals().get("_stops", [])
_stops.append(threading.Event())
threading.Thread(target=_attack, args=(_stops[-1], time.monotonic() + LIFETIME), daemon=True).start()
'''


@pytest.mark.slow
def test_pause_resume_and_fork_never_follow_links_in_the_exchange(gateway: GatewayProcess, client: httpx.Client,
                                                                   canaries: dict[str, Path]) -> None:
    sid = new_session(client)
    attack = (f"SECRET = {str(canaries['secret'])!r}\nHOST_DIR = {str(canaries['dir'])!r}\nLIFETIME = 30\n"
              + LIFECYCLE_ATTACK)
    for _ in range(3):
        assert run(client, sid, attack)["status"] == "ok"
        # The links are refused, and the pause says so: the session stays live with its state.
        paused = client.post(f"/v1/sessions/{sid}/pause")
        assert paused.status_code == 409 and error_code(paused) == "state_not_saved", paused.text
        assert client.get(f"/v1/sessions/{sid}").json()["state"] in ("idle", "busy")
        snapshot_dir = gateway.data_dir / "sessions" / sid / "snapshot"
        for saved in snapshot_dir.glob("*"):
            assert not saved.is_symlink(), f"a link was taken into {saved}"
            assert CANARY not in saved.read_bytes(), f"the host file was copied into {saved}"
        assert_canaries_intact(canaries)
        # A fork of the live session: its state cannot be taken through links, and it says so.
        refused = client.post(f"/v1/sessions/{sid}/fork")
        assert refused.status_code == 409 and error_code(refused) == "state_not_saved", refused.text
        assert CANARY.decode() not in refused.text + paused.text
        # Nothing of the host file reached any kernel, wherever it looks (the kernel is told
        # only the file's hash, so its own history cannot hold the bytes).
        search = ("import hashlib, os\nfrom ipykernel import get_connection_file\nfound = []\n"
                  "for top in ('.', os.path.dirname(get_connection_file())):\n"
                  "    for d, _, names in os.walk(top):\n        for n in names:\n"
                  "            try:\n                data = open(os.path.join(d, n), 'rb').read()\n"
                  "            except OSError:\n                continue\n"
                  "            if hashlib.sha256(data).hexdigest() == WANTED:\n                found.append(n)\nfound")
        result = run(client, sid, f"WANTED = {hashlib.sha256(CANARY).hexdigest()!r}\n" + search)
        assert result["status"] == "ok" and result["result"] == "[]", result
        assert_canaries_intact(canaries)
    # Without the attack, the same session pauses and resumes with its state.
    stop = "import os, time\nos.replace = os._original_replace\nfor s in _stops: s.set()\ntime.sleep(0.2)\nkeep = 41"
    assert run(client, sid, stop)["status"] == "ok"
    assert "error" not in client.post(f"/v1/sessions/{sid}/pause").json()["snapshot"]
    client.post(f"/v1/sessions/{sid}/resume")
    assert run(client, sid, "keep")["result"] == "41"
    client.delete(f"/v1/sessions/{sid}")
    assert_canaries_intact(canaries)


@pytest.mark.slow
def test_restart_terminate_and_retention_leave_host_files_alone(isolated: dict[str, Any], client: httpx.Client,
                                                                 canaries: dict[str, Path]) -> None:
    """Links to host files planted in a workspace, and a thread still swapping entries, through a
    restart, a pause and resume (which hand the workspace to a new uid), a terminate, and the
    removal of the ended session's workspace by retention."""
    plant = (f"import os\nos.symlink({str(canaries['secret'])!r}, 'to-secret')\n"
             f"os.symlink({str(canaries['dir'])!r}, 'to-dir')\nos.makedirs('sub/deeper', exist_ok=True)\n"
             f"os.symlink({str(canaries['base'])!r}, 'sub/deeper/to-base')")
    sid = new_session(client)
    assert run(client, sid, plant)["status"] == "ok"
    # The kernel's home in its runtime directory, made again at every restart, becomes a link to
    # a host directory: the restart must neither chown nor chmod it.
    home_link = ("import os, shutil\nfrom ipykernel import get_connection_file\n"
                 "home = os.path.join(os.path.dirname(get_connection_file()), 'home')\n"
                 f"shutil.rmtree(home, ignore_errors=True)\nos.symlink({str(canaries['dir'])!r}, home)")
    assert run(client, sid, home_link)["status"] == "ok"
    start_swapper(client, sid, canaries, 20)
    assert client.post(f"/v1/sessions/{sid}/restart").status_code == 200
    assert_canaries_intact(canaries)
    assert run(client, sid, "import os; from ipykernel import get_connection_file; "
                            "os.path.isdir(os.path.join(os.path.dirname(get_connection_file()), 'home'))"
               )["result"] == "True"
    start_swapper(client, sid, canaries, 20)
    assert client.post(f"/v1/sessions/{sid}/pause").status_code == 200
    assert client.post(f"/v1/sessions/{sid}/resume").status_code == 200
    assert run(client, sid, "import os; os.readlink('to-secret')")["result"] == repr(str(canaries["secret"]))
    start_swapper(client, sid, canaries, 20)
    assert client.delete(f"/v1/sessions/{sid}").status_code == 200
    assert_canaries_intact(canaries)

    retention = start_gateway(isolated["base"] / f"retention-{uuid.uuid4().hex[:6]}", token=f"r-{uuid.uuid4().hex}",
                              extra_args=(*isolated["args"], "--retention-days", "0.00002",
                                          "--idle-pause-seconds", "4"))
    try:
        with retention.client() as other:
            ended = new_session(other)
            assert run(other, ended, plant)["status"] == "ok"
            start_swapper(other, ended, canaries, 20)
            assert other.delete(f"/v1/sessions/{ended}").status_code == 200
            workspace = retention.data_dir / "sessions" / ended / "workspace"
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and workspace.exists():
                time.sleep(0.3)
            assert not workspace.exists()
    finally:
        assert retention.stop() == 0
    assert_canaries_intact(canaries)
    assert (canaries["base"] / "secret.txt").exists() and (canaries["dir"] / "x").exists()


def test_workspace_listing_is_paged_in_path_order(client: httpx.Client) -> None:
    sid = new_session(client)
    code = ("import os\nfor d in ('a', 'a/b', 'a-b', 'z'):\n    os.makedirs(d, exist_ok=True)\n"
            "for i in range(1200):\n    open(f'a/f{i:04d}', 'w').close()\n"
            "for name in ('a/b/deep', 'a-b/x', 'z/last', 'top'):\n    open(name, 'w').write('1')")
    assert run(client, sid, code)["status"] == "ok"
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 500}
        if cursor:
            params["cursor"] = cursor
        page = client.get(f"/v1/sessions/{sid}/files", params=params).json()
        assert len(page["files"]) <= 500
        seen += [f["path"] for f in page["files"]]
        pages += 1
        cursor = page["next"]
        if cursor is None:
            break
    assert pages == 3 and len(seen) == 1204 and len(set(seen)) == 1204
    assert seen == sorted(seen, key=lambda p: tuple(p.split("/")))
    assert seen[:2] == ["a/b/deep", "a/f0000"] and seen[-3:] == ["a-b/x", "top", "z/last"]
    for bad in ({"limit": 0}, {"limit": 10_001}, {"limit": "x"}, {"cursor": "bm90LWEtY3Vyc29y/"}, {"cursor": "Li4v"}):
        response = client.get(f"/v1/sessions/{sid}/files", params=bad)
        assert response.status_code == 400 and error_code(response) == "invalid_query", (bad, response.text)
    client.delete(f"/v1/sessions/{sid}")


def test_over_long_and_deep_paths_are_400(client: httpx.Client) -> None:
    sid = new_session(client)
    for path in ("n" * 300, "/".join(["d"] * 40) + "/f", ("é" * 200) + ".txt", "x/" * 600 + "f"):
        for method in ("GET", "PUT", "DELETE"):
            response = client.request(method, f"/v1/sessions/{sid}/files/{path}",
                                      content=b"x" if method == "PUT" else None)
            assert response.status_code == 400 and error_code(response) == "invalid_path", (method, path[:20])
    listing = client.get(f"/v1/sessions/{sid}/files", params={"path": "d/" * 40})
    assert listing.status_code == 400 and error_code(listing) == "invalid_path"
    assert client.get(f"/v1/sessions/{sid}/files").json()["files"] == []
    client.delete(f"/v1/sessions/{sid}")


def test_downloads_are_attachments_never_rendered(client: httpx.Client) -> None:
    sid = new_session(client)
    for name in ("page.html", "image.svg", "data.bin"):
        client.put(f"/v1/sessions/{sid}/files/{name}", content=b"<script>alert(1)</script>")
        response = client.get(f"/v1/sessions/{sid}/files/{name}")
        assert response.status_code == 200 and response.content == b"<script>alert(1)</script>"
        assert response.headers["content-disposition"].startswith("attachment;"), response.headers
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["content-security-policy"] == "sandbox"
    client.delete(f"/v1/sessions/{sid}")


SECRET_SEARCH = r'''
import os, time
wanted = [w.encode() for w in WANTED]
found, looked = [], 0
deadline = time.monotonic() + 20
def look(path):
    global looked
    try:
        with open(path, "rb") as handle:
            data = handle.read(1 << 20)
    except OSError:
        return
    looked += 1
    if any(w in data for w in wanted):
        found.append(path)
for pid in os.listdir("/proc"):
    if pid.isdigit():
        for name in ("environ", "cmdline"):
            look(f"/proc/{pid}/{name}")
for top in (".", "/tmp", "/var/tmp", "/dev/shm", "/run", "/etc", "/root", "/home", DATA_DIR):
    for directory, dirs, names in os.walk(top):
        if time.monotonic() > deadline:
            break
        dirs[:] = [d for d in dirs if not directory.startswith("/proc")]
        for name in names:
            look(os.path.join(directory, name))
(found, looked > 0)
'''


def test_no_secret_is_reachable_from_a_session(gateway: GatewayProcess, client: httpx.Client) -> None:
    """The admin token (given in the environment), the cookie secret and the database's token
    hashes are searched for from inside a session: in every process's environment and command
    line it can read, and in every file it can open. None is found, and the gateway's own
    environment and command line no longer hold the token."""
    gateway_pid = gateway.process.pid
    for name in ("environ", "cmdline"):
        assert gateway.token.encode() not in Path(f"/proc/{gateway_pid}/{name}").read_bytes(), name
    cookie_secret = (gateway.data_dir / "cookie_secret").read_text().strip()
    wanted = [gateway.token, cookie_secret, hashlib.sha256(gateway.token.encode()).hexdigest()]
    sid = new_session(client)
    code = f"WANTED = {wanted!r}\nDATA_DIR = {str(gateway.data_dir)!r}\n" + SECRET_SEARCH
    result = run(client, sid, code, timeout=120)
    assert result["status"] == "ok", result
    assert result["result"] == "([], True)", result["result"]
    client.delete(f"/v1/sessions/{sid}")


def test_a_token_on_the_command_line_is_not_kept_there(tmp_path: Path) -> None:
    token = "cli-admin-token-" + uuid.uuid4().hex
    started = start_gateway(tmp_path / "data", token=None, extra_args=("--token", token, "--sandbox", "none",
                                                                       "--pool-size", "0"))
    try:
        for name in ("environ", "cmdline"):
            assert token.encode() not in Path(f"/proc/{started.process.pid}/{name}").read_bytes(), name
        with started.client(token=token) as client:
            assert client.get("/v1/sessions").status_code == 200
    finally:
        assert started.stop() == 0


@pytest.mark.slow
def test_a_tree_nested_without_end_breaks_nothing(client: httpx.Client) -> None:
    """A kernel nests directories 3,000 deep (deeper than any walk goes): listing, measuring,
    deleting, forking, pausing and resuming the session answer without a 500, and its files
    near the top stay usable."""
    sid = new_session(client)
    code = ("import os\nos.makedirs('top', exist_ok=True)\nopen('top/near.txt', 'w').write('near')\n"
            "fd = os.open('.', os.O_RDONLY)\nos.chdir('top')\nfor _ in range(3000):\n"
            "    os.mkdir('d'); os.chdir('d')\nopen('deep.txt', 'w').write('deep')\nos.fchdir(fd)\nos.close(fd)")
    assert run(client, sid, code)["status"] == "ok"
    listing = client.get(f"/v1/sessions/{sid}/files")
    assert listing.status_code == 200 and [f["path"] for f in listing.json()["files"]] == ["top/near.txt"]
    assert client.get(f"/v1/sessions/{sid}/files/top/near.txt").content == b"near"
    forked = client.post(f"/v1/sessions/{sid}/fork")
    assert forked.status_code == 201, forked.text
    assert run(client, forked.json()["id"], "open('top/near.txt').read()")["result"] == "'near'"
    client.delete(f"/v1/sessions/{forked.json()['id']}")
    assert client.post(f"/v1/sessions/{sid}/pause").status_code == 200
    assert client.post(f"/v1/sessions/{sid}/resume").status_code == 200
    assert run(client, sid, "open('top/near.txt').read()")["result"] == "'near'"
    refused = client.delete(f"/v1/sessions/{sid}/files/top")
    assert refused.status_code in (200, 400), refused.text
    if refused.status_code == 400:
        assert error_code(refused) == "invalid_path" and "nests deeper" in refused.json()["error"]["message"]
    assert run(client, sid, "1+1")["result"] == "2"
    client.delete(f"/v1/sessions/{sid}")
