"""Server mode: vLLM generation servers on other GPUs or nodes, and the trainer's client for them.

    grpo serve RECIPE [overrides] --port 8000        # one per GPU / node (slurm/multinode.slurm starts them)
    grpo train RECIPE rollout.engine=vllm_server rollout.vllm.servers=[http://node7:8000,http://node8:8000]

HTTP (JSON) carries the small things: prompts and completions, health, sync control. Weights travel over a
torch.distributed process group the trainer's rank 0 and every server join at start-up (NCCL between GPUs, gloo on
CPU, so CI runs the same code): the trainer broadcasts each bucket as one flat tensor per dtype, the servers load it
into vLLM. The process group is built from a TCPStore on the trainer, outside the trainer's own default group,
so training ranks and servers never have to agree on a world.

Every wait has a deadline (`rollout.vllm.timeout`): a dead or wedged server is an error that names it, not a hang.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
import torch.distributed as dist

from grpo import collectives as coll
from grpo.config import Config
from grpo.model import DTYPES
from grpo.rollout import Completion, SamplingParams
from grpo.vllm_engine import (
    SyncCheck,
    SyncError,
    canary_diff,
    completions,
    finish_sync,
    judge,
    load_weights,
    trainer_probe_logprobs,
)
from grpo.weights import checksum, weight_buckets

log = logging.getLogger("grpo")

class ServerError(RuntimeError):
    """A generation server did not answer, or answered with an error; the message names it."""


def weight_group(host: str, port: int, rank: int, world: int, backend: str, timeout: float):
    """A process group of the trainer (rank 0, which hosts the store) and the servers, independent of any
    default group."""
    store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timedelta(seconds=timeout),
                          wait_for_workers=False)
    store = dist.PrefixStore("grpo-weights", store)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world), store
    return dist.ProcessGroupGloo(store, rank, world, timedelta(seconds=timeout)), store


def flat_buckets(tensors: list[tuple[str, torch.Tensor]]) -> list[tuple[str, list[tuple[str, list[int]]]]]:
    """Group a bucket's tensors by dtype (one broadcast each): [(dtype, [(name, shape), ...]), ...]."""
    by: dict[str, list[tuple[str, list[int]]]] = {}
    for name, t in tensors:
        by.setdefault(str(t.dtype).removeprefix("torch."), []).append((name, list(t.shape)))
    return list(by.items())


# ---------------------------------------------------------------------------------------------- server

class RequestMerger:
    """Generation requests that arrive together run as one engine call.

    With W training ranks a server gets W requests per step (each rank's share of whole groups). Run one at a time
    behind the engine lock, vLLM would see a 1/W batch each time and the server would idle between them. Here the
    first request waits until the `expect` requests of its step are in (each says how many ranks send one), or at
    most `max_wait` seconds, then all of them go to the engine in one call, each prompt with its own sampling
    parameters, and every caller gets its own results back."""

    def __init__(self, run, max_wait: float = 1.0):
        self.run = run  # (prompts, per-prompt sampling params) -> per-prompt outputs
        self.max_wait = max_wait
        self.cond = threading.Condition()
        self.pending: list[dict[str, Any]] = []
        self.leader_busy = False

    def submit(self, prompts: list[Any], params: list[Any], expect: int = 1) -> list[Any]:
        me = {"prompts": prompts, "params": params, "done": False, "out": None, "error": None}
        with self.cond:
            self.pending.append(me)
            self.cond.notify_all()  # a leader may be waiting for this one
            if self.leader_busy:  # a leader is collecting or running: it takes this request, or the next one will
                while not me["done"] and self.leader_busy:
                    self.cond.wait()
                if me["done"]:
                    return self._result(me)
            self.leader_busy = True
        batch: list[dict[str, Any]] = []
        try:
            deadline = time.monotonic() + self.max_wait
            with self.cond:  # the other ranks' requests of this step
                while len(self.pending) < expect and time.monotonic() < deadline:
                    self.cond.wait(deadline - time.monotonic())
                batch, self.pending = self.pending, []
            try:
                outs = self.run([p for r in batch for p in r["prompts"]], [s for r in batch for s in r["params"]])
                at = 0
                for r in batch:
                    r["out"], at = outs[at : at + len(r["prompts"])], at + len(r["prompts"])
            except Exception as e:  # noqa: BLE001 - every caller of the batch gets the error
                for r in batch:
                    r["error"] = e
        finally:
            with self.cond:
                for r in batch:
                    r["done"] = True
                self.leader_busy = False
                self.cond.notify_all()
        return self._result(me)

    @staticmethod
    def _result(r: dict[str, Any]) -> list[Any]:
        if r["error"] is not None:
            raise r["error"]
        return r["out"]


