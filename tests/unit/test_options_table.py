"""The options table in docs/recipes.md is generated from grpo/config.py (scripts/options_table.py), so the docs
cannot drift from the code, and every TRL GRPOConfig name it lists exists in the installed trl."""

import dataclasses
import importlib.util

import pytest

from grpo.config import TRL_NAMES
from tests.helpers import ROOT

pytestmark = pytest.mark.unit

spec = importlib.util.spec_from_file_location("options_table", ROOT / "scripts" / "options_table.py")
options_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(options_table)


def test_docs_block_is_the_generated_table():
    text = (ROOT / "docs" / "recipes.md").read_text()
    block = text.split(options_table.START)[1].split(options_table.END)[0]
    stale = "docs/recipes.md is stale: python scripts/options_table.py --write"
    assert block == f"\n{options_table.table()}\n", stale
    assert options_table.splice(text, options_table.table()) == text


def test_every_option_is_a_row_with_a_description():
    keys = [key for key, _ in options_table.options()]
    rows = options_table.table().splitlines()[2:]
    assert len(rows) == len(keys) == len(set(keys)) > 90
    assert all(f"| `{key}` |" in row for key, row in zip(keys, rows, strict=True))
    assert {"rollout.vllm.servers", "rewards[].name", "optim.betas", "checkpoint.keep"} <= set(keys)
    assert set(TRL_NAMES) <= set(keys)  # no mapping for a key that does not exist


def test_trl_names_exist_in_grpoconfig():
    from trl import GRPOConfig

    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    listed = {name for names in TRL_NAMES.values() for name in names}
    assert not listed - fields
    assert TRL_NAMES["algo.clip_low"] == ("epsilon",) and TRL_NAMES["rollout.dynamic_sampling"] == ()


def test_splice_replaces_only_the_block():
    text = f"# t\n\nbefore\n{options_table.START}\nold\n{options_table.END}\nafter\n"
    assert options_table.splice(text, "| new |") == (
        f"# t\n\nbefore\n{options_table.START}\n| new |\n{options_table.END}\nafter\n")
    with pytest.raises(SystemExit):
        options_table.splice("no markers", "x")
