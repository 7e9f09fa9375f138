"""Rollout inspection: pass@k by hand, and the committed notebook against its builder. (The shared readers on a real
run, `grpo inspect`, and the notebook executed with a real kernel: tests/integration/test_inspect.py.)"""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest

from grpo.commands.view import pass_at_k, pass_at_k_table
from tests.helpers import ROOT


@pytest.mark.unit
def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert pass_at_k(3, 0, 2) == 0.0
    assert pass_at_k(3, 2, 2) == 1.0
    evals = pd.DataFrame({"step": [0] * 6, "prompt_id": ["a"] * 3 + ["b"] * 3,
                          "correct": [True, False, False, True, True, True]})
    t = pass_at_k_table(evals)
    assert t[t["k"] == 1]["pass@k"].item() == pytest.approx((1 / 3 + 1) / 2)
    assert t[t["k"] == 3]["pass@k"].item() == pytest.approx(1.0)


@pytest.mark.unit
def test_committed_notebook_matches_its_builder():
    import nbformat

    sys.path.insert(0, str(ROOT / "notebooks"))
    try:
        from build_notebook import build
    finally:
        sys.path.pop(0)
    committed = nbformat.read(ROOT / "notebooks" / "inspect_rollouts.ipynb", as_version=4)
    assert [c.source for c in committed.cells] == [c.source for c in build().cells]
    json.dumps(committed)
