"""The benchmark scripts' own arithmetic, by hand. (The scripts are smoke-run on tiny configurations in
tests/integration/test_benchmarks.py.)"""

from __future__ import annotations

import pytest


@pytest.mark.unit
def test_train_phase_model_flops_by_hand():
    """1 layer, hidden 2, 10 parameters; one prompt of 2 tokens with completions of 1 and 2 tokens, one
    micro-batch. TRL: 6*10*3 + 12*2*9/2 = 288 and 6*10*4 + 12*2*16/2 = 432. Ours: 6*10*(2+3) = 300 for the
    tokens, and 24 x (4/2 + (1*2 + 1/2) + (2*2 + 4/2)) = 252 for attention."""
    from benchmarks.train_phase import model_flops

    assert model_flops(10, 1, 2, 2, [1, 2], 2, 2) == {"trl": 720, "ours": 552}
    # micro-batches of 1: the prompt runs twice, 2 x (6*10*2 + 24*2) more than once
    assert model_flops(10, 1, 2, 2, [1, 2], 2, 1)["ours"] == 552 + 6 * 10 * 2 + 24 * 2
