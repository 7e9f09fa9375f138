"""Fixtures and hooks only (plain helpers: tests/helpers.py). Tiny random models keep unit tests fast; they use the
embedded model's real tokenizer (converted once into the cache by `grpo prepare-model`, which scripts/setup.sh runs).

Every test carries exactly one tier marker, `unit` or `integration` (their meaning: pyproject.toml's markers and
tests/README.md); collection fails on a test that has neither, both, or `unit` beside a marker that implies
integration-level cost (slow, vllm, slurm, root)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import make_tiny_model

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _hold_vllm_to_avx2() -> None:
    """vLLM's CPU build has no switch like ATen's `ATEN_CPU_CAPABILITY`: it asks torch's CPU probes which kernels to
    load (`_C_AVX2` or `_C_AVX512`) and which attention and GEMM paths to take, at the moment it needs them. With
    `GRPO_VLLM_CPU_ISA=avx2` (scripts/test.sh's AVX2 pass) those probes answer as an AVX2-only CPU does, so the
    in-process vLLM tests run AVX2 kernels on any machine. (Processes the tests start, `grpo serve` and the CLI, keep
    the machine's own kernels.)"""
    import torch

    for probe in ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_avx512_vnni_supported",
                  "_is_amx_tile_supported", "_is_amx_fp16_supported"):
        if hasattr(torch.cpu, probe):
            setattr(torch.cpu, probe, lambda: False)


if os.environ.get("GRPO_VLLM_CPU_ISA", "").lower() == "avx2":
    _hold_vllm_to_avx2()

TIERS = ("unit", "integration")
NOT_UNIT = ("slow", "vllm", "slurm", "root")


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from grpo.runtime.model import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from grpo.runtime.model import load_tokenizer

    return load_tokenizer(str(embedded_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tokenizer)


@pytest.fixture(scope="session")
def vllm_tiny_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny model vLLM's CPU attention has kernels for (head size 64)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-vllm") / "model", tokenizer, hidden=128, heads=2)


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory, vllm_tiny_dir) -> Iterator[str]:
    """One `grpo serve` (a plain `vllm serve`) of the tiny vLLM model for the whole test run; yields its URL. Starting
    one costs about half a minute on 2 cores, and the tests that use it run one at a time. Each trainer run sends its
    own weights at its initial sync and sets the weight version, so nothing one test leaves behind reaches the next;
    a test that corrupts the served weights repairs them with a clean sync before it ends. The test that kills its
    server starts its own."""
    from grpo.commands.serve import running
    from tests.helpers import RECIPE

    with running(RECIPE, [f"model.path={vllm_tiny_dir}"], tmp_path_factory.mktemp("server"), timeout=300) as url:
        yield url


def _cpu_description() -> str:
    """The CPU model, the SIMD flags that decide which kernels torch, oneDNN and vLLM pick, and any switch that holds
    them to a lower path: a numeric failure is then read against the machine it happened on."""
    import re

    model, flags = "unknown CPU", set()
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", info, re.M).group(1).strip()
        flags = set(re.search(r"^flags\s*:\s*(.+)$", info, re.M).group(1).split())
    except (OSError, AttributeError):
        pass
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    held = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "GRPO_VLLM_CPU_ISA")
            if os.environ.get(k)]
    return (f"cpu: {model}, {os.cpu_count()} cores, flags {' '.join(shown) or 'none of avx2/avx512/amx'}"
            + (f"; held to {', '.join(held)}" if held else ""))


def pytest_sessionstart(session) -> None:
    """Logs the machine under `-q` too (a report header is hidden there)."""
    import torch

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(_cpu_description())
        reporter.write_line(f"torch {torch.__version__}: ATen CPU capability {torch.backends.cpu.get_cpu_capability()}"
                            f", {torch.get_num_threads()} threads")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Fail collection when a test has no tier (or two, or `unit` with a marker of integration-level cost). Runs
    before `-m` deselects anything, so `-m unit` checks the whole suite too. Also puts the tests that use the shared
    `vllm serve` in one xdist group (before xdist's own hook reads the groups)."""
    bad = []
    for item in items:
        if "vllm_server" in getattr(item, "fixturenames", ()):  # one xdist worker holds the one shared server
            item.add_marker(pytest.mark.xdist_group("vllm_server"))
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
            f" (module-level `pytestmark = ...` or per test; see tests/README.md):\n  {shown}")


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
