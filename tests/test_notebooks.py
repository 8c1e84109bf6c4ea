"""Every notebook under notebooks/ runs from top to bottom without an error, and none is
committed with outputs (so the repository never carries results older than the code).

Each runs with nbclient in the python3 kernel, in a temporary working directory (the
notebooks write only there), offline. The notebooks check their own results with assert
(finite-difference errors, the float32 merge bounds, the loss falling), so a wrong number
fails here as an error of the cell that asserts it."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 120  # one cell; the slowest (two 200-step training runs) takes about 4 s on 2 cores


def test_there_are_the_four_notebooks():
    assert [p.name for p in NOTEBOOKS][:4] == ["01_layernorm.ipynb", "02_attention.ipynb",
                                               "03_tiny_lora_training.ipynb", "04_lora_merge.ipynb"]


def cells_with_outputs(notebook):
    """The indices of the code cells that carry outputs or an execution count."""
    return [i for i, cell in enumerate(notebook.cells)
            if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    stale = cells_with_outputs(nbformat.read(path, as_version=4))
    assert not stale, f"{path.name}: cells {stale} carry outputs; clear them (see notebooks/README.md)"


def test_an_executed_notebook_is_caught(tmp_path):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# a"),
                                               nbformat.v4.new_code_cell("1 + 1")])
    assert cells_with_outputs(notebook) == []
    run_notebook(notebook, tmp_path)
    assert cells_with_outputs(notebook) == [1]


def run_notebook(notebook, folder):
    """Execute notebook in place, in folder; nbclient raises CellExecutionError on the first error."""
    NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                   resources={"metadata": {"path": str(folder)}}).execute()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_without_error(path, tmp_path, monkeypatch):
    monkeypatch.setenv("MINILORA_OFFLINE", "1")  # a notebook never downloads
    monkeypatch.setenv("MPLBACKEND", "Agg")  # headless, should a notebook not select the inline backend
    notebook = nbformat.read(path, as_version=4)
    run_notebook(notebook, tmp_path)
    assert sum(1 for cell in notebook.cells if cell.cell_type == "code" and cell.outputs) >= 3  # it did run


def test_a_failing_assert_in_a_notebook_fails_the_run(tmp_path):
    """The notebooks check themselves with assert; this proves such a failure is not swallowed."""
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import minilora"),
                                               nbformat.v4.new_code_cell("assert 1e-1 < 1e-7, 'broken backward'")])
    with pytest.raises(CellExecutionError, match="broken backward"):
        run_notebook(notebook, tmp_path)
