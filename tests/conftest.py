"""Fixtures: a real gateway process on a loopback port, with a real SQLite file and real kernels."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil
import pytest

TOKEN = "test-admin-token-0123456789"
LISTENING = re.compile(r"listening on (http://\S+)")


@dataclass
class GatewayProcess:
    """A gateway started by a test; ``stop()`` sends SIGTERM and returns the exit code."""

    process: subprocess.Popen[str]
    url: str
    token: str
    data_dir: Path
    stdout_path: Path
    stderr_path: Path

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)

    def kernel_pids(self) -> set[int]:
        try:
            return {p.pid for p in psutil.Process(self.process.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def stdout_text(self) -> str:
        return self.stdout_path.read_text()

    def stderr_text(self) -> str:
        return self.stderr_path.read_text()


def running(process: int | psutil.Process) -> bool:
    """Whether a process is alive and not a zombie (it may end while being looked at). Given a
    ``psutil.Process`` taken earlier, a new process that reused its pid does not count."""
    try:
        if isinstance(process, int):
            process = psutil.Process(process)
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def start_gateway(data_dir: Path, *, token: str | None = TOKEN, extra_args: tuple[str, ...] = (),
                  env: dict[str, str] | None = None) -> GatewayProcess:
    """Start ``python -m gateway serve`` on a free port and wait until it answers."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_GATEWAY_")}
    if token:
        full_env["AGENT_GATEWAY_TOKEN"] = token
    full_env.update(env or {})
    logs = data_dir.parent / f"{data_dir.name}-logs"
    logs.mkdir(exist_ok=True)
    stdout_path, stderr_path = logs / "stdout.txt", logs / "stderr.txt"
    with open(stdout_path, "w") as out, open(stderr_path, "w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--port", "0", "--data-dir", str(data_dir), *extra_args],
            stdout=out, stderr=err, text=True, env=full_env,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        match = LISTENING.search(stdout_path.read_text())
        if match:
            return GatewayProcess(process, match.group(1), token or "", data_dir, stdout_path, stderr_path)
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited early: {stderr_path.read_text()}")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("the gateway did not announce its URL within 60 s")


@contextmanager
def isolated_gateway(profile: str, *args: str, token: str | None = TOKEN,
                     prefix: str = "agw-isolated-") -> Iterator[dict[str, Any]]:
    """A gateway of its own under ``profile`` (the test is skipped, with the reason, where the
    profile does not work here), in a base directory other users may traverse (under `process`
    kernel uids reach their workspaces on the host). Yields ``{"profile", "gateway", "base",
    "args"}``; whichever gateway is in ``"gateway"`` at the end is stopped and must exit 0."""
    from gateway.sandbox import CONTAINER, probe_profile

    if profile != CONTAINER:  # the container profile's engine is the caller's (``container_engine``)
        status = probe_profile(profile)
        if not status.works:
            pytest.skip(f"the {profile} profile does not work here: {status.reason}")
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o711)
    extra = ("--sandbox", profile, *args)
    state: dict[str, Any] = {"profile": profile, "base": base, "args": extra,
                             "gateway": start_gateway(base / "data", token=token, extra_args=extra)}
    try:
        yield state
    finally:
        code = state["gateway"].stop()
        stderr_tail = state["gateway"].stderr_text()[-8000:] if code else ""
        # A test that failed between a kill -9 and the restart leaves that gateway's kernels
        # running: they are stopped here, so that a failure does not leak processes.
        for process in psutil.process_iter(["cmdline"]):
            try:
                if str(base) in " ".join(process.info["cmdline"] or []):
                    process.kill()
            except psutil.Error:
                continue
        if "--container-engine" in extra:  # and its containers, whatever state they are in
            from gateway.containers import Engine, instance_of

            url = extra[extra.index("--container-engine") + 1]
            Engine(url, instance=instance_of(str(base / "data"))).remove_unclaimed(set())
        shutil.rmtree(base, ignore_errors=True)
        assert code == 0, f"the gateway exited with {code}; its stderr ends:\n{stderr_tail}"


