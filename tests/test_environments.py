"""Kernel environments: the default python3 environment's data stack in a real (sandboxed) kernel,
its identity in the session, notebook, reviewer's page and replays, `%pip` failing its step,
`agent-gateway env` building, checking and removing an operator's environment from a local
wheel, and the checks the helper makes before a kernel runs in an environment."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from gateway.environments import (
    DEFAULT_ROOT,
    MANIFEST,
    Environment,
    EnvironmentProblem,
    Environments,
    changed_files,
    trusted,
)
from gateway.replay import environment_note
from tests.conftest import error_code, kernel_host_pid, run, running, start_gateway

REPO = Path(__file__).resolve().parent.parent
# The data stack docs/operations.md promises in the default environment (import name: distribution).
DATA_STACK = {"numpy": "numpy", "pandas": "pandas", "matplotlib": "matplotlib", "seaborn": "seaborn",
              "scipy": "scipy", "sklearn": "scikit-learn", "pyarrow": "pyarrow", "PIL": "pillow",
              "requests": "requests", "bs4": "beautifulsoup4", "lxml": "lxml", "openpyxl": "openpyxl",
              "sympy": "sympy"}


def default_environment() -> Environment:
    environments = Environments(Path(DEFAULT_ROOT).resolve())
    environment = environments.for_spec(REPO / "kernels" / "python3")
    assert environment is not None
    return environment


def stderr_outputs(execution: dict[str, Any]) -> list[str]:
    return [o["text"] for o in execution["outputs"] if o["output_type"] == "stream" and o["name"] == "stderr"]


@pytest.mark.slow
def test_the_default_environment_runs_a_data_analysis_script_with_nothing_on_stderr(
        client: httpx.Client, session: dict[str, Any]) -> None:
    sid = session["id"]
    environment = default_environment()
    imports = run(client, sid, "import sys, importlib.metadata as md\n"
                  f"names = {DATA_STACK!r}\n"
                  "for module, dist in names.items():\n    __import__(module)\n"
                  "print(sys.prefix)\nprint({d: md.version(d) for d in names.values()})")
    assert imports["status"] == "ok", imports
    prefix, versions = imports["stdout"].splitlines()
    assert prefix == str(environment.path)  # the kernel runs in the environment, not the gateway's venv
    assert prefix != sys.prefix
    assert eval(versions) == {dist: environment.packages[dist] for dist in DATA_STACK.values()}
    assert imports["stderr"] == ""

    analysis = run(client, sid, "\n".join([
        "import numpy as np, pandas as pd, seaborn as sns, matplotlib.pyplot as plt",
        "from sklearn.linear_model import LinearRegression",
        "rng = np.random.default_rng(0)",
        "x = rng.uniform(0, 10, 200)",
        "pd.DataFrame({'x': x, 'y': 2 * x + 1 + rng.normal(0, 0.1, 200)}).to_csv('data.csv', index=False)",
        "frame = pd.read_csv('data.csv')",
        "sns.scatterplot(data=frame, x='x', y='y'); plt.title('y against x'); plt.show()",
        "model = LinearRegression().fit(frame[['x']], frame['y'])",
        "print(round(float(model.coef_[0]), 1), round(float(model.intercept_), 1))"]))
    assert analysis["status"] == "ok", analysis
    assert analysis["stdout"].strip() == "2.0 1.0"
    images = [o for o in analysis["outputs"] if o["output_type"] == "display_data" and "image/png" in o["data"]]
    assert len(images) == 1 and base64.b64decode(images[0]["data"]["image/png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert analysis["stderr"] == "" and stderr_outputs(analysis) == []  # no Fontconfig error, no font-cache note

    listing = client.get(f"/v1/sessions/{sid}/files").json()
    assert "data.csv" in [f["path"] for f in listing["files"]]


def test_the_session_its_notebook_and_its_page_name_the_environment(client: httpx.Client,
                                                                    session: dict[str, Any]) -> None:
    environment = default_environment()
    sid = session["id"]
    assert session["environment"] == {"name": "python3", "hash": environment.digest,
                                      "python": environment.python_version, "packages": len(environment.packages)}
    assert run(client, sid, "1 + 1")["result"] == "2"
    notebook = client.get(f"/v1/sessions/{sid}/notebook").json()
    recorded = notebook["metadata"]["gateway"]["environment"]
    assert recorded == environment.identity()
    assert recorded["packages"]["ipykernel"] == environment.packages["ipykernel"]
    page = client.get(f"/ui/sessions/{sid}")
    assert page.status_code == 200
    assert f'title="{environment.digest}">{environment.digest[:12]}</code>' in page.text
    assert f"<code>numpy=={environment.packages['numpy']}</code>" in page.text
    listed = client.get("/api/kernelspecs").json()["kernelspecs"]["python3"]["spec"]["metadata"]["environment"]
    assert listed == {**environment.identity(), "built": True}


def test_a_failing_pip_fails_its_step_says_how_to_get_a_package_and_shows_no_ansi_codes(
        client: httpx.Client, session: dict[str, Any]) -> None:
    sid = session["id"]
    started = time.monotonic()
    failed = run(client, sid, "%pip install surely-not-a-package-agw")
    assert time.monotonic() - started < 30  # no index: pip gives up at once, no retries
    assert failed["status"] == "error", failed
    assert failed["error"]["name"] == "PipFailed"
    assert "pip exited with status 1" in failed["error"]["value"]
    assert "agent-gateway env build" in failed["error"]["value"]
    assert "GET /api/kernelspecs" in failed["error"]["value"]
    assert "\x1b" not in json.dumps(failed)
    assert "surely-not-a-package-agw" in failed["stdout"] + failed["stderr"]
    ok = run(client, sid, "%pip --version")
    assert ok["status"] == "ok" and ok["stdout"].startswith("pip ")
    shown = run(client, sid, "print('\\x1b[31mred\\x1b[0m and \\x1b]8;;http://x\\x1b\\\\a link\\x1b]8;;\\x1b\\\\')")
    assert shown["stdout"] == "red and a link\n"


def test_a_kernel_whose_environment_is_not_built_is_refused_and_nothing_is_created(tmp_path: Path) -> None:
    empty = tmp_path / "envs"
    gateway = start_gateway(tmp_path / "data", extra_args=("--envs-dir", str(empty), "--pool-size", "0",
                                                           "--sandbox", "none", "--build-environments", "false"))
    try:
        with gateway.client() as http:
            for path, body in (("/v1/sessions", {}), ("/api/kernels", {"name": "python3"})):
                refused = http.post(path, json=body)
                assert refused.status_code == 503, refused.text
                assert error_code(refused) == "environment_not_built"
                assert "agent-gateway env build python3" in refused.json()["error"]["message"]
                assert refused.json()["error"]["details"]["build"] == "agent-gateway env build python3"
            listed = http.get("/api/kernelspecs").json()["kernelspecs"]["python3"]["spec"]["metadata"]
            assert listed["environment"] == {"name": "python3", "built": False,
                                             "build": "agent-gateway env build python3"}
            assert http.get("/v1/sessions").json()["sessions"] == []
            assert http.get("/api/kernels").json() == []
    finally:
        assert gateway.stop() == 0


def test_a_replay_says_when_it_runs_in_another_environment() -> None:
    recorded = {"name": "python3", "hash": "a" * 64, "python": "3.11.7", "packages": {"numpy": "2.4.6", "six": "1"}}
    same = dict(recorded)
    other = {**recorded, "hash": "b" * 64, "packages": {"numpy": "2.5.0", "rich": "14"}}
    assert environment_note(recorded, same) is None
    assert environment_note(None, other) is None
    note = environment_note(recorded, other)
    assert note is not None and "bbbbbbbbbbbb" in note and "aaaaaaaaaaaa" in note
    assert "numpy 2.4.6 -> 2.5.0" in note and "rich - -> 14" in note and "six 1 -> -" in note


# -- the helper's checks before a kernel runs in an environment -------------------------------------

def fake_environment(root: Path, name: str = "tiny", digest: str = "c" * 64) -> Path:
    directory = root / f"{name}-{digest[:12]}"
    (directory / "bin").mkdir(parents=True)
    manifest = {"format": "agent-gateway-environment/1", "name": name, "hash": digest, "python": "3.11.7",
                "base_prefix": sys.base_prefix, "packages": {"tinypkg": "1.0"}}
    (directory / MANIFEST).write_text(json.dumps(manifest))
    for path in (root, directory):
        path.chmod(0o755)
    return directory


def test_the_helper_runs_kernels_only_in_environments_no_one_else_can_change(tmp_path: Path) -> None:
    root = tmp_path / "envs"
    root.mkdir()
    directory = fake_environment(root)
    assert trusted(root, directory.name).packages == {"tinypkg": "1.0"}
    for bad in ("../tiny-cccccccccccc", "tiny", "tiny-cccccccccccc/..", "/etc", "tiny-CCCCCCCCCCCC", "x" * 200):
        with pytest.raises(EnvironmentProblem):
            trusted(root, bad)
    directory.chmod(0o775)  # group-writable: someone else could change it
    with pytest.raises(EnvironmentProblem, match="may be changed by others"):
        trusted(root, directory.name)
    directory.chmod(0o755)
    os.chown(directory / MANIFEST, 12345, 12345)  # another user's manifest
    with pytest.raises(EnvironmentProblem, match="owner 12345"):
        trusted(root, directory.name)
    os.chown(directory / MANIFEST, os.geteuid(), os.getegid())
    link = root / "evil-dddddddddddd"
    link.symlink_to(directory)
    with pytest.raises(EnvironmentProblem, match="symbolic link"):
        trusted(root, link.name)
    incomplete = fake_environment(root, "half", "e" * 64)
    (incomplete / MANIFEST).write_text("{")
    with pytest.raises(EnvironmentProblem, match="no complete environment"):
        trusted(root, incomplete.name)
    renamed = root / "other-cccccccccccc"  # a manifest moved under another name
    directory.rename(renamed)
    with pytest.raises(EnvironmentProblem, match="no complete environment"):
        trusted(root, renamed.name)


# -- agent-gateway env: an operator's environment from a local wheel ---------------------------------

def build_wheel(directory: Path, name: str, version: str, source: str) -> Path:
    """A pure-Python wheel with a correct RECORD, written by hand."""
    def digest(content: bytes) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()

    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": source.encode(),
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},sha256={digest(content)},{len(content)}\n" for path, content in files.items())
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, content in files.items():
            archive.writestr(path, content)
    return wheel


def tiny_requirements(tmp_path: Path) -> tuple[Path, Path]:
    """A directory with a wheel of ``tinypkg`` 1.0 (``VALUE = 42``) and requirements naming it."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build_wheel(wheels, "tinypkg", "1.0", "VALUE = 42\n")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"--find-links {wheels}\ntinypkg==1.0\nipykernel\ncloudpickle\n")
    return wheels, requirements


