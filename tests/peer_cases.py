"""Peers' published reward test cases (Math-Verify, TRL, open-r1, verl) replayed against our rewards.

The case data in `tests/data/peers/*.jsonl` was transcribed from the peers' own test files (origins name file,
test and line; commits in `tests/data/peers/README.md`); the code here maps each peer reward onto ours and is our
own. `agreement()` is used by the tests and printed by `python -m tests.peer_cases` (the table in docs/rewards.md).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rewards.code import code_tests
from rewards.format import code_format, think_answer
from rewards.math import accuracy
from rewards.shaping import cosine_length, len_reward, reasoning_steps, repetition_penalty, soft_overlong, tag_count
from rewards.text import completion_texts

DATA = Path(__file__).parent / "data" / "peers"


def load(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ Math-Verify

def math_verify_case(case: dict[str, Any]) -> float | None:
    """A Math-Verify (gold, prediction) pair through `accuracy` reading the whole prediction (`extract:
    math_verify`), with the case's precision / strict / set-relation options."""
    cfg = case["config"]
    m = re.search(r"precision=(\d+)", cfg)
    return accuracy([case["pred"]], [case["gold"]], extract="math_verify", precision=int(m.group(1)) if m else 6,
                    strict="strict=False" not in cfg, set_relations="allow_set_relation_comp=True" in cfg)[0]


# ------------------------------------------------------------------------------------------------ TRL, open-r1

def _lengths(case: dict[str, Any], texts: list[str], peer: str) -> list[int]:
    """TRL measures length in tokens (completion_ids); open-r1 in characters of the completion."""
    ids = case["kwargs"].get("completion_ids")
    return [len(i) for i in ids] if peer == "trl" and ids is not None else [len(t) for t in texts]


def trl_style_case(case: dict[str, Any], peer: str) -> list[float | None]:
    """One TRL / open-r1 reward call mapped onto ours (same inputs; our argument names)."""
    name, f, kw = case["reward"], case["factory_args"], case["kwargs"]
    comps = case["completions"]
    texts = completion_texts(comps) if comps is not None else [""] * len(kw["completion_ids"])
    sol = kw.get("solution")
    mapping: dict[str, Callable[[], list[float | None]]] = {
        "accuracy_reward": lambda: accuracy(comps, sol, extract="math_verify"),
        "reasoning_accuracy_reward": lambda: accuracy(comps, sol, extract="math_verify",
                                                      after=(kw.get("reasoning_delimiters") or ["</think>"])[0]),
        "think_format_reward": lambda: think_answer(comps, require_answer=False),
        "format_reward": lambda: think_answer(comps),
        "tag_count_reward": lambda: tag_count(comps),
        "reasoning_steps_reward": lambda: reasoning_steps(comps),
        "len_reward": lambda: len_reward(comps, sol, _lengths(case, texts, peer), extract="math_verify"),
        "get_cosine_scaled_reward": lambda: cosine_length(
            comps, sol, _lengths(case, texts, peer), max_tokens=f["max_len"],
            correct_short=f.get("max_value_correct", 1.0), correct_long=f.get("min_value_correct", 0.5),
            wrong_short=f.get("min_value_wrong", -1.0), wrong_long=f.get("max_value_wrong", -0.5),
            extract="math_verify"),
        "get_repetition_penalty_reward": lambda: repetition_penalty(
            texts, ngram=f["ngram_size"], max_penalty=f["max_penalty"],
            unit="tokens" if comps is None else "words", completion_ids=kw.get("completion_ids")),
        "get_soft_overlong_punishment": lambda: soft_overlong(
            texts, [len(i) for i in kw["completion_ids"]], max_tokens=f["max_completion_len"],
            buffer=f["soft_punish_cache"]),
        "get_code_format_reward": lambda: code_format(comps, kw.get("language", f.get("language", "python"))),
    }
    return mapping[name]()


def _same(got: float | None, want: float | None, tol: float) -> bool:
    if want is None or got is None:
        return want is None and got is None
    return math.isclose(float(got), float(want), abs_tol=max(tol, 1e-9))


# ------------------------------------------------------------------------------------------------ verl

def verl_math_case(case: dict[str, Any]) -> float | None:
    """verl's prime_math cases give bare answers: the whole output is the answer (`final_line` keeps a multi-line
    matrix together)."""
    return accuracy([case["solution_str"]], [case["ground_truth"]], extract="final_line")[0]


def verl_code_case(case: dict[str, Any]) -> list[bool] | float | None:
    """verl's code cases through `code_tests` (fraction), their completions taken whole (verl's prime_code reads
    unfenced programs)."""
    return code_tests([case["completion"]], [case["tests"]], unfenced=True)[0]


# ------------------------------------------------------------------------------------------------ table

def agreement() -> list[dict[str, Any]]:
    """One row per (peer, reward, case value): what the peer expects and what we give."""
    rows = []
    for case in load("math_verify.jsonl"):
        got = math_verify_case(case)
        rows.append({"peer": "Math-Verify", "reward": "accuracy", "origin": case["origin"],
                     "expected": float(case["expected"]), "got": got,
                     "agree": (got == 1.0) == case["expected"]})
    for peer, fname in (("trl", "trl_rewards.jsonl"), ("open-r1", "open_r1_rewards.jsonl")):
        for case in load(fname):
            if case["factory_args"].get("language") == "zh":
                continue  # needs jieba's Chinese word segmentation, which we do not ship
            got = trl_style_case(case, peer)
            for i, (g, w) in enumerate(zip(got, case["expected"], strict=True)):
                rows.append({"peer": peer, "reward": case["reward"], "origin": f"{case['origin']} #{i}",
                             "expected": w, "got": g, "agree": _same(g, w, case.get("tolerance", 0.0))})
    for case in load("verl_math.jsonl"):
        got = verl_math_case(case)
        rows.append({"peer": "verl", "reward": "accuracy", "origin": case["origin"], "expected": case["expected"],
                     "got": got, "agree": _same(got, float(case["expected"]), 0.0)})
    return rows


if __name__ == "__main__":
    table: dict[tuple[str, str], list[int]] = {}
    for r in agreement():
        t = table.setdefault((r["peer"], r["reward"]), [0, 0])
        t[0] += 1
        t[1] += r["agree"]
        if not r["agree"]:
            print(f"DIFF {r['peer']} {r['reward']} {r['origin']}: expected {r['expected']}, got {r['got']}")
    print("| peer | reward | cases | agree |\n|---|---|---|---|")
    for (peer, reward), (n, ok) in sorted(table.items()):
        print(f"| {peer} | {reward} | {n} | {ok} |")
    n = sum(v[0] for v in table.values())
    ok = sum(v[1] for v in table.values())
    print(f"| all | | {n} | {ok} ({100 * ok / n:.1f}%) |")
