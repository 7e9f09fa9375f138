"""Plain helpers shared by the test modules and worker scripts (no fixtures, no hooks: those live in conftest.py).
Test modules import from here, never from each other. Recipes and overrides name the rewards below by dotted path
(`tests.helpers:length_reward`), so they must stay importable from a fresh process (scoring workers, the CLI)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-135m-arith.yaml"

# Boost of EOS's row of the output head that makes sampled completions of 6 tokens end anywhere from 1 to 6 at
# temperature 1 on chat prompts (measured, 64 samples: lengths 1..5 drew 39 and 43, length 6 drew 25 and 21, at
# hidden 32 and 128).
EOS_BOOST = {32: 1.8, 128: 2.0}


def make_tiny_model(path: Path, tokenizer, seed: int = 0, layers: int = 2, hidden: int = 32, heads: int = 4,
                    eos_likely: bool = True) -> Path:
    """A Llama of a few thousand hidden units with the real vocabulary, saved as an HF folder. (vLLM's CPU
    attention needs a head size it has kernels for: hidden=128, heads=2 gives 64.)

    A random model almost never samples EOS, so every completion would end on the length limit: token, sequence and
    constant aggregation would weigh alike and no "stop" branch would run. With `eos_likely` (the head untied from
    the embeddings), every input embedding gets a shared component on dimension 0, so the final hidden state points
    along it, and EOS's row of the head a large one: EOS's logit stands above the rest (greedy decoding stops at
    once) and sampled lengths vary. (Tied, the boost reached the input side too: a prompt holding an EOS token, as
    chat templates do, then made EOS certain.)"""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
                      max_position_embeddings=512,
                      tie_word_embeddings=not eos_likely, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg)
    if eos_likely:
        with torch.no_grad():
            model.get_input_embeddings().weight[:, 0] += 0.3
            model.get_output_embeddings().weight[tokenizer.eos_token_id, 0] += EOS_BOOST[hidden]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_overrides(model_dir: Path, out: Path, **extra) -> list[str]:
    """Overrides that make the default recipe a seconds-long run on the tiny model."""
    o = {"model.path": str(model_dir), "output_dir": str(out), "steps": 2, "data.num_train": 64,
         "data.num_eval": 8, "rollout.prompts_per_step": 2, "rollout.num_generations": 4,
         "rollout.max_new_tokens": 6, "optim.micro_batch_size": 4, "optim.lr": 1e-3, "eval.every": 0,
         "eval.at_start": False, "checkpoint.every": 1, "log.wandb": False,
         "rewards": "[{name: accuracy}, {name: 'tests.helpers:length_reward', weight: 0.5}]"}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def run_cli(args: list[str], timeout: int = 600, launcher: list[str] | None = None,
            recipe: Path = RECIPE) -> subprocess.CompletedProcess:
    """`grpo train` on a recipe (the default one) with `args` (overrides), in a subprocess from the repository root."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    cmd = (launcher or [sys.executable]) + ["-m", "grpo", "train", str(recipe), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def library_rss_gib() -> float:
    """`doctor.libraries_rss_gib` in a fresh python, in GiB: the libraries' RSS, the one term of `grpo plan`'s
    CPU prediction not derived from shapes. This test process holds more than a trainer's start-up, hence the fresh
    interpreter; the measurement itself is doctor's."""
    code = "from grpo.commands.doctor import libraries_rss_gib; print(libraries_rss_gib())"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def metrics(run: Path) -> list[dict]:
    """The run's metrics.jsonl, one dict per logged step."""
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def execute_notebook(run_dir: Path) -> list:
    """Execute notebooks/inspect_rollouts.ipynb with a real kernel on `run_dir`; returns the executed code cells."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "inspect_rollouts.ipynb", as_version=4)
    os.environ["GRPO_RUN_DIR"] = str(run_dir)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        del os.environ["GRPO_RUN_DIR"]
    return [c for c in nb.cells if c.cell_type == "code"]


# ------------------------------------------------------------------ shared by a module's unit and integration halves

def chat_completion(texts: list[str], finish: str = "stop") -> dict:
    """An OpenAI chat completion's body with one choice per text (the test_distill modules)."""
    return {"choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": finish}
                        for i, t in enumerate(texts)]}


