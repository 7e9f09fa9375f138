"""`grpo serve RECIPE`: a thin launcher of vLLM's own server for a recipe's model.

    grpo serve RECIPE [overrides] --port 8000        # one per GPU / node (slurm/multinode.slurm starts them)
    grpo train RECIPE rollout.engine=vllm_server rollout.vllm.servers=[http://node7:8000,http://node8:8000]

It runs a plain `vllm serve` with the recipe's engine settings, vLLM's RL endpoints switched on, our weight-transfer
backend and checksum (grpo/vllm_plugin.py), waits until it answers, prints its URL and passes signals on. The
trainer's side is grpo/server_client.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from grpo.config import Config
from grpo.server_client import ServerError, request


def vllm_serve_command(cfg: Config, model_path: str, device: str, host: str, port: int,
                       model_limit: int | None) -> tuple[list[str], dict[str, str]]:
    """The `vllm serve` command line and environment for a recipe: the same engine settings as the colocated
    engine (grpo.vllm_engine.llm_kwargs), our weight-transfer backend, and vLLM's RL endpoints switched on."""
    from grpo.vllm_engine import llm_kwargs

    kw = llm_kwargs(cfg, model_path, device, cfg.seed, False, model_limit)
    cmd = [sys.executable, "-m", "grpo.vllm_cli", "serve", kw.pop("model"), "--host", host,
           "--port", str(port), "--weight-transfer-config", json.dumps({"backend": "grpo_broadcast"}),
           "--worker-extension-cls", "grpo.vllm_plugin.GrpoWorkerExtension", "--disable-log-stats",
           "--uvicorn-log-level", "warning"]
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

    from grpo.engine import pick_device
    from grpo.model import resolve_model_path

    device = pick_device(cfg.device)
    model_path = resolve_model_path(cfg.model.path)
    limit = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    if port == 0:
        with socket.socket() as sk:
            sk.bind(("", 0))
            port = sk.getsockname()[1]
    cmd, env = vllm_serve_command(cfg, model_path, device, host, port, limit)
    url = f"http://{socket.gethostname() if host in ('0.0.0.0', '') else host}:{port}"
    proc = subprocess.Popen(cmd, env=env)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):  # slurm's and Ctrl-C's: passed on to vLLM
        signal.signal(sig, lambda signum, _f: proc.send_signal(signum))
    deadline = time.monotonic() + cfg.rollout.vllm.timeout
    while proc.poll() is None:
        try:
            request(url, "/health", None, 5.0)
            break
        except ServerError:
            if time.monotonic() > deadline:
                proc.kill()
                raise ServerError(f"vllm serve did not become ready at {url} within "
                                  f"{cfg.rollout.vllm.timeout:g} s") from None
            time.sleep(1.0)
    if proc.poll() is not None:
        raise ServerError(f"vllm serve exited with status {proc.returncode} before it was ready (its log is above)")
    print(f"grpo serve: ready at {url}", flush=True)
    if ready_file:
        with open(ready_file, "a") as f:
            f.write(url + "\n")
    raise SystemExit(proc.wait())
