"""Multi-turn rollouts: the model calls tools while it writes, on any engine.

`ToolRollout` wraps a rollout engine and is one itself (the rollout source, evaluation and the weight sync see no
difference). Each turn is one batched `generate` over every conversation still open, with the tools' closing
tags as stop strings; a conversation whose turn ended on a call gets the tool's answer appended and stays open, the
others are done. Token-exact: the trainer's sequence is the ids the engine sampled, verbatim, and the answers'
ids, tokenized once as text; a mask marks the answers (0) so that they are context, never trained on. One token
budget, `rollout.max_new_tokens`, covers the whole completion, answers included.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from grpo.rollout.base import Completion, RolloutEngine, SamplingParams
from grpo.rollout.tools import RESULT_CLOSE, RESULT_OPEN, TRUNCATED, InlineFormat, Tool, call_tool, truncate_ids
from grpo.runtime import collectives as coll


@dataclass
class Conversation:
    """One completion being written: its ids so far, what the engine sampled (mask 1) and what was appended."""

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "length"
    version: int | None = None
    done: bool = False


class ToolRollout:
    """A rollout engine whose completions may call tools (see the module's docstring)."""

    def __init__(self, engine: RolloutEngine, tok, tools: list[Tool], max_turns: int, timeout: float,
                 max_output_tokens: int, pool):
        self.engine, self.tok, self.pool = engine, tok, pool
        self.tools = {t.name: t for t in tools}
        self.fmt = InlineFormat(tools)
        self.max_turns, self.timeout, self.max_output_tokens = max_turns, timeout, max_output_tokens
        # the answer's frame and the truncation marker, tokenized once (as every answer's text is: as text)
        self.open_ids, self.close_ids = self._text_ids(RESULT_OPEN), self._text_ids(RESULT_CLOSE)
        self.marker = self._text_ids(TRUNCATED)

    # the engine interface, delegated
    def sync(self, model, version: int = 0) -> dict[str, float]:
        return self.engine.sync(model, version)

    def release(self) -> None:
        self.engine.release()

    @property
    def collective_generate(self) -> bool:
        return getattr(self.engine, "collective_generate", False)

    @property
    def version(self) -> int:
        return getattr(self.engine, "version", 0)

    def _text_ids(self, text: str) -> list[int]:
        """Text as text: a template's special tokens inside it are split like any other characters."""
        return self.tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        convs = [Conversation(list(p)) for p in prompts for _ in range(n)]
        turn_params = replace(params, stop=tuple(params.stop) + self.fmt.stops())
        for turn in range(self.max_turns + 1):
            live = [c for c in convs if not c.done]
            if self.collective_generate:  # ZeRO-3's HF engine: every rank takes part in every generate call
                if not coll.any_rank(bool(live)):
                    break
            elif not live:
                break
            self._turn(live, turn_params, params.max_new_tokens, last=turn == self.max_turns)
        return [[self._completion(c) for c in convs[i * n : (i + 1) * n]] for i in range(len(prompts))]

    def _turn(self, live: list[Conversation], params: SamplingParams, budget: int, last: bool) -> None:
        """One generate call over the open conversations, then their calls answered. The call asks for the largest
        room any of them has left; each keeps only what fits its own budget (the rest ends it on the length)."""
        room = [budget - len(c.ids) for c in live]
        step = replace(params, max_new_tokens=max(room)) if live else params
        outs = self.engine.generate([c.prompt_ids + c.ids for c in live], 1, step)
        calls = []
        for c, r, out in zip(live, room, outs, strict=True):
            s = out[0]
            ids, finish, stop = s.ids, s.finish_reason, s.stop_reason
            if len(ids) > r:  # past this conversation's budget: cut, and anything it ended on is gone
                ids, finish, stop = ids[:r], "length", None
            c.ids += ids
            c.mask += [1] * len(ids)
            c.logprobs += s.logprobs[: len(ids)]
            c.version = s.version if c.version is None else c.version
            c.finish_reason = finish
            text = s.text if len(ids) == len(s.ids) else self.tok.decode(ids, skip_special_tokens=True)
            turn = {"text": text, "tokens": len(ids), "tool": None, "arguments": None, "result": None,
                    "error": None, "seconds": 0.0}
            c.turns.append(turn)
            call = self.fmt.parse(text, stop)
            c.done = call is None or last or len(c.ids) >= budget
            if call is None:  # EOS, or the budget
                continue
            turn["tool"], turn["arguments"] = call.tool, call.arguments
            if c.done:
                turn["error"] = "no turn left to answer in" if last else "no budget left to answer in"
                continue
            calls.append((c, turn, call))
        self._answer(calls, budget)

    def _answer(self, calls: list, budget: int) -> None:
        """Run the turn's calls in the worker pool (killable, with a deadline each) and append their answers."""
        runnable = [(c, t, call) for c, t, call in calls if call.tool is not None]
        t0 = time.perf_counter()
        outcomes = self.pool.map(call_tool, [((self.tools[call.tool].fn, {self.tools[call.tool].first_arg:
                                                                               call.arguments}), {})
                                             for _, _, call in runnable], self.timeout) if runnable else []
        seconds = (time.perf_counter() - t0) / max(len(runnable), 1)
        results = iter(outcomes)
        for c, turn, call in calls:
            if call.tool is None:
                turn["error"] = "malformed call: no opening tag"
                text = "error: malformed call (write <name>arguments</name>)"
            else:
                o = next(results)
                turn["seconds"] = seconds
                if o.timed_out:
                    turn["error"] = f"timed out after {self.timeout:g} s"
                elif o.error is not None:
                    turn["error"] = o.error.strip().splitlines()[-1] if o.error.strip() else "error"
                text = f"error: {turn['error']}" if turn["error"] else o.value
            turn["result"] = self._append(c, text, budget)

    def _append(self, c: Conversation, output: str, budget: int) -> str:
        """The answer's ids, its output cut to max_tool_output_tokens (head and tail), then to the budget; returns
        the output as the model sees it (what the records keep)."""
        full = self._text_ids(output)
        body = truncate_ids(full, self.max_output_tokens, self.marker)
        ids = self.open_ids + body + self.close_ids
        room = budget - len(c.ids)
        if len(ids) >= room:
            ids, c.done, c.finish_reason = ids[:room], True, "length"
        c.ids += ids
        c.mask += [0] * len(ids)
        c.logprobs += [0.0] * len(ids)
        return output if body is full else self.tok.decode(body, skip_special_tokens=False)

    def _completion(self, c: Conversation) -> Completion:
        text = self.tok.decode(c.ids, skip_special_tokens=True)
        return Completion(c.prompt_ids, c.ids, text, c.logprobs, c.finish_reason, c.version,
                          mask=c.mask if 0 in c.mask else None, turns=c.turns)