def env_cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "env", *args, "--envs-dir", str(root)],
                          capture_output=True, text=True, timeout=600, cwd=REPO, check=False)


@pytest.mark.slow
def test_an_operator_builds_checks_uses_and_removes_an_environment(tmp_path: Path) -> None:
    wheels, requirements = tiny_requirements(tmp_path)
    root = tmp_path / "envs"

    built = env_cli(root, "build", "tiny", "--requirements", str(requirements))
    assert built.returncode == 0, built.stdout + built.stderr
    assert "[2/4] tiny: installing" in built.stdout and "tiny: built in" in built.stdout
    lock = (root / "kernels" / "tiny" / "requirements.lock").read_text()
    assert f"--find-links {wheels}" in lock
    wheel_hash = hashlib.sha256((wheels / "tinypkg-1.0-py3-none-any.whl").read_bytes()).hexdigest()
    assert f"tinypkg==1.0 --hash=sha256:{wheel_hash}" in lock
    again = env_cli(root, "build", "tiny")  # cached: nothing is built twice
    assert again.returncode == 0 and "built already" in again.stdout

    listing = json.loads(env_cli(root, "list", "--json").stdout)
    tiny = next(row for row in listing["environments"] if row["name"] == "tiny")
    assert tiny["built"] and tiny["packages"]["tinypkg"] == "1.0" and Path(tiny["path"]).parent == root
    python3 = next(row for row in listing["environments"] if row["name"] == "python3")
    assert not python3["built"]  # this root has only the operator's environment
    checked = env_cli(root, "check", "tiny")
    assert checked.returncode == 0 and "tiny: ok" in checked.stdout, checked.stdout

    # this root has no python3 of its own: serve is not to spend minutes building one
    gateway = start_gateway(tmp_path / "data", extra_args=("--envs-dir", str(root), "--pool-size", "0",
                                                           "--build-environments", "false"))
    try:
        with gateway.client() as http:
            assert "tiny" in http.get("/api/kernelspecs").json()["kernelspecs"]
            created = http.post("/v1/sessions", json={"kernel": "tiny"})
            assert created.status_code == 201, created.text
            sid = created.json()["id"]
            assert created.json()["environment"]["name"] == "tiny"
            used = run(http, sid, "import sys, tinypkg\nprint(tinypkg.VALUE, sys.prefix)")
            assert used["status"] == "ok", used
            assert used["stdout"].split() == ["42", tiny["path"]]
            missing = run(http, sid, "import pandas")
            assert missing["status"] == "error" and missing["error"]["name"] == "ModuleNotFoundError"
            http.delete(f"/v1/sessions/{sid}")
            jupyter = http.post("/api/kernels", json={"name": "tiny"})  # the Jupyter face chooses it too
            assert jupyter.status_code == 201, jupyter.text
            kernel_id = jupyter.json()["id"]
            recorded = [s for s in http.get("/v1/sessions").json()["sessions"] if s["kernel_id"] == kernel_id]
            assert recorded and recorded[0]["environment"]["name"] == "tiny"
            assert http.delete(f"/api/kernels/{kernel_id}").status_code == 204
    finally:
        assert gateway.stop() == 0

    site = Path(tiny["path"]) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    (site / "tinypkg" / "__init__.py").write_text("VALUE = 43\n")  # tampered with after the build
    assert changed_files(site) == ["tinypkg/__init__.py differs from its RECORD (tinypkg-1.0.dist-info)"]
    tampered = env_cli(root, "check", "tiny")
    assert tampered.returncode == 1 and "tinypkg/__init__.py differs from its RECORD" in tampered.stdout

    removed = env_cli(root, "remove", "tiny", "--definition")
    assert removed.returncode == 0, removed.stderr
    assert not Path(tiny["path"]).exists() and not (root / "kernels" / "tiny").exists()
    assert env_cli(root, "build", "tiny").returncode == 1  # no longer defined


