"""Fixtures and hooks only (plain helpers: tests/helpers.py). Tiny random models keep unit tests fast; they use the
embedded model's real tokenizer (converted once into the cache by `grpo prepare-model`, which scripts/setup.sh runs).

Every test carries exactly one tier marker, `unit` or `integration` (their meaning: pyproject.toml's markers and
README.md's Tests section); collection fails on a test that has neither, both, or `unit` beside a marker that implies
integration-level cost (slow, vllm, slurm, root)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import make_tiny_model

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TIERS = ("unit", "integration")
NOT_UNIT = ("slow", "vllm", "slurm", "root")


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from grpo.model import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from grpo.model import load_tokenizer

    return load_tokenizer(str(embedded_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tokenizer)


@pytest.fixture(scope="session")
def vllm_tiny_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny model vLLM's CPU attention has kernels for (head size 64)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-vllm") / "model", tokenizer, hidden=128, heads=2)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Fail collection when a test has no tier (or two, or `unit` with a marker of integration-level cost). Runs
    before `-m` deselects anything, so `-m unit` checks the whole suite too."""
    bad = []
    for item in items:
        tiers = [t for t in TIERS if item.get_closest_marker(t)]
        costly = [m for m in NOT_UNIT if item.get_closest_marker(m)]
        if not tiers:
            bad.append(f"{item.nodeid}: no tier")
        elif len(tiers) > 1:
            bad.append(f"{item.nodeid}: both unit and integration")
        elif tiers == ["unit"] and costly:
            bad.append(f"{item.nodeid}: unit, but also {', '.join(costly)}")
    if bad:
        shown = "\n  ".join(bad[:50]) + (f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else "")
        raise pytest.UsageError(
            f"{len(bad)} test(s) without exactly one tier: mark each `pytest.mark.unit` or `pytest.mark.integration`"
            f" (module-level `pytestmark = ...` or per test; see README.md, Tests):\n  {shown}")


def pytest_sessionfinish(session, exitstatus):
    """Under scripts/test.sh a skipped test fails the run (GRPO_FAIL_ON_SKIP=1), unless GRPO_ALLOW_SKIPS=1: a skip
    there means a missing part (slurm, bubblewrap, vLLM, a tmpfs) that set-up should have provided, and a suite that
    passes with a third of it skipped checks less than it says."""
    if os.environ.get("GRPO_FAIL_ON_SKIP") != "1" or os.environ.get("GRPO_ALLOW_SKIPS") == "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and exitstatus == 0:
        reporter.write_line(f"{len(skipped)} test(s) skipped: scripts/test.sh counts that as a failure (see the "
                            "skip reasons above; GRPO_ALLOW_SKIPS=1 accepts them)", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
