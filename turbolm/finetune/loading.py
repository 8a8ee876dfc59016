"""Loading fine-tuned models: a base checkpoint + an adapter folder, or a fine-tuned / merged
checkpoint, for evaluation, generation and merging.

A classification checkpoint is an ordinary turbolm checkpoint whose ``config.json`` has
``"task": {"type": "classify", "labels": [...], "pool": ..., "max_len": ...}`` and whose
``model.safetensors`` holds the classifier (``lm.*`` + ``score.*`` keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from turbolm.data import Tokenizer
from turbolm.errors import CheckpointError
from turbolm.finetune.classifier import SequenceClassifier
from turbolm.finetune.lora import (
    check_base_fits,
    load_adapter,
    needs_untie,
    read_adapter_meta,
    resolve_adapter_dir,
    untied_copy,
)

TASK_KEY = "task"


def checkpoint_task(path: str | Path) -> dict:
    """The ``task`` entry of a checkpoint's ``config.json`` (``{"type": "lm"}`` when absent),
    read without loading weights."""
    from turbolm.train.checkpoint import _read_config, _resolve_checkpoint

    try:
        config = _read_config(_resolve_checkpoint(Path(path), check_hash=False))
    except CheckpointError:
        return {"type": "lm"}  # loading it as an LM reports the problem in the usual words
    task = config.get(TASK_KEY)
    return task if isinstance(task, dict) else {"type": "lm"}


def adapter_task(adapter: str | Path) -> dict:
    return read_adapter_meta(resolve_adapter_dir(adapter))["task"]


def _check_classify_task(task: dict, where: str) -> dict:
    labels = task.get("labels")
    if not isinstance(labels, list) or len(labels) < 2 or task.get("pool") not in ("last", "mean"):
        raise CheckpointError(f"{where}: malformed classification task entry {task!r}")
    return task


def apply_lm_adapter(lm: nn.Module, adapter: str | Path) -> tuple[nn.Module, dict]:
    """Base LM + LM adapter -> merged plain model (eval mode) and its ``build_model`` kwargs.

    Untied first when the adapter adapts a tied embedding / head (see ``finetune/lora.py``).
    """
    from turbolm.models import model_config_dict

    adapter_dir = resolve_adapter_dir(adapter)
    meta = read_adapter_meta(adapter_dir)
    if meta["task"].get("type") != "lm":
        raise CheckpointError(
            f"adapter {adapter_dir} is a {meta['task'].get('type')} adapter, not a language-model "
            "adapter: `turbolm eval --adapter` reports its classification metrics; generate "
            "needs an LM"
        )
    kwargs = model_config_dict(lm)
    check_base_fits(adapter_dir, meta, kwargs)
    if needs_untie(lm, adapter_dir):
        lm, kwargs = untied_copy(lm)
    merged = load_adapter(lm, adapter_dir).merge_and_unload()
    return merged.eval(), kwargs


@dataclass
class LoadedClassifier:
    model: nn.Module  # SequenceClassifier, or a PeftModel around one (base + adapter)
    tokenizer: Tokenizer
    task: dict  # {"type": "classify", "labels", "pool", "max_len", "label_counts", ...}
    lm_kwargs: dict  # build_model kwargs of the language model inside
    config: dict  # the checkpoint's config.json (the base's, with an adapter)
    path: Path  # checkpoint folder loaded
    adapter: Path | None
    step: int

    @property
    def labels(self) -> list:
        return self.task["labels"]


def load_classifier(
    checkpoint: str | Path, adapter: str | Path | None = None, device: str | torch.device = "cpu"
) -> LoadedClassifier:
    """A classifier from a base checkpoint + classification adapter (not merged: exactly base +
    adapter) or from a classification checkpoint (full fine-tuning or ``turbolm merge``)."""
    from turbolm.models import build_model, model_config_dict
    from turbolm.train.checkpoint import load_checkpoint, load_model_weights
    from turbolm.train.loading import load_trained

    if adapter is not None:
        adapter_dir = resolve_adapter_dir(adapter)
        meta = read_adapter_meta(adapter_dir)
        task = meta["task"]
        if task.get("type") != "classify":
            raise CheckpointError(f"adapter {adapter_dir} is not a classification adapter")
        _check_classify_task(task, str(adapter_dir))
        base = load_trained(checkpoint, "cpu")
        kwargs = model_config_dict(base.model)
        check_base_fits(adapter_dir, meta, kwargs)
        clf = SequenceClassifier(base.model, len(task["labels"]), task["pool"])
        model = load_adapter(clf, adapter_dir)
        return LoadedClassifier(
            model.to(device).eval(),
            base.tokenizer,
            task,
            kwargs,
            base.config,
            base.path,
            adapter_dir,
            int(meta.get("steps", base.step)),
        )
    state = load_checkpoint(checkpoint, map_location="cpu", load_trainer_state=False)
    config, path = state["config"], Path(state["path"])
    task = config.get(TASK_KEY)
    if not isinstance(task, dict) or task.get("type") != "classify":
        raise CheckpointError(f"{path} is not a classification checkpoint")
    _check_classify_task(task, str(path))
    lm = build_model(dict(config["model"]))
    clf = SequenceClassifier(lm, len(task["labels"]), task["pool"])
    load_model_weights(clf, state["model_state"])
    tok_path = path / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{path}: tokenizer.json is missing")
    return LoadedClassifier(
        clf.to(device).eval(),
        Tokenizer.load(str(tok_path)),
        task,
        model_config_dict(lm),
        config,
        path,
        None,
        state["step"],
    )


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    ids: list[list[int]],
    pad_id: int,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Classifier logits (N, K) in fp32 for encoded examples, in input order."""
    from turbolm.finetune.data import iter_eval_batches

    was_training = model.training
    model.eval()
    out = []
    try:
        for x, lengths in iter_eval_batches(ids, batch_size, pad_id):
            out.append(model(x.to(device), lengths.to(device)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
