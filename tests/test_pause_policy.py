"""A pause never loses a session's state silently: when the state cannot be saved the session
stays live and the answer says why (409 ``state_not_saved``, a ``pause_failed`` event), unless
replay is configured, or the gateway stops: then the pause goes ahead and says that resuming
re-runs the steps, which it does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.conftest import error_code, run, start_gateway

BREAK_SAVING = "import builtins\nbuiltins._saved_open = builtins.open\nbuiltins.open = None"
MEND_SAVING = "import builtins\nbuiltins.open = builtins._saved_open"


def events_of(client: httpx.Client, sid: str, action: str) -> list[dict[str, Any]]:
    return [e for e in client.get(f"/v1/sessions/{sid}/events").json()["events"] if e["action"] == action]


def test_a_pause_that_cannot_save_leaves_the_session_live(client: httpx.Client, session: dict[str, Any]) -> None:
    sid = session["id"]
    run(client, sid, "x = 41")
    run(client, sid, BREAK_SAVING)
    refused = client.post(f"/v1/sessions/{sid}/pause")
    assert refused.status_code == 409 and error_code(refused) == "state_not_saved", refused.text
    assert "stays live" in refused.json()["error"]["message"]
    assert client.get(f"/v1/sessions/{sid}").json()["state"] == "idle"
    failed = events_of(client, sid, "pause_failed")
    assert failed and failed[-1]["details"]["error"] and failed[-1]["details"]["reason"] == "requested"
    assert not events_of(client, sid, "session_paused")
    run(client, sid, MEND_SAVING)
    assert run(client, sid, "x")["result"] == "41"
    paused = client.post(f"/v1/sessions/{sid}/pause").json()
    assert paused["state"] == "paused" and "x" in paused["snapshot"]["saved"]
    client.post(f"/v1/sessions/{sid}/resume")
    assert run(client, sid, "x")["result"] == "41"


def test_with_replay_configured_and_at_shutdown_the_pause_goes_ahead_and_replays(tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path / "data", extra_args=("--pool-size", "0", "--snapshot-fallback-replay", "1"))
    try:
        with gateway.client() as client:
            sid = client.post("/v1/sessions", json={}).json()["id"]
            run(client, sid, "x = 41")
            run(client, sid, BREAK_SAVING)
            paused = client.post(f"/v1/sessions/{sid}/pause").json()
            assert paused["state"] == "paused", paused
            assert paused["snapshot"]["fallback"] == "replay" and paused["snapshot"]["error"]
            resumed = client.post(f"/v1/sessions/{sid}/resume").json()
            assert resumed["state"] == "idle"
            assert run(client, sid, "x")["result"] == "41"
            assert events_of(client, sid, "session_resumed")[-1]["details"]["replayed_steps"] >= 1
    finally:
        assert gateway.stop() == 0
    # Without the setting, a stop still pauses (the kernel must go), and says resuming replays.
    gateway = start_gateway(tmp_path / "data2", extra_args=("--pool-size", "0"))
    with gateway.client() as client:
        sid = client.post("/v1/sessions", json={}).json()["id"]
        run(client, sid, "y = 'kept'")
        run(client, sid, BREAK_SAVING)
    assert gateway.stop() == 0
    gateway = start_gateway(tmp_path / "data2", extra_args=("--pool-size", "0"))
    try:
        with gateway.client() as client:
            snapshot = client.get(f"/v1/sessions/{sid}").json()["snapshot"]
            assert snapshot["reason"] == "shutdown" and snapshot["fallback"] == "replay", snapshot
            assert run(client, sid, "y")["result"] == "'kept'"
    finally:
        assert gateway.stop() == 0