class GenerationServer:
    """vLLM behind a small HTTP API. One lock serialises the engine (generate, weight loading, probes);
    concurrent generation requests are merged into one engine call (RequestMerger)."""

    def __init__(self, cfg: Config, model_path: str, device: str, model_limit: int | None):
        from grpo.vllm_engine import build_llm, llm_kwargs

        self.cfg = cfg
        self.device = device
        self.llm = build_llm(llm_kwargs(cfg, model_path, device, cfg.seed, False, model_limit))
        self.lock = threading.Lock()
        self.merger = RequestMerger(self._run)
        self.batch_sizes: list[int] = []  # prompts per engine call (the last 100), reported by /health
        self.group = None
        self.store = None
        self.version = 0  # weight syncs received

    def health(self, _req: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "version": self.version, "model": self.cfg.model.path, "batch_sizes": self.batch_sizes}

    def generate(self, req: dict[str, Any]) -> dict[str, Any]:
        from grpo.vllm_engine import sample_dicts, vllm_sampling_params

        params = SamplingParams(req["max_new_tokens"], req["temperature"], req["top_p"], req["greedy"])
        sp = vllm_sampling_params(params, req["n"], req["stop_ids"])
        outs = self.merger.submit(list(req["prompts"]), [sp] * len(req["prompts"]), int(req.get("ranks", 1)))
        return {"samples": [sample_dicts(o) for o in outs]}

    def _run(self, prompts: list[list[int]], params: list[Any]) -> list[Any]:
        with self.lock:
            self.batch_sizes = (self.batch_sizes + [len(prompts)])[-100:]
            return self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    def sync_init(self, req: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.group, self.store = weight_group(req["host"], req["port"], req["rank"], req["world"],
                                                  req["backend"], req["timeout"])
        return {"ok": True}

    def sync_bucket(self, req: dict[str, Any]) -> dict[str, Any]:
        """Receive one bucket (one flat tensor per dtype, broadcast by the trainer) and load it into vLLM."""
        if self.group is None:
            raise RuntimeError("no weight group: the trainer must call /sync/init first")
        dev = "cuda" if self.device == "cuda" else "cpu"
        with self.lock:
            tensors = []
            for dtype, entries in req["groups"]:
                total = sum(math.prod(shape) for _, shape in entries)
                flat = torch.empty(total, dtype=DTYPES[dtype], device=dev)
                self.group.broadcast(flat, 0).wait()
                off = 0
                for name, shape in entries:
                    n = math.prod(shape)
                    tensors.append((name, flat[off : off + n].view(shape)))
                    off += n
            load_weights(self.llm, tensors)
        return {"ok": True}

    def sync_finish(self, req: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            held, probe = finish_sync(self.llm, req["probe"])
            self.version += 1
        return {"checksum": list(held), "probe": probe, "version": self.version}


def make_handler(server: GenerationServer):
    routes = {"/health": server.health, "/generate": server.generate, "/sync/init": server.sync_init,
              "/sync/bucket": server.sync_bucket, "/sync/finish": server.sync_finish}

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self) -> None:
            fn = routes.get(self.path)
            if fn is None:
                self._reply(404, {"error": f"no route {self.path}"})
                return
            try:
                n = int(self.headers.get("Content-Length") or 0)
                req = json.loads(self.rfile.read(n) or b"{}")
                self._reply(200, fn(req))
            except Exception as e:  # the trainer gets the reason instead of a dropped connection
                log.exception("request %s failed", self.path)
                self._reply(500, {"error": f"{type(e).__name__}: {e}"})

        do_GET = do_POST = _handle

        def log_message(self, fmt: str, *args) -> None:  # requests are logged by the trainer, not here
            pass

    return Handler


def serve(cfg: Config, host: str, port: int, ready_file: str | None = None) -> None:
    """Start vLLM for the recipe's model and serve until killed."""
    from grpo.engine import pick_device
    from grpo.model import resolve_model_path

    device = pick_device(cfg.device)
    model_path = resolve_model_path(cfg.model.path)
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    server = GenerationServer(cfg, model_path, device, limit)
    httpd = ThreadingHTTPServer((host, port), make_handler(server))
    url = f"http://{socket.gethostname() if host in ('0.0.0.0', '') else host}:{httpd.server_address[1]}"
    log.info("grpo serve: ready at %s", url)
    print(f"grpo serve: ready at {url}", flush=True)
    if ready_file:
        with open(ready_file, "a") as f:
            f.write(url + "\n")
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()


# ---------------------------------------------------------------------------------------------- client

def post(url: str, route: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    req = urllib.request.Request(url.rstrip("/") + route, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read()).get("error", "")
        except Exception:
            detail = ""
        raise ServerError(f"vLLM server {url}{route} answered {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise ServerError(f"vLLM server {url} did not answer {route} within {timeout:g} s: {reason} "
                          "(is `grpo serve` running there? see rollout.vllm.servers)") from None


def _parallel(fns: list) -> list[Any]:
    """Run the callables in threads; re-raise the first error after all are done."""
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException | None] = [None] * len(fns)

    def run(i):
        try:
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in errors:
        if e is not None:
            raise e
    return results


class ServerEngine:
    """The trainer's side: prompts are split over the servers; after each update rank 0 sends the weights."""

    def __init__(self, cfg: Config, tok, rank: int, world: int, stop_ids: list[int], probe: list[int]):
        v = cfg.rollout.vllm
        self.cfg, self.tok, self.rank, self.world = cfg, tok, rank, world
        self.urls = list(v.servers)
        self.stop_ids, self.probe = stop_ids, probe
        self.timeout = v.timeout
        self.zero3 = cfg.deepspeed.zero_stage == 3
        for url in self.urls:
            post(url, "/health", {}, min(self.timeout, 30.0))
        self.group = None
        if rank == 0:
            self._init_group()

    def _init_group(self) -> None:
        v = self.cfg.rollout.vllm
        host = v.sync_host or ("127.0.0.1" if all(_is_local(u) for u in self.urls) else socket.gethostname())
        backend = "nccl" if torch.cuda.is_available() and self.cfg.device != "cpu" else "gloo"
        world = len(self.urls) + 1
        body = {"host": host, "port": v.sync_port, "world": world, "backend": backend, "timeout": self.timeout}
        calls = [lambda i=i, u=u: post(u, "/sync/init", {**body, "rank": i + 1}, self.timeout)
                 for i, u in enumerate(self.urls)]
        calls.append(lambda: weight_group(host, v.sync_port, 0, world, backend, self.timeout))
        *_, (self.group, self.store) = _parallel(calls)
        self.backend = backend

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[list[Completion]]:
        if not prompts:
            return []
        k = len(self.urls)
        # Contiguous shares keep a rank's prompts in order; a server gets whole groups (its prefix cache reuses
        # each prompt for the group's n samples).
        shares = [prompts[i * len(prompts) // k : (i + 1) * len(prompts) // k] for i in range(k)]
        body = {"n": n, "max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                "top_p": params.top_p, "greedy": params.greedy, "stop_ids": self.stop_ids,
                "ranks": self.world}  # the server merges the requests of a step's ranks into one engine call
        calls = [lambda u=u, s=s: post(u, "/generate", {**body, "prompts": s}, self.timeout)["samples"]
                 if s else [] for u, s in zip(self.urls, shares, strict=True)]
        out: list[list[Completion]] = []
        for share, samples in zip(shares, _parallel(calls), strict=True):
            out += [completions(p, s, self.tok) for p, s in zip(share, samples, strict=True)]
        return out

    def release(self) -> None:
        """Nothing to free here: the servers run on other GPUs."""

    def sync(self, model: torch.nn.Module) -> dict[str, float]:
        """Every rank walks the buckets (ZeRO-3 gathers are collective); rank 0 broadcasts them to the servers,
        then checks each server's checksum and canary. The verdict is shared so all ranks stop together."""
        sent = [0.0, 0.0]
        bucket_bytes = self.cfg.rollout.vllm.sync_bucket_mb * 2**20
        failure: Exception | None = None
        for bucket in weight_buckets(model, bucket_bytes, self.zero3):
            if self.rank != 0 or failure is not None:
                continue  # keep walking: the other ranks' ZeRO-3 gathers wait for this one
            s, q = checksum(t for _, t in bucket)
            sent[0] += s
            sent[1] += q
            try:
                self._send(bucket)
            except (ServerError, RuntimeError) as e:  # a server died mid-sync: report it once every rank is here
                failure = e
        trainer_lp = trainer_probe_logprobs(model, self.probe)  # every rank: under ZeRO-3 it is collective
        verdict: list[Any] = [failure]
        if self.rank == 0 and failure is None:
            try:
                verdict[0] = self._check(trainer_lp, (sent[0], sent[1]))
            except (SyncError, ServerError) as e:
                verdict[0] = e
        if self.world > 1:
            verdict[0] = coll.broadcast_object(verdict[0])
        if isinstance(verdict[0], BaseException):
            raise verdict[0]
        return verdict[0]

    def _send(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        groups = flat_buckets(bucket)
        dev = "cuda" if self.backend == "nccl" else "cpu"
        calls = [lambda u=u: post(u, "/sync/bucket", {"groups": groups}, self.timeout) for u in self.urls]

        def broadcast():
            tensors = dict(bucket)
            for _, entries in groups:  # the order the servers receive in
                flat = torch.cat([tensors[name].reshape(-1) for name, _ in entries]).to(dev)
                work = self.group.broadcast(flat, 0)
                if not work.wait(timedelta(seconds=self.timeout)):
                    raise ServerError(f"weight broadcast to {self.urls} did not finish in {self.timeout:g} s")

        _parallel([*calls, broadcast])

    def _check(self, trainer_lp: list[float], sent: tuple[float, float]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        worst = None
        for url in self.urls:
            r = post(url, "/sync/finish", {"probe": self.probe}, self.timeout)
            mean_abs, max_abs = canary_diff(r["probe"], trainer_lp)
            check = SyncCheck(sent, tuple(r["checksum"]), mean_abs, max_abs)
            judge(check, self.cfg, f"vLLM server {url}")
            if worst is None or not mean_abs <= worst.canary_mean_abs:
                worst = check
        metrics.update(worst.metrics())
        return metrics


def _is_local(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    return host in ("localhost", "127.0.0.1", "::1")
