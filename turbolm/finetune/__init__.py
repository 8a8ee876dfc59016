"""Fine-tuning: LoRA adapters (through ``peft``) or full fine-tuning of turbolm models, on new
text (causal LM) or labelled JSONL (sequence classification), plus merging and metrics.

    from turbolm.finetune import load_finetune_config, finetune
    cfg = load_finetune_config(None, ["task=classify", "lora.r=8", "finetune.data=[train.jsonl]"])
    result = finetune(cfg, "runs/base")      # -> runs/finetune/adapter/ (peft format)

Modules: ``config`` (sections finetune / lora / train), ``data`` (JSONL labels, LM text),
``classifier`` (``SequenceClassifier``: LM hidden states -> pooled -> linear head), ``lora``
(targets per architecture, adapter folders), ``train`` (the loop), ``merge``, ``loading``,
``metrics`` (scikit-learn), ``demo`` (the stdlib-package classification task), ``commands``
(the CLI). Importing this package is cheap: peft and scikit-learn load on first use.
"""

from __future__ import annotations

import importlib
import os

# peft imports huggingface_hub / transformers: never let them reach the network (adapters are
# local folders). Set here, before any module of this package can import peft.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_EXPORTS = {
    "FinetuneConfig": "config",
    "load_finetune_config": "config",
    "SequenceClassifier": "classifier",
    "resolve_targets": "lora",
    "finetune": "train",
    "Finetuner": "train",
    "FinetuneResult": "train",
    "merge_adapter": "merge",
    "load_classifier": "loading",
    "apply_lm_adapter": "loading",
    "classification_report": "metrics",
    "make_stdlib_task": "demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"turbolm.finetune.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'turbolm.finetune' has no attribute {name!r}")
