"""`grpo distill RECIPE`: rejection-sampled distillation data from a teacher, verified by the recipe's rewards.

R1's recipe for small models: a strong reasoning teacher samples N completions per prompt, a verifier keeps the
correct ones, and a small student is fine-tuned on them (`grpo sft`, which reads the result directly). The
teacher is either a local model sampled in-process (`distill.teacher.model`, with `rollout.engine` hf or vllm) or
any OpenAI-compatible endpoint (`distill.teacher.url`: a `vllm serve`, `grpo serve`, or a hosted model, the API
key read from the environment variable `distill.teacher.api_key_env`).

Nothing already distilled is lost: the samples of every `distill.batch_prompts` prompts are written as one shard
(written aside, then renamed), and a rerun skips the prompts its shards hold. Requests to an endpoint are
retried with exponential backoff on connection errors, timeouts, 429 (honouring Retry-After), 5xx and
answers that are not completions; what still fails is counted and reported, and a batch in which every request
failed stops the run with the endpoint's last error (rerun to continue). Prompts are rendered with the
student's tokenizer and chat template, exactly as `grpo train` and `grpo eval` render them, and the kept rows are
TRL's conversational prompt/completion format plus the teacher, the sampling settings, every reward and the
token count per row.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from grpo.config import Config, ConfigError, TeacherConfig
from grpo.data import PromptSet, load_rows, render
from grpo.rollout.base import Completion, SamplingParams
from grpo.rollout.http import HTTPStatusError, UnreachableError, post_json
from grpo.rollout.scoring import Group, score_groups

log = logging.getLogger("grpo")


class TeacherError(RuntimeError):
    """The teacher endpoint failed for a whole batch (down, refusing, rate-limited past the retries); the message
    names it. The shards written so far are kept: rerun to continue."""


@dataclass
class Tally:
    """What happened to the requests: retried for each reason, and failed after the retries (or refused for one
    prompt). Updated from `concurrency` threads at once, hence the lock."""

    retries: Counter = field(default_factory=Counter)
    failed: int = 0
    last_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def retried(self, reason: str, error: str) -> None:
        with self.lock:
            self.retries[reason] += 1
            self.last_error = error

    def gave_up(self, error: str) -> None:
        with self.lock:
            self.failed += 1
            self.last_error = error


# 4xx answers that say the endpoint, the model or the key is wrong: every request would fail the same way, so the
# run stops. Any other 4xx but 429 (400: this prompt plus max_tokens is over the model's context, 413, 422) is
# about one request: that prompt is counted as failed and the run goes on.
FATAL_4XX = (401, 403, 404, 405)


def _retry_after(e: HTTPStatusError, default: float, cap: float) -> float:
    """Retry-After in seconds or as an HTTP date (RFC 9110), at most `cap` (a day's wait is not worth one
    prompt); `default` when absent or unreadable. Reads `e.headers`, as urllib's HTTPError has them too."""
    value = e.headers.get("Retry-After") if e.headers is not None else None
    if value is None:
        return default
    try:
        wait = float(value)
    except ValueError:
        try:
            wait = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            return default
    return min(max(wait, 0.0), cap)


def _body(e: HTTPStatusError) -> str:
    """An error answer's first 300 characters; a body cut off mid-read (a reset, a timeout) is no reason to stop
    retrying. Reads `e.read()`, as urllib's HTTPError has it too."""
    try:
        return e.read().decode(errors="replace")[:300]
    except (OSError, http.client.HTTPException) as err:
        return f"(body unreadable: {err!r:.100})"


