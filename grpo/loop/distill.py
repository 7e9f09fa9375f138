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
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from grpo.config import Config, ConfigError, TeacherConfig
from grpo.data import load_rows, render
from grpo.rollout.base import Completion, SamplingParams
from grpo.rollout.scoring import score_groups

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


def _retry_after(e: urllib.error.HTTPError, default: float, cap: float) -> float:
    """Retry-After in seconds or as an HTTP date (RFC 9110), at most `cap` (a day's wait is not worth one
    prompt); `default` when absent or unreadable."""
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


def _body(e: urllib.error.HTTPError) -> str:
    """An error answer's first 300 characters; a body cut off mid-read (a reset, a timeout) is no reason to stop
    retrying."""
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
    body = json.dumps({"model": t.model, "messages": messages, "n": n, "max_tokens": params.max_new_tokens,
                       "temperature": params.temperature, "top_p": params.top_p}).encode()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(t.api_key_env)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    wait = t.backoff
    for attempt in range(t.retries + 1):
        reason, delay, error = None, wait, ""
        try:
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=t.timeout) as r:
                answer = json.loads(r.read())
            choices = answer.get("choices") if isinstance(answer, dict) else None
            out = [(_text(c["message"]), c.get("finish_reason") or "stop") for c in choices or []]
            if len(out) == n:
                return out
            reason, error = "garbage", (f"{url}: asked for n={n} completions, got {len(out)} (does the endpoint "
                                        f"support n?): {str(answer)[:200]}")
        except urllib.error.HTTPError as e:
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
        except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as e:
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


def distill(cfg: Config) -> Path:
    """Sample, verify and write shards; then the data set (save_to_disk, plus data.parquet) and report.json."""
    import datasets

    from grpo.runtime.model import load_tokenizer, resolve_model_path
    from rewards.pool import WorkerPool
    from rewards.runner import build_rewards, check_columns

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
    student = resolve_model_path(cfg.model.path)
    tok = load_tokenizer(student, cfg.model.revision, cfg.model.trust_remote_code)
    train_rows, _ = load_rows(cfg.data)  # the held-out split stays held out
    prompts = render(train_rows, cfg.data, tok)
    try:
        check_columns(rewards, prompts.columns)
    except ValueError as e:
        raise ConfigError(f"rewards: {e}") from None
    todo_rows = prompts.rows[: d.num_prompts] if d.num_prompts else prompts.rows
    out = Path(d.output or Path(cfg.output_dir) / "distilled")
    shards = out.parent / (out.name + ".shards")
    done = {s["prompt_id"] for s in read_shards(shards)}
    todo = [r for r in todo_rows if r["prompt_id"] not in done]
    if done:
        log.info("distill: %d prompts already in %s, %d to go", len(done), shards, len(todo))
    if t.url:
        teacher: EndpointTeacher | LocalTeacher | None = EndpointTeacher(t, tok)
        name = teacher.name
    elif todo:
        wanted = {r["prompt_id"] for r in todo}
        teacher = LocalTeacher(cfg, t.model, [r for r in train_rows if r["prompt_id"] in wanted])
        name = teacher.name
    else:  # every prompt is on disk already (a rerun after the sampling): no teacher to load, the data set to build
        teacher, name = None, resolve_model_path(t.model)
    tally = teacher.tally if teacher is not None else Tally()
    r = cfg.rollout
    params = SamplingParams(r.max_new_tokens, r.temperature, r.top_p)
    sampling = json.dumps({"n": d.num_samples, "temperature": r.temperature, "top_p": r.top_p,
                           "max_new_tokens": r.max_new_tokens})
    pool = WorkerPool(cfg.scoring.workers, cfg.scoring.memory_mb) if cfg.scoring.workers > 0 else None
    first = next_shard(shards)
    t0 = time.perf_counter()
    try:
        for b, i in enumerate(range(0, len(todo), d.batch_prompts)):
            batch = todo[i : i + d.batch_prompts]
            comps = teacher.sample(batch, d.num_samples, params)
            ok = [(row, c) for row, c in zip(batch, comps, strict=True) if c]
            if not ok:
                raise TeacherError(f"teacher {name}: every request of a batch failed after "
                                   f"{t.retries} retries; last error: {tally.last_error}. The "
                                   f"{len(done) + i} prompts distilled so far are kept in {shards}: rerun to go on")
            groups, errors, _ = score_groups([x for x, _ in ok], [c for _, c in ok], rewards, prompts, pool)
            samples = []
            for g in groups:
                for j, c in enumerate(g.completions):
                    per = {k: v[j] for k, v in g.rewards.items()}
                    v = per[verify]
                    samples.append({"prompt_id": g.row["prompt_id"], "index": j, "prompt": g.row["prompt_messages"],
                                    "answer": str(g.row.get("answer", "")), "completion": c.text,
                                    "num_tokens": len(c.ids), "finish_reason": c.finish_reason,
                                    "teacher": name, "sampling": sampling,
                                    "rewards": json.dumps({k: (None if x != x else x) for k, x in per.items()}),
                                    "total": g.total[j] if g.total[j] == g.total[j] else None,
                                    "passed": bool(v == v and v >= d.threshold)})
            write_shard(shards, first + b, samples)
            log.info("distill: %d/%d prompts, %d samples, %.1f s", min(i + d.batch_prompts, len(todo)), len(todo),
                     len(samples), time.perf_counter() - t0)
    finally:
        if pool is not None:
            pool.close()
    rows, report = build_dataset(read_shards(shards), d.keep)
    report.update({"teacher": name, "keep": d.keep, "verify": verify, "threshold": d.threshold,
                   "failed_requests": tally.failed, "retries": dict(tally.retries),
                   "seconds": round(time.perf_counter() - t0, 1)})
    if not rows:
        raise ConfigError(f"distill: no sample passed {verify} >= {d.threshold} ({report['samples']} sampled): "
                          "nothing to fine-tune on; check the teacher and distill.verify")
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(out))
    ds.to_parquet(str(out / "data.parquet"))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    log.info("distill: %s", json.dumps(report))
    return out
