import pickle

import pytest
import yaml
from pydantic import BaseModel

from grpo.config import Config, ConfigError, DataConfig, OptimConfig, load_config, to_dict
from tests.helpers import ROOT

pytestmark = pytest.mark.unit

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
    cfg = load_config(r, ["model.revision=123", "rollout.temperature=2", "rollout.vllm.canary_tolerance=null"])
    assert cfg.model.revision == "123"  # a string takes a number
    assert cfg.rollout.temperature == 2.0 and isinstance(cfg.rollout.temperature, float)


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
    ("rollout.top_p=1.5", "rollout.top_p: must be <= 1"),
    ("steps=1.5", "steps: expected an integer, got 1.5"),
    ("steps=true", "steps: expected an integer, got True"),
    ("log.wandb='yes'", "log.wandb: expected true/false, got 'yes'"),
    ("log.wandb=1", "log.wandb: expected true/false, got 1"),
    ("optim.lr=fast", "optim.lr: expected a number, got 'fast'"),
    ("optim.betas=[0.9, 1.0]", "optim.betas[1]: must be < 1"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("rollout.vllm.servers=[http://a:8000, node7:8000]", "rollout.vllm.servers[1]: 'node7:8000' is not an http://"),
    ("rewards=[{name: accuracy}, {weight: 2}]", "rewards[1].name: required"),
    ("rewards=[{name: accuracy, wieght: 2}]", "unknown key rewards[0].wieght"),
    ("rewards=[{name: accuracy, timeout: 0}]", "rewards[0].timeout: must be > 0"),
    ("rollout.vllm=3", "rollout.vllm: expected a mapping, got 3"),
    ("data={source: hf}", "data.path: required when data.source is 'hf'"),
    ("data.prompt_template=plain", "data.prompt_template: must reference a column"),
    ("data.answer_pattern='@@'", "data.answer_pattern: '@@' needs a capture group"),
    ("algo.clip_low=1", "algo.clip_low: must be < 1"),
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


def test_cross_field_error_names_file_and_key():
    with pytest.raises(ConfigError) as e:
        load_config(RECIPES[0], ["log.push_to_hub=me/model", "checkpoint.save_final_model=false"])
    assert str(e.value).startswith(f"{RECIPES[0]}: log.push_to_hub: needs checkpoint.save_final_model=true")


def test_every_error_is_listed_one_per_line_with_its_file():
    with pytest.raises(ConfigError) as e:
        load_config(RECIPES[0], ["steps=0", "device=gpu", "algo.advantage=ppo"])
    lines = str(e.value).splitlines()
    assert [line.split(": ")[1] for line in lines] == ["steps", "device", "algo.advantage"]
    assert all(line.startswith(f"{RECIPES[0]}: ") for line in lines)
    assert "'gpu'" in lines[1] and "'auto', 'cpu' or 'cuda'" in lines[1]


def test_bad_override_syntax_names_file_and_override():
    with pytest.raises(ConfigError, match=r"^defaults: override 'rollout\.temperature': expected dotted\.key=value"):
        load_config(None, ["rewards=[{name: accuracy}]", "rollout.temperature"])
    with pytest.raises(ConfigError, match=r"smollm2.*: override 'steps\.x=1': steps is not a section"):
        load_config(ROOT / "recipes" / "smollm2-135m-arith.yaml", ["steps.x=1"])


def test_sections_built_directly_validate_and_name_their_key():
    assert DataConfig(max_prompt_tokens=64).max_prompt_tokens == 64
    with pytest.raises(ConfigError, match=r"^data\.num_train: must be > 0, got 0$"):
        DataConfig(num_train=0)
    with pytest.raises(ConfigError, match=r"^unknown key optim\.foo \(known: lr, "):
        OptimConfig(foo=1)
    cfg = DataConfig(source="hf", path="x.jsonl")
    cfg.answer_pattern = "####"  # assignment is not validated ...
    with pytest.raises(ConfigError, match="data.answer_pattern: '####' needs a capture group"):
        cfg.validate()  # ... validate() checks again


def test_config_is_plain_data_pickles_and_dumps():
    cfg = load_config(RECIPES[0])
    cfg.rollout.vllm.canary = "warn"  # mutable, as the trainer and tests use it
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # sent to worker processes
    d = to_dict(cfg)
    assert yaml.safe_load(yaml.safe_dump(d)) == d and d["rollout"]["vllm"]["canary"] == "warn"
    assert Config.model_validate(d) == cfg  # the saved config.yaml loads back
    other = load_config(RECIPES[0])
    cfg.data.task_args["x"] = 1
    cfg.optim.betas[0] = 0.5
    assert other.data.task_args == {}  # mutable defaults are not shared between configs
    assert other.optim.betas != cfg.optim.betas


def _models(model: type[BaseModel], seen: set) -> set:
    seen.add(model)
    for f in model.model_fields.values():
        for tp in (f.annotation, *getattr(f.annotation, "__args__", ())):
            if isinstance(tp, type) and issubclass(tp, BaseModel) and tp not in seen:
                _models(tp, seen)
    return seen


def test_every_field_has_a_description():
    models = _models(Config, set())
    assert len(models) == 17  # + SFTConfig, DistillConfig, TeacherConfig, LoraSettings
    missing = [f"{m.__name__}.{k}" for m in models for k, f in m.model_fields.items() if not f.description]
    assert not missing