@pytest.mark.slow
def test_a_gateway_restarted_after_its_sessions_environment_was_removed_goes_on(tmp_path: Path) -> None:
    """kill -9 of the gateway, the session's environment removed meanwhile: the restart does not
    fail on the kernel it cannot take up (stopped), the session is paused, its next step says
    how to build the environment, and after the build it goes on with a new kernel."""
    wheels, requirements = tiny_requirements(tmp_path)
    root = tmp_path / "envs"
    assert env_cli(root, "build", "tiny", "--requirements", str(requirements)).returncode == 0
    args = ("--envs-dir", str(root), "--pool-size", "0", "--build-environments", "false")
    gateway = start_gateway(tmp_path / "data", extra_args=args)
    with gateway.client() as http:
        sid = http.post("/v1/sessions", json={"kernel": "tiny"}).json()["id"]
        assert run(http, sid, "x = 6 * 7")["status"] == "ok"
        kernel = psutil.Process(kernel_host_pid(tmp_path / "data", sid))
    gateway.stop(signal.SIGKILL)
    try:
        restarted_after_removal(tmp_path, root, args, sid, kernel)
    finally:  # a failure must not leave the killed gateway's kernel running
        for process in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if str(tmp_path) in " ".join(process.info["cmdline"] or []):
                    process.kill()


