"""Worker for tests/integration/test_update_reference.py (run by torchrun, 1 or 2 ranks, any ZeRO stage):
`grpo.loop.update.update` on hand-built groups against an independent float64 reference of the objective's gradient.

Four prompts x three completions of 1 to 9 tokens (one completion with a NaN total, one group with zero advantage),
micro-batches of 3 sequences holding different token counts, 4-token vocabulary chunks, temperature 0.8 and a
clipping norm too large to bite. On two ranks, rank 0 holds the two groups with the long completions. For each
aggregation (token, sequence, constant) four variants: plain, with a KL term against a perturbed reference, with
truncated importance weights against shifted engine logprobs (some above the cap), and `tools`: KL and importance
weights on completions holding tool spans (mask 0: appended tokens, context only, out of every term and every
length, their engine logprob a placeholder 0.0, one completion opening on one); each case runs two steps, the
second checked against the reference at the weights the first step left. The reference is derived, not
copied: with one pass the PPO ratio is 1 with gradient grad(logp), so the step's gradient is that of
    sum_i valid_i sum_t mask_it w_it [ -A_i is_it logp_it + beta (exp(ref_it - logp_it) - (ref_it - logp_it) - 1) ]
(the lengths and token counts in w count sampled tokens only) computed in float64 with full-vocabulary logits, one
sequence at a time, on an unsharded copy. Rank 0 writes
{case: [update's grad_norm, reference norm]} to the JSON path given.
"""

import json
import math
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from grpo.algo.logprobs import Sequence, reference_logprobs  # noqa: E402
from grpo.config import load_config  # noqa: E402
from grpo.loop.update import Learner, update  # noqa: E402
from grpo.rollout.base import Completion  # noqa: E402
from grpo.rollout.scoring import Group  # noqa: E402
from grpo.runtime.deepspeed_setup import build_policy_engine, build_reference, init_distributed  # noqa: E402
from grpo.runtime.model import load_model, load_tokenizer  # noqa: E402
from grpo.runtime.tracking import Timer  # noqa: E402
from grpo.runtime.weights import weight_buckets  # noqa: E402

TEMP, CAP, BETA, MAX_NEW = 0.8, 1.2, 0.1, 9
MICRO = int(os.environ.get("GRPO_TEST_MICRO", "3"))
LENGTHS = [[9, 8, 7], [9, 6, 5], [4, 3, 2], [1, 2, 3]]  # per group: long groups first
ADV = [[1.2, -0.4, -0.8], [0.5, 0.5, -1.0], [0.0, 0.0, 0.0], [-1.5, 0.7, 0.8]]
NAN_AT = (1, 1)  # group 1, completion 1: a reward errored (total NaN)
OFFSETS = [-0.4, -0.1, 0.05, 0.3, 0.45]  # engine logprob = trainer logprob + offset: exp(0.4) > CAP is cut


def tool_mask(gi: int, ci: int, n: int) -> list[int] | None:
    """Tool spans: two tokens in the middle of completions of 5+ tokens, the first token of group 3's last."""
    if n >= 5:
        return [0 if 1 + (gi + ci) % 2 <= t < 3 + (gi + ci) % 2 else 1 for t in range(n)]
    if (gi, ci) == (3, 2):
        return [0] + [1] * (n - 1)
    return None


def groups_and_truth(model_dir: str, tok, tools: bool = False) -> tuple[list[Group], list[dict]]:
    """Hand-built groups (engine logprobs from the float64 copy) and, per sequence, what the reference needs."""
    gen = torch.Generator().manual_seed(7)
    plain = load_model(model_dir, "float32").double().eval()
    groups, truth = [], []
    for gi, (lens, advs) in enumerate(zip(LENGTHS, ADV, strict=True)):
        prompt = torch.randint(5, 400, (3 + gi,), generator=gen).tolist()
        comps, totals = [], []
        for ci, n in enumerate(lens):
            ids = torch.randint(5, 400, (n,), generator=gen).tolist()
            with torch.no_grad():
                lp = reference_logprobs(plain, [Sequence(prompt, ids)], TEMP)[0]
            off = torch.tensor([OFFSETS[(gi + ci + t) % len(OFFSETS)] for t in range(n)], dtype=torch.float64)
            mask = tool_mask(gi, ci, n) if tools else None
            keep = torch.tensor(mask if mask is not None else [1] * n, dtype=torch.bool)
            engine_lp = torch.where(keep, lp + off, 0.0)  # an appended token was not sampled: no logprob
            comps.append(Completion(prompt, ids, "", engine_lp.tolist(), "stop", mask=mask))
            total = math.nan if (gi, ci) == NAN_AT else 1.0
            totals.append(total)
            truth.append({"prompt": prompt, "ids": ids, "adv": advs[ci], "valid": not math.isnan(total),
                          "rollout_lp": (lp + off)[keep], "keep": keep})
        groups.append(Group({}, comps, {}, totals, list(advs)))
    return groups, truth


