"""``turbolm merge``: base checkpoint + LoRA adapter -> a plain turbolm checkpoint.

The merged weights are ``W + (alpha / r) * B @ A`` (peft's ``merge_and_unload``), so the merged
model computes what base + adapter computes, up to float rounding. An LM adapter gives an LM
checkpoint (``turbolm eval`` / ``generate`` load it like any other); a classification adapter
gives a classification checkpoint (``task`` entry in ``config.json``, ``lm.*`` + ``score.*``
weights). When the adapter adapts a tied embedding / LM head the merged model is untied
(``tie_embeddings: false``). Nothing at ``out`` is touched unless everything else worked: the
checkpoint is written into a hidden sibling folder and renamed into place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from turbolm.errors import ConfigError
from turbolm.finetune.lora import (
    check_base_fits,
    load_adapter,
    needs_untie,
    read_adapter_meta,
    resolve_adapter_dir,
    untied_copy,
)


def merge_adapter(
    base: str | Path, adapter: str | Path, out: str | Path, overwrite: bool = False
) -> Path:
    """Write the merged model to the run folder ``out``; returns the checkpoint folder."""
    from turbolm.finetune.classifier import SequenceClassifier
    from turbolm.models import model_config_dict
    from turbolm.train.checkpoint import save_checkpoint
    from turbolm.train.loading import load_trained

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"output folder {out} already exists: pass --overwrite to replace it")
    adapter_dir = resolve_adapter_dir(adapter)
    meta = read_adapter_meta(adapter_dir)
    task = dict(meta["task"])
    trained = load_trained(base, "cpu")
    lm = trained.model
    resolved = out.resolve()
    for what, path in (("base checkpoint", trained.path), ("adapter", adapter_dir)):
        p = Path(path).resolve()
        if resolved == p or resolved in p.parents:
            raise ConfigError(f"--out {out} holds the {what} {path}; merge somewhere else")
    check_base_fits(adapter_dir, meta, model_config_dict(lm))
    classify = task.get("type") == "classify"
    prefix = "lm." if classify else ""
    if needs_untie(lm, adapter_dir, prefix):
        lm, _ = untied_copy(lm)
    kwargs = model_config_dict(lm)
    model = SequenceClassifier(lm, len(task["labels"]), task["pool"]) if classify else lm
    merged = load_adapter(model, adapter_dir).merge_and_unload()
    config = {
        "run": trained.config.get("run", {}),
        "model": kwargs,
        "task": task,
        "merged": {"base_checkpoint": str(trained.path), "adapter": str(adapter_dir.resolve())},
    }
    step = int(meta.get("steps", 0))
    tmp = out.parent / f".tmp-merge-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ckpt = save_checkpoint(
            tmp,
            step,
            merged.state_dict(),
            config,
            {"step": step, "merged": True},
            tokenizer_path=trained.path / "tokenizer.json",
            keep=1,
        )
        aside = None
        if out.exists():
            aside = out.parent / f".old-merge-{out.name}-{os.getpid()}"
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(out, aside)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, out)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out / ckpt.relative_to(tmp)
