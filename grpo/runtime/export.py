"""The trained model as the ecosystem expects it: a plain HF folder (`output_dir/final`) with the tokenizer, a model
card naming the recipe and the final metrics, and optionally pushed to the Hub (`log.push_to_hub`).

Under ZeRO-3 the weights are consolidated by DeepSpeed's own exporter, which gathers one layer at a time onto rank
0, so no rank ever holds every full parameter at once (gathering the whole model on every rank, as a naive export
does, needs the full model's memory on each GPU). Below ZeRO-3 every rank holds the whole model; their checksums
must agree (ranks that drifted apart are an error, recorded in `ranks.json`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

from grpo.runtime import collectives as coll
from grpo.runtime import lora
from grpo.runtime.weights import checksum, checksums_match


def state_dict_on_rank0(engine: Any) -> dict[str, torch.Tensor] | None:
    """The full state dict on rank 0 (None elsewhere); under ZeRO-3 gathered layer by layer; with LoRA, the
    merged weights under their HF names."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    if dist.get_rank() != 0:
        return None
    if lora.active(engine.module):
        return {k: v.cpu().clone() for k, v in lora.merged_parameters(engine.module)}
    return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}


def replica_checksums(engine: Any) -> list[list[float]] | None:
    """Every rank's (sum, sum of squares) of its full copy, below ZeRO-3 (where ranks hold full copies)."""
    if engine.zero_optimization_stage() == 3:
        return None
    return coll.gather_objects(list(checksum(engine.module.parameters())))


def model_card(cfg_dict: dict[str, Any], final_metrics: dict[str, Any], base_model: str) -> str:
    """A Hub model card: what was trained from what, with which rewards, and how it ended."""
    rewards = ", ".join(f"`{r['name']}` (weight {r['weight']})" for r in cfg_dict.get("rewards", []))
    data = cfg_dict.get("data", {})
    source = data.get("path") or f"reasoning-gym `{data.get('task')}`"
    shown = {k: v for k, v in final_metrics.items() if k.startswith(("eval/", "reward/mean", "step"))}
    base = base_model if "/" in base_model and not base_model.startswith((".", "/")) else None
    lines = ["---", "library_name: transformers", "tags: [grpo, reinforcement-learning, reasoning]"]
    if base:
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {Path(cfg_dict.get('output_dir', 'model')).name}", "",
              f"Trained with GRPO from `{base_model}` on {source}, for {cfg_dict.get('steps')} steps, rewarded by "
              f"{rewards or 'the recipe rewards'}.", "", "## Final metrics", "", "```json",
              json.dumps(shown, indent=1, sort_keys=True), "```", "", "## Recipe", "",
              "Re-run with `grpo train recipe.yaml` (the full recipe as resolved):", "", "```yaml",
              yaml.safe_dump(cfg_dict, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _raise_on_every_rank(error: str | None, kind: type[Exception] = RuntimeError) -> None:
    """Rank 0's failure, shared: a rank that raised alone would leave the others waiting in the next collective."""
    error = coll.broadcast_object(error)
    if error is not None:
        raise kind(error)


def save_final(engine: Any, tokenizer: Any, out: Path, cfg_dict: dict[str, Any],
               final_metrics: dict[str, Any]) -> None:
    """Write `out` as a plain HF folder on rank 0 (all ranks must call it: ZeRO-3 gathers collectively)."""
    rank = dist.get_rank()
    every = replica_checksums(engine)
    state = state_dict_on_rank0(engine)
    error = None  # every rank computes the same verdict on the checksums; rank 0's is the one shared
    if every is not None and not all(checksums_match(every[0], e) for e in every):
        error = f"ranks disagree on the final weights: {every}"
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            if every is not None:
                (out / "ranks.json").write_text(json.dumps({"checksums": every}))
            if error is None:
                _write_final(engine.module, state, tokenizer, out, cfg_dict, final_metrics)
        except Exception as e:  # noqa: BLE001 - shared with every rank below, then raised everywhere
            error = f"final model export to {out} failed: {type(e).__name__}: {e}"
    _raise_on_every_rank(error)


def _write_final(model: Any, state: dict[str, torch.Tensor] | None, tokenizer: Any, out: Path,
                 cfg_dict: dict[str, Any], final_metrics: dict[str, Any]) -> None:
    assert state is not None
    numel = sum(v.numel() for v in {id(v): v for v in state.values()}.values())
    expected = lora.weight_count(model, adapters=False)
    if numel < expected:  # ZeRO-3 exports can silently come out empty
        raise RuntimeError(f"final model export has {numel} values, expected at least {expected}")
    use_cache = model.config.use_cache
    model.config.use_cache = True  # training turned the KV cache off; generation wants it back
    try:
        with lora.plain(model):
            model.save_pretrained(out, state_dict=state)
    finally:
        model.config.use_cache = use_cache
    tokenizer.save_pretrained(out)
    if lora.active(model):
        lora.save_adapter(model, out / "adapter", cfg_dict["model"]["path"])
    (out / "README.md").write_text(model_card(cfg_dict, final_metrics, cfg_dict["model"]["path"]))


def check_hub_token_on_rank0(repo_id: str | None) -> None:
    """`check_hub_token` where the push happens (rank 0), its verdict shared so that every rank stops together."""
    if not repo_id:
        return
    from grpo.config import ConfigError

    error = None
    if dist.get_rank() == 0:
        try:
            check_hub_token(repo_id)
        except ConfigError as e:
            error = str(e)
    _raise_on_every_rank(error, ConfigError)


def check_hub_token(repo_id: str | None) -> None:
    """At start-up, not after hours of training: pushing needs a token (HF_TOKEN or `hf auth login`)."""
    if not repo_id:
        return
    from huggingface_hub import get_token

    from grpo.config import ConfigError

    if "/" not in repo_id:
        raise ConfigError(f"log.push_to_hub: {repo_id!r} is not a hub id like user/model")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError("log.push_to_hub: HF_HUB_OFFLINE=1 is set; pushing needs the network")
    if get_token() is None:
        raise ConfigError("log.push_to_hub: no Hugging Face token (set HF_TOKEN or run `hf auth login`)")


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload the final folder to `repo_id` (created private if missing); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=True, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                             commit_message="grpo: final model", ignore_patterns=["ranks.json"])
    return str(getattr(info, "commit_url", info))
