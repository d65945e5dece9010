"""colab_notebook.ipynb runs top to bottom on a CPU, as Colab runs it, with a few steps."""
import nbformat
from nbclient import NotebookClient

from conftest import REPO


def test_the_colab_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    """With the environment variables of its training cell: 30 steps on a small text."""
    monkeypatch.setenv("NOTEBOOK_MAX_ITERS", "30")            # the kernel inherits the environment
    monkeypatch.setenv("NOTEBOOK_NEW_TOKENS", "20")
    monkeypatch.setenv("NOTEBOOK_OUT_DIR", str(tmp_path / "out"))
    text_file = tmp_path / "text.txt"            # small, so that the final pass over validation is short
    text_file.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n"
                         "JULIET:\nWhat's in a name? That which we call a rose\n\n" * 100)
    monkeypatch.setenv("NOTEBOOK_DATA", str(text_file))
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    nb = nbformat.read(REPO / "colab_notebook.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()

    def text(cell):
        return "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/plain", ""))
                       for o in cell.get("outputs", []))
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "repository:" in text(code[0]) and "device: cpu" in text(code[2])
    assert "final_val_loss" in text(code[3]) and (tmp_path / "out" / "best.pt").exists()
    assert any("image/png" in o.get("data", {}) for o in code[4].outputs)        # the loss curves
    assert text(code[5]).startswith("ROMEO:")
    assert text(code[-1]).startswith("JULIET:")
    assert not any(o.output_type == "error" for c in code for o in c.outputs)
