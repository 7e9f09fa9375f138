"""Shared fixtures. Tiny random models keep unit tests fast; they use the embedded model's real tokenizer
(converted once into the cache by `grpo prepare-model`, which scripts/setup.sh runs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from grpo.model import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from grpo.model import load_tokenizer

    return load_tokenizer(str(embedded_dir))


def make_tiny_model(path: Path, tokenizer, seed: int = 0, layers: int = 2, hidden: int = 32, heads: int = 4) -> Path:
    """A Llama of a few thousand hidden units with the real vocabulary, saved as an HF folder. (vLLM's CPU
    attention needs a head size it has kernels for: hidden=128, heads=2 gives 64.)"""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
                      max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tokenizer)


@pytest.fixture(scope="session")
def vllm_tiny_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny model vLLM's CPU attention has kernels for (head size 64)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-vllm") / "model", tokenizer, hidden=128, heads=2)


def tiny_overrides(model_dir: Path, out: Path, **extra) -> list[str]:
    """Overrides that make the default recipe a seconds-long run on the tiny model."""
    o = {"model.path": str(model_dir), "output_dir": str(out), "steps": 2, "data.num_train": 64,
         "data.num_eval": 8, "rollout.prompts_per_step": 2, "rollout.num_generations": 4,
         "rollout.max_new_tokens": 6, "optim.micro_batch_size": 4, "optim.lr": 1e-3, "eval.every": 0,
         "eval.at_start": False, "checkpoint.every": 1, "log.wandb": False,
         "rewards": "[{name: accuracy}, {name: 'tests.conftest:length_reward', weight: 0.5}]"}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def needs_tests(completions, tests, **_):
    """A user reward that needs a `tests` column (for the missing-column start-up check)."""
    return [0.0 for _ in completions]


def length_reward(completions, **_):
    """A reward a random tiny model can vary on (characters / 100), so its groups carry signal."""
    return [len(c) / 100 for c in completions]


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
