"""A user's reward file written the way TRL's and open-r1's rewards are (our own code, their conventions): keyword
arguments, `completions` as lists of messages for conversational data, the data set's columns by name, `**kwargs`.
Used by tests/unit/rewards/test_peers.py, and by tests/integration/test_peers.py in a real run of the embedded model."""

from __future__ import annotations


def _text(completion):
    return completion[0]["content"] if isinstance(completion, list) else completion


def prompt_length_mod7(prompts, completions, **kwargs):
    """Depends only on the prompt the trainer passes: the last message's text (conversational) or the text."""
    out = []
    for p in prompts:
        text = p[-1]["content"] if isinstance(p, list) else p
        out.append(float(len(text) % 7))
    return out


def starts_with_digit(completions, solution, **kwargs):
    """open-r1 style: reads `completion[0]["content"]` and the `solution` column; None where no solution."""
    pairs = zip(completions, solution, strict=True)
    return [None if not s else float(_text(c).lstrip()[:1].isdigit()) for c, s in pairs]


def token_count(completion_ids, **kwargs):
    """TRL style: reads the completion's token ids."""
    return [float(len(ids)) for ids in completion_ids]
