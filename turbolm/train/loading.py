"""Load a trained model (and its tokenizer) from a checkpoint folder or a run folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from turbolm.data.tokenizer import Tokenizer
from turbolm.errors import CheckpointError
from turbolm.models import build_model
from turbolm.train.checkpoint import load_checkpoint, load_model_weights


@dataclass
class TrainedModel:
    model: torch.nn.Module
    tokenizer: Tokenizer
    config: dict  # {"run": run config dict, "model": build_model kwargs, ...}
    path: Path  # the checkpoint folder actually loaded
    step: int


def load_trained(
    path: str | Path, device: torch.device | str = "cpu", adapter: str | Path | None = None
) -> TrainedModel:
    """Model in eval mode on ``device`` + tokenizer from a checkpoint (or run) folder.

    ``adapter``: a LoRA adapter folder from ``turbolm finetune`` (task lm), merged into the
    loaded weights (see ``turbolm/finetune``).
    """
    state = load_checkpoint(path, map_location="cpu", load_trainer_state=False)
    config = state["config"]
    model_cfg = config.get("model")
    if not isinstance(model_cfg, dict) or "arch" not in model_cfg:
        raise CheckpointError(f"{path}: config.json has no model description; not a turbolm run")
    task = config.get("task")
    if isinstance(task, dict) and task.get("type") == "classify":
        raise CheckpointError(
            f"{state['path']} is a sequence-classification checkpoint (labels "
            f"{task.get('labels')}), not a language model: `turbolm eval` reports its "
            "classification metrics; there is nothing to generate from"
        )
    model = build_model(dict(model_cfg))
    load_model_weights(model, state["model_state"])
    if adapter is not None:
        from turbolm.finetune.loading import apply_lm_adapter

        model, model_cfg = apply_lm_adapter(model, adapter)
        config = {**config, "model": model_cfg, "adapter": str(adapter)}
    ckpt_dir = Path(state.get("path", path))
    tok_path = ckpt_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{ckpt_dir}: tokenizer.json is missing")
    tokenizer = Tokenizer.load(str(tok_path))
    if tokenizer.vocab_size > model_cfg["vocab_size"]:
        raise CheckpointError(
            f"{ckpt_dir}: tokenizer has {tokenizer.vocab_size} ids but the model only "
            f"{model_cfg['vocab_size']}"
        )
    return TrainedModel(model.to(device).eval(), tokenizer, config, ckpt_dir, state["step"])
