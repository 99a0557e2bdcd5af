"""Renders a session's trajectory (steps and events from the store) as an nbformat v4 notebook.

The notebook is a view: SQLite is the source of truth. Cells are assembled as JSON text from
the stored columns, so rendering does not parse every recorded output again. Steps that did
not run to their end (or did not run) are tagged ``skip-execution`` and failed ones
``raises-exception``, so the notebook runs top to bottom with nbclient. File uploads small
enough to inline become code cells that recreate the file; restarts and kernel deaths become
markdown cells.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from gateway.outcomes import NOT_RUN, RUNNING, UNFINISHED_STATUSES
from gateway.records import SessionRecord

INLINE_UPLOAD_LIMIT = 256 * 1024
NBFORMAT, NBFORMAT_MINOR = 4, 5
NOTEBOOK_FILE = "trajectory.ipynb"


def step_tags(status: str) -> list[str]:
    if status in UNFINISHED_STATUSES or status == RUNNING:
        return ["skip-execution", "raises-exception"]
    if status == NOT_RUN:
        return ["skip-execution"]
    if status == "error":
        return ["raises-exception"]
    return []


@dataclass(frozen=True)
class Inherited:
    """An ancestor's trajectory up to the point where its descendant was forked from it."""

    session_id: str
    step: int | None
    timeline: list[tuple[str, Any]]


def step_cell_json(row: Any, inherited_from: str | None = None, after_skipped: Any = None) -> str:
    """One code cell, as JSON text, from a ``steps`` row (of an ancestor, for a fork's notebook).
    ``after_skipped`` is the last step of the same kernel that is not re-run (it timed out, was
    interrupted, ...): what it did before it stopped is missing from a re-run, so this cell may
    fail there; it is marked so (``raises-exception``, ``gateway.rerun``) and a re-run goes on."""
    gateway = {
        "step": row["step"], "status": row["status"], "started_at": row["started_at"],
        "finished_at": row["finished_at"], "duration_ms": row["duration_ms"], "source": row["source"],
        "principal": row["principal"],
    }
    if inherited_from is not None:
        gateway["inherited_from"] = inherited_from
    if row["truncated"]:
        gateway["truncated"] = True
    for name in ("user_expressions", "stdin"):
        if row[name]:
            gateway[name] = json.loads(row[name])
    metadata: dict[str, Any] = {"gateway": gateway}
    tags = step_tags(row["status"])
    if after_skipped is not None and "skip-execution" not in tags:
        gateway["rerun"] = (f"runs after step {after_skipped['step']}, which is not re-run (it ended "
                            f"'{after_skipped['status']}'): what that step did is missing, so this cell may fail "
                            "or differ when the notebook is re-run")
        if "raises-exception" not in tags:
            tags = [*tags, "raises-exception"]
    if tags:
        metadata["tags"] = tags
    count = "null" if row["execution_count"] is None else str(int(row["execution_count"]))
    cell_id = f"step-{row['step']}" if inherited_from is None else f"{inherited_from}-step-{row['step']}"
    return ('{"cell_type": "code", "execution_count": %s, "id": %s, "metadata": %s, '
            '"outputs": %s, "source": %s}' % (count, json.dumps(cell_id[:64]), json.dumps(metadata), row["outputs"],
                                               json.dumps(row["code"])))


def event_cell(row: Any) -> dict[str, Any] | None:
    """A cell for an event that changes what re-running needs (files, restarts), else None."""
    details = json.loads(row["details"] or "{}")
    action = row["action"]
    meta = {"gateway": {"event": action, "at": row["at"], "principal": row["principal"], **{
        k: v for k, v in details.items() if k != "content_b64"}}}
    cell_id = f"event-{row['seq']}"
    if action == "file_upload":
        path = details["path"]
        if "content_b64" in details:
            source = (
                f"# Recorded by the gateway: {row['principal']} uploaded {path!r} ({details['size']} bytes).\n"
                "import base64 as _b64, pathlib as _pl\n"
                f"_p = _pl.Path({path!r}); _p.parent.mkdir(parents=True, exist_ok=True)\n"
                f"_p.write_bytes(_b64.b64decode({details['content_b64']!r}))\n"
                "del _b64, _pl, _p"
            )
            return _code_event(cell_id, source, meta)
        return _markdown(cell_id, f"**File uploaded** by {row['principal']}: `{path}` ({details['size']} bytes, "
                                  f"sha256 `{details.get('sha256', '')}`). Too large to inline here.", meta)
    if action == "file_delete":
        path = details["path"]
        if details.get("kind") == "directory":
            source = f"# Recorded by the gateway: {row['principal']} deleted the directory {path!r}.\nimport shutil as _sh\n_sh.rmtree({path!r}, ignore_errors=True)\ndel _sh"
        else:
            source = f"# Recorded by the gateway: {row['principal']} deleted {path!r}.\nimport pathlib as _pl\n_pl.Path({path!r}).unlink(missing_ok=True)\ndel _pl"
        return _code_event(cell_id, source, meta)
    if action == "kernel_restarted":
        why = details.get("reason", "restart requested")
        return _markdown(cell_id, f"**Kernel restarted** ({why}): variables and imports defined above are gone; "
                                  "files in the workspace are kept.", meta)
    if action == "kernel_died":
        return _markdown(cell_id, f"**Kernel died**: {details.get('message', '')}", meta)
    return None


