"""Sequence classification on top of a turbolm language model.

``SequenceClassifier(lm, num_labels, pool)`` reads the LM's final hidden states
(``lm.hidden_states(idx)``: what the LM head reads, after the final norm / projection) and
applies one linear layer ``score`` to a pooled vector per sequence:

* ``pool="last"`` (default): the hidden state at the last real token. In a causal model that
  is the only position that has seen the whole sequence (as GPT-style sequence classifiers
  do); examples end in the end-of-text token (see ``finetune/data.py``), so the classifier
  always reads the same token's state, and right padding cannot change it.
* ``pool="mean"``: the mean over real tokens (padding masked out).

State dict keys are ``lm.*`` (the language model's own keys) and ``score.weight`` /
``score.bias``. The LM sub-module is untouched, so peft can put LoRA adapters on it and keep
``score`` fully trainable (``modules_to_save=["score"]``).
"""

from __future__ import annotations

import torch
from torch import nn

from turbolm.errors import InputError, ShapeError

POOLS = ("last", "mean")
HEAD_INIT_STD = 0.02


def feature_size(lm: nn.Module) -> int:
    """Width of ``lm.hidden_states``: the input width of the LM's output layer."""
    head = getattr(lm, "lm_head", None) or getattr(lm, "head", None)
    width = getattr(head, "in_features", None)
    if not isinstance(width, int):
        raise InputError(f"{type(lm).__name__} has no linear output layer to read the width from")
    return width


class SequenceClassifier(nn.Module):
    """LM backbone + linear head: ``forward(idx, lengths=None) -> logits (B, num_labels)``."""

    def __init__(self, lm: nn.Module, num_labels: int, pool: str = "last"):
        super().__init__()
        if pool not in POOLS:
            raise InputError(f"pool must be one of {POOLS}, got {pool!r}")
        if not isinstance(num_labels, int) or num_labels < 2:
            raise InputError(f"num_labels must be an int >= 2, got {num_labels!r}")
        if not callable(getattr(lm, "hidden_states", None)):
            raise InputError(f"{type(lm).__name__} has no hidden_states(idx) method")
        self.lm = lm
        self.pool = pool
        self.num_labels = num_labels
        self.score = nn.Linear(feature_size(lm), num_labels)
        nn.init.normal_(self.score.weight, mean=0.0, std=HEAD_INIT_STD)
        nn.init.zeros_(self.score.bias)

    def pooled(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids + (B,) lengths (None = all T real) -> pooled features (B, C)."""
        h = self.lm.hidden_states(idx)  # (B, T, C)
        B, T, _ = h.shape
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.int64, device=h.device)
        lengths = lengths.to(h.device)
        if lengths.shape != (B,):
            raise ShapeError(f"lengths must have shape ({B},), got {tuple(lengths.shape)}")
        if self.pool == "last":
            return h[torch.arange(B, device=h.device), lengths - 1]  # (B, C)
        mask = (torch.arange(T, device=h.device)[None, :] < lengths[:, None]).to(h.dtype)  # (B, T)
        return (h * mask[..., None]).sum(dim=1) / lengths[:, None].to(h.dtype)  # (B, C)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.score(self.pooled(idx, lengths))  # (B, K)

    def extra_repr(self) -> str:
        return f"num_labels={self.num_labels}, pool={self.pool!r}"
