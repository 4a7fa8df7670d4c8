"""The error-analysis notebooks run top to bottom (their last cell asserts their claims)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_exist() -> None:
    assert [p.stem for p in NOTEBOOKS] == [
        "01_ea_spectrum_decay",
        "02_randomized_error_vs_bounds",
        "03_brand_drift_and_control",
        "04_inverse_application_error",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs, path.name
            assert cell.execution_count is None, path.name
    assert nb.cells[1].metadata.get("tags") == ["parameters"], "first code cell holds SCALE"
    assert "all claims hold" in nb.cells[-1].source


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_its_claims_hold(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the traceback) if any cell fails
    elapsed = time.perf_counter() - start
    last = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    assert "all claims hold" in last
    figures = sum(
        1
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    )
    assert figures >= 2, f"{path.name}: {figures} figures"
    print(f"{path.stem}: {elapsed:.1f} s")
