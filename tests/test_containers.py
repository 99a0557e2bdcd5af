"""The container profile on a real podman engine (its Docker Engine API): the kernel image, the
container each kernel gets, and a session's whole life in containers: interrupt, restart,
pause, resume, fork, a kill -9 of the gateway, terminate.

The hostile-code catalogue (tests/test_isolation.py, test_attacks_files.py,
test_attacks_connection_file.py) and the egress tests run under this profile too."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import docker
import httpx
import pytest

from gateway import kernel_image
from gateway.containers import INSTANCE_LABEL, KERNEL_LABEL, instance_of
from gateway.environments import Environments
from tests.conftest import REPO, GatewayProcess, isolated_gateway, run, start_gateway

pytestmark = pytest.mark.slow
KERNEL_UIDS = range(1_000_000, 1_010_000)


@pytest.fixture(scope="module")
def contained(container_engine: str) -> Iterator[dict[str, Any]]:
    """A gateway whose kernels all run under the container profile (and one pooled kernel)."""
    with isolated_gateway("container", "--pool-size", "1", "--container-engine", container_engine,
                          prefix="agw-container-") as state:
        state["engine"] = container_engine
        yield state


@pytest.fixture
def admin(contained: dict[str, Any]) -> Iterator[httpx.Client]:
    with contained["gateway"].client() as client:
        yield client


def engine_client(url: str) -> docker.DockerClient:
    return docker.DockerClient(base_url=url, version="1.41")


def containers_of(engine: str, data_dir: Path) -> dict[str, dict[str, Any]]:
    """The engine's containers of the gateway on ``data_dir``, by kernel name, as inspected."""
    client = engine_client(engine)
    rows = client.api.containers(all=True, filters={"label": f"{INSTANCE_LABEL}={instance_of(str(data_dir))}"})
    return {row["Labels"][KERNEL_LABEL]: client.api.inspect_container(row["Id"]) for row in rows}


def launch_id(data_dir: Path, session_id: str) -> str:
    with sqlite3.connect(f"file:{data_dir / 'gateway.db'}?mode=ro", uri=True) as db:
        placement = db.execute("SELECT placement FROM sessions WHERE id = ?", [session_id]).fetchone()[0]
    return str(json.loads(placement)["launch_id"])


def container_of(state: dict[str, Any], session_id: str) -> dict[str, Any]:
    data_dir = state["gateway"].data_dir
    return containers_of(state["engine"], data_dir)[launch_id(data_dir, session_id)]


