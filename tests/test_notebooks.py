"""The notebooks run top to bottom (on the bundled corpus, in a fresh kernel)."""

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_the_three_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_signal_flow.ipynb", "03_finetune_with_trainer.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    book = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in book.cells if cell.cell_type == "code"), "store notebooks without outputs"
    started = time.time()
    NotebookClient(book, timeout=170, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    assert time.time() - started < 170
    text = "\n".join(
        output.get("text", "") for cell in book.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "Error" not in text
    plotting = [cell for cell in book.cells if cell.cell_type == "code" and "plot_" in cell.source and "import" not in cell.source]
    for cell in plotting:  # each plot shows inline (a backend switched to Agg would show none)
        assert any("image/png" in output.get("data", {}) for output in cell.outputs), f"no inline plot from:\n{cell.source}"
    assert bool(plotting) == (path.stem == "02_signal_flow"), "update the list of plotting notebooks"
    if path.stem == "03_finetune_with_trainer":
        assert "before: perplexity" in text and "after:  perplexity" in text