def request_samples(t: TeacherConfig, messages: list[dict[str, str]], n: int, params: SamplingParams,
                    tally: Tally, sleep=time.sleep) -> list[tuple[str, str]] | None:
    """One prompt's n samples from an OpenAI-compatible /chat/completions endpoint: [(text, finish_reason)], or
    None when it still failed after `t.retries` retries (counted in `tally`). A 4xx other than 429 is not retried
    (it would fail the same way every time): FATAL_4XX stops the run, any other fails this prompt only."""
    url = t.url.rstrip("/") + "/chat/completions"
    body = {"model": t.model, "messages": messages, "n": n, "max_tokens": params.max_new_tokens,
            "temperature": params.temperature, "top_p": params.top_p}
    key = os.environ.get(t.api_key_env)
    headers = {"Authorization": f"Bearer {key}"} if key else None
    wait = t.backoff
    for attempt in range(t.retries + 1):
        reason, delay, error = None, wait, ""
        try:
            answer = post_json(url, body, t.timeout, headers)
            choices = answer.get("choices") if isinstance(answer, dict) else None
            out = [(_text(c["message"]), c.get("finish_reason") or "stop") for c in choices or []]
            if len(out) == n:
                return out
            reason, error = "garbage", (f"{url}: asked for n={n} completions, got {len(out)} (does the endpoint "
                                        f"support n?): {str(answer)[:200]}")
        except HTTPStatusError as e:
            error = f"{url} answered {e.code}: {_body(e)}"
            if e.code == 429:
                reason, delay = "rate_limited", max(wait, _retry_after(e, wait, cap=t.timeout))
            elif e.code >= 500:
                reason = "server_error"
            elif e.code in FATAL_4XX:
                hint = f" (is {t.api_key_env} set?)" if e.code in (401, 403) else ""
                tally.gave_up(error)
                raise TeacherError(f"teacher {error}{hint}") from None
            else:
                tally.gave_up(error)
                return None
        except (UnreachableError, http.client.HTTPException) as e:  # HTTPException: an answer cut short
            reason, error = "unreachable", f"{url} did not answer: {getattr(e, 'reason', e)}"
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            reason, error = "garbage", f"{url}: an answer that is not a chat completion ({e!r:.200})"
        if attempt < t.retries:
            tally.retried(reason, error)
            sleep(delay * (1.0 + 0.1 * random.random()))
            wait *= 2
    tally.gave_up(error)
    return None


def _text(message: dict[str, Any]) -> str:
    """The answer's text; a reasoning model's separate reasoning (`reasoning_content`) goes back inside <think>
    tags, where a student trained on it will write it."""
    content = message.get("content") or ""
    if not isinstance(content, str):
        raise TypeError(f"message content is {type(content).__name__}")
    thought = message.get("reasoning_content") or message.get("reasoning")
    return f"<think>\n{thought}\n</think>\n{content}" if isinstance(thought, str) and thought else content


class EndpointTeacher:
    """An OpenAI-compatible endpoint; `distill.teacher.concurrency` prompts in flight at once."""

    def __init__(self, t: TeacherConfig, tok):
        self.t, self.tok, self.tally = t, tok, Tally()
        self.name = f"{t.model or 'default'} @ {t.url}"

    def sample(self, rows: list[dict[str, Any]], n: int, params: SamplingParams) -> list[list[Completion] | None]:
        with ThreadPoolExecutor(self.t.concurrency) as ex:
            answers = list(ex.map(lambda r: request_samples(self.t, r["prompt_messages"], n, params, self.tally),
                                  rows))
        out: list[list[Completion] | None] = []
        for row, ans in zip(rows, answers, strict=True):
            if ans is None:
                out.append(None)
                continue
            out.append([Completion(row["prompt_ids"], self.tok(text, add_special_tokens=False)["input_ids"], text, [],
                                   "length" if reason == "length" else "stop") for text, reason in ans])
        return out


