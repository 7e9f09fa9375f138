"""Server mode, the trainer's side: `vllm serve` processes (started by `grpo serve`, grpo/commands/serve.py) on
other GPUs or nodes.

The servers are plain `vllm serve` processes (`grpo serve` only fills in the model, ports and settings from the
recipe): generation goes to their OpenAI-compatible /v1/completions (token ids in, token ids and sampled logprobs
out), so eval harnesses and chat clients can use the same servers. Weights go through vLLM's RL endpoints and its
trainer-side weight-transfer API (grpo/rollout/transfer/: vLLM's `nccl` between GPUs, our gloo `grpo_broadcast` on
CPU).
After each sync every server's weights are checksummed (through vLLM's /collective_rpc into our worker extension)
and its logprobs of a fixed probe compared with the trainer's.

Every wait has a deadline (`rollout.vllm.timeout`): a dead or wedged server is an error that names it, not a hang.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import urllib.parse
from typing import Any

import torch

from grpo.config import Config
from grpo.rollout.base import Completion, SamplingParams
from grpo.rollout.http import ServerError, parallel, request
from grpo.rollout.vllm_engine import (
    SyncCheck,
    SyncError,
    canary_diff,
    completions,
    judge,
    sampling_fields,
    trainer_probe_logprobs,
)
from grpo.runtime import collectives as coll

log = logging.getLogger("grpo")


def completion_body(prompts: list[list[int]], n: int, params: SamplingParams, stop_ids: list[int]) -> dict[str, Any]:
    """An OpenAI-compatible /v1/completions request: token ids in; token ids and the sampled tokens' logprobs out,
    sampled as the colocated engine samples (`sampling_fields`)."""
    return {"prompt": prompts, "n": n, **sampling_fields(params, stop_ids), "return_token_ids": True}


def samples_from(choices: list[dict[str, Any]], num_prompts: int, n: int) -> list[list[dict[str, Any]]]:
    """The choices of a completions answer (prompt-major, n per prompt) as per-prompt sample dicts."""
    if len(choices) != num_prompts * n:
        raise ServerError(f"expected {num_prompts * n} completions, got {len(choices)}")
    out = []
    for c in choices:
        ids = list(c["token_ids"])
        lps = [float(x) for x in (c.get("logprobs") or {}).get("token_logprobs") or []]
        if len(lps) != len(ids):
            raise ServerError(f"vLLM returned {len(lps)} logprobs for {len(ids)} tokens")
        reason = c.get("stop_reason")
        out.append({"ids": ids, "logprobs": lps, "finish_reason": "stop" if c["finish_reason"] == "stop" else "length",
                    "stop_reason": reason if isinstance(reason, str) else None})
    return [out[i * n : (i + 1) * n] for i in range(num_prompts)]


class ServerEngine:
    """The trainer's side of server mode: prompts are split over `vllm serve` processes (whole groups each); after
    each update rank 0 pauses them, the weights go through vLLM's weight-transfer API (grpo/rollout/transfer/), rank 0
    resumes them and checks what each holds (checksum and canary)."""

    def __init__(self, cfg: Config, tok, rank: int, world: int, stop_ids: list[int], probe: list[int]):
        v = cfg.rollout.vllm
        self.cfg, self.tok, self.rank, self.world = cfg, tok, rank, world
        self.urls = list(v.servers)
        self.stop_ids, self.probe = stop_ids, probe
        self.timeout = v.timeout
        # the optimizer steps the servers' weights include (set by each sync); a completion records the version it
        # was requested at
        self.version = 0
        # async rollouts: requests in flight during an update are kept (finish on the new weights) or aborted (and
        # sent again); otherwise the update waits for them
        self.pause_mode = cfg.rollout.async_pause if cfg.rollout.async_ else "wait"
        for url in self.urls:
            request(url, "/health", None, min(self.timeout, 30.0))
        self._init_transfer()

    def _init_transfer(self) -> None:
        """Every rank builds vLLM's trainer engine (the others only take part in the ZeRO-3 gathers); rank 0 first
        closes what a trainer killed mid-update left open on the servers (usually nothing: the errors are
        ignored), then meets them in the transfer group."""
        from grpo.rollout.transfer.base import ModelSource, ServersClient, resolve_backend, trainer_engine

        v = self.cfg.rollout.vllm
        if self.rank == 0:
            for url in self.urls:
                for route in ("/finish_weight_update", "/resume"):
                    with contextlib.suppress(ServerError):
                        request(url, route, {}, self.timeout)
        bucket_bytes = v.sync_bucket_mb * 2**20
        self.client = ServersClient(self.urls, self.timeout)
        self.source = ModelSource(self.cfg.deepspeed.zero_stage == 3, bucket_bytes, sums=self.rank == 0)
        self.backend = resolve_backend(v.weight_transfer, self.cfg.device)
        host = v.sync_host or ("127.0.0.1" if all(_is_local(u) for u in self.urls) else socket.gethostname())
        self.transfer = trainer_engine(self.backend, rank=self.rank, host=host, port=v.sync_port,
                                       num_servers=len(self.urls), bucket_bytes=bucket_bytes, timeout=self.timeout,
                                       client=self.client, source=self.source)

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        if not prompts:
            return []
        k = len(self.urls)
        # Contiguous shares keep a rank's prompts in order; a server gets whole groups (its prefix cache reuses
        # each prompt for the group's n samples), and vLLM batches the requests of all ranks that arrive together.
        shares = [prompts[i * len(prompts) // k : (i + 1) * len(prompts) // k] for i in range(k)]
        calls = [lambda u=u, s=s: self._complete(u, s, n, params) if s else (0, [])
                 for u, s in zip(self.urls, shares, strict=True)]
        out: list[list[Completion]] = []
        for share, (version, choices) in zip(shares, parallel(calls), strict=True):
            for p, samples in zip(share, samples_from(choices, len(share), n), strict=True):
                out.append(completions(p, samples, self.tok))
                for c in out[-1]:
                    c.version = version
        return out

    def _complete(self, url: str, prompts: list[list[int]], n: int, params: SamplingParams) -> tuple[int, list]:
        """One server's share, sent again when a weight update aborted it (rollout.async_pause=abort); returns the
        weight version it was sent at and the choices."""
        for _ in range(5):
            version = self.version
            choices = request(url, "/v1/completions", completion_body(prompts, n, params, self.stop_ids),
                              self.timeout)["choices"]
            if self.pause_mode != "abort" or not any(c.get("finish_reason") == "abort" for c in choices):
                return version, choices
        raise ServerError(f"vLLM server {url} aborted the same request 5 times (is it shutting down?)")

    def release(self) -> None:
        """Nothing to free here: the servers run on other GPUs."""

    def sync(self, model: torch.nn.Module, version: int = 0) -> dict[str, float]:
        """Every rank sends (vLLM's engine: rank 0 streams, the others take part in the ZeRO-3 gathers); rank 0
        pauses the servers before and resumes them after, then checks each server's checksum and canary. The
        verdict is shared so all ranks stop together."""
        failure: Exception | None = None
        if self.rank == 0:
            try:  # in-flight requests finish first (wait), or are held (keep) or aborted (abort) during the update
                self._all(f"/pause?mode={self.pause_mode}&clear_cache=true")
            except ServerError as e:
                failure = e
        self.source.begin(model)
        self.client.version = version
        try:
            if failure is None:
                self.transfer.send_weights()
        except (ServerError, RuntimeError, ValueError) as e:  # a server died mid-sync: report it once all are here
            failure = e
        finally:
            self.source.finish_pass()  # the rest of the gathers the other ranks are waiting in (after a failure)
        if self.rank == 0 and failure is None:
            try:
                self.version = version  # requests sent from here on run on the new weights
                self._reset_prefix_cache()  # KV blocks of the old weights (the pause clears it too: a safety net)
                self._all("/resume")
            except ServerError as e:
                failure = e
        trainer_lp = trainer_probe_logprobs(model, self.probe)  # every rank: under ZeRO-3 it is collective
        verdict: list[Any] = [failure]
        if self.rank == 0 and failure is None:
            try:
                verdict[0] = self._check(trainer_lp, self.source.sent)
            except (SyncError, ServerError) as e:
                verdict[0] = e
        if self.world > 1:
            verdict[0] = coll.broadcast_object(verdict[0])
        if isinstance(verdict[0], BaseException):
            raise verdict[0]
        self.version = version  # every rank: its completions record it
        return verdict[0]

    def _all(self, route: str, body: dict[str, Any] | None = None) -> list[Any]:
        return parallel([lambda u=u: request(u, route, body or {}, self.timeout) for u in self.urls])

    def _reset_prefix_cache(self) -> None:
        for url, r in zip(self.urls, self._all("/reset_prefix_cache"), strict=True):
            if isinstance(r, dict) and r.get("success") is False:
                raise ServerError(f"vLLM server {url} could not reset its prefix cache after a weight update")

    def _check(self, trainer_lp: list[float], sent: tuple[float, float]) -> dict[str, float]:
        """Each server's checksum (through vLLM's /collective_rpc into our worker extension) and its logprobs of
        the probe (prompt logprobs of a completions request) against the trainer's; the worst server's figures."""
        worst = None
        for url in self.urls:
            held = request(url, "/collective_rpc", {"method": "grpo_checksum"}, self.timeout)["results"][0]
            probe = request(url, "/v1/completions", {"prompt": self.probe, "max_tokens": 1, "temperature": 1.0,
                                                     "prompt_logprobs": 0}, self.timeout)
            steps = probe["choices"][0]["prompt_logprobs"][1:]
            rollout_lp = [float(step[str(t)]["logprob"]) for step, t in zip(steps, self.probe[1:], strict=True)]
            mean_abs, max_abs = canary_diff(rollout_lp, trainer_lp)
            check = SyncCheck(sent, (float(held[0]), float(held[1])), mean_abs, max_abs)
            judge(check, self.cfg, f"vLLM server {url}")
            if worst is None or not mean_abs <= worst.canary_mean_abs:
                worst = check
        return worst.metrics()


def _is_local(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    return host in ("localhost", "127.0.0.1", "::1")
