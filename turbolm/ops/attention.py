"""Scaled dot-product attention: reference math, the SDPA baseline, and the functional API.

Layout: ``q`` (B, Hq, Tq, D), ``k``/``v`` (B, Hkv, Tk, D) with ``Hq % Hkv == 0`` (grouped-query
attention; Hkv == 1 is multi-query). Output (B, Hq, Tq, D) in ``q``'s dtype.

* ``causal``: query i sees keys j <= i + (Tk - Tq) (bottom-right aligned, as FlashAttention),
  so decoding Tq new tokens against a cache of Tk keys works. Query rows that see no key
  (Tq > Tk) output zeros and get zero gradient.
* ``attn_mask``: boolean (True = may attend) or additive float, broadcastable to (B, Hq, Tq, Tk).
* ``dropout_p``: dropout on the attention probabilities (the caller passes 0.0 in eval).
* ``scale``: softmax scale, default ``1/sqrt(D)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from turbolm.errors import InputError, ShapeError
from turbolm.ops import registry
from turbolm.ops.checks import check_float, check_ndim, check_same_device, check_same_dtype
from turbolm.ops.function import run_backend


def causal_allowed(tq: int, tk: int, device) -> torch.Tensor:
    """(Tq, Tk) bool: True where query i may see key j (bottom-right aligned)."""
    rows = torch.arange(tq, device=device)[:, None]
    cols = torch.arange(tk, device=device)[None, :]
    return cols <= rows + (tk - tq)


def _allowed_and_bias(q, k, causal, attn_mask):
    """Combine causal and user masks into (bool allowed | None, additive bias | None)."""
    allowed = causal_allowed(q.shape[-2], k.shape[-2], q.device) if causal else None
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask if allowed is None else allowed & attn_mask
        else:
            bias = attn_mask
    return allowed, bias


def attention_reference(q, k, v, causal=False, dropout_p=0.0, attn_mask=None, scale=None):
    """Readable attention in fp32 (fp64 for fp64 inputs)."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, Hq, Tk, D)
    v = v.repeat_interleave(groups, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.to(compute) @ k.to(compute).transpose(-2, -1)) * scale  # (B, Hq, Tq, Tk)
    allowed, bias = _allowed_and_bias(q, k, causal, attn_mask)
    if bias is not None:
        scores = scores + bias.to(compute)
    empty_rows = None
    if allowed is not None:
        allowed = allowed.expand_as(scores)
        empty_rows = ~allowed.any(dim=-1, keepdim=True)  # (B, Hq, Tq, 1)
        # Rows with no visible key would be NaN; let them see everything, then zero them.
        scores = scores.masked_fill(~(allowed | empty_rows), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = probs @ v.to(compute)  # (B, Hq, Tq, D)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    return out.to(q.dtype)


def _attention_torch(q, k, v, causal=False, dropout_p=0.0, attn_mask=None, scale=None):
    """PyTorch's scaled_dot_product_attention (flash / efficient / math, as torch picks)."""
    tq, tk = q.shape[-2], k.shape[-2]
    if k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if attn_mask is None and (not causal or tq == tk):
        # SDPA's is_causal is top-left aligned, which equals ours only when Tq == Tk.
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale
        )
    allowed, bias = _allowed_and_bias(q, k, causal, attn_mask)
    mask = bias.to(q.dtype) if bias is not None else None
    empty_rows = None
    if allowed is not None:
        shape = torch.broadcast_shapes(allowed.shape, (q.shape[0], q.shape[1], tq, tk))
        allowed = allowed.expand(shape)
        empty_rows = ~allowed.any(dim=-1, keepdim=True)
        allowed = allowed | empty_rows
        additive = torch.zeros(shape, dtype=q.dtype, device=q.device)
        additive = additive.masked_fill(~allowed, float("-inf"))
        mask = additive if mask is None else mask + additive
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    return out


registry.register("attention", "reference", fn=attention_reference)
registry.register("attention", "torch", fn=_attention_torch)


def _check_attention_inputs(q, k, v, attn_mask, dropout_p, scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        check_ndim(name, t, 4, "(batch, heads, seq, head_dim)")
    check_same_dtype(q=q, k=k, v=v)
    check_same_device(q=q, k=k, v=v, attn_mask=attn_mask)
    b, hq, _, d = q.shape
    if k.shape != v.shape:
        raise ShapeError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[0] != b or k.shape[-1] != d:
        raise ShapeError(
            f"k must be (batch={b}, kv_heads, seq_k, head_dim={d}), got {tuple(k.shape)}"
        )
    if k.shape[1] == 0 or hq % k.shape[1] != 0:
        raise ShapeError(f"q heads ({hq}) must be a multiple of k/v heads ({k.shape[1]})")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            check_float("attn_mask", attn_mask)
        try:
            torch.broadcast_shapes(attn_mask.shape, (b, hq, q.shape[2], k.shape[2]))
        except RuntimeError:
            raise ShapeError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                f"(batch, heads, seq_q, seq_k) = {(b, hq, q.shape[2], k.shape[2])}"
            ) from None
    if not 0.0 <= dropout_p < 1.0:
        raise InputError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise InputError(f"scale must be a finite number > 0, got {scale}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of ``q`` (B, Hq, Tq, D) over ``k``/``v`` (B, Hkv, Tk, D) -> (B, Hq, Tq, D)."""
    _check_attention_inputs(q, k, v, attn_mask, dropout_p, scale)
    chosen = registry.select(
        "attention", q.device.type, backend, q=q, k=k, v=v, attn_mask=attn_mask, causal=causal
    )
    if chosen.is_autograd_native:
        return chosen.fn(q, k, v, causal, dropout_p, attn_mask, scale)
    # Kernel backends: fwd(q, k, v, attn_mask, causal=, dropout_p=, scale=) -> (out, *saved).
    params = {"causal": causal, "dropout_p": dropout_p, "scale": scale}
    return run_backend(chosen, (q, k, v, attn_mask), params)
