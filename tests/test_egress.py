"""Egress: the rules, the proxy on a real unix socket in front of a real HTTP server, and a
sandboxed session installing a package from a real local index (wheels served over HTTP,
behind a token the proxy adds) through it; a refused host audited; the token looked for from
inside the session; the package importable after pause, resume, restart, a fork and a gateway
restart."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import json
import os
import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from gateway.egress import Connection, InvalidRule, Policy, Proxy, Rule, public
from tests.conftest import engine_args, isolated_gateway, run, start_gateway
from tests.test_environments import build_wheel

INDEX_TOKEN = "idx-7f3c9e1b5a2d4c6e8f0a1b3c5d7e9f1a"


# -- rules -------------------------------------------------------------------------------------------

def test_rules_parse_names_wildcards_and_ports_and_refuse_anything_else() -> None:
    assert Rule.parse("PyPI.org") == Rule("pypi.org", (80, 443))
    assert Rule.parse("*.pythonhosted.org:443") == Rule("*.pythonhosted.org", (443,))
    assert Rule.parse("127.0.0.1:8080,81") == Rule("127.0.0.1", (81, 8080))
    for bad in ("", "http://pypi.org", "pypi.org:0", "pypi.org:65536", "pypi.org:x", "*pypi.org", "a..b",
                "py pi.org", "pypi.org/simple", "é.org", "pypi.org\x00", "\u202epypi.org", "x" * 400, "-a.org",
                "a.*.org", "**", "pypi.org:\u0663", "pypi.org:\uff18\uff10", "\u212aey.org", "pypi.org: 443",
                "pypi.org:+443", 42, None):
        with pytest.raises(InvalidRule):
            Rule.parse(bad)  # type: ignore[arg-type]


def test_a_wildcard_matches_names_under_its_domain_only_and_exact_rules_come_first() -> None:
    policy = Policy.parse(["*.example.org:443", "api.example.org:443,8443"])
    assert policy.rule_for("files.example.org", 443) == Rule("*.example.org", (443,))
    assert policy.rule_for("api.example.org", 443) == Rule("api.example.org", (443, 8443))
    for host, port in (("example.org", 443), ("evilexample.org", 443), ("files.example.org", 80),
                       ("example.org.evil.com", 443), ("files.example.org", 8443)):
        assert policy.rule_for(host, port) is None, (host, port)
    assert Policy().rule_for("pypi.org", 443) is None  # denied by default
    assert Policy.parse(["*"]).rule_for("anything.at.all", 80) == Rule("*", (80, 443))


def test_only_internet_addresses_are_public() -> None:
    for address in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "172.16.5.4", "169.254.169.254", "::1", "fe80::1",
                    "fd00::1", "0.0.0.0", "224.0.0.1", "::ffff:127.0.0.1", "100.64.0.1"):
        assert not public(address), address
    for address in ("151.101.0.223", "2a04:4e42::223", "8.8.8.8"):
        assert public(address), address


# -- the proxy against a real server -----------------------------------------------------------------

class Index(http.server.ThreadingHTTPServer):
    """A PEP 503 index of the wheels in a directory, on loopback, answering only with the token."""

    def __init__(self, wheels: Path):
        self.wheels = wheels
        self.seen: list[tuple[str, str | None]] = []  # (path, Authorization) of every request
        super().__init__(("127.0.0.1", 0), IndexHandler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class IndexHandler(http.server.BaseHTTPRequestHandler):
    server: Index

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.server.seen.append((self.path, self.headers.get("Authorization")))
        if self.headers.get("Authorization") != f"Bearer {INDEX_TOKEN}":
            self.send_error(401, "a token is needed")
            return
        wheels = {path.name: path for path in self.server.wheels.glob("*.whl")}
        name = self.path.rstrip("/").rsplit("/", 1)[-1]
        if self.path.startswith("/simple/"):
            links = "".join(f'<a href="/files/{file}#sha256={hashlib.sha256(path.read_bytes()).hexdigest()}">'
                            f"{file}</a>" for file, path in wheels.items() if file.split("-")[0] == name)
            body = f"<html><body>{links}</body></html>".encode() if links else b""
            kind = "text/html"
        elif self.path.startswith("/files/") and name in wheels:
            body, kind = wheels[name].read_bytes(), "application/octet-stream"
        else:
            body = b""
        if not body:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    build_wheel(wheels, "tinypkg", "1.0", "VALUE = 42\n")
    server = Index(wheels)
    yield server
    server.stop()


async def through(socket_path: Path, request: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


def test_the_proxy_lets_through_what_the_policy_allows_adds_credentials_and_records_every_attempt(
        tmp_path: Path, index: Index) -> None:
    target = f"127.0.0.1:{index.port}"

    async def scenario() -> tuple[list[bytes], list[Connection]]:
        seen: list[Connection] = []
        proxy = Proxy(tmp_path, Policy.parse([target, "*"]),
                      {target: {"Authorization": f"Bearer {INDEX_TOKEN}"}}, sink=seen.append)
        await proxy.start()
        try:
            answers = [
                # allowed; the kernel's own Authorization is replaced by the operator's
                await through(proxy.socket_path, f"GET http://{target}/simple/tinypkg/ HTTP/1.1\r\nHost: {target}\r\n"
                              "Authorization: Bearer guessed\r\nProxy-Authorization: x\r\n\r\n".encode()),
                # a port no rule names, the same host
                await through(proxy.socket_path, f"GET http://127.0.0.1:{index.port + 1}/ HTTP/1.1\r\n\r\n".encode()),
                # "*" does not open non-public addresses
                await through(proxy.socket_path, b"CONNECT localhost:443 HTTP/1.1\r\n\r\n"),
                await through(proxy.socket_path, b"GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\n\r\n"),
                # not proxy requests
                await through(proxy.socket_path, b"GET /relative HTTP/1.1\r\n\r\n"),
                await through(proxy.socket_path, b"\xff\xfe garbage\r\n\r\n"),
                # ports in digits that are not ASCII ones (latin-1 superscripts)
                await through(proxy.socket_path, b"CONNECT pypi.org:\xb2 HTTP/1.1\r\n\r\n"),
                await through(proxy.socket_path, b"GET http://pypi.org:\xb9/ HTTP/1.1\r\n\r\n"),
            ]
            # CONNECT to the allowed host: a tunnel, bytes counted both ways
            reader, writer = await asyncio.open_unix_connection(str(proxy.socket_path))
            writer.write(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            writer.write(f"GET /simple/tinypkg/ HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode())
            answers.append(await asyncio.wait_for(reader.read(), 10))
            writer.close()
            await asyncio.sleep(0.2)
        finally:
            proxy.close()
        assert not proxy.socket_path.exists()
        return answers, seen

    answers, seen = asyncio.run(scenario())
    assert answers[0].startswith(b"HTTP/1.0 200") and b"tinypkg-1.0-py3-none-any.whl" in answers[0]
    assert index.seen[0] == ("/simple/tinypkg/", f"Bearer {INDEX_TOKEN}")
    for refused in answers[1:4]:
        assert refused.startswith(b"HTTP/1.1 403"), refused
    assert b"not allowed for this session" in answers[1] and b"non-public address" in answers[2]
    assert all(answer.startswith(b"HTTP/1.1 400") for answer in answers[4:8]), answers[4:8]
    assert answers[8].startswith(b"HTTP/1.0 401")  # a tunnel (TLS, usually) gets no credentials added
    by_host = [(c.host, c.port, c.allowed) for c in seen]
    assert ("127.0.0.1", index.port, True) in by_host and ("127.0.0.1", index.port + 1, False) in by_host
    assert ("localhost", 443, False) in by_host and ("169.254.169.254", 80, False) in by_host
    allowed = next(c for c in seen if c.allowed and c.method == "GET")
    assert allowed.credentials and allowed.bytes_received > 100 and allowed.bytes_sent > 20
    tunnel = next(c for c in seen if c.allowed and c.method == "CONNECT")
    assert tunnel.bytes_sent > 20 and tunnel.bytes_received > 20 and not tunnel.credentials
    assert all(INDEX_TOKEN not in json.dumps(c.details()) for c in seen)


def test_packages_a_kernel_reports_are_read_bounded_and_anything_else_is_dropped() -> None:
    from gateway.outputs import PACKAGES_MIME, reported_packages

    def shown(report: object, kind: str = "display_data") -> dict[str, object]:
        return {"output_type": kind, "data": {PACKAGES_MIME: report, "text/plain": "x"}, "metadata": {}}

    assert reported_packages([{"output_type": "stream", "name": "stdout", "text": "x"}]) is None
    assert reported_packages([shown({"packages": {"b": "2", "a": "1"}})]) == {"a": "1", "b": "2"}
    assert reported_packages([shown({"packages": {"a": "1"}}), shown({"packages": {"a": "2"}})]) == {"a": "2"}
    assert reported_packages([shown({"packages": {"a": "1"}}, "execute_result")]) is None
    for bad in ("x", None, [], {"packages": ["a"]}, {"packages": "a"}):
        assert reported_packages([shown(bad)]) is None
    odd = reported_packages([shown({"packages": {"": "1", "n" * 500: "v" * 500, "k": 3, "ok": "1"}})])
    assert odd == {"n" * 200: "v" * 100, "ok": "1"}
    many = reported_packages([shown({"packages": {f"p{i}": "1" for i in range(5000)}})])
    assert many is not None and len(many) == 2000


def test_the_proxy_tries_each_address_of_a_host_until_one_takes_the_connection(index: Index) -> None:
    async def scenario() -> str:
        # 127.0.0.2 is loopback too, where nothing listens on the index's port (refused at once)
        reader, writer = await Proxy._open(["127.0.0.2", "127.0.0.1"], index.port)
        peer = writer.get_extra_info("peername")[0]
        writer.close()
        with pytest.raises(OSError):
            await Proxy._open(["127.0.0.2", "127.0.0.3"], index.port)
        return str(peer)

    assert asyncio.run(scenario()) == "127.0.0.1"


def token_hunt() -> str:
    """Code for a kernel: ``found`` lists where the index's token shows up (its environment, any
    process's environment or command line, files under /workspace, /tmp, ~ and /etc)."""
    return "\n".join([
        f"needle = {INDEX_TOKEN[4:]!r}",
        "import os, glob",
        "found = [k for k, v in os.environ.items() if needle in v]",
        "for path in glob.glob('/proc/*/environ') + glob.glob('/proc/*/cmdline'):",
        "    try:\n        found += [path] if needle.encode() in open(path, 'rb').read() else []",
        "    except OSError:\n        pass",
        "for top in ('/workspace', '/tmp', os.path.expanduser('~'), '/etc'):",
        "    for root, dirs, files in os.walk(top):",
        "        for name in files:",
        "            try:\n                found += [name] if needle.encode() in open(os.path.join(root, name), 'rb').read() else []",
        "            except OSError:\n                pass"])


