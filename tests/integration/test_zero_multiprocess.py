"""Real DeepSpeed ZeRO-2 and ZeRO-3 in two processes (gloo on CPU), through torchrun and the real CLI."""

from __future__ import annotations

import json
import socket
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import metrics, run_cli, tiny_overrides

pytestmark = pytest.mark.integration


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_zero(tmp_path, tiny_model_dir, stage):
    run = tmp_path / f"zero{stage}"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_port())]
    p = run_cli(tiny_overrides(tiny_model_dir, run, **{"deepspeed.zero_stage": stage, "eval.at_end": True}),
                launcher=launcher, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    m = metrics(run)
    assert [r["step"] for r in m] == [1, 2]
    assert m[0]["grad_norm"] > 0
    # rank 0 alone reports progress; rank 1 would only warn or err, prefixed with its rank
    assert len([ln for ln in p.stderr.splitlines() if " grpo: step 1/2 " in ln]) == 1, p.stderr[-3000:]
    assert not any("[rank 1] INFO" in ln for ln in p.stderr.splitlines())
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(run / "final" / "model.safetensors")
    if stage < 3:  # both ranks hold the same full weights at the end (checksums gathered from every rank)
        sums = json.loads((run / "final" / "ranks.json").read_text())["checksums"]
        assert len(sums) == 2 and sums[0] == pytest.approx(sums[1], rel=1e-9)
    else:  # the layer-by-layer export equals DeepSpeed's own offline consolidation of the last checkpoint's shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        shards = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints" / "step-000002"), tag="state")
        assert set(after) <= set(shards)  # (lm_head is tied to the embedding: saved once)
        assert all(torch.equal(shards[k], after[k]) for k in after)
    # the exported weights changed, are complete, and the model card and generation settings are there
    assert set(before) <= set(after)
    assert all(before[k].shape == after[k].shape for k in before)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert json.loads((run / "final" / "config.json").read_text())["use_cache"] is True
    card = (run / "final" / "README.md").read_text()
    assert "library_name: transformers" in card and f"zero_stage: {stage}" in card and '"step": 2' in card
    # both ranks' rollouts reached the record (1 prompt per rank x G = 4)
    import pandas as pd

    roll = pd.read_parquet(run / "rollouts" / "step-000001.parquet")
    assert len(roll) == 8 and roll["prompt_id"].nunique() == 2
    assert len(pd.read_parquet(run / "eval" / "step-000002.parquet")) == 8


@pytest.mark.slow
def test_zero3_generation_with_ranks_stopping_apart(tmp_path, tokenizer):
    """HF generation under ZeRO-3 on two ranks whose completions end at different steps (and one rank with no prompts
    at all): DeepSpeed's hooks used to gather every layer at every decode step, so the rank still decoding waited
    in a collective the other never joined (a hang, or a crash at its next collective)."""
    import os
    import subprocess

    from tests.helpers import ROOT, make_tiny_model

    # a model that (almost) never samples EOS, so each rank's completions run to its own limit: 2 and 24 tokens
    model_dir = make_tiny_model(tmp_path / "model", tokenizer, eos_likely=False)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(_port()), str(ROOT / "tests" / "zero3_generate_worker.py"), str(model_dir),
                        str(ROOT / "recipes" / "smollm2-135m-arith.yaml")],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "rank 0 lengths [2, 2]" in p.stdout and "rank 1 lengths [24, 24]" in p.stdout
    assert "rank 0 trained, ranks 2" in p.stdout and "rank 1 trained, ranks 2" in p.stdout


@pytest.mark.slow
def test_zero3_logprobs_with_uneven_chunks(tiny_model_dir):
    """ZeRO-3 on two ranks whose micro-batches hold 3 and 59 completion tokens, 4-token vocabulary chunks: the head
    used to be called once per chunk (and again per chunk in the checkpointed backward), so the ranks issued 1 and
    15 gathers of its weight and waited in collectives the other never joined. Values and the global gradient norm
    are checked against the plain computation on an unsharded copy."""
    import os
    import subprocess

    from tests.helpers import ROOT

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(_port()), str(ROOT / "tests" / "zero3_head_worker.py"), str(tiny_model_dir),
                        str(ROOT / "recipes" / "smollm2-135m-arith.yaml")],
                       capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "rank 0 done, ranks 2" in p.stdout and "rank 1 done, ranks 2" in p.stdout
    assert "rank 0 grad norm" in p.stdout and "rank 1 grad norm" in p.stdout


@pytest.mark.slow
@pytest.mark.parametrize("reward", ["constant_on_even", "constant_reward"])
def test_dynamic_sampling_refills_on_two_ranks(tmp_path, tiny_model_dir, reward):
    """A reward constant on even answers (and, second case, everywhere): zero-variance groups are dropped and more
    prompts sampled, both ranks run the same rounds (or the collectives would hang), the data position advances by
    every round's prompts on both, and when the rounds run out the step is topped up with no-signal groups."""
    run = tmp_path / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_port())]
    p = run_cli(tiny_overrides(tiny_model_dir, run, **{
        "rewards": f"[{{name: 'tests.helpers:{reward}'}}]", "rollout.dynamic_sampling": True,
        "rollout.max_sampling_rounds": 3, "rollout.prompts_per_step": 4, "checkpoint.every": 1}),
        launcher=launcher, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    m = metrics(run)
    rounds = [r["rollout/rounds"] for r in m]
    import pandas as pd

    if reward == "constant_reward":  # no group ever has signal: every round runs, the step is all no-signal groups
        assert rounds == [3, 3] and all(r["groups/zero_variance_frac"] == 1.0 for r in m)
    else:
        assert max(rounds) > 1, rounds  # something was dropped and refilled
        for r in m:
            roll = pd.read_parquet(run / "rollouts" / f"step-{r['step']:06d}.parquet")
            assert roll["prompt_id"].nunique() == 4  # the step is full
            if r["rollout/rounds"] < 3:  # refilled in time: only groups with signal were kept
                assert r["groups/zero_variance_frac"] == 0.0
                assert all(int(a) % 2 == 1 for a in roll["answer"])
    done = sum(rounds) * 4  # every round draws prompts_per_step prompts from the shared permutation
    meta = json.loads((run / "checkpoints" / "step-000002" / "meta.json").read_text())["sampler"]
    assert meta["epoch"] * meta["size"] + meta["pos"] == done
