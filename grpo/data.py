"""Prompts: procedural `reasoning-gym` tasks or HF `datasets`, chat template applied, a held-out split.

Every row keeps its data set columns (so rewards receive `answer`, ...), plus a stable `prompt_id`, the
rendered `prompt` text and its token ids. Prompts longer than `max_prompt_tokens` are reported and dropped,
never silently cut. The sampler walks a seeded permutation per epoch, and its position is part of a checkpoint.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from grpo.config import ConfigError, DataConfig

log = logging.getLogger(__name__)

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


# Row keys that are never passed to rewards as columns (TRL leaves out the same; `prompts` is passed by name).
NOT_REWARD_COLUMNS = ("prompt_id", "prompt", "prompt_ids", "prompt_messages", "completion", "completion_ids")


@dataclass
class PromptSet:
    rows: list[dict[str, Any]]  # columns + prompt_id, prompt (rendered text), prompt_ids, prompt_messages
    columns: list[str]  # the data set's own columns (what rewards may ask for)
    dropped_too_long: list[str]  # prompt ids
    conversational: bool = False  # prompts were lists of messages: rewards get completions as messages too


def as_messages(value: Any, where: str) -> list[dict[str, str]] | None:
    """A prompt given as a list of chat messages (TRL's conversational format), checked; None for plain text."""
    if isinstance(value, str):
        return None
    if isinstance(value, (list, tuple)) and value and all(isinstance(m, dict) for m in value):
        for i, m in enumerate(value):
            if m.get("role") not in ("system", "user", "assistant", "tool") or not isinstance(m.get("content"), str):
                raise ConfigError(f"{where}: message {i} needs a role (system/user/assistant/tool) and a text "
                                  f"content, got {dict(m)!r:.120}")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ConfigError(f"{where}: a prompt must be text or a list of chat messages ({{'role', 'content'}}), got "
                      f"{type(value).__name__} {value!r:.80}")


def load_rows(cfg: DataConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, held-out rows) as plain dicts with a `prompt_id`. Eval rows never appear in train."""
    if cfg.source == "reasoning_gym":
        return _reasoning_gym_rows(cfg)
    return _hf_rows(cfg)


def _reasoning_gym_rows(cfg: DataConfig):
    import reasoning_gym

    def make(size: int, seed: int, tag: str) -> list[dict[str, Any]]:
        try:
            ds = reasoning_gym.create_dataset(cfg.task, size=size, seed=seed, **cfg.task_args)
        except (KeyError, ValueError, TypeError, AssertionError) as e:
            raise ConfigError(f"data.task/data.task_args: reasoning-gym cannot build {cfg.task!r} with "
                              f"{cfg.task_args}: {e}") from None
        rows = []
        for i, x in enumerate(ds):
            rows.append({"prompt_id": f"{cfg.task}-{tag}{i}", "question": x["question"], "answer": str(x["answer"]),
                         "metadata": json.dumps(x.get("metadata", {}), default=str)})
        return rows

    # The held-out problems are drawn first (own seed, duplicates removed) and every training problem equal to
    # one of them is removed: small task spaces (1-digit arithmetic) repeat problems across draws.
    held, seen = [], set()
    for r in make(4 * cfg.num_eval, cfg.seed + 1_000_003, "eval") if cfg.num_eval else []:
        if r["question"] not in seen and len(held) < cfg.num_eval:
            seen.add(r["question"])
            held.append(r)
    train = [r for r in make(cfg.num_train, cfg.seed, "") if r["question"] not in seen]
    return train, held


def _hf_rows(cfg: DataConfig):
    import datasets

    path = cfg.path
    assert path is not None
    p = Path(path).expanduser()
    try:
        if p.is_dir():
            ds = _load_folder(p, cfg)
        elif p.exists():
            fmt = LOCAL_FORMATS.get(p.suffix.lower())
            if fmt is None:
                raise ConfigError(f"data.path: {p}: unsupported file type (use {', '.join(LOCAL_FORMATS)}, a "
                                  "save_to_disk folder or a folder of data files)")
            ds = datasets.load_dataset(fmt, data_files=str(p), split="train")
        elif path.startswith((".", "/", "~")):
            raise ConfigError(f"data.path: {path} does not exist")
        else:
            ds = datasets.load_dataset(path, cfg.subset, split=cfg.split, revision=cfg.revision)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types; name the file
        raise ConfigError(f"data.path: cannot load {path}: {type(e).__name__}: {e}") from None
    if len(ds) == 0:
        raise ConfigError(f"data.path: {path} is empty")
    for col in (cfg.prompt_column, cfg.answer_column):
        if col not in ds.column_names:
            raise ConfigError(f"data: column {col!r} not in {path} (columns: {ds.column_names})")
    pattern = re.compile(cfg.answer_pattern, re.S) if cfg.answer_pattern else None
    ds = ds.add_column("_row", list(range(len(ds))))  # the original row number names the prompt
    if pattern is not None:
        keep = [i for i, a in enumerate(ds[cfg.answer_column]) if pattern.search(str(a))]
        if not keep:
            raise ConfigError(f"data.answer_pattern: {cfg.answer_pattern!r} matches no answer in {path}")
        if len(keep) < len(ds):
            log.warning("data: %d of %d rows of %s have no answer matching data.answer_pattern: dropped",
                        len(ds) - len(keep), len(ds), path)
            ds = ds.select(keep)
    if cfg.num_eval >= len(ds):
        raise ConfigError(f"data.num_eval={cfg.num_eval} leaves no training rows in {path} ({len(ds)} rows)")
    # datasets' own seeded split: the same held-out rows as `ds.train_test_split(test_size=num_eval, seed=seed)`
    if cfg.num_eval:
        parts = ds.train_test_split(test_size=cfg.num_eval, seed=cfg.seed)
        train_ds, held_ds = parts["train"], parts["test"]
    else:
        train_ds, held_ds = ds.shuffle(seed=cfg.seed), None
    train_ds = train_ds.select(range(min(cfg.num_train, len(train_ds))))
    train = [_hf_row(x, cfg, pattern, path) for x in train_ds]
    held = [_hf_row(x, cfg, pattern, path) for x in held_ds] if held_ds is not None else []
    return train, held


def _hf_row(x: dict[str, Any], cfg: DataConfig, pattern: re.Pattern | None, path: str) -> dict[str, Any]:
    """One data set row as the trainer keeps it. Nested values travel as JSON text (records and workers take
    plain values); a conversational prompt column stays a list of messages, checked here so that a bad row is named
    before training."""
    i = x.pop("_row")
    row = {k: (v if isinstance(v, (str, int, float, bool)) or v is None
               or (k == cfg.prompt_column and as_messages(v, f"data: {path} row {i} column {k!r}") is not None)
               else json.dumps(v, default=str))
           for k, v in x.items()}
    row["prompt_id"] = f"row-{i}"
    if cfg.prompt_column != "question":
        given = row[cfg.prompt_column]
        users = [m["content"] for m in given if m["role"] == "user"] if isinstance(given, list) else [given]
        row.setdefault("question", users[-1] if users else "")
    if cfg.answer_column != "answer":
        row["answer"] = row[cfg.answer_column]
    if pattern is not None:
        row["answer"] = pattern.search(str(row["answer"])).group(1).strip()
    return row


def _load_folder(p: Path, cfg: DataConfig):
    """A local folder: `save_to_disk` output (a Dataset or a DatasetDict, whose `data.split` is taken), or a folder
    of data files as a downloaded hub repository holds them (parquet/jsonl/csv, split by file name)."""
    import datasets

    if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise ConfigError(f"data.split: {cfg.split!r} is not a split of {p} (splits: {sorted(ds)})")
            ds = ds[cfg.split]
        return ds
    return datasets.load_dataset(str(p), cfg.subset, split=cfg.split)


def render(rows: list[dict[str, Any]], cfg: DataConfig, tokenizer) -> PromptSet:
    """Apply the prompt template (text prompts) or take the messages as they are (conversational prompts, TRL's
    format: system/user/assistant turns kept; a final assistant turn is continued), then the chat template; drop
    (and report) prompts over the token limit."""
    if not rows:
        raise ConfigError("data: the training split is empty")
    out, dropped = [], []
    kinds = set()
    for row in rows:
        given = as_messages(row.get(cfg.prompt_column), f"data: prompt {row['prompt_id']} column "
                            f"{cfg.prompt_column!r}") if cfg.prompt_column in row else None
        kinds.add(given is not None)
        if given is not None:
            messages = list(given)
            if cfg.system_prompt is not None and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": cfg.system_prompt})
        else:
            try:
                user = cfg.prompt_template.format(**row)
            except KeyError as e:
                raise ConfigError(f"data.prompt_template: no column {e.args[0]!r} (columns: {sorted(row)})") from None
            messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt is not None else [])
            messages.append({"role": "user", "content": user})
        if cfg.few_shot:  # the examples go after the system message, before the conversation
            at = 1 if messages[0]["role"] == "system" else 0
            messages[at:at] = [{"role": r, "content": ex[r]} for ex in cfg.few_shot for r in ("user", "assistant")]
        cont = messages[-1]["role"] == "assistant"
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not cont,
                                             continue_final_message=cont)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > cfg.max_prompt_tokens:
            dropped.append(row["prompt_id"])
            continue
        out.append({**row, "prompt": text, "prompt_ids": ids, "prompt_messages": messages})
    if len(kinds) > 1:
        raise ConfigError(f"data: column {cfg.prompt_column!r} mixes text prompts and message lists")
    if dropped:
        log.warning("data: %d prompt(s) longer than data.max_prompt_tokens=%d were dropped (not cut): %s",
                    len(dropped), cfg.max_prompt_tokens, ", ".join(dropped[:10]) + (" ..." if len(dropped) > 10
                                                                                     else ""))
    if not out:
        raise ConfigError(f"data: every prompt is longer than data.max_prompt_tokens={cfg.max_prompt_tokens}")
    columns = sorted(k for k in rows[0] if k not in NOT_REWARD_COLUMNS)
    return PromptSet(out, columns, dropped, conversational=kinds == {True})


class PromptSampler:
    """Seeded permutation per epoch; `state()` / `load_state()` make the data position part of a checkpoint."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.size)

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.size:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
            n = min(k - len(out), self.size - self.pos)
            out += self._perm[self.pos : self.pos + n].tolist()
            self.pos += n
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "size": self.size, "seed": self.seed}

    def load_state(self, state: dict[str, int]) -> None:
        if state["size"] != self.size or state["seed"] != self.seed:
            raise ConfigError(f"resume: the checkpoint's data set has {state['size']} prompts (seed "
                              f"{state['seed']}), this run has {self.size} (seed {self.seed}): the data "
                              "changed; refusing to resume misaligned")
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._permutation()