# -- a sandboxed session ------------------------------------------------------------------------------

def events_of(http: Any, sid: str, action: str) -> list[dict[str, Any]]:
    return [e for e in http.get(f"/v1/sessions/{sid}/events").json()["events"] if e["action"] == action]


@contextlib.contextmanager
def index_credentials(index: Index) -> Iterator[Path]:
    """The operator's credentials file for the index, readable by the server's user alone."""
    reachable = Path(tempfile.mkdtemp(prefix="agw-egress-", dir="/tmp"))  # the server's user passes through
    reachable.chmod(0o711)
    credentials = reachable / "credentials.json"
    credentials.write_text(json.dumps({f"127.0.0.1:{index.port}": {"Authorization": f"Bearer {INDEX_TOKEN}"}}))
    credentials.chmod(0o600)
    from gateway.privileges import server_identity
    from gateway.settings import Settings, uid_range

    identity = server_identity(Settings().server_user, uid_range(Settings().sandbox_uids))
    if identity is not None:  # the server's user reads it, no one else
        os.chown(credentials, identity.uid, identity.gid)
    try:
        yield credentials
    finally:
        shutil.rmtree(reachable, True)


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["sandbox", "container"])
def test_a_sandboxed_session_installs_from_a_private_index_through_the_proxy_and_keeps_the_package(
        request: pytest.FixtureRequest, index: Index, profile: str) -> None:
    engine = engine_args(request, profile)
    with index_credentials(index) as credentials:
        run_session_through_the_proxy(index, credentials, profile, engine)


