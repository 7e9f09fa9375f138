"""Chunked, prefix-shared and packed logprobs against the plain padded computation, values and gradients."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grpo.logprobs import Sequence, build_micro_batch, completion_logprobs, reference_logprobs


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def groups(seed=1, n_prompts=3, g=3):
    gen = torch.Generator().manual_seed(seed)

    def rnd(lo, hi):
        n = int(torch.randint(lo, hi, (1,), generator=gen))
        return torch.randint(3, 97, (n,), generator=gen).tolist()

    return [Sequence(p, rnd(1, 8)) for p in (rnd(2, 10) for _ in range(n_prompts)) for _ in range(g)]


@pytest.mark.parametrize("layout", ["prefix", "padded", "packed"])
@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_values_match_reference(model, layout, chunk):
    seqs = groups()
    ref = torch.cat(reference_logprobs(model, seqs, temperature=0.7))
    lp, ent = completion_logprobs(model, build_micro_batch(seqs, 0, layout), 0.7, chunk_size=chunk)
    assert lp.shape == ref.shape
    assert torch.allclose(lp, ref, atol=1e-5)
    assert (ent > 0).all()


@pytest.mark.parametrize("layout", ["prefix", "padded", "packed"])
def test_gradients_match_reference(model, layout):
    seqs = groups(seed=2)
    weights = torch.linspace(-1, 1, sum(len(s.completion_ids) for s in seqs))
    model.zero_grad()
    (torch.cat(reference_logprobs(model, seqs)) * weights).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    lp, _ = completion_logprobs(model, build_micro_batch(seqs, 0, layout), 1.0, chunk_size=3)
    (lp * weights).sum().backward()
    for r, p in zip(ref, model.parameters(), strict=False):
        assert torch.allclose(p.grad, r, atol=1e-5), layout
    assert sum(r.abs().sum() for r in ref) > 0


def test_micro_batches_sum_to_the_one_batch_gradient(model):
    """Splitting a step into micro-batches (groups cut in the middle) leaves the gradient unchanged."""
    seqs = groups(seed=3, n_prompts=2, g=4)
    weights = torch.rand(sum(len(s.completion_ids) for s in seqs))
    model.zero_grad()
    lp, _ = completion_logprobs(model, build_micro_batch(seqs, 0, "prefix"), 1.0)
    (lp * weights).sum().backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    off = 0
    for part in (seqs[:3], seqs[3:5], seqs[5:]):
        n = sum(len(s.completion_ids) for s in part)
        lp, _ = completion_logprobs(model, build_micro_batch(part, 0, "prefix"), 1.0)
        (lp * weights[off : off + n]).sum().backward()
        off += n
    for w, p in zip(whole, model.parameters(), strict=False):
        assert torch.allclose(p.grad, w, atol=1e-5)


def test_prefix_layout_runs_each_prompt_once(model):
    seqs = groups(seed=4, n_prompts=2, g=5)
    mb = build_micro_batch(seqs, 0, "prefix")
    assert mb.prompt_ids.shape[0] == 2
    assert mb.comp_ids.shape[0] == 10
