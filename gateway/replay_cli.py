"""``agent-gateway replay``: rerun a session (by id) or an exported trajectory notebook on a
running gateway, with a progress bar on stderr and the per-step report on stdout.

A notebook is replayed by this client: a new session, each recorded step executed in turn,
gateway event cells (file uploads, deletions) executed as they are, restarts re-applied; its
outputs are judged with the same rules as the server's replay.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from gateway.http_client import CallError, call
from gateway.replay import NORMALISERS, SKIPPED_STATUSES, environment_note, judge


def progress_bar(done: int, total: int, status: str) -> None:
    width = 30
    filled = int(width * done / max(total, 1))
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {status:<10}")
    sys.stderr.flush()


def replay_remote(url: str, token: str, session_id: str) -> dict[str, Any]:
    """The server's replay of ``session_id``, followed line by line."""
    request = urllib.request.Request(f"{url}/v1/sessions/{session_id}/replay", data=b"{}", method="POST")
    request.add_header("Authorization", f"token {token}")
    request.add_header("Accept", "application/x-ndjson")
    request.add_header("Content-Type", "application/json")
    try:
        response = urllib.request.urlopen(request, timeout=3600)
    except urllib.error.HTTPError as exc:
        raise CallError(f"POST /v1/sessions/{session_id}/replay answered {exc.code}: "
                        f"{exc.read().decode(errors='replace')[:300]}") from None
    report: dict[str, Any] = {}
    with response:
        for raw in response:
            line = json.loads(raw)
            if line["type"] == "step":
                progress_bar(line["done"], line["total"], line["status"])
            elif line["type"] == "done":
                report = line["report"]
    sys.stderr.write("\n")
    return report


def replay_notebook(url: str, token: str, path: Path) -> dict[str, Any]:
    """Replay an exported trajectory notebook in a new session. It is read with nbformat: an
    older notebook format is upgraded to v4, and one that is not a valid notebook is refused
    (``ValueError``) before anything is created."""
    from gateway.notebook import read_file

    notebook = json.loads(json.dumps(read_file(path)))  # plain data, with multi-line strings whole
    meta = notebook.get("metadata", {}).get("gateway", {})
    kernel = notebook.get("metadata", {}).get("kernelspec", {}).get("name", "python3")
    session = call("POST", f"{url}/v1/sessions", token, {"kernel": kernel, "labels": {
        "replay_of": str(meta.get("session_id", path.name))}})
    sid = session["id"]
    cells = notebook.get("cells", [])
    total = sum(1 for c in cells if "step" in c.get("metadata", {}).get("gateway", {}))
    verdicts: list[dict[str, Any]] = []
    for cell in cells:
        gateway = cell.get("metadata", {}).get("gateway", {})
        source = "".join(cell["source"]) if isinstance(cell.get("source"), list) else cell.get("source", "")
        if gateway.get("event") == "kernel_restarted":
            call("POST", f"{url}/v1/sessions/{sid}/restart", token, {})
        elif cell.get("cell_type") == "code" and gateway.get("event"):
            call("POST", f"{url}/v1/sessions/{sid}/execute", token, {"code": source})
        elif cell.get("cell_type") == "code" and "step" in gateway:
            if gateway.get("status") in SKIPPED_STATUSES:
                verdict = {"step": gateway["step"], "code": source, "status": "skipped",
                           "detail": f"the recorded step ended '{gateway['status']}'"}
            else:
                request: dict[str, Any] = {"code": source}
                if gateway.get("stdin"):  # answered again with what was typed (a password with "")
                    request["stdin"] = [str(exchange.get("value") or "") for exchange in gateway["stdin"]]
                replayed = call("POST", f"{url}/v1/sessions/{sid}/execute", token, request)
                recorded = {"step": gateway["step"], "code": source, "status": gateway.get("status", "ok"),
                            "outputs": json.dumps(cell.get("outputs", [])),
                            "stdin": json.dumps(gateway["stdin"]) if gateway.get("stdin") else None}
                verdict = judge(recorded, replayed, NORMALISERS)
            verdicts.append(verdict)
            progress_bar(len(verdicts), total, verdict["status"])
    sys.stderr.write("\n")
    summary = {status: sum(v["status"] == status for v in verdicts)
               for status in ("reproduced", "different", "error", "skipped")}
    different = environment_note(meta.get("environment"), session.get("environment"))
    return {"session_id": sid, "source": str(path), "steps": verdicts, "summary": summary,
            "notes": [different] if different else [],
            "reproduced": summary["different"] == 0 and summary["error"] == 0}


def print_report(report: dict[str, Any]) -> None:
    for verdict in report["steps"]:
        print(f"step {verdict['step']:>4}  {verdict['status']:<10}  {verdict['code'].splitlines()[0][:60] if verdict['code'] else ''}")
        if verdict.get("diff"):
            print("\n".join("            " + line for line in verdict["diff"].splitlines()))
        if verdict.get("detail"):
            print(f"            {verdict['detail']}")
    for note in report.get("notes", []):
        print(f"note: {note}")
    summary = report["summary"]
    print(f"replay session {report['session_id']}: {summary['reproduced']} reproduced, {summary['different']} "
          f"different, {summary['error']} error, {summary['skipped']} skipped")