@pytest.mark.slow
def test_an_admin_opens_and_closes_a_running_sessions_egress_and_every_change_is_audited(index: Index) -> None:
    import subprocess
    import sys

    rule = f"127.0.0.1:{index.port}"
    install = f"%pip install --index-url http://127.0.0.1:{index.port}/simple tinypkg"
    fetch = (f"import urllib.request, urllib.error\ntry:\n    print(urllib.request.urlopen("
             f"'http://127.0.0.1:{index.port}/simple/tinypkg/', timeout=10).status)\n"
             "except urllib.error.HTTPError as e:\n    print(e.code)")
    with index_credentials(index) as credentials, \
            isolated_gateway("sandbox", "--egress-credentials", str(credentials), "--pool-size", "0") as state:
        agent_token = subprocess.run([sys.executable, "-m", "gateway", "token", "create", "--name", "agent-1",
                                      "--role", "agent", "--data-dir", str(state["base"] / "data")],
                                     capture_output=True, text=True, check=True).stdout.strip()
        with state["gateway"].client(token=agent_token) as agent, state["gateway"].client() as admin:
            sid = agent.post("/v1/sessions", json={}).json()["id"]
            denied = run(agent, sid, install)
            assert denied["status"] == "error" and "no package index" in denied["error"]["value"], denied

            forbidden = agent.put(f"/v1/sessions/{sid}/egress", json={"rules": [rule]})
            assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden", forbidden.text
            for body in ({"rules": ["http://x"]}, {"rules": "x"}, {"rules": [rule] * 65}, {}, {"rules": [], "x": 1}):
                refused = admin.put(f"/v1/sessions/{sid}/egress", json=body)
                assert refused.status_code == 400, (body, refused.text)
            assert admin.put("/v1/sessions/s_nope/egress", json={"rules": []}).status_code == 404
            assert events_of(admin, sid, "egress_rules_changed") == []
            assert agent.get(f"/v1/sessions/{sid}").json()["isolation"]["egress"] == []

            opened = admin.put(f"/v1/sessions/{sid}/egress", json={"rules": [rule.upper()]})
            assert opened.status_code == 200 and opened.json()["isolation"]["egress"] == [rule], opened.text
            installed = run(agent, sid, install)  # the same kernel, no restart
            assert installed["status"] == "ok" and "Successfully installed tinypkg-1.0" in installed["stdout"]
            assert run(agent, sid, "import tinypkg; print(tinypkg.VALUE)")["stdout"] == "42\n"

            from gateway.client import Gateway

            with Gateway(state["gateway"].url, state["gateway"].token) as sdk:  # the SDK's call for the same route
                assert sdk.session(sid).set_egress([]).raw["isolation"]["egress"] == []
            assert run(agent, sid, fetch)["stdout"] == "403\n"  # closed again for the connections to come
            again = run(agent, sid, install.replace("install", "install --upgrade"))
            assert again["status"] == "error" and "no package index" in again["error"]["value"]

            assert agent.post(f"/v1/sessions/{sid}/pause").status_code == 200
            assert admin.put(f"/v1/sessions/{sid}/egress", json={"rules": [rule]}).status_code == 200
            assert run(agent, sid, fetch)["stdout"] == "200\n"  # resumed under the rules set while paused

            changes = [(e["principal"], e["details"]) for e in events_of(admin, sid, "egress_rules_changed")]
            assert changes == [("admin", {"before": [], "after": [rule]}), ("admin", {"before": [rule], "after": []}),
                               ("admin", {"before": [], "after": [rule]})]
            refused = [e["details"] for e in events_of(admin, sid, "egress") if not e["details"]["allowed"]]
            assert any(e["host"] == "127.0.0.1" and e["port"] == index.port for e in refused)

            unsandboxed = admin.post("/v1/sessions", json={"sandbox": "process"})
            assert unsandboxed.status_code == 201, unsandboxed.text
            conflict = admin.put(f"/v1/sessions/{unsandboxed.json()['id']}/egress", json={"rules": [rule]})
            assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "egress_not_enforced"
            agent.delete(f"/v1/sessions/{sid}")
            ended = admin.put(f"/v1/sessions/{sid}/egress", json={"rules": []})
            assert ended.status_code == 409, ended.text