def new_session(client: httpx.Client, **body: Any) -> str:
    response = client.post("/v1/sessions", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def python3_environment() -> Any:
    environments = Environments(REPO / "gateway-envs")
    definition = next(d for d in environments.definitions() if d.name == "python3")
    return environments.current(definition)


def test_the_image_holds_debians_packages_and_the_environment_and_is_built_once(
        contained: dict[str, Any], admin: httpx.Client) -> None:
    environment = python3_environment()
    cli = [sys.executable, "-m", "gateway", "image"]
    where = ["--container-engine", contained["engine"], "--envs-dir", str(REPO / "gateway-envs")]
    listed = subprocess.run([*cli, "list", "--json", *where], capture_output=True, text=True, check=True, cwd=REPO)
    row = next(r for r in json.loads(listed.stdout)["images"] if r["name"] == "python3")
    assert row == {"name": "python3", "image": kernel_image.image_tag(environment), "present": True}
    again = subprocess.run([*cli, "build", "python3", *where], capture_output=True, text=True, cwd=REPO, check=False)
    assert again.returncode == 0 and "present on the engine already" in again.stdout, again.stdout + again.stderr
    unknown = subprocess.run([*cli, "build", "nosuch", *where], capture_output=True, text=True, cwd=REPO, check=False)
    assert unknown.returncode == 1 and "no built environment nosuch" in unknown.stderr

    sid = new_session(admin)
    try:
        inside = run(admin, sid, "\n".join([
            "import json, os, sys",
            "print(json.dumps({'manifest': json.load(open('/etc/agent-gateway-image.json')),",
            "    'packages': open('/etc/agent-gateway-packages.txt').read().split(),",
            "    'debian': open('/etc/debian_version').read().strip(), 'prefix': sys.prefix,",
            f"    'base_site': os.path.exists({environment.base_prefix + '/lib/python3.11/site-packages'!r})}}))"]))
        assert inside["status"] == "ok", inside
        facts = json.loads(inside["stdout"])
        assert facts["manifest"]["environment"] == json.loads(json.dumps(environment.identity()))
        assert facts["debian"].startswith("12.") and facts["prefix"] == str(environment.path)
        names = {line.split("=")[0] for line in facts["packages"]}
        assert set(kernel_image.PACKAGES) <= names and "libc6" in names
        assert facts["base_site"] is False  # the interpreter's own packages stay out; the environment's are in
    finally:
        admin.delete(f"/v1/sessions/{sid}")


def test_each_kernel_gets_a_container_of_its_own_with_the_sessions_limits_and_no_more_of_the_host(
        contained: dict[str, Any], admin: httpx.Client) -> None:
    sid = new_session(admin, limits={"memory": "512MiB", "cpu": 0.5, "pids": 64, "file_size": "2MiB"})
    other = new_session(admin)
    try:
        found = container_of(contained, sid)
        config, settings = found["Config"], found["HostConfig"]
        assert found["State"]["Running"] and found["Name"].lstrip("/").startswith("agent-gateway-")
        uid, gid = (int(part) for part in config["User"].split(":"))
        assert uid in KERNEL_UIDS and gid == uid
        assert settings["NetworkMode"] == "none" and settings["ReadonlyRootfs"] is True
        assert settings["Memory"] == 512 << 20 and settings["NanoCpus"] == 500_000_000
        assert settings["PidsLimit"] == 64 and settings["Init"] is True
        assert "no-new-privileges" in " ".join(settings["SecurityOpt"] or [])
        workspace = contained["gateway"].data_dir / "sessions" / sid / "workspace"
        binds = sorted((m["Source"], m["Destination"]) for m in found["Mounts"] if m["Type"] == "bind")
        runtime = [source for source, destination in binds if destination != "/workspace"]
        assert binds == sorted([(str(workspace), "/workspace"), (runtime[0], runtime[0])])  # nothing else of the host
        assert Path(runtime[0]).parent == contained["gateway"].data_dir / "runtime"
        assert container_of(contained, other)["Id"] != found["Id"]
        assert int(container_of(contained, other)["Config"]["User"].split(":")[0]) != uid

        inside = run(admin, sid, "\n".join([
            "import os, socket",
            "status = dict(line.split(':\\t', 1) for line in open('/proc/self/status').read().splitlines() if ':\\t' in line)",
            "print(os.getuid(), status['CapEff'].strip(), status['CapBnd'].strip(), status['NoNewPrivs'].strip(),",
            "      [name for _, name in socket.if_nameindex()], os.getcwd())"]))
        assert inside["stdout"].split(maxsplit=5) == [str(uid), "0000000000000000", "0000000000000000", "1",
                                                      "['lo']", "/workspace\n"], inside
        for code in ("open('/etc/planted', 'w')", f"open({str(contained['gateway'].data_dir / 'gateway.db')!r})",
                     "open('big.bin', 'wb').write(b'x' * (3 << 20))"):
            refused = run(admin, sid, code)
            assert refused["status"] == "error", (code, refused)
        assert "(the session's largest file limit is 2 MiB)" in refused["error"]["value"]
        assert run(admin, sid, "open('/tmp/scratch', 'w').write('ok')")["result"] == "2"  # a /tmp of its own
    finally:
        admin.delete(f"/v1/sessions/{sid}")
        admin.delete(f"/v1/sessions/{other}")


def test_a_session_lives_its_whole_life_in_containers(contained: dict[str, Any], admin: httpx.Client) -> None:
    sid = new_session(admin)
    data_dir = contained["gateway"].data_dir
    run(admin, sid, "x = 41\nopen('notes.txt', 'w').write('kept')")
    first = container_of(contained, sid)["Id"]

    threading.Timer(1.5, lambda: admin.post(f"/v1/sessions/{sid}/interrupt")).start()
    interrupted = run(admin, sid, "import time; time.sleep(30)")
    assert interrupted["status"] == "interrupted", interrupted
    assert run(admin, sid, "x")["result"] == "41" and container_of(contained, sid)["Id"] == first

    assert admin.post(f"/v1/sessions/{sid}/restart").status_code == 200
    assert run(admin, sid, "'x' in dir()")["result"] == "False"
    assert container_of(contained, sid)["Id"] != first  # a new container; the old one is gone
    assert first not in {c["Id"] for c in containers_of(contained["engine"], data_dir).values()}
    run(admin, sid, "x = 42")

    paused = admin.post(f"/v1/sessions/{sid}/pause")
    assert paused.status_code == 200 and paused.json()["state"] == "paused"
    assert launch_id(data_dir, sid) not in containers_of(contained["engine"], data_dir)
    assert admin.post(f"/v1/sessions/{sid}/resume").status_code == 200
    assert run(admin, sid, "x + 1")["result"] == "43"

    fork = admin.post(f"/v1/sessions/{sid}/fork", json={})
    assert fork.status_code == 201, fork.text
    child = fork.json()["id"]
    assert run(admin, child, "x + 2, open('notes.txt').read()")["result"] == "(44, 'kept')"
    assert container_of(contained, child)["Id"] != container_of(contained, sid)["Id"]

    died = run(admin, sid, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert died["status"] == "died", died
    assert run(admin, sid, "open('notes.txt').read()")["result"] == "'kept'"  # a new kernel, the same files

    kernels = {launch_id(data_dir, sid), launch_id(data_dir, child)}
    for session in (sid, child):
        assert admin.delete(f"/v1/sessions/{session}").status_code == 200
    assert not kernels & set(containers_of(contained["engine"], data_dir))  # terminate leaves no container


def test_containers_outlive_a_kill_9_of_the_gateway_and_are_taken_up_again(container_engine: str) -> None:
    with isolated_gateway("container", "--pool-size", "1", "--container-engine", container_engine,
                          prefix="agw-container-crash-") as state:
        gateway: GatewayProcess = state["gateway"]
        with gateway.client() as http:
            sid = new_session(http)
            assert run(http, sid, "kept = 'across the crash'")["status"] == "ok"
        deadline = time.monotonic() + 60
        while len(containers_of(container_engine, gateway.data_dir)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # the pool's kernel
        before = containers_of(container_engine, gateway.data_dir)
        kernel = launch_id(gateway.data_dir, sid)
        pooled = set(before) - {kernel}
        assert len(pooled) == 1, before.keys()

        gateway.stop(signal.SIGKILL)
        time.sleep(1)
        survived = containers_of(container_engine, gateway.data_dir)
        assert all(found["State"]["Running"] for found in survived.values()) and set(survived) == set(before)

        state["gateway"] = start_gateway(gateway.data_dir, extra_args=state["args"])
        with state["gateway"].client() as http:
            assert http.get(f"/v1/sessions/{sid}").json()["state"] == "idle"
            assert run(http, sid, "kept")["result"] == "'across the crash'"
            after = containers_of(container_engine, gateway.data_dir)
            assert after[kernel]["Id"] == before[kernel]["Id"]  # the same container, taken up again
            assert not pooled & set(after)  # the old pool's kernel: nobody claimed it, so it was removed
            events = http.get(f"/v1/sessions/{sid}/events").json()["events"]
            assert any(e["action"] == "session_reattached" for e in events), [e["action"] for e in events]
        assert state["gateway"].stop() == 0
        assert containers_of(container_engine, gateway.data_dir) == {}  # a clean stop leaves none


def test_sessions_choose_the_container_profile_and_are_refused_clearly_where_it_cannot_be(
        container_engine: str, tmp_path: Path) -> None:
    with isolated_gateway("sandbox", "--pool-size", "0", "--container-engine", container_engine,
                          prefix="agw-container-choice-") as state:
        gateway: GatewayProcess = state["gateway"]
        token = subprocess.run([sys.executable, "-m", "gateway", "token", "create", "--name", "agent-1", "--role",
                                "agent", "--data-dir", str(gateway.data_dir)],
                               capture_output=True, text=True, check=True).stdout.strip()
        with gateway.client() as admin, gateway.client(token=token) as agent:
            chosen = admin.post("/v1/sessions", json={"sandbox": "container"})
            assert chosen.status_code == 201 and chosen.json()["isolation"]["profile"] == "container", chosen.text
            assert run(admin, chosen.json()["id"], "6 * 7")["result"] == "42"
            assert launch_id(gateway.data_dir, chosen.json()["id"]) in containers_of(container_engine, gateway.data_dir)
            default = new_session(admin)
            assert admin.get(f"/v1/sessions/{default}").json()["isolation"]["profile"] == "sandbox"
            refused = agent.post("/v1/sessions", json={"sandbox": "container"})
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden", refused.text

    with isolated_gateway("sandbox", "--pool-size", "0", prefix="agw-container-none-") as state:
        with state["gateway"].client() as admin:
            missing = admin.post("/v1/sessions", json={"sandbox": "container"})
            assert missing.status_code == 400 and missing.json()["error"]["code"] == "invalid_field", missing.text
            assert "no container engine is configured" in missing.json()["error"]["message"]
            assert admin.get("/v1/sessions").json()["sessions"] == []

    with pytest.raises(RuntimeError, match="no container engine is configured"):
        start_gateway(tmp_path / "data", extra_args=("--sandbox", "container"))


def test_an_operators_environment_gets_an_image_and_without_one_the_error_says_how(
        container_engine: str, tmp_path: Path) -> None:
    from tests.test_environments import env_cli, tiny_requirements

    _wheels, requirements = tiny_requirements(tmp_path)
    # not under /tmp, which a kernel's container mounts its own /tmp over (and so refuses to hold)
    root = Path(tempfile.mkdtemp(prefix="agw-envs-", dir="/var/tmp")) / "envs"
    assert env_cli(root, "build", "tiny", "--requirements", str(requirements)).returncode == 0
    with isolated_gateway("container", "--pool-size", "0", "--container-engine", container_engine, "--envs-dir",
                          str(root), "--build-environments", "false", prefix="agw-container-tiny-") as state:
        with state["gateway"].client() as admin:
            missing = admin.post("/v1/sessions", json={"kernel": "tiny"})
            assert missing.status_code == 503 and missing.json()["error"]["code"] == "image_not_built", missing.text
            assert "agent-gateway image build tiny" in missing.json()["error"]["message"]
            assert missing.json()["error"]["details"]["build"] == "agent-gateway image build tiny"
            assert admin.get("/v1/sessions").json()["sessions"] == []  # nothing was created

            built = subprocess.run([sys.executable, "-m", "gateway", "image", "build", "tiny", "--container-engine",
                                    container_engine, "--envs-dir", str(root)],
                                   capture_output=True, text=True, timeout=900, cwd=REPO, check=False)
            assert built.returncode == 0 and "tiny" in built.stdout, built.stdout + built.stderr
            sid = new_session(admin, kernel="tiny")
            used = run(admin, sid, "import sys, tinypkg; print(tinypkg.VALUE, sys.prefix.startswith(%r))" % str(root))
            assert used["stdout"] == "42 True\n", used
            assert run(admin, sid, "import pandas")["error"]["name"] == "ModuleNotFoundError"

            # The image taken away while the session is paused: its resume is refused, it stays paused.
            engine = engine_client(container_engine).api
            tag = kernel_image.image_tag(tiny_environment(root))
            repository, _, version = tag.rpartition(":")
            assert admin.post(f"/v1/sessions/{sid}/pause").status_code == 200
            engine.tag(tag, repository, "aside")
            engine.remove_image(tag)
            refused = admin.post(f"/v1/sessions/{sid}/resume")
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "image_not_built", refused.text
            assert admin.get(f"/v1/sessions/{sid}").json()["state"] == "paused"
            engine.tag(f"{repository}:aside", repository, version)
            engine.remove_image(f"{repository}:aside")
            assert admin.post(f"/v1/sessions/{sid}/resume").status_code == 200
            assert run(admin, sid, "import tinypkg; tinypkg.VALUE")["result"] == "42"
    engine_client(container_engine).api.remove_image(kernel_image.image_tag(tiny_environment(root)))
    shutil.rmtree(root.parent, ignore_errors=True)


def tiny_environment(root: Path) -> Any:
    environments = Environments(root)
    environment = environments.current(next(d for d in environments.definitions() if d.name == "tiny"))
    assert environment is not None
    return environment


def test_kernels_go_on_while_their_engine_is_down_and_new_ones_wait_for_it(tmp_path: Path,
                                                                          container_engine: str) -> None:
    """The engine's service stopped in the middle of a run: its containers keep running (their
    monitor is not the service), so sessions keep their kernels and state; what needs the engine
    (a new kernel) fails saying so, and works again once the engine is back."""
    from tests.conftest import podman_service

    engine_dir = Path(tempfile.mkdtemp(prefix="agw-engine-own-", dir="/tmp"))
    with contextlib.ExitStack() as engines:  # the engine started again outlives the gateway
        url, service = engines.enter_context(podman_service(engine_dir))
        with isolated_gateway("container", "--pool-size", "0", "--container-engine", url,
                              prefix="agw-container-down-") as state:
            with state["gateway"].client() as admin:
                sid = new_session(admin)
                assert run(admin, sid, "x = 20")["status"] == "ok"
                service.terminate()
                service.wait(15)
                assert run(admin, sid, "x * 2 + 2")["result"] == "42"  # the kernel never noticed
                refused = admin.post("/v1/sessions", json={})
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable", \
                    refused.text
                assert "container engine" in refused.json()["error"]["message"]
                assert len(admin.get("/v1/sessions").json()["sessions"]) == 1  # nothing else was created
                again, _service = engines.enter_context(podman_service(engine_dir))
                assert again == url
                other = new_session(admin)
                assert run(admin, other, "1 + 1")["result"] == "2"
                assert run(admin, sid, "x")["result"] == "20"
                kernel = launch_id(state["gateway"].data_dir, sid)
                assert admin.delete(f"/v1/sessions/{sid}").status_code == 200
                assert kernel not in containers_of(url, state["gateway"].data_dir)
    shutil.rmtree(engine_dir, ignore_errors=True)


def test_an_environment_where_a_container_mounts_its_own_directories_gets_no_image() -> None:
    from gateway.environments import Environment

    for path, base in (("/tmp/clone/gateway-envs/python3-0123456789ab", "/usr"),
                       ("/srv/envs/python3-0123456789ab", "/workspace/python")):
        environment = Environment("python3", "0" * 64, Path(path), "3.11.7", base)
        why = kernel_image.mounted_over(environment)
        assert why is not None and "build the environment elsewhere" in why, why
    assert kernel_image.mounted_over(python3_environment()) is None or str(REPO).startswith("/tmp")