def restarted_after_removal(tmp_path: Path, root: Path, args: tuple[str, ...], sid: str,
                            kernel: psutil.Process) -> None:
    removed = env_cli(root, "remove", "tiny")
    assert removed.returncode == 0, removed.stderr
    gateway = start_gateway(tmp_path / "data", extra_args=args)
    try:
        with gateway.client() as http:
            row = http.get(f"/v1/sessions/{sid}").json()
            assert row["state"] == "paused", row
            deadline = time.monotonic() + 10
            while running(kernel) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not running(kernel)  # the kernel no environment backs any more is stopped
            refused = http.post(f"/v1/sessions/{sid}/execute", json={"code": "x"})
            assert refused.status_code == 503 and error_code(refused) == "environment_not_built", refused.text
            assert env_cli(root, "build", "tiny").returncode == 0
            again = run(http, sid, "import tinypkg\nprint(tinypkg.VALUE, 'x' in dir())")
            assert again["status"] == "ok" and again["stdout"].split() == ["42", "False"], again
            kinds = [e["action"] for e in http.get(f"/v1/sessions/{sid}/events").json()["events"]]
            assert "kernel_died" in kinds and "session_paused" in kinds
    finally:
        assert gateway.stop() == 0, gateway.stderr_text()[-4000:]


