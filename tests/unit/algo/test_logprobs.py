"""Chunked, prefix-shared and packed logprobs against the plain padded computation, values and gradients.

Tolerance: atol 1e-5 on fp32 values from models of hidden size 32, 2 layers and a vocabulary of 97 (the head test:
hidden 8, 11 outputs, against float64). Layouts differ only in the order and blocking of fp32 sums of at most 97
terms, so values of magnitude about 5 differ by about sqrt(97) * 6e-8 * 5, 3e-6 at the very most, on AVX2 and
AVX-512 kernels alike (scripts/test.sh runs these again held to AVX2); a wrong mask or offset moves a value by
O(1)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grpo.algo.logprobs import Sequence, build_micro_batch, completion_logprobs, head_logprobs, reference_logprobs

pytestmark = [pytest.mark.unit, pytest.mark.numerics]


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


@pytest.mark.parametrize("layout", ["prefix", "padded", "packed", "prefix-expanded-kv"])
def test_gradients_match_reference(model, layout, monkeypatch):
    if layout == "prefix-expanded-kv":  # the CUDA way of grouped-query attention, here on CPU
        from grpo.algo import prefix_attention
        monkeypatch.setattr(prefix_attention, "native_gqa", lambda device: False)
        layout = "prefix"
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
    assert mb.prefix.p_idx.shape[0] == 2 and mb.prefix.c_idx.shape[0] == 10
    prompt_tokens = len(seqs[0].prompt_ids) + len(seqs[5].prompt_ids)
    assert mb.input_ids.shape == (1, prompt_tokens + sum(len(s.completion_ids) for s in seqs))


def test_prefix_layout_by_hand():
    """Prompts of 2 and 1 tokens; completions of 2, 1 (prompt 0) and 3 (prompt 1) tokens. Flat stream:
    p0 p0 | p1 | c0 c0 | c1 | c2 c2 c2, at flat positions 0 1 | 2 | 3 4 | 5 | 6 7 8."""
    from grpo.algo.prefix_attention import build_layout

    lay, pos, pred = build_layout([2, 1], [0, 0, 1], [2, 1, 3])
    assert pos.tolist() == [[0, 1, 0, 2, 3, 2, 1, 2, 3]]
    # each completion's first token is predicted by its prompt's last position, the rest by their predecessor
    assert pred.tolist() == [1, 3, 1, 2, 6, 7]
    assert lay.p_idx.tolist() == [[0, 1], [2, 0]]
    assert lay.c_idx.tolist() == [[3, 4, 0], [5, 0, 0], [6, 7, 8]]
    assert lay.kv_idx[2].tolist() == [2, 0, 6, 7, 8]
    # completion 2 (prompt of 1 token): query i sees prompt key 0 and own keys 0..i
    assert lay.c_mask[2, 0].int().tolist() == [[1, 0, 1, 0, 0], [1, 0, 1, 1, 0], [1, 0, 1, 1, 1]]
    assert lay.c_mask[0, 0, 1].int().tolist() == [1, 1, 1, 1, 0]
    # outputs: prompt rows [2 x 2] then completion rows [3 x 3], in flat order
    assert lay.out_idx.tolist() == [0, 1, 2, 4, 5, 7, 10, 11, 12]


def test_prefix_layout_with_gradient_checkpointing(model):
    """The recomputation in backward sees the same structure (the layout travels with the checkpointed call)."""
    seqs = groups(seed=5)
    weights = torch.linspace(-1, 1, sum(len(s.completion_ids) for s in seqs))
    model.zero_grad()
    ref_lp = torch.cat(reference_logprobs(model, seqs))
    (ref_lp * weights).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        mb = build_micro_batch(seqs, 0, "prefix")
        lp, _ = completion_logprobs(model, mb, 1.0, chunk_size=5)
        assert mb.prefix.calls == 2  # one per layer
        (lp * weights).sum().backward()
        assert mb.prefix.calls == 4  # and again in the recomputation
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    assert torch.allclose(lp, ref_lp, atol=1e-5)
    for r, p in zip(ref, model.parameters(), strict=False):
        assert torch.allclose(p.grad, r, atol=1e-5)


def test_prefix_layout_on_qwen2_with_scattered_groups():
    """The Qwen2 family (every GPU recipe), a group split around another prompt, one-token prompts and
    completions; and other forwards (generation's) are unchanged by the installed wrapper."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128)
    qwen = Qwen2ForCausalLM(cfg).eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    before = qwen(input_ids=ids).logits
    a, b = [3, 4, 5], [9]
    seqs = [Sequence(a, [7, 8]), Sequence(b, [4]), Sequence(a, [11]), Sequence(b, [12, 13, 14, 15])]
    ref = torch.cat(reference_logprobs(qwen, seqs))
    lp, _ = completion_logprobs(qwen, build_micro_batch(seqs, 0, "prefix"), 1.0)
    assert torch.allclose(lp, ref, atol=1e-5)
    assert torch.equal(qwen(input_ids=ids).logits, before)


def test_prefix_layout_refuses_eager_attention():
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    eager = LlamaForCausalLM._from_config(cfg, attn_implementation="eager")
    with pytest.raises(ValueError, match="optim.layout=prefix needs model.attn_implementation"):
        completion_logprobs(eager, build_micro_batch(groups(), 0, "prefix"))


def test_entropies_match_full_softmax(model):
    seqs = groups(seed=6)
    ref = []
    for s in seqs:
        logits = model(input_ids=torch.tensor([s.prompt_ids + s.completion_ids])).logits[0].float() / 0.7
        p = len(s.prompt_ids)
        dist = torch.distributions.Categorical(logits=logits[p - 1 : -1])
        ref.append(dist.entropy())
    with torch.enable_grad():  # the differentiable path
        _, ent = completion_logprobs(model, build_micro_batch(seqs, 0, "prefix"), 0.7, chunk_size=4)
    assert torch.allclose(ent, torch.cat(ref).detach(), atol=1e-5)


def test_prefix_layout_with_an_empty_completion(model):
    seqs = [Sequence([5, 6, 7], [8, 9]), Sequence([5, 6, 7], []), Sequence([5, 6, 7], [10])]
    lp, _ = completion_logprobs(model, build_micro_batch(seqs, 0, "prefix"))
    assert torch.allclose(lp, torch.cat(reference_logprobs(model, [seqs[0], seqs[2]])), atol=1e-5)


@pytest.mark.parametrize("frozen", [False, True])
def test_head_with_bias_against_autograd_of_full_logits(frozen):
    """The hand-written backward of the chunked projection against autograd through full fp64 logits: hidden, weight
    and bias gradients at temperature 0.7 with 5 chunks of 3 (the last one short), and none for a frozen head."""
    torch.manual_seed(3)
    head = torch.nn.Linear(8, 11, bias=True)
    head.weight.requires_grad_(not frozen)
    head.bias.requires_grad_(not frozen)
    hidden = torch.randn(13, 8, requires_grad=True)
    targets = torch.randint(0, 11, (13,))
    g = torch.randn(13)
    calls = []
    head.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    lp, ent = head_logprobs(head, hidden, targets, temperature=0.7, chunk_size=3)
    (lp * g).sum().backward()
    assert calls == [(13, 8)]  # the module is entered once, whatever the number of chunks
    assert "forward" not in head.__dict__  # the swap is undone
    h64 = hidden.detach().double().requires_grad_()
    w64 = head.weight.detach().double().requires_grad_()
    b64 = head.bias.detach().double().requires_grad_()
    logp = torch.log_softmax((h64 @ w64.T + b64) / 0.7, dim=-1)
    ref = logp.gather(-1, targets[:, None]).squeeze(-1)
    (ref * g.double()).sum().backward()
    assert torch.allclose(lp.double(), ref.detach(), atol=1e-5)
    assert torch.allclose(ent.double(), -(logp.exp() * logp).sum(-1).detach(), atol=1e-5)
    assert torch.allclose(hidden.grad.double(), h64.grad, atol=1e-5)
    if frozen:
        assert head.weight.grad is None and head.bias.grad is None
    else:
        assert torch.allclose(head.weight.grad.double(), w64.grad, atol=1e-5)
        assert torch.allclose(head.bias.grad.double(), b64.grad, atol=1e-5)


def test_head_that_is_not_linear_is_refused():
    with pytest.raises(TypeError, match="not a torch.nn.Linear"):
        head_logprobs(torch.nn.Embedding(5, 4), torch.randn(2, 4), torch.tensor([0, 1]))


def test_prefix_attention_has_its_own_name(model, tmp_path):
    """The prefix layout switches its model to `grpo_prefix_sdpa`; transformers' `sdpa` entry and other models stay
    as they were, and a saved model does not carry the name (a plain transformers load must not need us)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    other = LlamaForCausalLM(model.config.__class__(**{**model.config.to_dict(), "_attn_implementation": "sdpa"}))
    completion_logprobs(model, build_micro_batch(groups(), 0, "prefix"), 1.0)
    assert model.config._attn_implementation == "grpo_prefix_sdpa"
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa and other.config._attn_implementation == "sdpa"
    model.save_pretrained(tmp_path)
    assert "grpo_prefix" not in (tmp_path / "config.json").read_text()


def test_prefix_attention_wraps_flash_in_place(monkeypatch):
    """Flash attention is recognised by its name and reads the configured name back (its lazy kernel import), so a
    renamed entry could not hand calls on to it: under flash the wrapper goes in front of transformers' own entry,
    and a forward without a layout still reaches the original function."""
    import types

    from transformers import AttentionInterface

    from grpo.algo import prefix_attention
    calls = []
    original = lambda module, q, k, v, mask, **kw: calls.append("flash") or ("out", None)  # noqa: E731
    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", original)
    fake = types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="flash_attention_2"),
                                 set_attn_implementation=lambda name: pytest.fail("flash must not be renamed"))
    prefix_attention.enable(fake)
    prefix_attention.enable(fake)  # idempotent: wrapped once
    wrapped = AttentionInterface._global_mapping["flash_attention_2"]
    assert wrapped.grpo_prefix_base is original
    module = types.SimpleNamespace(training=False)
    assert wrapped(module, 1, 2, 3, None) == ("out", None) and calls == ["flash"]


def _masked(seqs: list[Sequence], seed: int = 5) -> list[Sequence]:
    """The same sequences with tool spans: in every completion of 3+ tokens, a run of tokens in the middle (and in
    one completion its first token) marked as appended, not sampled."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, s in enumerate(seqs):
        n = len(s.completion_ids)
        mask = [1] * n
        if n >= 3:
            start = int(torch.randint(1, n - 1, (1,), generator=g))
            for j in range(start, min(n - 1, start + 1 + i % 3)):
                mask[j] = 0
        if i == 1:
            mask[0] = 0  # a completion that opens on appended tokens
        out.append(Sequence(s.prompt_ids, s.completion_ids, mask))
    return out


@pytest.mark.parametrize("layout", ["prefix", "padded", "packed"])
def test_masked_tokens_are_context_but_never_predicted(model, layout):
    """Tool spans (mask 0): the logprobs and entropies are those of the sampled tokens only, in order, equal to the
    full computation at those positions; the gradient equals the full computation's with the appended tokens'
    terms left out (so no gradient flows through an appended token's logit); lengths count sampled tokens."""
    seqs = _masked(groups(seed=4))
    keep = torch.tensor([m for s in seqs for m in s.mask], dtype=torch.bool)
    assert 0 < int(keep.sum()) < len(keep)
    weights = torch.linspace(-1, 1, len(keep))
    model.zero_grad()
    full = torch.cat(reference_logprobs(model, seqs, temperature=0.7))
    (full * weights * keep).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    mb = build_micro_batch(seqs, 0, layout)
    lp, ent = completion_logprobs(model, mb, 0.7, chunk_size=3)
    assert lp.shape == (int(keep.sum()),) and ent.shape == lp.shape
    assert torch.allclose(lp, full[keep], atol=1e-5)
    (lp * weights[keep]).sum().backward()
    for r, p in zip(ref, model.parameters(), strict=False):
        assert torch.allclose(p.grad, r, atol=1e-5), layout
    per_seq = [sum(s.mask) for s in seqs]
    assert mb.seq_len.tolist() == [per_seq[i] for i in mb.seq_index.tolist()]
    assert mb.targets.tolist() == [t for s in seqs for t, m in zip(s.completion_ids, s.mask, strict=True) if m]


def test_a_mask_that_does_not_cover_its_completion_is_refused():
    with pytest.raises(ValueError, match="masks cover 2 tokens, the completions hold 3"):
        build_micro_batch([Sequence([1, 2], [3, 4, 5], [1, 0])], 0, "packed")
