"""``agent-gateway run NOTEBOOK.ipynb``: execute a notebook's code cells on a gateway session,
top to bottom, and write the executed notebook, as ``jupyter execute`` does with a local
kernel; each cell is a recorded step of the session.

As nbclient does, a cell tagged ``skip-execution`` is not run, and a failing cell stops the run
unless it is tagged ``raises-exception`` (or ``allow_errors``); the notebook is written up to
that cell either way.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nbformat
from nbformat import NotebookNode

from gateway.client import Execution, Gateway, Session
from gateway.notebook import read_file

SKIP_TAG = "skip-execution"
ERROR_TAG = "raises-exception"


@dataclass
class RunOutcome:
    """How a run went: the executed notebook, the session it ran in, and the first failing cell."""

    notebook: NotebookNode
    session_id: str
    executed: int
    failed: tuple[int, Execution] | None = None  # (cell index, its step)


def run(gateway: Gateway, path: Path, *, session_id: str | None = None, kernel: str | None = None,
        timeout: float | None = None, allow_errors: bool = False, keep: bool = False,
        on_cell: Callable[[int, int, Execution], None] | None = None) -> RunOutcome:
    """Run the notebook at ``path`` in session ``session_id`` (kept), or in a new session of its
    kernel (terminated afterwards unless ``keep``). Raises ``ValueError`` for a file that is not
    a valid notebook, and the client's ``GatewayError``s."""
    notebook = read_file(path)
    if session_id is not None:
        session = gateway.session(session_id)
        keep = True
    else:
        name = kernel or notebook.metadata.get("kernelspec", {}).get("name") or None
        session = gateway.create_session(kernel=name, labels={"notebook": path.name[:1024]})
    try:
        outcome = _execute(session, notebook, timeout, allow_errors, on_cell)
    finally:
        if not keep:
            session.terminate()
    notebook.metadata.setdefault("agent_gateway", {})["executed_in"] = session.id
    return outcome


def _execute(session: Session, notebook: NotebookNode, timeout: float | None, allow_errors: bool,
             on_cell: Callable[[int, int, Execution], None] | None) -> RunOutcome:
    code_cells = [i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"]
    outcome = RunOutcome(notebook, session.id, 0)
    for number, index in enumerate(code_cells, start=1):
        cell = notebook.cells[index]
        tags = set(cell.metadata.get("tags", []))
        if SKIP_TAG in tags or not cell.source.strip():
            continue
        step = session.run(cell.source, timeout=timeout)
        cell.outputs = [nbformat.from_dict(output) for output in step.raw["outputs"]]
        cell.execution_count = step.execution_count
        outcome.executed += 1
        if on_cell is not None:
            on_cell(number, len(code_cells), step)
        if not step.ok and not allow_errors and ERROR_TAG not in tags:
            outcome.failed = (index, step)
            break
    return outcome


def print_progress(number: int, total: int, step: Execution) -> None:
    """One line per executed cell on standard error."""
    sys.stderr.write(f"[{number}/{total}] step {step.step}: {step.status}\n")
    sys.stderr.flush()