class LocalTeacher:
    """A local model sampled in this process, by the recipe's in-process engine (hf, or colocated vllm)."""

    def __init__(self, cfg: Config, path: str, raw_rows: list[dict[str, Any]]):
        from grpo.rollout.base import stop_ids
        from grpo.rollout.hf import HFEngine
        from grpo.runtime.deepspeed_setup import pick_device
        from grpo.runtime.model import load_model, load_tokenizer, resolve_model_path

        if cfg.rollout.engine == "vllm_server":
            raise ConfigError("distill.teacher: for a server, set distill.teacher.url (its OpenAI-compatible /v1)")
        m = cfg.model
        path = resolve_model_path(path)
        self.name, self.tally = path, Tally()
        self.tok = load_tokenizer(path, None, m.trust_remote_code)
        # the raw rows, rendered with the teacher's own tokenizer and chat template (a prompt too long for it is
        # dropped by render and comes back as a failed prompt)
        self.rendered = {r["prompt_id"]: r for r in render(raw_rows, cfg.data, self.tok).rows}
        model = load_model(path, m.dtype, m.attn_implementation, None, m.trust_remote_code)
        device = pick_device(cfg.device)
        if cfg.rollout.engine == "hf":
            self.engine = HFEngine(model.to(device).eval(), self.tok, cfg.rollout.generation_batch_size)
        else:
            from grpo.rollout.vllm_engine import VLLMEngine, probe_ids

            first = next(iter(self.rendered.values()))["prompt_ids"]
            self.engine = VLLMEngine(cfg, path, self.tok, device, 0, 1, stop_ids(self.tok, model),
                                     probe_ids(self.tok, first), getattr(model.config, "max_position_embeddings", None))

    def sample(self, rows: list[dict[str, Any]], n: int, params: SamplingParams) -> list[list[Completion] | None]:
        known = [r for r in rows if r["prompt_id"] in self.rendered]
        comps = iter(self.engine.generate([self.rendered[r["prompt_id"]]["prompt_ids"] for r in known], n, params))
        out: list[list[Completion] | None] = []
        for r in rows:
            if r["prompt_id"] not in self.rendered:
                self.tally.gave_up(f"prompt {r['prompt_id']} is too long for the teacher's context")
                out.append(None)
                continue
            # the student's prompt ids go with the teacher's completion (the record is the student's row)
            out.append([Completion(r["prompt_ids"], c.ids, c.text, c.logprobs, c.finish_reason) for c in next(comps)])
        return out


def read_shards(folder: Path) -> list[dict[str, Any]]:
    samples = []
    for f in sorted(folder.glob("shard-*.jsonl")):
        samples += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return samples


def next_shard(folder: Path) -> int:
    """One past the highest shard index on disk (not the count: with a gap, the count names an existing one)."""
    return max((int(f.stem.split("-")[1]) + 1 for f in folder.glob("shard-*.jsonl")), default=0)


def write_shard(folder: Path, index: int, samples: list[dict[str, Any]]) -> None:
    """Written aside, flushed to disk, then renamed: a crash or a power cut leaves the whole shard or none."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".shard-{index:06d}.tmp"
    with open(tmp, "w") as f:
        f.write("".join(json.dumps(s) + "\n" for s in samples))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(folder / f"shard-{index:06d}.jsonl")


def _total(s: dict[str, Any]) -> float:
    """A sample's total reward; None (a reward that failed on it, stored as null) ranks below every number."""
    return s["total"] if s["total"] is not None else float("-inf")


def select(samples: list[dict[str, Any]], keep: str) -> list[dict[str, Any]]:
    """Of one prompt's samples, those kept: every passing one, the best total reward, or the shortest passing
    one (fewest tokens; ties: the better total, then the first sampled). A passing sample can have no total (a
    reward other than distill.verify failed on it): it ranks last on total."""
    ok = [s for s in samples if s["passed"]]
    if keep == "all" or not ok:
        return ok
    if keep == "best":
        return [max(ok, key=lambda s: (_total(s), -s["num_tokens"]))]
    return [min(ok, key=lambda s: (s["num_tokens"], -_total(s)))]


