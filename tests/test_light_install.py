"""The light install: ``pip install agent-kernel-gateway`` (no extra) is the Python client alone,
with httpx and its dependencies and nothing of the server, and it drives a real gateway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import GatewayProcess

ROOT = Path(__file__).resolve().parent.parent
HTTPX_AND_ITS_OWN = {"httpx", "httpcore", "h11", "anyio", "idna", "certifi", "sniffio", "typing-extensions",
                     "exceptiongroup"}
INSTALLER = {"pip", "setuptools", "wheel"}

SERVER_MODULES = ("tornado", "jupyter_client", "ipykernel", "zmq", "nbformat", "sqlite_utils", "psutil", "mcp",
                  "cryptography", "docker", "certifi", "cloudpickle")
WITHOUT_THE_SERVER_EXTRA = textwrap.dedent("""
    import importlib.abc, sys
    class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in sys.argv[1].split(","):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Absent())
    from gateway.cli import main
    for command in sys.argv[2:]:
        print(main(command.split()))
""")


def test_every_server_command_says_it_needs_the_extra_when_its_modules_are_missing(tmp_path: Path) -> None:
    """The fast guard of the light install: no module the command line loads imports the server's own."""
    commands = [f"serve --data-dir {tmp_path}", "image list --container-engine unix:///nowhere",
                f"env list --envs-dir {tmp_path}", "doctor"]
    ran = subprocess.run([sys.executable, "-c", WITHOUT_THE_SERVER_EXTRA, ",".join(SERVER_MODULES), *commands],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "Traceback" not in ran.stderr, ran.stderr
    assert ran.stdout.split() == ["2"] * len(commands), (ran.stdout, ran.stderr)
    assert ran.stderr.count("pip install 'agent-kernel-gateway[server]'") == len(commands)


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("light") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(ROOT)], capture_output=True,
                               text=True, timeout=600)
    if installed.returncode != 0 and "No matching distribution" in installed.stderr:
        pytest.skip(f"no package index reachable to build the package: {installed.stderr.strip()[-200:]}")
    assert installed.returncode == 0, installed.stderr
    return venv


@pytest.mark.slow
def test_the_light_install_holds_httpx_and_nothing_of_the_server(light_venv: Path) -> None:
    listing = subprocess.run([str(light_venv / "bin" / "pip"), "list", "--format", "json"], capture_output=True,
                             text=True, check=True)
    names = {entry["name"].lower().replace("_", "-") for entry in json.loads(listing.stdout)}
    assert "agent-kernel-gateway" in names
    assert names - INSTALLER - {"agent-kernel-gateway"} <= HTTPX_AND_ITS_OWN, names
    assert not names & {"tornado", "jupyter-client", "ipykernel", "pyzmq", "mcp", "nbformat"}


@pytest.mark.slow
def test_the_light_install_drives_a_gateway(light_venv: Path, gateway: GatewayProcess) -> None:
    script = textwrap.dedent("""
        import sys
        from gateway.client import Gateway, NotFoundError
        with Gateway(sys.argv[1], sys.argv[2]) as gateway:
            with gateway.create_session() as session:
                session.run("x = 6")
                print(session.run("x * 7").text)
                session.files.write("a.txt", b"light")
                print(session.files.read("a.txt").decode())
            try:
                gateway.session("s_missing")
            except NotFoundError as exc:
                print(exc.code)
    """)
    ran = subprocess.run([str(light_venv / "bin" / "python"), "-c", script, gateway.url, gateway.token],
                         capture_output=True, text=True, timeout=120, cwd="/", env={"PATH": os.environ["PATH"]})
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["42", "light", "session_not_found"]


@pytest.mark.slow
def test_the_server_commands_say_which_extra_they_need(light_venv: Path, tmp_path: Path) -> None:
    served = subprocess.run([str(light_venv / "bin" / "agent-gateway"), "serve", "--data-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60, cwd="/")
    assert served.returncode == 2
    assert "pip install 'agent-kernel-gateway[server]'" in served.stderr
    assert "Traceback" not in served.stderr
    bridged = subprocess.run([str(light_venv / "bin" / "agent-gateway"), "mcp", "--token", "t"],
                             capture_output=True, text=True, timeout=60, cwd="/")
    assert bridged.returncode == 2 and "agent-kernel-gateway[mcp]" in bridged.stderr
