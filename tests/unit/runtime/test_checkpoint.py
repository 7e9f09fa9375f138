"""What a resume compares: a key added to the config after a checkpoint was written compares as its default, so an
old checkpoint resumes unless the new key is set to something else. (A whole resume of a checkpoint written by an
earlier layout of the code: tests/integration/test_resume.py.)"""

from __future__ import annotations

import pytest

from grpo.config import ConfigError, load_config, to_dict
from grpo.runtime.checkpoint import check_compatible
from tests.helpers import RECIPE

pytestmark = pytest.mark.unit


def test_a_key_added_since_compares_as_its_default(tmp_path):
    current = to_dict(load_config(RECIPE))
    old = to_dict(load_config(RECIPE))
    del old["data"]["few_shot"]  # as written before data.few_shot existed
    del old["rollout"]["tools"]
    check_compatible(old, current, tmp_path)
    shots = to_dict(load_config(RECIPE, ["data.few_shot=[{user: a, assistant: b}]"]))
    with pytest.raises(ConfigError, match="different data"):
        check_compatible(old, shots, tmp_path)
    changed = to_dict(load_config(RECIPE, ["data.num_train=100"]))
    with pytest.raises(ConfigError, match="different data"):
        check_compatible(old, changed, tmp_path)
