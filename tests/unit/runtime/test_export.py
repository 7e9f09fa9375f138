"""The final model's folder: model card, hub push set-up, hub loading options (the export itself is checked in
tests/integration/test_zero_multiprocess.py against DeepSpeed's own consolidation)."""

from __future__ import annotations

import pytest
import yaml

from grpo.config import ConfigError, load_config, to_dict
from grpo.runtime.export import check_hub_token, model_card, push_to_hub
from grpo.runtime.model import hub_kwargs
from tests.helpers import ROOT

pytestmark = pytest.mark.unit


def test_model_card_names_recipe_rewards_and_metrics():
    cfg = to_dict(load_config(ROOT / "recipes" / "smollm2-135m-arith.yaml", ["model.path=Qwen/Qwen2.5-0.5B"]))
    card = model_card(cfg, {"step": 30, "eval/accuracy": 0.45, "loss": 0.1}, cfg["model"]["path"])
    head, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert yaml.safe_load(head)["base_model"] == "Qwen/Qwen2.5-0.5B"
    metrics_block = body.split("```json\n")[1].split("```")[0]
    assert "`accuracy` (weight 1.0)" in body
    assert '"eval/accuracy": 0.45' in metrics_block and "loss" not in metrics_block
    recipe = yaml.safe_load(body.split("```yaml\n")[1].split("```")[0])
    assert recipe == cfg  # the card's recipe re-creates the run
    local = model_card(cfg, {}, "/data/models/mine")
    assert "base_model" not in local


def test_push_to_hub_is_checked_at_start_up(monkeypatch):
    check_hub_token(None)
    with pytest.raises(ConfigError, match="not a hub id"):
        check_hub_token("just-a-name")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        check_hub_token("me/model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(ConfigError, match="no Hugging Face token"):
        check_hub_token("me/model")


def test_push_to_hub_uploads_the_final_folder(monkeypatch, tmp_path):
    calls = []

    class FakeApi:  # the Hub itself is out of reach here: check what we ask of it
        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload", kw))
            return type("Info", (), {"commit_url": "https://hub/commit/1"})()

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    assert push_to_hub(tmp_path, "me/model") == "https://hub/commit/1"
    assert calls[0] == ("create", "me/model", {"private": True, "exist_ok": True})
    assert calls[1][1]["folder_path"] == str(tmp_path) and calls[1][1]["repo_id"] == "me/model"


def test_revision_applies_to_hub_names_only(tmp_path):
    assert hub_kwargs("org/model", "v1") == {"trust_remote_code": False, "revision": "v1"}
    assert hub_kwargs(str(tmp_path), "v1", True) == {"trust_remote_code": True}