def run_session_through_the_proxy(index: Index, credentials: Path, profile: str, engine: tuple[str, ...]) -> None:
    with isolated_gateway(profile, "--egress-credentials", str(credentials), "--pool-size", "0", *engine) as state:
        http = state["gateway"].client()
        created = http.post("/v1/sessions", json={"egress": [f"127.0.0.1:{index.port}"]})
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        assert created.json()["isolation"]["egress"] == [f"127.0.0.1:{index.port}"]

        installed = run(http, sid, f"%pip install --index-url http://127.0.0.1:{index.port}/simple tinypkg")
        assert installed["status"] == "ok", installed
        assert "Successfully installed tinypkg-1.0" in installed["stdout"]
        (reported,) = events_of(http, sid, "packages_installed")  # what was installed is recorded
        assert reported["details"] == {"step": installed["step"], "packages": {"tinypkg": "1.0"},
                                       "reported_by": "kernel"}
        assert "Packages in this session's own layer (/workspace/.packages): tinypkg 1.0" in \
            http.get(f"/v1/sessions/{sid}/notebook").text
        used = run(http, sid, "import tinypkg, os\nprint(tinypkg.VALUE, tinypkg.__file__)")
        assert used["stdout"] == "42 /workspace/.packages/tinypkg/__init__.py\n", used
        assert all(auth == f"Bearer {INDEX_TOKEN}" for _, auth in index.seen) and index.seen
        allowed = [e["details"] for e in events_of(http, sid, "egress") if e["details"]["allowed"]]
        assert allowed and all(e["host"] == "127.0.0.1" and e["port"] == index.port for e in allowed)
        assert sum(e["bytes_received"] for e in allowed) > 1000 and any(e["credentials"] for e in allowed)

        refused = run(http, sid, "\n".join([
            "import urllib.request, urllib.error, socket",
            "try:\n    urllib.request.urlopen('http://10.9.8.7/', timeout=10)\n"
            "except urllib.error.HTTPError as e:\n    print('proxy', e.code)",
            "try:\n    socket.create_connection(('1.1.1.1', 80), timeout=3)\nexcept OSError as e:\n    print('direct', e.errno)"]))
        assert refused["stdout"].splitlines()[0] == "proxy 403", refused
        assert refused["stdout"].splitlines()[1].startswith("direct ")  # no other way out
        audited = [e["details"] for e in events_of(http, sid, "egress") if not e["details"]["allowed"]]
        assert {"host": "10.9.8.7", "port": 80, "allowed": False} in [
            {k: e[k] for k in ("host", "port", "allowed")} for e in audited]

        hunt = run(http, sid, token_hunt() + "\nprint(found)")
        assert hunt["status"] == "ok" and hunt["stdout"] == "[]\n", hunt

        assert http.post(f"/v1/sessions/{sid}/pause").status_code == 200
        assert http.post(f"/v1/sessions/{sid}/resume").status_code == 200
        assert run(http, sid, "import tinypkg; print(tinypkg.VALUE)")["stdout"] == "42\n"
        assert http.post(f"/v1/sessions/{sid}/restart").status_code == 200
        assert run(http, sid, "import tinypkg; print(tinypkg.VALUE)")["stdout"] == "42\n"
        fork = http.post(f"/v1/sessions/{sid}/fork", json={})
        assert fork.status_code == 201, fork.text
        assert run(http, fork.json()["id"], "import tinypkg; print(tinypkg.VALUE)")["stdout"] == "42\n"
        assert fork.json()["isolation"]["egress"] == [f"127.0.0.1:{index.port}"]

        http.close()
        assert state["gateway"].stop() == 0
        state["gateway"] = start_gateway(state["base"] / "data", extra_args=state["args"])
        with state["gateway"].client() as again:
            after = run(again, sid, "import tinypkg; print(tinypkg.VALUE)")
            assert after["stdout"] == "42\n", after
            index.seen.clear()
            reinstall = run(again, sid, f"%pip install --upgrade --index-url http://127.0.0.1:{index.port}/simple "
                            "tinypkg")
            assert reinstall["status"] == "ok", reinstall  # the proxy is back for the reattached kernel
            assert index.seen


