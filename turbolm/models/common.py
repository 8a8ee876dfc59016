"""Pieces shared by the language models: config validation, input checks, param counting,
optimizer groups and the loss."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from turbolm.errors import ConfigError, DTypeError, ShapeError
from turbolm.ops.cross_entropy import linear_cross_entropy

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# config validation (each failure names the field)


def check_int(cls: str, name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{cls}.{name} must be an int >= {minimum}, got {value!r}")


def check_float(cls: str, name: str, value, low: float, high: float, high_open=False) -> None:
    """``value`` is a real number in [low, high] (or [low, high) with ``high_open``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and low <= value and (value < high if high_open else value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise ConfigError(
            f"{cls}.{name} must be a number in [{low}, {high}{bracket}, got {value!r}"
        )


def check_positive(cls: str, name: str, value) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and value > 0):
        raise ConfigError(f"{cls}.{name} must be a finite number > 0, got {value!r}")


def check_choice(cls: str, name: str, value, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{cls}.{name} must be one of {choices}, got {value!r}")


def check_bool(cls: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{cls}.{name} must be true or false, got {value!r}")


# ---------------------------------------------------------------------------------------------
# forward-time checks (cheap: shapes and dtypes only, no device sync)


def check_idx(idx: torch.Tensor, name: str = "idx") -> None:
    """``idx`` is a (B, T) integer tensor with T >= 1."""
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
        got = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise DTypeError(f"{name} must be an int64 (or int32) tensor of token ids, got {got}")
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ShapeError(
            f"{name} must have shape (batch, seq) with seq >= 1, got {tuple(idx.shape)}"
        )


def _check_targets(targets: torch.Tensor, idx: torch.Tensor) -> None:
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise DTypeError("targets must be an int64 tensor of token ids (or -100 to ignore)")
    if targets.shape != idx.shape:
        raise ShapeError(
            f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}"
        )


def lm_loss(logits: torch.Tensor, targets: torch.Tensor | None, idx: torch.Tensor):
    """Mean cross-entropy of ``logits`` (B, T, V) against ``targets`` (B, T), in fp32.

    Targets equal to -100 are ignored. Returns None without targets.
    """
    if targets is None:
        return None
    _check_targets(targets, idx)
    V = logits.size(-1)
    return F.cross_entropy(
        logits.reshape(-1, V).float(), targets.reshape(-1).long(), ignore_index=IGNORE_INDEX
    )


# ---------------------------------------------------------------------------------------------
# parameters


def unique_params(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter once (tied weights counted once)."""
    return list(model.parameters())  # parameters() already de-duplicates shared tensors


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """nanoGPT's rule: weight decay on every parameter with >= 2 dims (matmul weights and
    embeddings, which a tied LM head shares), none on 1-D ones (biases, norm gains).

    Returns ``[{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0}]``
    with trainable parameters only, each once; an empty group is left out.
    """
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ConfigError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    params = [p for p in unique_params(model) if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def fused_lm_loss(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, idx: torch.Tensor):
    """``lm_loss(head(hidden), targets, idx)`` without the logits: the fused linear
    cross-entropy op (``turbolm.ops.linear_cross_entropy``), hidden (B, T, D) -> fp32 loss."""
    _check_targets(targets, idx)
    return linear_cross_entropy(hidden, head.weight, targets, head.bias, ignore_index=IGNORE_INDEX)
