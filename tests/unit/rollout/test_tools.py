"""Tools: the calculator against hand-computed values and hostile input, the inline format's parse, output
truncation, loading by name or path (tests/integration/test_tools.py runs them in rollouts)."""

from __future__ import annotations

import pytest

from grpo.rollout.tools import InlineCall, InlineFormat, calculator, load_tool, truncate_ids

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("expr,want", [
    ("17*23", "391"), ("(2+3)/4", "1.25"), ("1/3", "1/3"), ("2**10", "1024"), ("-7 // 2", "-4"), ("7 % 3", "1"),
    ("0.1 + 0.2", "0.3"), ("1,234 + 1", "1235"), ("3 ^ 2", "9"), ("12 × 3 ÷ 4", "9"), ("-(1.5)", "-1.5"),
    ("123456789 * 987654321", "121932631112635269"), ("2 / -8", "-0.25"), ("10/4*2", "5"),
])
def test_calculator_is_exact(expr, want):
    assert calculator(expr) == want


@pytest.mark.parametrize("expr,match", [
    ("__import__('os').system('id')", "not arithmetic"), ("x + 1", "not arithmetic"), ("9**9**9", "4096"),
    ("99999999**4000", "digits"), ("1/0", "division by zero"), ("2**0.5", "whole numbers"), ("", "empty"),
    ("1 +", "cannot parse"), ("[1, 2]", "not arithmetic"), ("1" * 600, "500 characters"),
])
def test_calculator_refuses_what_is_not_bounded_arithmetic(expr, match):
    with pytest.raises((ValueError, ZeroDivisionError), match=match):
        calculator(expr)


def test_inline_format_reads_the_call_that_ended_the_turn():
    fmt = InlineFormat([load_tool("calculator")])
    assert fmt.stops() == ("</calculator>",)
    assert fmt.parse("so <calculator> 17*23 </calculator>", "</calculator>") == InlineCall("calculator", "17*23")
    # the token completing the tag may carry more text; an earlier call in the same turn is not this one
    assert fmt.parse("<calculator>1+1</calculator> and <calculator>2*3</calculator>.", "</calculator>") == \
        InlineCall("calculator", "2*3")
    assert fmt.parse("no opening tag 3*4</calculator>", "</calculator>").tool is None
    assert fmt.parse("The answer is 4.", None) is None
    assert fmt.parse("ended on another stop", "</result>") is None
    assert fmt.answer("391") == "<result>391</result>"


def test_truncation_keeps_head_and_tail():
    ids, marker = list(range(100)), [-1, -1]
    assert truncate_ids(ids, 200, marker) == ids
    out = truncate_ids(ids, 10, marker)
    assert out == [0, 1, 2, 3, -1, -1, 96, 97, 98, 99] and len(out) == 10
    assert truncate_ids(ids, 11, marker) == [0, 1, 2, 3, 4, -1, -1, 96, 97, 98, 99]
    assert truncate_ids(ids, 2, marker) == [0, 1]  # no room for the marker: the head alone


def test_tools_load_by_name_or_path_with_their_schema():
    calc = load_tool("calculator")
    assert calc.first_arg == "expression"
    schema = calc.schema()
    assert schema["function"]["name"] == "calculator"
    assert schema["function"]["parameters"]["required"] == ["expression"]
    user = load_tool("tests.helpers:word_count")
    assert user.name == "word_count" and user.first_arg == "text"
    with pytest.raises(ValueError, match="unknown tool 'calc'"):
        load_tool("calc")
    with pytest.raises(ValueError, match="cannot be imported"):
        load_tool("tests.helpers:no_such_tool")


def test_recipe_tools_are_checked_at_start_up_naming_the_key():
    from grpo.config import ConfigError, load_config
    from grpo.loop.state import load_tools

    assert [t.name for t in load_tools(["calculator", "tests.helpers:word_count"])] == ["calculator", "word_count"]
    with pytest.raises(ConfigError, match=r"rollout.tools\[1\]: unknown tool 'calc'"):
        load_tools(["calculator", "calc"])
    with pytest.raises(ConfigError, match="two tools share a name"):
        load_tools(["calculator", "calculator"])
    with pytest.raises(ConfigError, match="rollout.tools: does not run with rollout.async"):
        load_config(None, ["rewards=[{name: accuracy}]", "rollout.tools=[calculator]", "rollout.engine=vllm_server",
                           "rollout.async=true"])
    cfg = load_config(None, ["rewards=[{name: accuracy}]", "rollout.max_tool_calling_iterations=2"])
    assert cfg.rollout.max_turns == 2  # TRL's name is accepted
