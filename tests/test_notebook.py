"""The walkthrough notebook runs top to bottom (small settings)."""

import json
from pathlib import Path

import pytest

NB = Path(__file__).parents[1] / "notebooks" / "walkthrough.ipynb"


def test_walkthrough_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    monkeypatch.setenv("SCHEDSEARCH_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("SCHEDSEARCH_NOTEBOOK_OUT", str(tmp_path / "run"))
    monkeypatch.setenv("SCHEDSEARCH_PRESETS", str(tmp_path / "presets"))
    monkeypatch.setenv("SCHEDSEARCH_CACHE", str(tmp_path / "cache"))
    nb = nbformat.read(NB, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "| best (trial" in text and "karras dpm++2m @20" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # schedules, FID by trial, the two sample grids
    assert (tmp_path / "run" / "mlflow.db").is_file()
    # the sample grid is labelled with the ★ row it shows (a baseline can be the recommendation)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    pick = [r["name"] for r in summary["rows"] if r.get("recommended")]
    assert len(pick) == 1 and f"★ {pick[0]} |" in text