def test_env_build_refuses_credentials_in_the_requirements_and_reserved_names(tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("--index-url https://user:s3cret@index.example/simple\nsix\n")
    refused = env_cli(tmp_path / "envs", "build", "private", "--requirements", str(requirements))
    assert refused.returncode == 1 and "credentials" in refused.stderr
    assert "s3cret" not in refused.stdout + refused.stderr
    assert not (tmp_path / "envs" / "kernels" / "private" / "requirements.lock").exists()
    requirements.write_text("six\n")
    reserved = env_cli(tmp_path / "envs", "build", "python3", "--requirements", str(requirements))
    assert reserved.returncode == 1 and "the gateway's own environments" in reserved.stderr
    bad = env_cli(tmp_path / "envs", "build", "../up", "--requirements", str(requirements))
    assert bad.returncode == 1 and "not an environment name" in bad.stderr


def test_a_sandboxed_kernel_sees_its_environment_read_only_and_only_the_fonts_of_etc(
        client: httpx.Client, session: dict[str, Any]) -> None:
    if (session.get("isolation") or {}).get("profile") != "sandbox":
        pytest.skip("the shared gateway does not run the sandbox profile here")
    environment = default_environment()
    seen = run(client, session["id"], "\n".join([
        "import os, sys, errno",
        "print(sorted(os.listdir('/etc')))",
        "print(sorted(os.listdir('/var/cache')))",
        "try:\n    open('/etc/debian_version')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])",
        "for target in (sys.prefix, os.path.join(sys.prefix, 'lib'), os.path.dirname(os.__file__)):",
        "    try:\n        open(os.path.join(target, 'planted.py'), 'w')\n    except OSError as e:\n"
        "        print(errno.errorcode[e.errno])",
        "import multiprocessing; multiprocessing.Semaphore(); print('semaphore')"]))
    assert seen["status"] == "ok", seen
    assert seen["stdout"].splitlines() == ["['fonts', 'ld.so.cache', 'localtime', 'nsswitch.conf']",
                                           "['fontconfig']", "ENOENT", "EROFS", "EROFS", "EROFS", "semaphore"]
    assert not (environment.path / "planted.py").exists()
