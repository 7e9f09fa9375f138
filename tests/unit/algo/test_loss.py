import math

import pytest
import torch

from grpo.algo.loss import LossInput, clipped_surrogate, k3_kl, policy_loss, token_weights, truncated_is_weights

pytestmark = [pytest.mark.unit, pytest.mark.numerics]


def test_clipped_surrogate_by_hand():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 0.5, 1.5]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clipped = clipped_surrogate(logp, old, adv, clip_low=0.2, clip_high=0.28)
    assert loss.tolist() == pytest.approx([-1.28, -0.5, 0.8, 1.5], rel=1e-6)
    assert clipped.tolist() == [True, False, True, False]


def test_ratio_one_gives_plain_policy_gradient():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    adv = torch.tensor([2.0, -3.0])
    loss, _ = clipped_surrogate(logp, logp.detach(), adv, 0.2, 0.2)
    loss.sum().backward()
    assert logp.grad.tolist() == [-2.0, 3.0]


def test_k3_by_hand():
    kl = k3_kl(torch.tensor([0.0, -1.0]), torch.log(torch.tensor([0.5, math.exp(-1.0)])))
    assert kl.tolist() == pytest.approx([0.5 + math.log(2) - 1, 0.0], abs=1e-6)


def test_token_weights_by_hand():
    seq_len = torch.tensor([2, 2, 3, 3, 3])
    assert token_weights("token", seq_len, 5, 2, 4).tolist() == pytest.approx([0.2] * 5)
    assert token_weights("sequence", seq_len, 5, 2, 4).tolist() == pytest.approx([1 / 4] * 2 + [1 / 6] * 3)
    assert token_weights("constant", seq_len, 5, 2, 4).tolist() == pytest.approx([1 / 8] * 5)


def test_tis_weights_are_capped_and_detached():
    t = torch.tensor([0.0, 0.0], requires_grad=True)
    w = truncated_is_weights(t, torch.tensor([math.log(0.25), math.log(2.0)]), cap=2.0)
    assert w.tolist() == pytest.approx([2.0, 0.5])
    assert not w.requires_grad


def _reference_objective(logits, targets, seqs, adv, old, mode, max_len, lo, hi, beta, ref):
    """The objective written from its definition, one sequence at a time, in float64."""
    logp_all = torch.log_softmax(logits.double(), -1)
    per_seq, n_tokens = [], 0
    for s, (a, b) in enumerate(seqs):
        terms = []
        for t in range(a, b):
            lp = logp_all[t, targets[t]]
            r = torch.exp(lp - old[t])
            term = -torch.min(r * adv[s], torch.clamp(r, 1 - lo, 1 + hi) * adv[s])
            if beta:
                d = ref[t] - lp
                term = term + beta * (torch.exp(d) - d - 1)
            terms.append(term)
        per_seq.append(terms)
        n_tokens += len(terms)
    if mode == "token":
        return sum(sum(ts) for ts in per_seq) / n_tokens
    if mode == "sequence":
        return sum(sum(ts) / len(ts) for ts in per_seq) / len(per_seq)
    return sum(sum(ts) for ts in per_seq) / (len(per_seq) * max_len)