def perturbed(model_dir: str) -> torch.nn.Module:
    ref = load_model(model_dir, "float32")
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return ref


def reference_norm(model_dir: str, truth: list[dict], agg: str, beta: float, tis: bool,
                   weights: dict[str, torch.Tensor] | None = None) -> float:
    policy = load_model(model_dir, "float32")
    if weights is not None:  # the trainer's weights after its first step
        missing = set(dict(policy.named_parameters())) - set(weights)
        assert not missing, missing
        policy.load_state_dict(weights, strict=False)
    policy = policy.double().eval()
    ref = perturbed(model_dir).double().eval()
    valid = [s for s in truth if s["valid"]]
    n_tok, n_seq = sum(int(s["keep"].sum()) for s in valid), len(valid)
    policy.zero_grad()
    for s in valid:
        seq = Sequence(s["prompt"], s["ids"])
        logp = reference_logprobs(policy, [seq], TEMP)[0][s["keep"]]  # the sampled tokens' terms only
        with torch.no_grad():
            ref_lp = reference_logprobs(ref, [seq], TEMP)[0][s["keep"]]
        n = int(s["keep"].sum())
        w = {"token": 1.0 / n_tok, "sequence": 1.0 / (n * n_seq), "constant": 1.0 / (MAX_NEW * n_seq)}[agg]
        # pi_trainer / pi_engine at the weights of this step, truncated (no gradient through it)
        isw = torch.clamp(torch.exp(logp.detach() - s["rollout_lp"]), max=CAP) if tis else torch.ones(n)
        d = ref_lp - logp
        obj = (-s["adv"] * isw * logp + beta * (torch.exp(d) - d - 1.0)).sum() * w
        obj.backward()
    return math.sqrt(sum(float((p.grad ** 2).sum()) for p in policy.parameters() if p.grad is not None))


def main(model_dir: str, recipe: str, stage: int, out: str) -> None:
    rank, world = init_distributed("cpu")
    tok = load_tokenizer(model_dir)
    per_rank = 4 // world
    results = {}
    for agg in ("token", "sequence", "constant"):
        for variant in ("plain", "kl", "tis", "tools"):
            groups, truth = groups_and_truth(model_dir, tok, tools=variant == "tools")
            mine = groups[rank * per_rank : (rank + 1) * per_rank]
            beta = BETA if variant in ("kl", "tools") else 0.0
            tis = variant in ("tis", "tools")
            cfg = load_config(recipe, [
                f"model.path={model_dir}", "rollout.prompts_per_step=4", "rollout.num_generations=3",
                f"optim.micro_batch_size={MICRO}", "optim.max_grad_norm=1.0e6", "optim.logprob_chunk_size=4",
                f"rollout.temperature={TEMP}", f"rollout.max_new_tokens={MAX_NEW}", f"algo.loss_agg={agg}",
                f"algo.beta={beta}", f"algo.tis={'true' if tis else 'false'}", f"algo.tis_cap={CAP}",
                "algo.tis_mode=truncate", "algo.tis_level=token", f"deepspeed.zero_stage={stage}", "optim.lr=1e-3"])
            shape = cfg.check_batch(world)
            engine = build_policy_engine(load_model(model_dir, "float32"), cfg, MICRO, shape.grad_accum)
            ref = build_reference(perturbed(model_dir), cfg, MICRO, shape.grad_accum) if beta > 0 else None
            learner = Learner(engine, ref, shape, tok.pad_token_id)
            got = update(cfg, learner, mine, Timer()).metrics["grad_norm"]
            if rank == 0:
                results[f"{agg}/{variant}"] = [got, reference_norm(model_dir, truth, agg, beta, tis)]
            # a second step on the same groups from the weights the first step left: no state of the first
            # step's accumulation may leak into it
            weights = {n: t.detach().clone() for b in weight_buckets(engine.module, 1 << 30, stage == 3)
                       for n, t in b}
            got = update(cfg, learner, mine, Timer()).metrics["grad_norm"]
            if rank == 0:
                results[f"{agg}/{variant}/step2"] = [got, reference_norm(model_dir, truth, agg, beta, tis,
                                                                         weights)]
            dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
