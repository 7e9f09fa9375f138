"""What every reward reads first: the completions as text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def completion_texts(completions: Sequence[Any]) -> list[str]:
    """Completions as text, whether they are strings or conversational (a list of messages, as TRL passes them for
    chat data sets: the assistant turn's `content`)."""
    out = []
    for c in completions:
        if isinstance(c, str):
            out.append(c)
        elif isinstance(c, (list, tuple)) and c and isinstance(c[-1], dict) and "content" in c[-1]:
            out.append("".join(str(m.get("content") or "") for m in c if m.get("role", "assistant") == "assistant"))
        else:
            raise TypeError(f"a completion must be a string or a list of messages, got {type(c).__name__}")
    return out