@pytest.mark.parametrize("mode", ["token", "sequence", "constant"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_gradient_matches_independent_reference(mode, beta):
    torch.manual_seed(0)
    seqs = [(0, 3), (3, 4), (4, 9)]
    T, V = 9, 11
    logits = torch.randn(T, V, requires_grad=True)
    targets = torch.randint(0, V, (T,))
    adv = torch.tensor([1.3, -0.4, 0.7])
    old = (torch.log_softmax(logits.detach(), -1)[torch.arange(T), targets] + 0.3 * torch.randn(T))
    ref = old - 0.2
    seq_len = torch.tensor([b - a for a, b in seqs for _ in range(b - a)])
    seq_index = torch.tensor([i for i, (a, b) in enumerate(seqs) for _ in range(b - a)])

    logp = torch.log_softmax(logits, -1)[torch.arange(T), targets]
    w = token_weights(mode, seq_len, T, len(seqs), 6)
    ours = policy_loss(LossInput(logp, old, adv[seq_index], w, ref), 0.2, 0.28, beta).loss
    (g_ours,) = torch.autograd.grad(ours, logits)

    logits64 = logits.detach().double().requires_grad_(True)
    theirs = _reference_objective(logits64, targets, seqs, adv.double(), old.double(), mode, 6, 0.2, 0.28, beta,
                                  ref.double())
    (g_ref,) = torch.autograd.grad(theirs, logits64)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert torch.allclose(g_ours.double(), g_ref, atol=1e-6)
    assert g_ref.abs().sum() > 0


def test_sequence_level_and_masked_importance_weights_by_hand():
    # two sequences: tokens 0,1 belong to seq 0, token 2 to seq 1
    seq = torch.tensor([0, 0, 1])
    trainer = torch.log(torch.tensor([0.5, 0.4, 0.9]))
    engine = torch.log(torch.tensor([0.25, 0.8, 0.3]))
    # token ratios 2.0, 0.5, 3.0; sequence ratios 2.0 * 0.5 = 1.0 and 3.0
    tok = truncated_is_weights(trainer, engine, 2.5, seq, 2, "token", "truncate")
    assert torch.allclose(tok, torch.tensor([2.0, 0.5, 2.5]))
    seq_w = truncated_is_weights(trainer, engine, 2.5, seq, 2, "sequence", "truncate")
    assert torch.allclose(seq_w, torch.tensor([1.0, 1.0, 2.5]))
    masked = truncated_is_weights(trainer, engine, 2.5, seq, 2, "sequence", "mask")
    assert torch.allclose(masked, torch.tensor([1.0, 1.0, 0.0]))
    masked_tok = truncated_is_weights(trainer, engine, 1.5, seq, 2, "token", "mask")
    assert torch.allclose(masked_tok, torch.tensor([0.0, 0.5, 0.0]))
    # a huge sequence ratio overflows exp() to inf: truncated to the cap, masked to 0, never NaN
    big = truncated_is_weights(torch.zeros(3), torch.full((3,), -400.0), 2.0, seq, 2, "sequence", "truncate")
    assert torch.equal(big, torch.full((3,), 2.0))
    assert torch.equal(truncated_is_weights(torch.zeros(3), torch.full((3,), -400.0), 2.0, seq, 2, "sequence",
                                            "mask"), torch.zeros(3))


def test_gspo_sequence_ratio_value_clipping_and_gradient():
    from grpo.algo.loss import sequence_log_ratio

    seq = torch.tensor([0, 0, 1])
    old = torch.tensor([-1.0, -2.0, -0.5])
    logp = torch.tensor([-0.9, -1.7, -0.5], requires_grad=True)
    log_r = sequence_log_ratio(logp, old, seq, 2)
    # seq 0: mean(0.1, 0.3) = 0.2 for both tokens; seq 1: 0
    assert torch.allclose(log_r.detach(), torch.tensor([0.2, 0.2, 0.0]))
    adv = torch.tensor([1.0, 1.0, -1.0])
    w = torch.tensor([0.25, 0.25, 0.5])  # sequence aggregation: 1/(len * n_seqs)
    parts = policy_loss(LossInput(logp, old, adv, w, seq_index=seq, num_seqs=2), 0.1, 0.3, ratio="sequence")
    # seq 0 ratio e^0.2 = 1.2214 < 1.3: unclipped; loss = -(0.25 + 0.25) * 1.2214 - 0.5 * (-1) * 1
    r0 = math.exp(0.2)
    assert math.isclose(parts.loss.item(), -0.5 * r0 + 0.5, rel_tol=1e-6)
    parts.loss.backward()
    # d/dlogp_t of -w_t * A * s_i: the gradient of GSPO's sequence ratio, s_i * mean_t grad(logp_t), per token
    assert torch.allclose(logp.grad, torch.tensor([-0.25 * r0, -0.25 * r0, 0.5]), atol=1e-6)
    # past the clip range the whole sequence is clipped: no gradient from any of its tokens
    logp2 = torch.tensor([-0.5, -1.5, -0.5], requires_grad=True)  # seq 0 mean diff 0.5: e^0.5 > 1.3
    p2 = policy_loss(LossInput(logp2, old, adv, w, seq_index=seq, num_seqs=2), 0.1, 0.3, ratio="sequence")
    p2.loss.backward()
    assert torch.equal(logp2.grad[:2], torch.zeros(2)) and p2.clip_frac_num == 2.0