def _code_event(cell_id: str, source: str, meta: dict[str, Any]) -> dict[str, Any]:
    return {"cell_type": "code", "execution_count": None, "id": cell_id,
            "metadata": {**meta, "tags": ["gateway-event"]}, "outputs": [], "source": source}


def _markdown(cell_id: str, text: str, meta: dict[str, Any]) -> dict[str, Any]:
    return {"cell_type": "markdown", "id": cell_id, "metadata": meta, "source": text}


def render(session: SessionRecord, display_name: str, timeline: Iterable[tuple[str, Any]],
           inherited: Iterable[Inherited] = ()) -> str:
    """The whole notebook as JSON text (``application/x-ipynb+json``). A fork's notebook starts
    with its ancestors' cells up to each fork point (``inherited``, oldest first), each marked
    with ``gateway.inherited_from``, then a cell saying where the session itself begins."""
    parent = None
    if session.parent_session_id:
        parent = {"session_id": session.parent_session_id, "step": session.parent_step}
    metadata = {
        "kernelspec": {"name": session.kernel, "display_name": display_name,
                       "language": (session.language_info or {}).get("name", "python")},
        "language_info": session.language_info or {"name": "python"},
        "gateway": {"session_id": session.id, "owner": session.owner, "kernel": session.kernel,
                    "created_at": session.created_at, "parent": parent,
                    **({"environment": session.environment} if session.environment else {})},
    }
    cells: list[str] = []
    ancestors = list(inherited)
    for ancestor in ancestors:
        cells.extend(_cells(ancestor.timeline, ancestor.session_id))
    if ancestors:
        origin = ancestors[-1]
        cells.append(json.dumps(_markdown("forked-here", (
            f"**Forked** from session `{origin.session_id}` after its step {origin.step}: the cells above are "
            "the trajectory it inherited (marked `inherited_from`), the cells below its own."),
            {"gateway": {"event": "session_forked", "parent": {"session_id": origin.session_id,
                                                               "step": origin.step}}})))
    cells.extend(_cells(timeline, None))
    return ('{"cells": [%s], "metadata": %s, "nbformat": %d, "nbformat_minor": %d}'
            % (",\n".join(cells), json.dumps(metadata), NBFORMAT, NBFORMAT_MINOR))


def _cells(timeline: Iterable[tuple[str, Any]], inherited_from: str | None) -> list[str]:
    cells: list[str] = []
    skipped = None  # the last step of the current kernel that a re-run skips
    for kind, row in timeline:
        if kind == "step":
            cells.append(step_cell_json(row, inherited_from, skipped))
            if "skip-execution" in step_tags(row["status"]) and row["status"] != NOT_RUN:
                skipped = row
            continue
        if row["action"] in ("kernel_restarted", "kernel_died"):
            skipped = None  # a fresh kernel: nothing of the skipped step is missing any more
        cell = event_cell(row)
        if cell is not None:
            if inherited_from is not None:
                cell["id"] = f"{inherited_from}-{cell['id']}"[:64]
                cell["metadata"]["gateway"]["inherited_from"] = inherited_from
            cells.append(json.dumps(cell))
    return cells


def upload_details(path: str, content: bytes | None, size: int, sha256: str) -> dict[str, Any]:
    """The details of a ``file_upload`` event; the bytes are kept only when small enough to inline."""
    details: dict[str, Any] = {"path": path, "size": size, "sha256": sha256}
    if content is not None and size <= INLINE_UPLOAD_LIMIT:
        details["content_b64"] = base64.b64encode(content).decode()
    return details


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so a reader never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".trajectory-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_file(path: Path) -> Any:
    """A notebook file read with nbformat (an older format upgraded to v4) and validated.
    Raises ``ValueError`` for anything that is not a valid notebook, whatever nbformat raised
    (a wrong type in a field makes its converters fail with ``TypeError``, for example), and
    ``OSError`` for a file that cannot be read."""
    import nbformat

    try:
        node = nbformat.read(str(path), as_version=4)
        nbformat.validate(node)
    except OSError:
        raise
    except Exception as exc:  # nbformat's readers and converters raise many kinds
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path} is not a valid notebook: {first}") from None
    return node
