from pathlib import Path

import pytest

from grpo.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert cfg.rewards, recipe


def test_override_types_and_nesting(tmp_path):
    r = RECIPES[0]
    cfg = load_config(r, ["rollout.num_generations=16", "algo.tis_cap=2", "log.wandb=true", "optim.lr=3e-6",
                          "data.task_args={min_terms: 3}"])
    assert cfg.rollout.num_generations == 16
    assert cfg.algo.tis_cap == 2.0 and isinstance(cfg.algo.tis_cap, float)
    assert cfg.log.wandb is True
    assert cfg.optim.lr == pytest.approx(3e-6)
    assert cfg.data.task_args == {"min_terms": 3}


@pytest.mark.parametrize("override, fragment", [
    ("rollout.num_generaton=4", "unknown key rollout.num_generaton"),
    ("optim.lr=-1", "optim.lr"),
    ("rollout.num_generations=many", "rollout.num_generations: expected an integer"),
    ("rollout.num_generations=1", "rollout.num_generations"),
    ("algo.advantage=ppo", "algo.advantage"),
    ("algo.loss_agg=mean", "algo.loss_agg"),
    ("log.wandb=maybe", "log.wandb: expected true/false"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
    ("modle.path=x", "unknown key modle"),
    ("rollout.top_p=1.5", "rollout.top_p"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(RECIPES[0], [override])
    assert fragment in str(e.value)
    assert RECIPES[0].name in str(e.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("rewards: [{name: accuracy}]\nrollout:\n  temprature: 0.7\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: unknown key rollout\.temprature"):
        load_config(p)


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("rollout: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_batch_divisibility():
    cfg = load_config(RECIPES[0], ["rollout.prompts_per_step=6", "rollout.num_generations=4",
                                   "optim.micro_batch_size=5"])
    with pytest.raises(ConfigError, match="prompts_per_step=6 does not divide over 4 ranks"):
        cfg.check_batch(4)
    with pytest.raises(ConfigError, match="optim.micro_batch_size=5 does not divide"):
        cfg.check_batch(2)
    cfg = load_config(RECIPES[0], ["rollout.prompts_per_step=6", "rollout.num_generations=4",
                                   "optim.micro_batch_size=4"])
    shape = cfg.check_batch(2)
    assert (shape.prompts_per_rank, shape.seqs_per_rank, shape.grad_accum) == (3, 12, 3)


def test_no_rewards_is_an_error(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("steps: 3\n")
    with pytest.raises(ConfigError, match="rewards: at least one reward"):
        load_config(p)
