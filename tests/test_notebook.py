"""notebooks/analysis.ipynb runs top to bottom against a real tiny sweep and shows the right numbers."""

import json
import os
import statistics

import nbformat
import pytest

from tests.conftest import ROOT, made_once
from tests.test_report import LOSSES, ROUNDS, SEEDS, build_sweep

nbclient = pytest.importorskip("nbclient")
NOTEBOOK = ROOT / "notebooks" / "analysis.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_notebook_runs_on_a_sweep(tmp_path_factory, monkeypatch):
    sweep = made_once(tmp_path_factory, "tiny_sweep", build_sweep)  # shared with test_report
    monkeypatch.setenv("SPINLAB_SWEEP_DIR", str(sweep))
    # The kernel is a fresh process: it finds spinlab through PYTHONPATH even without `pip install -e`.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    )
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Read back what the notebook computed: its last-round table.
    nb.cells.append(nbformat.v4.new_code_cell('print(last.to_json(orient="records"))'))
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the plot cell drew nothing"
    assert f"{len(LOSSES) * len(SEEDS)} runs" in "".join(o.get("text", "") for o in outputs)

    last = {row["loss_fn"]: row for row in json.loads(nb.cells[-1].outputs[0]["text"])}
    assert sorted(last) == sorted(LOSSES)
    for loss in LOSSES:
        accuracies = [
            json.loads((next(sweep.glob(f"*loss={loss},*seed={seed}")) / "summary.json").read_text())[-1][
                "accuracy"
            ]
            for seed in SEEDS
        ]
        assert last[loss]["round"] == ROUNDS - 1 and last[loss]["seeds"] == len(SEEDS)
        assert last[loss]["accuracy mean"] == pytest.approx(statistics.mean(accuracies))
        assert last[loss]["accuracy std"] == pytest.approx(statistics.stdev(accuracies))