@pytest.fixture(scope="session", autouse=True)
def no_volume_left(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Workspace volumes of gateways a test killed (and never restarted) are unmounted at the end:
    those under the directories this run made only (another test run, started or not before
    this one, may be using its own meanwhile)."""
    made: list[Path] = []
    make = tempfile.mkdtemp

    def recorded(*args: Any, **kwargs: Any) -> str:
        path = make(*args, **kwargs)
        made.append(Path(path))
        return path

    tempfile.mkdtemp = recorded  # type: ignore[assignment]
    try:
        yield
    finally:
        tempfile.mkdtemp = make
    from gateway import volumes

    for root in (tmp_path_factory.getbasetemp(), *made):
        if root.name.startswith("agw-") or root == tmp_path_factory.getbasetemp():
            volumes.release_all(root)


REPO = Path(__file__).resolve().parent.parent
PODMAN_FLAGS = ("--runtime", "runc", "--cgroup-manager", "cgroupfs")  # what works on these hosts (docs/operations.md)


def container_engine_problem() -> str | None:
    """Why the container profile cannot be tested here, or None."""
    if os.geteuid() != 0:
        return "the container profile needs root"
    for tool in ("podman", "runc", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (.ci/install test installs it)"
    if not any((REPO / "gateway-envs").glob("python3-*/environment.json")):
        return "the python3 environment is not built (.ci/install test builds it)"
    from gateway.kernel_image import MOUNTED_OVER

    covered = next((top for top in MOUNTED_OVER if (REPO / "gateway-envs").is_relative_to(top)), None)
    if covered:
        return (f"the checkout's environments lie under {covered}, which a kernel's container mounts its own "
                f"{covered} over (clone the repository elsewhere)")
    return None


@contextmanager
def podman_service(directory: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``podman system service`` of a test's own, on a unix socket in ``directory``. Yields its
    URL and process (stopped at the end)."""
    url = f"unix://{directory / 'podman.sock'}"
    command = ["podman", *PODMAN_FLAGS, "system", "service", "--time=0", url]
    log = open(directory / "podman-service.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(command, stdout=log, stderr=log)
    try:
        from gateway.containers import Engine, EngineUnavailable

        deadline = time.monotonic() + 30
        while True:
            try:
                Engine(url, timeout=5).describe()
                break
            except EngineUnavailable:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"podman's service did not answer: {(directory / 'podman-service.log').read_text()}")
                time.sleep(0.2)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="session")
def container_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real podman engine (its Docker Engine API on a unix socket) holding the kernel image
    of the python3 environment, built by ``agent-gateway image build`` (once per machine: the
    engine keeps it). Skips, saying why, where podman or root is missing."""
    problem = container_engine_problem()
    if problem:
        pytest.skip(f"the container profile cannot be tested here: {problem}")
    directory = Path(tempfile.mkdtemp(prefix="agw-engine-", dir="/tmp"))
    with podman_service(directory) as (url, _process):
        built = subprocess.run([sys.executable, "-m", "gateway", "image", "build", "python3", "--container-engine",
                                url, "--envs-dir", str(REPO / "gateway-envs")],
                               capture_output=True, text=True, timeout=1200, cwd=REPO, check=False)
        assert built.returncode == 0, built.stdout + built.stderr
        yield url
    shutil.rmtree(directory, ignore_errors=True)


def engine_args(request: pytest.FixtureRequest, profile: str) -> tuple[str, ...]:
    """What a gateway under ``profile`` is started with besides: under ``container``, the tests'
    own podman engine (skipped, with the reason, where it cannot run)."""
    return ("--container-engine", request.getfixturevalue("container_engine")) if profile == "container" else ()


ISOLATING_PROFILES = ["sandbox", "process", pytest.param("container", marks=pytest.mark.slow)]


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway shared by the tests that need only the defaults."""
    proc = start_gateway(tmp_path_factory.mktemp("gateway-data"))
    yield proc
    children = proc.kernel_pids()
    assert proc.stop() == 0
    assert not [pid for pid in children if running(pid)]


@pytest.fixture(scope="session")
def client(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with gateway.client() as http:
        yield http


@pytest.fixture
def session(client: httpx.Client) -> Iterator[dict[str, Any]]:
    """A fresh session, terminated afterwards."""
    response = client.post("/v1/sessions", json={})
    assert response.status_code == 201, response.text
    created = response.json()
    yield created
    client.delete(f"/v1/sessions/{created['id']}")


def kernel_host_pid(data_dir: Path, session_id: str) -> int:
    """The host pid of a session's kernel, as the gateway recorded it (inside a sandbox the kernel
    sees its own pid namespace, so ``os.getpid()`` there is not a host pid)."""
    import sqlite3

    with sqlite3.connect(f"file:{data_dir / 'gateway.db'}?mode=ro", uri=True) as db:
        row = db.execute("SELECT kernel_pid FROM sessions WHERE id = ?", [session_id]).fetchone()
    assert row and row[0], f"no kernel pid recorded for {session_id}"
    return int(row[0])


def kernel_cwd(data_dir: Path, session: dict[str, Any]) -> str:
    """The working directory a session's kernel sees: its workspace, at /workspace in a sandbox."""
    if (session.get("isolation") or {}).get("profile") == "sandbox":
        return "/workspace"
    return str(data_dir / "sessions" / session["id"] / "workspace")


def run(client: httpx.Client, session_id: str, code: str, **extra: Any) -> dict[str, Any]:
    """Execute one step and return its Execution."""
    response = client.post(f"/v1/sessions/{session_id}/execute", json={"code": code, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def error_code(response: httpx.Response) -> str:
    """The envelope's error code, after checking the envelope's shape."""
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["message"]
    return str(body["error"]["code"])
