"""HTML for the reviewer's pages: a recorded step's outputs, made safe to show.

Outputs come from code an agent ran, so nothing in them may run in the reviewer's page: text is
escaped, images become ``data:`` URIs (SVG too, which an ``<img>`` never runs), and HTML
outputs (pandas tables, rich reprs) are shown in an ``<iframe sandbox>`` without scripts.
Whatever a session stored, a page renders: characters that cannot be encoded (lone
surrogates) or that hide or reorder text (control characters, bidirectional overrides) are
shown as visible ``\\uXXXX`` escapes.
"""

from __future__ import annotations

import base64
import json
import re
from html import escape
from typing import Any

from gateway.outputs import strip_ansi

IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif")
# C0 and C1 controls but tab, newline and carriage return; bidirectional embeddings, overrides
# and isolates (the "Trojan Source" characters); lone surrogates.
UNSHOWABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
HTML_FRAME_MIN, HTML_FRAME_MAX, HTML_ROW_HEIGHT = 80, 600, 26


def shown(text: str) -> str:
    """``text`` with every ``UNSHOWABLE`` character written as a visible ``\\uXXXX`` escape."""
    return UNSHOWABLE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def shown_values(value: Any) -> Any:
    """``shown`` applied to every string (keys too) in nested dicts, lists and tuples."""
    if isinstance(value, str):
        return shown(value)
    if isinstance(value, dict):
        return {shown_values(key): shown_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(shown_values(item) for item in value)
    return value


def text_of(value: Any) -> str:
    """nbformat keeps multi-line strings either whole or as a list of lines."""
    if isinstance(value, list):
        return "".join(str(part) for part in value)
    return value if isinstance(value, str) else json.dumps(value)


def pre(text: str, css: str) -> str:
    return f'<pre class="{css}">{escape(text)}</pre>'


def html_frame(html: str) -> str:
    """An HTML output in a sandboxed frame: no scripts, no same-origin access, no navigation."""
    rows = len(re.findall(r"<(?:tr|p|div|li|br|h[1-6])[\s/>]", html, re.IGNORECASE))
    height = max(HTML_FRAME_MIN, min(HTML_FRAME_MAX, 40 + HTML_ROW_HEIGHT * rows))
    return (f'<iframe class="html-output" sandbox="" referrerpolicy="no-referrer" title="HTML output" '
            f'style="height:{height}px" srcdoc="{escape(html, quote=True)}"></iframe>')


def rich_output(data: dict[str, Any]) -> str:
    """The richest safe rendering of a display_data / execute_result bundle."""
    for kind in IMAGE_TYPES:
        if kind in data:
            payload = "".join(text_of(data[kind]).split())
            return f'<img class="image-output" alt="{kind} output" src="data:{kind};base64,{escape(payload)}">'
    if "image/svg+xml" in data:
        encoded = base64.b64encode(text_of(data["image/svg+xml"]).encode("utf-8")).decode("ascii")
        return f'<img class="image-output" alt="SVG output" src="data:image/svg+xml;base64,{encoded}">'
    if "text/html" in data:
        return html_frame(text_of(data["text/html"]))
    if "text/markdown" in data:
        return pre(text_of(data["text/markdown"]), "markdown-output")
    if "application/json" in data:
        return pre(json.dumps(data["application/json"], indent=2), "json-output")
    if "text/latex" in data:
        return pre(text_of(data["text/latex"]), "text-output")
    if "text/plain" in data:
        return pre(text_of(data["text/plain"]), "text-output")
    kinds = ", ".join(sorted(data)) or "nothing"
    return f'<p class="note">An output of type {escape(kinds)}, not shown here; download the notebook to see it.</p>'


def render_output(output: dict[str, Any]) -> str:
    kind = output.get("output_type")
    if kind == "stream":
        name = "stderr" if output.get("name") == "stderr" else "stdout"
        return pre(text_of(output.get("text", "")), f"stream {name}")
    if kind == "error":
        traceback = "\n".join(strip_ansi(str(line)) for line in output.get("traceback") or [])
        headline = f"{output.get('ename', 'Error')}: {output.get('evalue', '')}"
        return pre(traceback or headline, "error-output")
    if kind in ("display_data", "execute_result"):
        return rich_output(output.get("data") or {})
    return ""


def render_outputs(outputs_json: str | None) -> str:
    """All outputs of one step (the ``outputs`` column, nbformat JSON) as one HTML fragment."""
    try:
        outputs = json.loads(outputs_json or "[]")
    except ValueError:
        return '<p class="note">The outputs of this step could not be read.</p>'
    return shown("\n".join(render_output(output) for output in outputs if isinstance(output, dict)))
