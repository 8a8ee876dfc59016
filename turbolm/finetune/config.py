"""Fine-tuning configuration: ``finetune``, ``lora`` and ``train`` sections, YAML + overrides.

Same rules as the training config (``turbolm/config.py``, whose coercion and suggestion
helpers this module reuses): every field has a default, ``section.key=value`` overrides (bare
``key=value`` when only one section has the key: ``task=classify``, ``r=4``, ``lr=3e-3``),
values coerced by the field annotations, unknown keys answered with a "did you mean".

    finetune: task (lm | classify), data / val_data, pooling, lengths, JSONL field names
    lora:     r (0 = full fine-tuning), alpha, dropout, target (module groups or names)
    train:    the training section of ``turbolm train`` (``TrainConfig``) with fine-tuning
              defaults (fewer steps, no weight decay, its own out_dir)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from turbolm.config import (
    RunConfig,
    TrainConfig,
    _parse_override_value,
    _read_yaml,
    _resolve_key,
    _schema,
    _suggest,
    coerce_value,
    validate,
)
from turbolm.errors import ConfigError

__all__ = [
    "FinetuneConfig",
    "TaskConfig",
    "LoraSettings",
    "FinetuneTrainConfig",
    "load_finetune_config",
    "finetune_config_to_dict",
]


@dataclass
class TaskConfig:
    """What to fine-tune on and how examples become model inputs."""

    task: Literal["lm", "classify"] = "lm"
    data: list[str] = field(default_factory=list)  # training files/folders/.jsonl (or --data)
    val_data: list[str] = field(default_factory=list)  # held-out set; empty = split from data
    val_fraction: float = 0.1  # share of data held out when val_data is empty
    # classification
    text_field: str = "text"  # JSONL field with the text (lm: also the field of .jsonl input)
    label_field: str = "label"  # JSONL field with the label (string or integer)
    pool: Literal["last", "mean"] = "mean"  # mean over real tokens, or the last token's state
    max_len: int | None = None  # tokens per example (classify) / window (lm); None = context


@dataclass
class LoraSettings:
    """LoRA adapters (through ``peft``). ``r=0`` means full fine-tuning instead."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    # Groups (transformer: attn, mlp, embed, head; rnn: rnn, proj, embed, head), "auto"
    # (transformer: attn,mlp; rnn: rnn + proj if present) or module names (blocks.0.attn.qkv).
    target: list[str] = field(default_factory=lambda: ["auto"])


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """``TrainConfig`` with fine-tuning defaults. ``checkpoint_every``/``keep_checkpoints``,
    ``sample_tokens``, ``tensorboard`` and ``compile`` are not used by fine-tuning."""

    out_dir: str = "runs/finetune"
    batch_size: int = 16
    max_steps: int = 200
    lr: float = 2e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    eval_every: int = 50
    eval_batches: int = 20  # lm task only; classification evaluates the whole val set
    log_every: int = 10
    tensorboard: bool = False


@dataclass
class FinetuneConfig:
    """A whole fine-tuning run."""

    finetune: TaskConfig = field(default_factory=TaskConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)


SECTIONS: dict[str, type] = {
    "finetune": TaskConfig,
    "lora": LoraSettings,
    "train": FinetuneTrainConfig,
}


def _set(cfg: FinetuneConfig, key: str, raw: Any, schema: dict[str, Any], parse: bool) -> None:
    value = _parse_override_value(raw, schema[key]) if parse else raw
    section, name = key.split(".", 1)
    setattr(getattr(cfg, section), name, coerce_value(key, value, schema[key]))


def _apply_yaml(cfg: FinetuneConfig, path: str | Path, schema: dict[str, Any]) -> None:
    where = f"config file {str(path)!r}: "
    for section, values in _read_yaml(path).items():
        if section not in SECTIONS:
            raise ConfigError(
                f"{where}unknown config section '{section}' (a fine-tuning config has "
                f"{', '.join(SECTIONS)})"
            )
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}config section '{section}' must be a mapping")
        for name, value in values.items():
            key = f"{section}.{name}"
            if key not in schema:
                raise ConfigError(f"{where}unknown config key '{key}'{_suggest(key, schema)}")
            _set(cfg, key, value, schema, parse=False)


def _rules(cfg: FinetuneConfig) -> list[tuple[str, bool, str]]:
    f, lo = cfg.finetune, cfg.lora
    return [
        ("finetune.val_fraction", 0 < f.val_fraction < 1, "must be > 0 and < 1"),
        ("finetune.text_field", bool(f.text_field.strip()), "must not be empty"),
        ("finetune.label_field", bool(f.label_field.strip()), "must not be empty"),
        ("finetune.max_len", f.max_len is None or f.max_len >= 2, "must be >= 2 or null"),
        ("lora.r", lo.r >= 0, "must be >= 0 (0 = full fine-tuning)"),
        ("lora.alpha", lo.alpha > 0, "must be > 0"),
        ("lora.dropout", 0 <= lo.dropout < 1, "must be >= 0 and < 1"),
        ("lora.target", bool(lo.target), "must name at least one module group or module"),
        # train keys fine-tuning does not implement: refuse rather than ignore
        ("train.compile", not cfg.train.compile, "is not supported by fine-tuning"),
        (
            "train.fused_cross_entropy",
            not cfg.train.fused_cross_entropy,
            "is not supported by fine-tuning (a LoRA-adapted head must run as a module)",
        ),
        (
            "train.deepspeed",
            not getattr(cfg.train, "deepspeed", None),
            "is not supported by fine-tuning (single process)",
        ),
    ]


def validate_finetune(cfg: FinetuneConfig) -> FinetuneConfig:
    """Check every value; one ``ConfigError`` listing what is wrong."""
    problems = [
        f"config key '{key}' {rule}, got {getattr(getattr(cfg, key.split('.')[0]), key.split('.')[1])!r}"
        for key, ok, rule in _rules(cfg)
        if not ok
    ]
    if problems:
        head = "invalid config: " if len(problems) == 1 else "invalid config:\n  "
        raise ConfigError(head + "\n  ".join(problems))
    validate(RunConfig(train=cfg.train))  # the train section's own rules
    return cfg


def load_finetune_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> FinetuneConfig:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides; validated."""
    cfg = FinetuneConfig()
    schema = _schema(FinetuneConfig)
    if path is not None:
        _apply_yaml(cfg, path, schema)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. lora.r=4)")
        raw_key, raw_value = item.split("=", 1)
        if not raw_key.strip():
            raise ConfigError(f"override {item!r} has an empty key")
        key = _resolve_key(raw_key, FinetuneConfig)
        _set(cfg, key, raw_value, schema, parse=True)
    return validate_finetune(cfg)


def finetune_config_to_dict(cfg: FinetuneConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
