"""A minimal JSON HTTP client for the command line (standard library only)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class CallError(Exception):
    """A request failed; the message says which and why."""


def call(method: str, url: str, token: str | None, body: Any = None, scheme: str = "token") -> Any:
    """Send one JSON request and return the decoded JSON answer (None for an empty body)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"{scheme} {token}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise CallError(f"{method} {url.split('?')[0]} answered {exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise CallError(f"{method} {url.split('?')[0]} failed: {exc.reason}") from None
    return json.loads(raw) if raw else None
