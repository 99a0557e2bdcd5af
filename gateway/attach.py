"""Open an agent's live session in JupyterLab: the ``agent-gateway attach`` command.

JupyterLab in gateway mode lists only kernels it started or adopted. This puts the session's
trajectory notebook on the Jupyter server (``agent-sessions/<id>.ipynb``) and adopts the
session's kernel for it, so a person opens the notebook of what the agent did, attached to the
agent's live kernel. Plain HTTP with the standard library: it runs wherever the CLI runs.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

FOLDER = "agent-sessions"


class AttachError(Exception):
    """A step of attaching failed; the message says which and why."""


def _call(method: str, url: str, token: str | None, body: Any = None, scheme: str = "token") -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"{scheme} {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise AttachError(f"{method} {url.split('?')[0]} answered {exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise AttachError(f"{method} {url.split('?')[0]} failed: {exc.reason}") from None
    return json.loads(raw) if raw else None


def attach(gateway_url: str, token: str, session_id: str, jupyter_url: str, jupyter_token: str | None) -> str:
    """Adopt ``session_id``'s kernel on the Jupyter server; returns the notebook's URL there."""
    gateway_url, jupyter_url = gateway_url.rstrip("/"), jupyter_url.rstrip("/")
    session = _call("GET", f"{gateway_url}/v1/sessions/{urllib.parse.quote(session_id)}", token)
    if session["state"] in ("terminated", "failed", "paused"):
        raise AttachError(f"Session {session_id} is {session['state']}; only a live session can be attached.")
    notebook = _call("GET", f"{gateway_url}/v1/sessions/{urllib.parse.quote(session_id)}/notebook", token)
    path = f"{FOLDER}/{session_id}.ipynb"
    try:
        _call("PUT", f"{jupyter_url}/api/contents/{FOLDER}", jupyter_token, {"type": "directory"})
    except AttachError:
        pass  # it may exist already; the next call says if the server is unusable
    _call("PUT", f"{jupyter_url}/api/contents/{path}", jupyter_token,
          {"type": "notebook", "format": "json", "content": notebook})
    _call("POST", f"{jupyter_url}/api/sessions", jupyter_token,
          {"path": path, "name": f"{session_id}.ipynb", "type": "notebook", "kernel": {"id": session["kernel_id"]}})
    return f"{jupyter_url}/lab/tree/{path}"