def build_dataset(samples: list[dict[str, Any]], keep: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The kept rows, and the report: pass rate per prompt, kept fraction, tokens."""
    by: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        by.setdefault(s["prompt_id"], []).append(s)
    rows, passes = [], Counter()
    for pid in by:
        group = sorted(by[pid], key=lambda s: s["index"])
        passes[sum(s["passed"] for s in group)] += 1
        for s in select(group, keep):
            rows.append({"prompt": s["prompt"], "completion": [{"role": "assistant", "content": s["completion"]}],
                         **{k: s[k] for k in ("prompt_id", "answer", "teacher", "sampling", "rewards", "total",
                                              "num_tokens", "finish_reason", "index")}})
    n = len(samples)
    report = {"prompts": len(by), "samples": n, "passed": sum(s["passed"] for s in samples),
              "pass_rate": sum(s["passed"] for s in samples) / max(n, 1),
              "prompts_with_a_pass": sum(v for k, v in passes.items() if k > 0) / max(len(by), 1),
              "passes_per_prompt": {str(k): passes[k] for k in sorted(passes)},
              "kept": len(rows), "kept_fraction": len(rows) / max(n, 1),
              "kept_tokens": sum(r["num_tokens"] for r in rows),
              "sampled_tokens": sum(s["num_tokens"] for s in samples)}
    return rows, report


@dataclass
class Setup:
    """What a run works from, all checked before a teacher is loaded or a request sent (a bad recipe fails in
    seconds): the rewards and the one that decides what passes, the student's tokenizer, the training rows and
    their rendering, and where the data set and its shards go."""

    rewards: list[Any]
    verify: str
    tok: Any
    train_rows: list[dict[str, Any]]
    prompts: PromptSet
    out: Path
    shards: Path


def _rewards(cfg: Config) -> tuple[list[Any], str]:
    """The recipe's rewards and the name of the verifier (distill.verify, else the first reward), after the
    teacher's settings: checked first, as they need nothing loaded."""
    from rewards.runner import build_rewards

    d, t = cfg.distill, cfg.distill.teacher
    if not t.url and not t.model:
        raise ConfigError("distill.teacher: set model (a local folder) or url (an OpenAI-compatible endpoint)")
    try:
        rewards = build_rewards(cfg.rewards)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    verify = d.verify or rewards[0].name
    if verify not in [r.name for r in rewards]:
        raise ConfigError(f"distill.verify: {verify!r} is not one of the recipe's rewards {[r.name for r in rewards]}")
    return rewards, verify


def _setup(cfg: Config) -> Setup:
    """The rewards, and the prompts rendered with the student's tokenizer and chat template, as `grpo train` and
    `grpo eval` render them: the rows `grpo sft` trains on are the student's."""
    from grpo.runtime.model import load_tokenizer, resolve_model_path
    from rewards.runner import check_columns

    rewards, verify = _rewards(cfg)
    student = resolve_model_path(cfg.model.path)
    tok = load_tokenizer(student, cfg.model.revision, cfg.model.trust_remote_code)
    train_rows, _ = load_rows(cfg.data)  # the held-out split stays held out
    prompts = render(train_rows, cfg.data, tok)
    try:
        check_columns(rewards, prompts.columns)
    except ValueError as e:
        raise ConfigError(f"rewards: {e}") from None
    out = Path(cfg.distill.output or Path(cfg.output_dir) / "distilled")
    return Setup(rewards, verify, tok, train_rows, prompts, out, out.parent / (out.name + ".shards"))


def _resume(cfg: Config, s: Setup) -> tuple[int, list[dict[str, Any]]]:
    """How many prompts the shards already hold (a rerun after a crash or a stop), and the rows still to sample:
    the first distill.num_prompts (all when 0), less those."""
    d = cfg.distill
    rows = s.prompts.rows[: d.num_prompts] if d.num_prompts else s.prompts.rows
    done = {x["prompt_id"] for x in read_shards(s.shards)}
    todo = [r for r in rows if r["prompt_id"] not in done]
    if done:
        log.info("distill: %d prompts already in %s, %d to go", len(done), s.shards, len(todo))
    return len(done), todo


def _teacher(cfg: Config, s: Setup, todo: list[dict[str, Any]]) -> tuple[EndpointTeacher | LocalTeacher | None, str]:
    """The teacher and the name its samples are recorded under. A local model is loaded only when there is
    something to sample, from the raw rows of the prompts to go (it renders them with its own template); with every
    prompt on disk (a rerun after the sampling) there is no teacher to load, only the data set to build."""
    from grpo.runtime.model import resolve_model_path

    t = cfg.distill.teacher
    if t.url:
        teacher: EndpointTeacher | LocalTeacher = EndpointTeacher(t, s.tok)
        return teacher, teacher.name
    if todo:
        wanted = {r["prompt_id"] for r in todo}
        teacher = LocalTeacher(cfg, t.model, [r for r in s.train_rows if r["prompt_id"] in wanted])
        return teacher, teacher.name
    return None, resolve_model_path(t.model)


def _records(groups: list[Group], s: Setup, name: str, sampling: str, threshold: float) -> list[dict[str, Any]]:
    """A scored batch as shard records, one per sample: what build_dataset needs to select and write it. A reward
    that failed on a sample (NaN) is stored as null, JSON having no NaN; such a verifier score does not pass."""
    samples = []
    for g in groups:
        for j, c in enumerate(g.completions):
            per = {k: v[j] for k, v in g.rewards.items()}
            v = per[s.verify]
            samples.append({"prompt_id": g.row["prompt_id"], "index": j, "prompt": g.row["prompt_messages"],
                            "answer": str(g.row.get("answer", "")), "completion": c.text,
                            "num_tokens": len(c.ids), "finish_reason": c.finish_reason,
                            "teacher": name, "sampling": sampling,
                            "rewards": json.dumps({k: (None if x != x else x) for k, x in per.items()}),
                            "total": g.total[j] if g.total[j] == g.total[j] else None,
                            "passed": bool(v == v and v >= threshold)})
    return samples


def _sample_shards(cfg: Config, s: Setup, teacher: EndpointTeacher | LocalTeacher | None, name: str, tally: Tally,
                   todo: list[dict[str, Any]], done: int) -> float:
    """Sample, score and write `todo`, distill.batch_prompts prompts a shard, so that a crash loses at most the
    batch in flight; a batch in which every request failed stops the run (the endpoint is down: rerun later).
    Returns when the sampling began, after the scoring pool started: the report's clock."""
    from rewards.pool import WorkerPool

    d, r = cfg.distill, cfg.rollout
    params = SamplingParams(r.max_new_tokens, r.temperature, r.top_p)
    sampling = json.dumps({"n": d.num_samples, "temperature": r.temperature, "top_p": r.top_p,
                           "max_new_tokens": r.max_new_tokens})
    pool = WorkerPool(cfg.scoring.workers, cfg.scoring.memory_mb) if cfg.scoring.workers > 0 else None
    first = next_shard(s.shards)
    t0 = time.perf_counter()
    try:
        for b, i in enumerate(range(0, len(todo), d.batch_prompts)):
            batch = todo[i : i + d.batch_prompts]
            comps = teacher.sample(batch, d.num_samples, params)
            ok = [(row, c) for row, c in zip(batch, comps, strict=True) if c]
            if not ok:
                raise TeacherError(f"teacher {name}: every request of a batch failed after "
                                   f"{d.teacher.retries} retries; last error: {tally.last_error}. The "
                                   f"{done + i} prompts distilled so far are kept in {s.shards}: rerun to go on")
            groups, _, _ = score_groups([x for x, _ in ok], [c for _, c in ok], s.rewards, s.prompts, pool)
            samples = _records(groups, s, name, sampling, d.threshold)
            write_shard(s.shards, first + b, samples)
            log.info("distill: %d/%d prompts, %d samples, %.1f s", min(i + d.batch_prompts, len(todo)), len(todo),
                     len(samples), time.perf_counter() - t0)
    finally:
        if pool is not None:
            pool.close()
    return t0


def _write(out: Path, rows: list[dict[str, Any]], report: dict[str, Any], verify: str, threshold: float) -> None:
    """The data set (save_to_disk for `grpo sft`, plus data.parquet for other tools) and report.json; an error
    instead when nothing passed, as there is nothing to fine-tune on."""
    import datasets

    if not rows:
        raise ConfigError(f"distill: no sample passed {verify} >= {threshold} ({report['samples']} sampled): "
                          "nothing to fine-tune on; check the teacher and distill.verify")
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(out))
    ds.to_parquet(str(out / "data.parquet"))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    log.info("distill: %s", json.dumps(report))


def distill(cfg: Config) -> Path:
    """Sample, verify and write shards; then the data set (save_to_disk, plus data.parquet) and report.json."""
    d = cfg.distill
    s = _setup(cfg)
    done, todo = _resume(cfg, s)
    teacher, name = _teacher(cfg, s, todo)
    tally = teacher.tally if teacher is not None else Tally()
    t0 = _sample_shards(cfg, s, teacher, name, tally, todo, done)
    rows, report = build_dataset(read_shards(s.shards), d.keep)
    report.update({"teacher": name, "keep": d.keep, "verify": s.verify, "threshold": d.threshold,
                   "failed_requests": tally.failed, "retries": dict(tally.retries),
                   "seconds": round(time.perf_counter() - t0, 1)})
    _write(s.out, rows, report, s.verify, d.threshold)
    return s.out
