"""Open an agent's live session in JupyterLab: the ``agent-gateway attach`` command.

JupyterLab in gateway mode lists only kernels it started or adopted. This puts the session's
trajectory notebook on the Jupyter server (``agent-sessions/<id>.ipynb``) and adopts the
session's kernel for it, so a person opens the notebook of what the agent did, attached to the
agent's live kernel. Plain HTTP with the standard library: it runs wherever the CLI runs.
"""

from __future__ import annotations

import urllib.parse

from gateway.http_client import CallError as AttachError
from gateway.http_client import call as _call

FOLDER = "agent-sessions"


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
