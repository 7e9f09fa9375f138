import pytest
import torch

from grpo.algo.logprobs import Sequence, build_micro_batch, completion_logprobs
from grpo.rollout.base import SamplingParams
from grpo.rollout.hf import HFEngine, generation_config
from grpo.runtime.model import load_model

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tokenizer):
    model = load_model(str(tiny_model_dir), "float32")
    return HFEngine(model, tokenizer, batch_size=5)


def _prompts(tokenizer):
    texts = ["Calculate 1 + 2.", "What is seven times six? Think."]
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for t in texts]


def test_groups_shapes_and_finish_reasons(engine, tokenizer):
    torch.manual_seed(0)
    prompts = _prompts(tokenizer)
    out = engine.generate(prompts, 3, SamplingParams(max_new_tokens=7, temperature=1.0))
    assert len(out) == 2 and all(len(g) == 3 for g in out)
    for p, g in zip(prompts, out, strict=False):
        for c in g:
            assert c.prompt_ids == p
            assert len(c.logprobs) == len(c.ids) and 1 <= len(c.ids) <= 7
            if c.finish_reason == "length":
                assert len(c.ids) == 7 and tokenizer.eos_token_id not in c.ids
            else:
                assert c.ids[-1] in engine.eos_ids and c.ids.count(c.ids[-1]) == 1
            assert all(lp <= 0 for lp in c.logprobs)


@pytest.mark.numerics
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.9)])
def test_engine_logprobs_match_trainer(engine, tokenizer, temperature, top_p):
    """The engine's sampling logprobs are the trainer's logprobs at the same temperature (top-p renormalises,
    so there the engine's are >= the trainer's, equal where the nucleus kept everything)."""
    torch.manual_seed(1)
    out = engine.generate(_prompts(tokenizer), 4, SamplingParams(12, temperature, top_p))
    comps = [c for g in out for c in g]
    seqs = [Sequence(c.prompt_ids, c.ids) for c in comps]
    with torch.no_grad():
        lp, _ = completion_logprobs(engine.model, build_micro_batch(seqs, tokenizer.pad_token_id), temperature)
    eng = torch.tensor([x for c in comps for x in c.logprobs])
    if top_p == 1.0:
        assert torch.allclose(eng, lp, atol=1e-4)
    else:
        assert (eng >= lp - 1e-4).all()


def test_greedy_is_deterministic_and_batch_independent(tiny_model_dir, tokenizer):
    model = load_model(str(tiny_model_dir), "float32")
    prompts = _prompts(tokenizer)
    a = HFEngine(model, tokenizer, batch_size=1).generate(prompts, 1, SamplingParams(8, greedy=True))
    b = HFEngine(model, tokenizer, batch_size=8).generate(prompts, 1, SamplingParams(8, greedy=True))
    assert [g[0].ids for g in a] == [g[0].ids for g in b]


@pytest.mark.parametrize("greedy", [True, False])
def test_generation_config_is_valid_for_transformers(greedy):
    """transformers' strict validation finds nothing to warn about: an evaluation's greedy decoding once logged
    "generation flags are not valid: ['top_k']" at every call. Sampling keeps top_k=0 (the full distribution)."""
    cfg = generation_config(SamplingParams(8, greedy=greedy), [2], 0)
    cfg.validate(strict=True)
    assert cfg.do_sample is not greedy and (greedy or cfg.top_k == 0)


def test_shared_prompt_prefill_matches_separate_generation(tiny_model_dir, tokenizer):
    """Each distinct prompt is prefilled once and its cache fanned out to its copies (a batch boundary cuts a
    group here: batches of 5 over 2 x 3 copies); greedy results equal those of one-copy batches, where nothing is
    shared."""
    model = load_model(str(tiny_model_dir), "float32")
    prompts = _prompts(tokenizer)
    shared = HFEngine(model, tokenizer, batch_size=5)
    prefills = []
    inner = shared._shared_prefill
    shared._shared_prefill = lambda ids, mask: prefills.append(len(ids)) or inner(ids, mask)
    out = shared.generate(prompts, 3, SamplingParams(8, greedy=True))
    alone = HFEngine(model, tokenizer, batch_size=1).generate(prompts, 1, SamplingParams(8, greedy=True))
    assert prefills == [5, 1]
    for g, (a,) in zip(out, alone, strict=True):
        for c in g:
            assert c.ids == a.ids
            assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(a.logprobs), atol=1e-5)
    width = max(len(p) for p in prompts)
    ids = torch.full((3, width), tokenizer.pad_token_id)
    for i, p in enumerate([prompts[0], prompts[0], prompts[1]]):
        ids[i, width - len(p):] = torch.tensor(p)
    cache = shared._shared_prefill(ids, (ids != tokenizer.pad_token_id).long())
    assert cache.get_seq_length() == width - 1 and cache.layers[0].keys.shape[0] == 3
    assert torch.equal(cache.layers[0].keys[0], cache.layers[0].keys[1])


