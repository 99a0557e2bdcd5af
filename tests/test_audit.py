"""The audit log: every action and execution recorded in a hash chain that shows tampering;
tokens listed and revoked; refused requests recorded."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import run, start_gateway


def cli(*args: str, data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--data-dir", str(data)],
                          capture_output=True, text=True, timeout=120)


def test_the_chain_holds_and_shows_an_edit_and_a_deletion(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = start_gateway(data, extra_args=("--pool-size", "0"))
    try:
        with proc.client() as client:
            sid = client.post("/v1/sessions", json={}).json()["id"]
            run(client, sid, "secret_sauce = 42")
            client.put(f"/v1/sessions/{sid}/files/a.txt", content=b"a")
            run(client, sid, "1/0")
            httpx.get(proc.url + "/v1/sessions", headers={"Authorization": "Bearer wrong-token"})
            client.get("/v1/sessions/s_someone_elses")
            events = client.get(f"/v1/sessions/{sid}/events").json()["events"]
            executed = [(e["details"]["code"], e["details"]["status"]) for e in events if e["action"] == "execute"]
            assert executed == [("secret_sauce = 42", "ok"), ("1/0", "error")]
            assert all(len(e["hash"]) == 64 for e in events)
    finally:
        assert proc.stop() == 0

    verified = cli("audit", "verify", data=data)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "unbroken" in verified.stdout
    exported = cli("audit", "export", data=data)
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    actions = [line["action"] for line in lines]
    assert {"session_created", "execute", "file_upload", "auth_failed", "access_denied", "session_paused"} <= set(actions)
    failed = [line for line in lines if line["action"] == "auth_failed"][0]
    assert failed["session_id"] is None and failed["details"]["status"] == 401 and "wrong-token" not in json.dumps(failed)

    db = sqlite3.connect(data / "gateway.db")
    target = [line["id"] for line in lines if line["action"] == "execute"][0]
    original = db.execute("SELECT details FROM events WHERE id = ?", [target]).fetchone()[0]
    db.execute("UPDATE events SET details = ? WHERE id = ?", [original.replace("42", "43"), target])
    db.commit()
    edited = cli("audit", "verify", data=data)
    assert edited.returncode == 1 and f"BROKEN at event {target}" in edited.stdout and "changed" in edited.stdout
    db.execute("UPDATE events SET details = ? WHERE id = ?", [original, target])
    db.commit()
    assert cli("audit", "verify", data=data).returncode == 0
    db.execute("DELETE FROM events WHERE id = ?", [target])
    db.commit()
    db.close()
    deleted = cli("audit", "verify", data=data)
    assert deleted.returncode == 1 and f"BROKEN at event {target + 1}" in deleted.stdout
    assert "missing" in deleted.stdout


def test_tokens_are_listed_without_secrets_and_revocation_takes_effect(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = start_gateway(data, extra_args=("--pool-size", "0"))
    try:
        token = cli("token", "create", "--name", "worker", "--role", "agent", data=data).stdout.strip()
        with proc.client(token=token) as worker:
            assert worker.get("/v1/sessions").status_code == 200
            listed = cli("token", "list", data=data).stdout
            assert "worker\tagent" in listed and token not in listed
            revoked = cli("token", "revoke", "--name", "worker", data=data)
            assert revoked.returncode == 0 and "revoked 1" in revoked.stdout
            time.sleep(1.2)
            assert worker.get("/v1/sessions").status_code == 401
        assert "revoked" in cli("token", "list", data=data).stdout
        assert cli("token", "revoke", "--name", "nobody", data=data).returncode == 1
        assert token.encode() not in (data / "gateway.db").read_bytes()
    finally:
        assert proc.stop() == 0
