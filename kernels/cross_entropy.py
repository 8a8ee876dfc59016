"""Fused linear + cross-entropy in Triton: the per-chunk loss-and-gradient step.

``turbolm/ops/cross_entropy.py`` runs the LM head in chunks of rows (logits = x_chunk @ W^T
through cuBLAS), then :func:`cross_entropy_step_` overwrites each row of logits with the
gradient of that row's loss and returns the losses, so the logits of the whole batch never
exist at once (the memory Liger-Kernel's fused linear cross-entropy saves, in the same way).

One program per row, looping over the vocabulary in blocks of BLOCK_V: pass 1 keeps a running
max and rescaled sum of exponentials (online softmax), the sum of the logits (for label
smoothing); pass 2 writes ``softmax - e / V - (1 - e) [j == t]``. fp32 arithmetic whatever
the storage dtype (fp32 / fp16 / bf16); the gradient is stored in the logits' dtype.

Per row z, target t, label smoothing e (``torch.nn.functional.cross_entropy``):
    loss = logsumexp(z) - (1 - e) z[t] - e mean(z)
Rows whose target is ``ignore_index`` get loss 0 and a zero gradient. A target outside
[0, V) that is not ``ignore_index`` gives a NaN loss (and a NaN gradient row): checking it
on the host would synchronise with the GPU every step, and NaN is loud where a clamped
index would be silently wrong.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_BLOCK_V = 1024 if INTERPRET else 8192


@triton.jit
def _ce_step_kernel(
    Z,  # (rows, V) logits, overwritten with their gradient
    T,  # (rows,) int64 targets
    LOSS,  # (rows,) fp32 losses
    stride_row,
    V,
    ignore_index,
    smoothing,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_row
    target = tl.load(T + row)
    cols = tl.arange(0, BLOCK_V)
    ignored = target == ignore_index
    # pass 1: running max m, sum of exp(z - m), sum of z
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    total = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        z = tl.load(z_row + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        # lanes that have seen only -inf (the masked tail) keep s = 0: shift by a finite value
        # so no exp(-inf - -inf) = NaN is ever formed
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.exp(z - shift)
        m = m_new
        total += tl.where(idx < V, z, 0.0)
    m_row = tl.max(m, axis=0)
    s_row = tl.sum(s * tl.exp(m - m_row), axis=0)
    lse = m_row + tl.log(s_row)
    in_range = (target >= 0) & (target < V)
    z_t = tl.load(z_row + tl.where(in_range, target, 0)).to(tl.float32)
    z_t = tl.where(in_range, z_t, float("nan"))
    loss = lse - (1.0 - smoothing) * z_t - smoothing * tl.sum(total, axis=0) / V
    tl.store(LOSS + row, tl.where(ignored, 0.0, loss))
    # pass 2: the gradient, in place
    uniform = smoothing / V
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        z = tl.load(z_row + idx, mask=idx < V, other=0.0).to(tl.float32)
        g = tl.exp(z - lse) - uniform
        g = tl.where(idx == target, g - (1.0 - smoothing), g)
        g = tl.where(in_range, g, float("nan"))
        g = tl.where(ignored, 0.0, g)
        tl.store(z_row + idx, g.to(Z.dtype.element_ty), mask=idx < V)


def cross_entropy_step_(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float, ignore_index: int
) -> torch.Tensor:
    """logits (rows, V) fp32/fp16/bf16 with a contiguous last dim, overwritten with the
    gradient of each row's loss; targets (rows,) int64. Returns the losses (rows,) fp32."""
    rows, V = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return losses
    block = min(MAX_BLOCK_V, triton.next_power_of_2(V))
    warps = 1 if INTERPRET else (16 if block >= 8192 else 8 if block >= 2048 else 4)
    _ce_step_kernel[(rows,)](
        logits,
        targets,
        losses,
        logits.stride(0),
        V,
        ignore_index,
        float(label_smoothing),
        BLOCK_V=block,
        num_warps=warps,
    )
    return losses
