"""Notebooks are committed stripped: no outputs, no execution counts, no widget state (run `make strip`)."""
import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
#: The walkthrough notebooks this project must ship (others, e.g. 04 and 06, are checked too when present).
EXPECTED = ["00_quickstart.ipynb", "01_lagkv_step_by_step.ipynb", "02_lrsa_mask.ipynb",
            "03_compressed_generation.ipynb", "04_finetune.ipynb", "05_explorer.ipynb", "06_performance.ipynb",
            "07_compressed_inference.ipynb"]


def all_notebooks() -> list[Path]:
    return sorted(p for p in NOTEBOOKS.glob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def test_expected_notebooks_exist():
    names = {p.name for p in all_notebooks()}
    missing = [n for n in EXPECTED if n not in names]
    assert not missing, f"missing notebooks: {missing}"


def stripping_problems(nb: dict) -> list[str]:
    """What a stripped notebook must not have; empty list = clean."""
    problems = []
    if "widgets" in nb.get("metadata", {}):
        problems.append("notebook metadata holds widget state ('widgets')")
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        if cell.get("outputs"):
            problems.append(f"cell {i} has outputs")
        if cell.get("execution_count") is not None:
            problems.append(f"cell {i} has execution_count {cell['execution_count']}")
        if any(k in cell.get("metadata", {}) for k in ("execution", "widgets", "collapsed", "scrolled")):
            problems.append(f"cell {i} metadata holds run state {sorted(cell['metadata'])}")
    return problems


@pytest.mark.parametrize("path", all_notebooks(), ids=lambda p: p.name)
def test_notebook_is_stripped(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb.get("cells"), f"{path.name} has no cells"
    problems = stripping_problems(nb)
    assert not problems, f"{path.name} is not stripped (run `make strip`): {problems}"


def test_the_check_catches_unstripped_notebooks():
    dirty = {"metadata": {"widgets": {"application/vnd.jupyter.widget-state+json": {}}},
             "cells": [{"cell_type": "code", "execution_count": 3, "metadata": {}, "source": "1",
                        "outputs": [{"output_type": "stream", "name": "stdout", "text": "1"}]}]}
    assert len(stripping_problems(dirty)) == 3
    clean = {"metadata": {}, "cells": [{"cell_type": "code", "execution_count": None, "metadata": {}, "source": "1",
                                        "outputs": []}]}
    assert stripping_problems(clean) == []
