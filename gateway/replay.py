"""Replaying a trajectory in a fresh session, and judging step by step whether it reproduced.

The replay session is a fork-like child of the original (``parent`` names it) and is recorded
like any session. Steps run again in their recorded order, with file uploads, deletions and
restarts re-applied where they happened, and the kernel's input() calls answered with what was
typed the first time. Outputs (and input prompts) are compared after normalising what is
expected to vary between runs (memory addresses, timestamps, durations; see ``NORMALISERS``).
Steps that did not run to their end, or did not run at all, are not run again.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from gateway import access
from gateway.auth import Principal
from gateway.errors import GatewayError
from gateway.outcomes import RERUN_STATUSES, STATUSES
from gateway.recorder import recorded_replies
from gateway.workspace import Workspace

if TYPE_CHECKING:
    from gateway.sessions import SessionManager

# (pattern, replacement): applied in order to every output text before comparing.
NORMALISERS: list[tuple[str, str]] = [
    (r"0x[0-9a-fA-F]{6,}", "0x<address>"),
    (r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?", "<timestamp>"),
    (r"\b\d+(?:\.\d+)?\s?(?:ns|us|µs|ms|s|sec|seconds)\b", "<duration>"),
]
SKIPPED_STATUSES = tuple(status for status in STATUSES if status not in RERUN_STATUSES)
FILE_EVENTS = ("file_upload", "file_delete", "kernel_restarted")


def normalise(text: str, normalisers: list[tuple[str, str]]) -> str:
    for pattern, replacement in normalisers:
        text = re.sub(pattern, replacement, text)
    return text


def comparable(outputs: list[dict[str, Any]], normalisers: list[tuple[str, str]]) -> str:
    """The parts of a step's outputs that a rerun should reproduce, as normalised text."""
    parts = []
    for output in outputs:
        kind = output.get("output_type")
        if kind == "stream":
            parts.append(f"[{output.get('name')}] {output.get('text', '')}")
        elif kind in ("execute_result", "display_data"):
            data = output.get("data", {})
            parts.append(f"[{kind}] {data.get('text/plain', '')}")
            for mime in sorted(data):
                if mime.startswith("image/"):
                    parts.append(f"[{kind}] {mime}")
        elif kind == "error":
            parts.append(f"[error] {output.get('ename')}: {output.get('evalue')}")
    return normalise("\n".join(parts), normalisers)


def input_exchanges(stdin: list[dict[str, Any]]) -> str:
    """A step's input() prompts and replies as comparable text (a password shows as such)."""
    return "\n".join(f"[input] {e.get('prompt', '')}{'<password>' if e.get('password') else e.get('value')}"
                     for e in stdin)


def environment_note(recorded: dict[str, Any] | None, replayed: dict[str, Any] | None) -> str | None:
    """What a report says when the replay runs in another environment than the recorded one
    (``recorded`` and ``replayed``: identities or summaries, each with ``name`` and ``hash``)."""
    if not recorded or not replayed or recorded.get("hash") == replayed.get("hash"):
        return None
    changed = ""
    old, new = recorded.get("packages"), replayed.get("packages")
    if isinstance(old, dict) and isinstance(new, dict):
        differing = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
        shown = ", ".join(f"{name} {old.get(name, '-')} -> {new.get(name, '-')}" for name in differing[:10])
        changed = f"; packages that differ: {shown}{' ...' if len(differing) > 10 else ''}" if differing else ""
    return (f"the replay runs in environment {replayed.get('name')} {str(replayed.get('hash'))[:12]}, not in the "
            f"recorded {recorded.get('name')} {str(recorded.get('hash'))[:12]}{changed}")


def judge(original: dict[str, Any], replayed: dict[str, Any], normalisers: list[tuple[str, str]]) -> dict[str, Any]:
    """One step's verdict: reproduced, different (with a short diff) or error."""
    verdict: dict[str, Any] = {"step": original["step"], "replay_step": replayed["step"], "code": original["code"]}
    if replayed["status"] != original["status"] and replayed["status"] not in ("ok",):
        failure = replayed.get("error") or {}
        verdict.update(status="error", detail=f"{replayed['status']}: {failure.get('name', '')} {failure.get('value', '')}".strip())
        return verdict
    before = comparable(json.loads(original["outputs"]), normalisers)
    after = comparable(replayed["outputs"], normalisers)
    if original.get("stdin") or replayed.get("stdin"):
        before += "\n" + normalise(input_exchanges(json.loads(original.get("stdin") or "[]")), normalisers)
        after += "\n" + normalise(input_exchanges(replayed.get("stdin") or []), normalisers)
    if before == after and replayed["status"] == original["status"]:
        verdict["status"] = "reproduced"
    else:
        diff = difflib.unified_diff(before.splitlines(), after.splitlines(), "recorded", "replayed", lineterm="", n=1)
        verdict.update(status="different", diff="\n".join(list(diff)[:40]))
    return verdict