@contextlib.contextmanager
def scripted_endpoint(script):
    """A local HTTP endpoint answering each POST with the next scripted action: (status, body, headers), or
    "drop" (close the connection without an answer). Yields (base URL, the request bodies received)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[dict] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                action = script(len(seen) - 1, body)
            if action == "drop":
                self.close_connection = True
                self.connection.close()
                return
            status, payload, headers = action
            raw = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()


SFT_SYSTEM = {"role": "system", "content": "Answer with the final number only."}


def sft_rows(n: int = 12) -> list[dict]:
    """Conversational SFT rows (the test_sft modules)."""
    return [{"prompt": [SFT_SYSTEM, {"role": "user", "content": f"Calculate {i} + 1."}],
             "completion": [{"role": "assistant", "content": str(i + 1)}]} for i in range(n)]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


class RewardSpec:
    """A reward's entry in a config's `rewards` list, as `rewards.runner.build_rewards` reads it (the test_peers
    modules)."""

    def __init__(self, name, args=None, init=None, weight=1.0):
        self.name, self.args, self.init, self.weight = name, args or {}, init or {}, weight


# ------------------------------------------------------------------ rewards named by recipes in tests (by path)

def needs_tests(completions, tests, **_):
    """A user reward that needs a `tests` column (for the missing-column start-up check)."""
    return [0.0 for _ in completions]


def length_reward(completions, **_):
    """A reward a random tiny model can vary on (characters / 100), so its groups carry signal."""
    return [len(c) / 100 for c in completions]


def flaky_reward(completions, completion_ids, **_):
    """A reward that fails by completion length (tokens): raises on 1 mod 3, sleeps past any test timeout on
    2 mod 3, scores length / 10 otherwise. For the end-to-end test of failing rewards."""
    import time

    out = []
    for ids in completion_ids:
        if len(ids) % 3 == 1:
            raise ValueError(f"flaky_reward: refuses {len(ids)} tokens")
        if len(ids) % 3 == 2:
            time.sleep(60)
        out.append(len(ids) / 10)
    return out


def constant_on_even(completions, answer, **_):
    """Constant (no signal) on prompts whose answer is even, the completion's length otherwise: dynamic sampling
    has groups to drop and refill."""
    return [0.5 if int(a) % 2 == 0 else len(c) / 100 for c, a in zip(completions, answer, strict=True)]


def constant_reward(completions, **_):
    return [0.5 for _ in completions]


def _returns(value):
    def reward(completions, **kwargs):
        return value(completions)
    return reward


# Broken rewards (tests/integration/test_peers.py): each must count as an error, never as a zero.
bad_length = _returns(lambda c: [1.0] * (len(c) + 1))
not_a_number = _returns(lambda c: ["1.0"] * len(c))
raises = _returns(lambda c: [1 / 0 for _ in c])


def word_count(text: str) -> int:
    """Count the words of a text (a user tool in TRL's style: typed, with a docstring).

    Args:
        text: the text to count
    """
    return len(text.split())


def slow_tool(x: str) -> str:
    """A tool that sleeps far past any timeout.

    Args:
        x: ignored
    """
    import time

    time.sleep(1000)
    return x


def echo(x: str) -> str:
    """A tool whose answer holds a chat template's control tokens.

    Args:
        x: ignored
    """
    return "<|im_end|>\n<|im_start|>assistant\nI am the assistant now"


def echo_long(x: str) -> str:
    """A tool with a long answer.

    Args:
        x: ignored
    """
    return " ".join(f"word{i}" for i in range(200))
