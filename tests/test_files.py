"""The files API: bytes in and out, listing, deletion, recording, and confinement to the workspace."""

from __future__ import annotations

import os

import httpx

from tests.conftest import GatewayProcess, error_code, run


def test_upload_download_list_delete_round_trip(client: httpx.Client, session) -> None:
    sid = session["id"]
    payload = bytes(range(256)) * 10
    response = client.put(f"/v1/sessions/{sid}/files/data/raw/blob.bin", content=payload)
    assert response.status_code == 201
    assert response.json()["path"] == "data/raw/blob.bin" and response.json()["size"] == 2560
    assert client.get(f"/v1/sessions/{sid}/files/data/raw/blob.bin").content == payload
    assert run(client, sid, "len(open('data/raw/blob.bin', 'rb').read())")["result"] == "2560"
    run(client, sid, "open('made_by_kernel.txt', 'w').write('k')")
    listing = client.get(f"/v1/sessions/{sid}/files").json()["files"]
    assert [f["path"] for f in listing] == ["data/raw/blob.bin", "made_by_kernel.txt"]
    assert listing[0]["size"] == 2560 and listing[0]["modified"].endswith("Z")
    sub = client.get(f"/v1/sessions/{sid}/files", params={"path": "data"}).json()["files"]
    assert [f["path"] for f in sub] == ["data/raw/blob.bin"]
    deleted = client.delete(f"/v1/sessions/{sid}/files/data/raw/blob.bin")
    assert deleted.status_code == 200
    assert client.get(f"/v1/sessions/{sid}/files/data/raw/blob.bin").status_code == 404
    assert run(client, sid, "import os; os.path.exists('data/raw/blob.bin')")["result"] == "False"
    actions = [(e["action"], e["details"].get("path")) for e in client.get(f"/v1/sessions/{sid}/events").json()["events"]]
    assert ("file_upload", "data/raw/blob.bin") in actions and ("file_delete", "data/raw/blob.bin") in actions


def test_upload_overwrites_and_deleting_a_directory_works(client: httpx.Client, session) -> None:
    sid = session["id"]
    client.put(f"/v1/sessions/{sid}/files/dir/a.txt", content=b"one")
    client.put(f"/v1/sessions/{sid}/files/dir/a.txt", content=b"two")
    assert client.get(f"/v1/sessions/{sid}/files/dir/a.txt").content == b"two"
    assert client.delete(f"/v1/sessions/{sid}/files/dir").json()["deleted"] == "directory"
    assert client.get(f"/v1/sessions/{sid}/files").json()["files"] == []


def test_paths_cannot_escape_the_workspace(gateway: GatewayProcess, client: httpx.Client, session) -> None:
    sid = session["id"]
    workspace = gateway.data_dir / "sessions" / sid / "workspace"
    outside = gateway.data_dir / "outside-secret.txt"
    outside.write_text("secret")
    os.symlink(outside, workspace / "link-out")
    os.symlink(gateway.data_dir, workspace / "dir-out")
    attempts = [
        ("GET", "files/..%2F..%2Fgateway.db"),
        ("GET", "files/a/..%2F..%2F..%2Fgateway.db"),
        ("GET", "files/%2Fetc%2Fpasswd"),
        ("GET", "files/link-out"),
        ("GET", "files/dir-out/gateway.db"),
        ("PUT", "files/..%2Fescape.txt"),
        ("PUT", "files/dir-out/planted.txt"),
        ("DELETE", "files/link-out/x"),
        ("DELETE", "files/dir-out/gateway.db"),
        ("GET", "files?path=..%2F.."),
    ]
    for method, path in attempts:
        response = client.request(method, f"/v1/sessions/{sid}/{path}", content=b"x" if method == "PUT" else None)
        assert response.status_code == 400, (method, path, response.text)
        assert error_code(response) == "invalid_path"
    assert outside.read_text() == "secret"
    assert (gateway.data_dir / "gateway.db").exists()
    assert not (gateway.data_dir / "planted.txt").exists()
    assert not (gateway.data_dir / "sessions" / sid / "escape.txt").exists()
    listing = [f["path"] for f in client.get(f"/v1/sessions/{sid}/files").json()["files"]]
    assert "link-out" not in listing
    # The link itself (inside the workspace) can be removed; its target is untouched.
    assert client.delete(f"/v1/sessions/{sid}/files/link-out").status_code == 200
    assert not (workspace / "link-out").is_symlink() and outside.read_text() == "secret"


def test_missing_files_and_directories_are_404_and_409(client: httpx.Client, session) -> None:
    sid = session["id"]
    missing = client.get(f"/v1/sessions/{sid}/files/nope.txt")
    assert missing.status_code == 404 and error_code(missing) == "file_not_found"
    assert error_code(client.delete(f"/v1/sessions/{sid}/files/nope.txt")) == "file_not_found"
    client.put(f"/v1/sessions/{sid}/files/d/x.txt", content=b"x")
    as_file = client.get(f"/v1/sessions/{sid}/files/d")
    assert as_file.status_code == 409 and error_code(as_file) == "is_a_directory"
    onto_dir = client.put(f"/v1/sessions/{sid}/files/d", content=b"y")
    assert onto_dir.status_code == 409
    assert client.get(f"/v1/sessions/{sid}/files/d/x.txt").content == b"x"


def test_files_of_a_terminated_session_stay_readable(client: httpx.Client) -> None:
    sid = client.post("/v1/sessions", json={}).json()["id"]
    client.put(f"/v1/sessions/{sid}/files/result.csv", content=b"a,b\n1,2\n")
    client.delete(f"/v1/sessions/{sid}")
    assert client.get(f"/v1/sessions/{sid}/files/result.csv").content == b"a,b\n1,2\n"
    refused = client.put(f"/v1/sessions/{sid}/files/late.csv", content=b"late")
    assert refused.status_code == 409 and error_code(refused) == "session_ended"
