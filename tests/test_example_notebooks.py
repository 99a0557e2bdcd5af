"""The example notebooks in notebooks/ run top to bottom against a real gateway, without errors."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import GatewayProcess

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_example_notebooks() -> None:
    assert NOTEBOOKS, "notebooks/ holds no .ipynb file"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_example_notebook_is_committed_clean(path: Path) -> None:
    """Examples are stored without outputs, so diffs stay readable and nothing stale is shown."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {index} of {path.name} has outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_example_notebook_runs(path: Path, gateway: GatewayProcess, monkeypatch: pytest.MonkeyPatch,
                               tmp_path: Path) -> None:
    # The notebook's kernel is started by nbclient from this process and inherits its environment.
    monkeypatch.setenv("AGENT_GATEWAY_URL", gateway.url)
    monkeypatch.setenv("AGENT_GATEWAY_TOKEN", gateway.token)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first cell that fails
    errors = [(index, output.get("ename"), output.get("evalue"))
              for index, cell in enumerate(nb.cells) if cell.cell_type == "code"
              for output in cell.outputs if output.output_type == "error"]
    assert errors == []
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code_cells), "a code cell was not executed"