def test_samples_come_from_the_full_distribution(tiny_model_dir, tokenizer):
    """The HF engine samples from the whole softmax, the distribution whose logprobs it records and the trainer
    computes: one token from 600 samples of a prompt, against the model's own next-token probabilities. Passing
    top_k=None to transformers 5 meant its default top-k of 50: EOS (the likeliest token of the tiny model, p about
    0.3) was sampled every time and no token outside the top 50 ever was."""
    model = load_model(str(tiny_model_dir), "float32")
    eng = HFEngine(model, tokenizer, batch_size=600)
    prompt = _prompts(tokenizer)[0]
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].float(), -1)
    top50 = set(torch.topk(probs, 50).indices.tolist())
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    firsts = [c.ids[0] for c in eng.generate([prompt], 600, SamplingParams(max_new_tokens=1, temperature=1.0))[0]]
    n = len(firsts)
    for name, p, got in (("EOS", float(probs[eos]), sum(t == eos for t in firsts) / n),
                         ("outside the top 50", 1.0 - float(probs[list(top50)].sum()),
                          sum(t not in top50 for t in firsts) / n)):
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(got - p) < 5 * sigma + 1e-3, f"{name}: sampled {got:.3f}, model's probability {p:.3f}"


def _shortest_prefix_with(ids, tok, stop):
    """An independent route to the cut: the first prefix, token by token, whose text holds `stop`."""
    return next(k for k in range(1, len(ids) + 1) if stop in tok.decode(ids[:k], skip_special_tokens=False))


def test_cut_at_stop_keeps_the_token_that_completes_the_earliest_stop(tokenizer):
    from grpo.rollout.base import cut_at_stop

    text = "Let me compute <calc>17*23</calc> then <result>391</result> and more"
    ids = tokenizer.encode(text, add_special_tokens=False)
    cut, which = cut_at_stop(ids, tokenizer, ("</result>", "</calc>"))
    assert which == "</calc>" and len(cut) == _shortest_prefix_with(ids, tokenizer, "</calc>")
    assert tokenizer.decode(cut).endswith("</calc>") and cut == ids[: len(cut)]
    assert cut_at_stop(ids, tokenizer, ("</python>",)) == (ids, None)
    assert cut_at_stop(ids, tokenizer, ()) == (ids, None)


def test_hf_engine_ends_a_completion_on_a_stop_string(tiny_model_dir, tokenizer):
    """Sampled with a fixed seed, then again with a stop string taken from the first sample: the second ends on the
    token completing that string (the same tokens before it), with the string recorded and finish_reason stop."""
    model = load_model(str(tiny_model_dir), "float32")
    eng = HFEngine(model, tokenizer, batch_size=1)
    prompt = _prompts(tokenizer)[1]
    for seed in range(50):
        torch.manual_seed(seed)
        free = eng.generate([prompt], 1, SamplingParams(24, temperature=1.0))[0][0]
        words = [tokenizer.decode([t]) for t in free.ids[2:]]
        stop = next((w for w in words if w.strip().isalpha() and len(w.strip()) >= 3), None)
        if stop is not None:
            break
    assert stop is not None, "no sample of 24 tokens held a word token"
    torch.manual_seed(seed)
    c = eng.generate([prompt], 1, SamplingParams(24, temperature=1.0, stop=(stop,)))[0][0]
    assert c.stop_reason == stop and c.finish_reason == "stop"
    assert c.ids == free.ids[: _shortest_prefix_with(free.ids, tokenizer, stop)]
    assert c.logprobs == pytest.approx(free.logprobs[: len(c.ids)], abs=1e-5)
    assert free.stop_reason is None
