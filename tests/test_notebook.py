"""The quickstart notebook runs top to bottom."""

from __future__ import annotations

import nbformat
from nbclient import NotebookClient

from tests.conftest import ROOT


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGMODEL_ROOT", str(tmp_path))  # logs go here, not into the repository
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(
        o.output_type == "display_data" and "image/png" in o.get("data", {}) for o in outputs
    )
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "best val/loss" in text and "The " in text
    assert list((tmp_path / "logs" / "notebook" / "runs").glob("*/checkpoints/last.ckpt"))