async def replay_session(manager: "SessionManager", principal: Principal, session_id: str,
                         progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Rerun ``session_id``'s trajectory in a new session owned by ``principal``; the report."""
    row = manager.visible(principal, session_id)
    access.check_create(principal, "replay them (a replay is a new session)")
    normalisers = NORMALISERS + [(str(a), str(b)) for a, b in manager.settings.replay_normalisers]
    steps = manager.store.list_steps(session_id)
    events = [e for e in manager.store.list_events(session_id) if e["action"] in FILE_EVENTS]
    last_step = steps[-1]["step"] if steps else 0
    child = await manager.create(principal, kernel=row.kernel, env=row.env,
                                 labels={**row.labels, "replay_of": session_id},
                                 parent=(session_id, last_step), isolation=manager.isolation_of(row))
    child_id = child["id"]
    timeline = sorted([("step", s["seq"], s) for s in steps] + [("event", e["seq"], e) for e in events],
                      key=lambda item: item[1])
    verdicts: list[dict[str, Any]] = []
    notes: list[str] = []
    different = environment_note(row.environment, manager.visible(principal, child_id).environment)
    if different:
        notes.append(different)
    for kind, _, item in timeline:
        if kind == "event":
            await _apply_event(manager, principal, child_id, session_id, item, notes)
            continue
        if item["status"] in SKIPPED_STATUSES:
            verdict = {"step": item["step"], "code": item["code"], "status": "skipped",
                       "detail": f"the recorded step ended '{item['status']}'; it is not run again"}
        else:
            replayed = await manager.execute(principal, child_id, item["code"], stdin=recorded_replies(item))
            verdict = judge(item, replayed, normalisers)
        verdicts.append(verdict)
        if progress is not None:
            progress({"type": "step", **verdict, "done": len(verdicts), "total": len(steps)})
    summary = {status: sum(v["status"] == status for v in verdicts)
               for status in ("reproduced", "different", "error", "skipped")}
    report = {"session_id": child_id, "source_session_id": session_id, "steps": verdicts, "summary": summary,
              "notes": notes, "reproduced": summary["different"] == 0 and summary["error"] == 0}
    manager.recorder.record_event(manager.live[child_id].trajectory if child_id in manager.live
                                  else manager.trajectory_of(child_id), "replay_report", principal.name,
                                  {"source_session_id": session_id, "summary": summary})
    return report


async def _uploaded_bytes(manager: "SessionManager", source_id: str, details: dict[str, Any]) -> bytes | None:
    """An upload's bytes: kept in the event when small; else the original file if unchanged."""
    if "content_b64" in details:
        return base64.b64decode(details["content_b64"])
    # The source session's file, read without following links and only if it still has the
    # recorded size and hash (its kernel may have replaced it with anything).
    try:
        fd, info = await Workspace(manager.sessions_dir / source_id / "workspace").open_file(details["path"])
    except GatewayError:
        return None
    with os.fdopen(fd, "rb") as handle:
        if info.st_size != details.get("size"):
            return None
        content = handle.read(info.st_size)
    return content if hashlib.sha256(content).hexdigest() == details.get("sha256") else None


async def _apply_event(manager: "SessionManager", principal: Principal, session_id: str, source_id: str,
                       event: dict[str, Any], notes: list[str]) -> None:
    details = event["details"]
    if event["action"] == "file_upload":
        content = await _uploaded_bytes(manager, source_id, details)
        if content is None:
            notes.append(f"the upload of {details['path']!r} ({details.get('size')} bytes) was not kept and "
                         "the original file has changed or is gone; it was not re-applied")
            return
        directory = manager.upload_dir(principal, session_id)
        with tempfile.NamedTemporaryFile(dir=directory, prefix="upload-", delete=False) as handle:
            handle.write(content)
        await manager.put_file(principal, session_id, details["path"], Path(handle.name), size=len(content),
                               sha256=details.get("sha256", ""), content=content)
    elif event["action"] == "file_delete":
        try:
            await manager.delete_file(principal, session_id, details["path"])
        except Exception:
            pass  # already gone in the replay: the deletion's effect holds
    elif event["action"] == "kernel_restarted":
        await manager.restart(principal, session_id)
