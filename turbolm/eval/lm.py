"""Language-model evaluation: loss, perplexity and next-token accuracy over token windows."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from turbolm.data.loader import val_batches
from turbolm.errors import DataError


@torch.no_grad()
def evaluate_lm(
    model: torch.nn.Module,
    tokens: np.ndarray,
    *,
    batch_size: int,
    context: int,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[str, float]:
    """Mean next-token loss (nats), perplexity and top-1 accuracy of ``model`` on ``tokens``.

    ``tokens`` is a 1-D array of ids walked sequentially in windows of ``context`` (see
    ``val_batches``). Loss is averaged over every predicted token, not over batches, so the
    result does not depend on the batch size.
    """
    if len(tokens) < 2:
        raise DataError(f"evaluation needs at least 2 tokens, got {len(tokens)}")
    context = min(context, len(tokens) - 1)
    was_training = model.training
    model.eval()
    total_loss, total_correct, total_tokens = 0.0, 0, 0
    try:
        for x, y in val_batches(tokens, batch_size, context, max_batches=max_batches):
            x, y = x.to(device), y.to(device)
            with autocast or contextlib.nullcontext():
                logits, _ = model(x)
            logits = logits.float()  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
            total_loss += loss.item()
            total_correct += (logits.argmax(dim=-1) == y).sum().item()
            total_tokens += y.numel()
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise DataError("evaluation saw no tokens")
    mean_loss = total_loss / total_tokens
    return {
        "loss": mean_loss,
        "perplexity": math.exp(min(mean_loss, 700.0)),
        "accuracy": total_correct / total_tokens,
        "tokens": total_tokens,
    }
