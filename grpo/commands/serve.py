"""`grpo serve RECIPE`: a thin launcher of vLLM's own server for a recipe's model.

    grpo serve RECIPE [overrides] --port 8000        # one per GPU / node (slurm/multinode.slurm starts them)
    grpo train RECIPE rollout.engine=vllm_server rollout.vllm.servers=[http://node7:8000,http://node8:8000]

It runs a plain `vllm serve` with the recipe's engine settings, vLLM's RL endpoints switched on, our weight-transfer
backend and checksum (grpo/vllm_plugin.py), waits until it answers, prints its URL and passes signals on. The
trainer's side is grpo/rollout/server.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from grpo.config import Config
from grpo.rollout.server import ServerError, request


def vllm_serve_command(cfg: Config, model_path: str, device: str, host: str, port: int,
                       model_limit: int | None) -> tuple[list[str], dict[str, str]]:
    """The `vllm serve` command line and environment for a recipe: the same engine settings as the colocated
    engine (grpo.rollout.vllm_engine.llm_kwargs), our weight-transfer backend, and vLLM's RL endpoints switched on."""
    from grpo.rollout.transfer.base import resolve_backend
    from grpo.rollout.vllm_engine import llm_kwargs

    kw = llm_kwargs(cfg, model_path, device, cfg.seed, False, model_limit)
    backend = resolve_backend(cfg.rollout.vllm.weight_transfer, device)
    cmd = [sys.executable, "-m", "grpo.commands.vllm_cli", "serve", kw.pop("model"), "--host", host,
           "--port", str(port), "--weight-transfer-config", json.dumps({"backend": backend}),
           "--worker-extension-cls", "grpo.vllm_plugin.GrpoWorkerExtension", "--disable-log-stats",
           "--uvicorn-log-level", "warning",
           # vLLM's own sampling defaults, not the model's generation_config.json (a Qwen's repetition_penalty
           # would otherwise apply to every rollout here and to none in the other engines)
           "--generation-config", "vllm"]
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            cmd += [flag] if value else ([f"--no-{key.replace('_', '-')}"] if key == "enable_prefix_caching" else [])
        elif isinstance(value, dict):
            cmd += [flag, json.dumps(value)]
        elif value is not None:
            cmd += [flag, str(value)]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # (in-process engines')
    env |= {"VLLM_SERVER_DEV_MODE": "1",  # the RL endpoints (/pause, /update_weights, ...)
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")}
    return cmd, env


def serve(cfg: Config, host: str, port: int, ready_file: str | None = None) -> None:
    """Run `vllm serve` for the recipe's model until killed; print (and append to `ready_file`) its URL once its
    /health answers. A thin launcher: the server is vLLM's own, with its OpenAI-compatible API."""
    from transformers import AutoConfig

    from grpo.runtime.deepspeed_setup import pick_device
    from grpo.runtime.model import hub_kwargs, resolve_model_path

    device = pick_device(cfg.device)
    model_path = resolve_model_path(cfg.model.path)
    model_cfg = AutoConfig.from_pretrained(model_path, **hub_kwargs(model_path, cfg.model.revision,
                                                                    cfg.model.trust_remote_code))
    limit = getattr(model_cfg, "max_position_embeddings", None)
    if port == 0:
        with socket.socket() as sk:
            sk.bind(("", 0))
            port = sk.getsockname()[1]
    cmd, env = vllm_serve_command(cfg, model_path, device, host, port, limit)
    anywhere = host in ("0.0.0.0", "")
    url = f"http://{socket.gethostname() if anywhere else host}:{port}"
    local = f"http://127.0.0.1:{port}" if anywhere else url
    proc = subprocess.Popen(cmd, env=env)
    # slurm's and Ctrl-C's signals go on to vLLM; slurm's preemption warning (USR1) is the trainer's business, and
    # vLLM, which has no handler for it, would die of it mid-step
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _f: proc.send_signal(signum))
    # no deadline of our own: a large model's first start (download, compile) takes what it takes; the caller
    # (slurm/multinode.slurm, the tests) decides how long to wait
    while proc.poll() is None:
        try:
            request(local, "/health", None, 5.0)
            break
        except ServerError:
            time.sleep(1.0)
    if proc.poll() is not None:
        raise ServerError(f"vllm serve exited with status {proc.returncode} before it was ready (its log is above)")
    print(f"grpo serve: ready at {url}", flush=True)
    if ready_file:
        with open(ready_file, "a") as f:
            f.write(url + "\n")
    code = proc.wait()
    raise SystemExit(code if code >= 0 else 128 - code)  # a signal's death as the shell reports it


@contextlib.contextmanager
def running(recipe: str | Path, overrides: list[str], workdir: Path, timeout: float = 600.0) -> Iterator[str]:
    """A `grpo serve` process on localhost for the duration of the block (benchmarks, tests, a teacher for
    distillation); yields its URL. Its log is `workdir/serve.log`; it is killed with its process group after."""
    workdir.mkdir(parents=True, exist_ok=True)
    ready, log_path = workdir / "ready.txt", workdir / "serve.log"
    ready.unlink(missing_ok=True)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "grpo", "serve", str(recipe), *overrides, "--host",
                                 "127.0.0.1", "--port", "0", "--ready-file", str(ready)], cwd=root, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not (ready.exists() and ready.read_text().strip()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise ServerError(f"grpo serve did not start within {timeout:g} s; the end of {log_path}:\n"
                                      + log_path.read_text()[-3000:])
                time.sleep(0.5)
            yield ready.read_text().split()[0]
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