def test_only_an_admin_chooses_egress_rules_and_bad_rules_are_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    gateway = start_gateway(tmp_path / "data", extra_args=("--pool-size", "0", "--sandbox", "none",
                                                           "--egress-allow", "pypi.org:443 *.pythonhosted.org:443"))
    try:
        agent_token = subprocess.run([sys.executable, "-m", "gateway", "token", "create", "--name", "agent-1",
                                      "--role", "agent", "--data-dir", str(tmp_path / "data")],
                                     capture_output=True, text=True, check=True).stdout.strip()
        with gateway.client(token=agent_token) as agent, gateway.client() as admin:
            server_rules = ["pypi.org:443", "*.pythonhosted.org:443"]
            default = agent.post("/v1/sessions", json={})  # the server's rules, for every session
            assert default.status_code == 201 and default.json()["isolation"]["egress"] == server_rules
            same = agent.post("/v1/sessions", json={"egress": ["PYPI.org:443", "*.pythonhosted.org:443"]})
            assert same.status_code == 201, same.text  # asking for the server's own rules is no widening
            for sid in (default.json()["id"], same.json()["id"]):
                agent.delete(f"/v1/sessions/{sid}")
            for wider in (["pypi.org:443"], ["*"], []):
                forbidden = agent.post("/v1/sessions", json={"egress": wider})
                assert forbidden.status_code == 403 and forbidden.json()["error"]["details"]["field"] == "egress"
            for bad in (["http://x"], "pypi.org", [1], ["*.*"], ["a" * 5000], "\\ud800", ["ok.org"] * 65):
                raw = '{"egress": ["\\ud800"]}' if bad == "\\ud800" else json.dumps({"egress": bad})
                refused = admin.post("/v1/sessions", content=raw, headers={"Content-Type": "application/json"})
                assert refused.status_code == 400, (bad, refused.text)
                assert refused.json()["error"]["code"] in ("invalid_field", "invalid_json")
            assert [s["state"] for s in admin.get("/v1/sessions").json()["sessions"]] == ["terminated"] * 2
            chosen = admin.post("/v1/sessions", json={"egress": ["PyPI.org:443", "*.pythonhosted.org:443"]})
            assert chosen.status_code == 201, chosen.text
            assert chosen.json()["isolation"]["egress"] == ["pypi.org:443", "*.pythonhosted.org:443"]
            admin.delete(f"/v1/sessions/{chosen.json()['id']}")
    finally:
        assert gateway.stop() == 0


def test_the_socket_is_made_only_in_a_directory_of_the_gateways_own(tmp_path: Path) -> None:
    import os

    import pytest as _pytest

    from gateway.safefs import UnsafeEntry

    async def answer(runtime: Path) -> bytes:
        proxy = Proxy(runtime, Policy())
        await proxy.start()
        try:
            assert oct(os.stat(proxy.socket_path.parent).st_mode & 0o777) == "0o711"
            assert oct(os.stat(proxy.socket_path).st_mode & 0o777) == "0o666"
            return await through(proxy.socket_path, b"CONNECT pypi.org:443 HTTP/1.1\r\n\r\n")
        finally:
            proxy.close()

    (tmp_path / "egress").mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "egress" / "egress.sock"))  # left by an earlier gateway process
    stale.close()
    assert asyncio.run(answer(tmp_path)).startswith(b"HTTP/1.1 403")

    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "egress").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    with _pytest.raises(UnsafeEntry):
        asyncio.run(answer(linked))  # a kernel's link is not followed
    assert list((tmp_path / "elsewhere").iterdir()) == []

    foreign = tmp_path / "foreign"
    (foreign / "egress").mkdir(parents=True)
    os.chown(foreign / "egress", 12345, 12345)  # the kernel made the directory: it could swap what is inside
    with _pytest.raises(PermissionError, match="not the gateway's"):
        asyncio.run(answer(foreign))
    assert list((foreign / "egress").iterdir()) == []
