"""Scaled dot-product attention: reference math, the SDPA baseline, the Triton kernels, and the
functional API.

Layouts: ``layout="bhsd"`` (default): ``q`` (B, Hq, Tq, D), ``k``/``v`` (B, Hkv, Tk, D);
``layout="bshd"``: ``q`` (B, Tq, Hq, D), ``k``/``v`` (B, Tk, Hkv, D) (the output follows the
input layout); variable-length packed batches (``cu_seqlens=``): ``q`` (total_q, Hq, D),
``k``/``v`` (total_k, Hkv, D), sequence b owning rows ``cu_seqlens[b] .. cu_seqlens[b+1]-1``.
``Hq % Hkv == 0`` (grouped-query attention; Hkv == 1 is multi-query). Output in ``q``'s dtype.

* ``causal``: query i sees keys j <= i + (Tk - Tq) (bottom-right aligned, as FlashAttention),
  so decoding Tq new tokens against a cache of Tk keys works. Query rows that see no key
  (Tq > Tk) output zeros and get zero gradient.
* ``window``: sliding-window (local) attention, FlashAttention's ``window_size`` semantics:
  ``(left, right)`` lets query i see keys j with
  ``i + (Tk - Tq) - left <= j <= i + (Tk - Tq) + right`` (-1 = unbounded on that side); an int
  ``w`` means ``(w, -1)``. With ``causal=True`` the right bound is 0, so ``causal=True,
  window=w`` sees the aligned key and the ``w`` keys before it (``w + 1`` keys). Rows that see
  no key output zeros, as above.
* ``attn_mask``: boolean (True = may attend) or additive float, broadcastable to
  (B, Hq, Tq, Tk) whatever the layout (not with ``cu_seqlens``).
* ``dropout_p``: dropout on the attention probabilities (the caller passes 0.0 in eval).
  ``seed``: the dropout seed; when None one is drawn from torch's default (CPU) generator, so
  ``torch.manual_seed`` makes runs reproducible. The triton backend regenerates the same mask
  in the backward from the seed (Philox); the autograd-native backends run their dropout under
  ``torch.random.fork_rng`` seeded with ``seed`` when it is given.
* ``scale``: softmax scale, default ``1/sqrt(D)``.
* ``cu_seqlens``: int32 (B + 1,) cumulative sequence lengths, one tensor for q and k/v or a
  pair ``(cu_seqlens_q, cu_seqlens_k)``; ``max_seqlen`` an int or pair (computed, with a host
  sync, when omitted). No padding is computed by the triton backend.

Backends: ``reference`` (readable fp32/fp64 math, the oracle), ``torch`` (SDPA), ``triton``
(``turbolm.kernels.attention``: FlashAttention-2 style forward and backward; CUDA tensors, or
CPU tensors under ``TRITON_INTERPRET=1``; no ``attn_mask``; head dim <= 256), and the
inference-only decode kernels ``cpu`` / ``cuda`` (``csrc/attention``, registered in
``turbolm/ops/decode_kernels.py``: a few new queries against a KV cache, no gradients).
"""

from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn.functional as F

from turbolm.errors import InputError, ShapeError
from turbolm.ops import registry
from turbolm.ops.checks import (
    check_float,
    check_ndim,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from turbolm.ops.function import run_backend

LAYOUTS = ("bhsd", "bshd")


def window_bounds(window) -> tuple[int, int]:
    """Normalize ``window`` (None, int left, or (left, right)) to (left, right); -1 = unbounded."""
    if window is None:
        return -1, -1
    if isinstance(window, bool):
        raise InputError(f"window must be an int or a (left, right) pair, got {window!r}")
    if isinstance(window, int):
        pair = (window, -1)
    elif isinstance(window, tuple | list) and len(window) == 2:
        pair = tuple(-1 if w is None else w for w in window)
    else:
        raise InputError(f"window must be an int or a (left, right) pair, got {window!r}")
    for w in pair:
        if isinstance(w, bool) or not isinstance(w, int) or w < -1:
            raise InputError(
                f"window sizes must be ints >= 0 (or -1 / None for unbounded), got {window!r}"
            )
    return int(pair[0]), int(pair[1])


def causal_allowed(tq: int, tk: int, device) -> torch.Tensor:
    """(Tq, Tk) bool: True where query i may see key j (bottom-right aligned)."""
    rows = torch.arange(tq, device=device)[:, None]
    cols = torch.arange(tk, device=device)[None, :]
    return cols <= rows + (tk - tq)


def visible_mask(tq: int, tk: int, causal: bool, window, device) -> torch.Tensor | None:
    """(Tq, Tk) bool of the keys each query may see under ``causal`` and ``window``, or None
    when every key is visible."""
    left, right = window_bounds(window)
    if causal:
        right = 0
    if left < 0 and right < 0:
        return None
    diag = torch.arange(tq, device=device)[:, None] + (tk - tq)
    cols = torch.arange(tk, device=device)[None, :]
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if right >= 0:
        allowed &= cols <= diag + right
    if left >= 0:
        allowed &= cols >= diag - left
    return allowed


def _allowed_and_bias(q, k, causal, attn_mask, window=None):
    """Combine causal, window and user masks into (bool allowed | None, additive bias | None)."""
    allowed = visible_mask(q.shape[-2], k.shape[-2], causal, window, q.device)
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask if allowed is None else allowed & attn_mask
        else:
            # -inf entries of an additive mask hide keys: they join `allowed`, so a row they
            # hide entirely outputs zeros (with zero, finite gradients) like any row that sees
            # no key, instead of NaN.
            visible = ~torch.isneginf(attn_mask)
            allowed = visible if allowed is None else allowed & visible
            bias = attn_mask.masked_fill(~visible, 0.0)
    return allowed, bias


def attention_reference(
    q, k, v, causal=False, dropout_p=0.0, attn_mask=None, scale=None, window=None
):
    """Readable attention in fp32 (fp64 for fp64 inputs); (B, H, T, D) layout."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, Hq, Tk, D)
    v = v.repeat_interleave(groups, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.to(compute) @ k.to(compute).transpose(-2, -1)) * scale  # (B, Hq, Tq, Tk)
    allowed, bias = _allowed_and_bias(q, k, causal, attn_mask, window)
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


# scaled_dot_product_attention(enable_gqa=) exists from torch 2.5 on.
_SDPA_GQA = torch.torch_version.TorchVersion(torch.__version__) >= "2.5"


def _attention_torch(q, k, v, causal=False, dropout_p=0.0, attn_mask=None, scale=None, window=None):
    """PyTorch's scaled_dot_product_attention (flash / efficient / math, as torch picks)."""
    tq, tk = q.shape[-2], k.shape[-2]
    # One causal query against a non-empty cache sits at the last key and sees every key: no
    # mask (the decoding case, which would otherwise take the masked path below).
    if causal and tq == 1 and tk >= 1:
        causal = False
    unmasked = attn_mask is None and window is None and (not causal or tq == tk)
    if k.shape[1] != q.shape[1] and _SDPA_GQA and q.device.type == "cpu":
        # Grouped heads read in place (no repeated k/v copies). CPU only: on CUDA, SDPA's
        # memory-efficient kernel does not take enable_gqa and fp32 would fall back to math.
        return _sdpa(q, k, v, causal, dropout_p, attn_mask, scale, window, unmasked, gqa=True)
    if k.shape[1] != q.shape[1]:
        groups = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return _sdpa(q, k, v, causal, dropout_p, attn_mask, scale, window, unmasked, gqa=False)


def _sdpa(q, k, v, causal, dropout_p, attn_mask, scale, window, unmasked, gqa):
    """One SDPA call. Masks stay in their broadcast shape (a (B, 1, Tq, Tk) padding mask is
    not expanded over the heads) and boolean where they can; rows that see no key are let see
    every key for the call, then zeroed."""
    extra = {"enable_gqa": True} if gqa else {}
    if unmasked:
        # SDPA's is_causal is top-left aligned, which equals ours only when Tq == Tk.
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale, **extra
        )
    allowed, bias = _allowed_and_bias(q, k, causal, attn_mask, window)
    mask = None
    if bias is not None:
        mask = bias.to(q.dtype)
        if bias.dtype != q.dtype:
            # A large finite fp32 bias (-1e9) must not become -inf in fp16 / bf16.
            overflow = torch.isinf(mask) & torch.isfinite(bias)
            mask = mask.masked_fill(overflow & (bias < 0), torch.finfo(q.dtype).min)
    empty_rows = None
    if allowed is not None:
        if allowed.dim() < 2:
            allowed = allowed.reshape(1, -1)  # (Tk,) -> (1, Tk): one row per query
        empty_rows = ~allowed.any(dim=-1, keepdim=True)
        allowed = allowed | empty_rows
        if mask is None:
            mask = allowed
        else:
            mask = torch.where(allowed, mask, float("-inf"))
    if mask is not None and mask.dim() < 2:
        mask = mask.reshape(1, -1)  # SDPA takes masks of 2+ dims
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, **extra
    )
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    return out


registry.register("attention", "reference", fn=attention_reference)
registry.register("attention", "torch", fn=_attention_torch)


# ---- triton backend -------------------------------------------------------------------------

# `auto` picks triton on CUDA only once GPU tests and committed benchmarks
# (benchmarks/results/<gpu>/) show it correct and fastest; until then name it explicitly.
TRITON_AUTO_ON_CUDA = False
_KERNELS_MODULE = "turbolm.kernels.attention"


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _triton_available() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def _int32_offset_overflow(q, k, v, layout) -> str | None:
    """The Triton kernels index within one (batch, head) with int32 offsets (token * token
    stride): refuse sequences whose offsets (of the inputs, or of the contiguous outputs and
    gradients the kernels write in the same layout) would not fit."""
    seq_dim = {"bhsd": 2, "bshd": 1, "varlen": 0}.get(layout, 2)
    for name, t in (("q", q), ("k", k), ("v", v)):
        dense = math.prod(t.shape[seq_dim + 1 :])  # token stride when contiguous
        last = (t.shape[seq_dim] - 1) * max(abs(t.stride(seq_dim)), dense) + t.shape[-1]
        if last >= 2**31:
            return (
                f"{name} has {t.shape[seq_dim]} tokens with a token stride of "
                f"{max(abs(t.stride(seq_dim)), dense)} elements: offsets past 2**31 overflow "
                "the kernels' int32 indexing (use the torch backend)"
            )
    return None


def _triton_supports(q, k, v, attn_mask=None, requested=None, layout="bhsd", **_) -> str | None:
    """None if the Triton kernels can run these inputs, else why not."""
    loaded = sys.modules.get(_KERNELS_MODULE)
    if q.device.type == "cpu":
        if not _interpret_requested():
            return "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 before importing)"
        if loaded is not None and not loaded.INTERPRET:
            return (
                f"{_KERNELS_MODULE} was imported without TRITON_INTERPRET=1, so its kernels are "
                "compiled for a GPU; set TRITON_INTERPRET=1 before it is imported"
            )
    elif q.device.type != "cuda":
        return f"tensors on {q.device.type} are not supported (CUDA, or CPU under the interpreter)"
    if attn_mask is not None:
        return (
            "attn_mask (boolean or additive) is not supported by the triton backend; "
            "use causal= / window=, or the torch backend"
        )
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        dtype = str(q.dtype).replace("torch.", "")
        return f"dtype {dtype} is not supported (float16, bfloat16, float32)"
    d = q.shape[-1]
    if d > 256:
        return f"head_dim {d} > 256 is not supported"
    too_long = _int32_offset_overflow(q, k, v, layout)
    if too_long:
        return too_long
    if q.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(q.device)
        if q.dtype == torch.bfloat16 and major < 8:
            return f"bfloat16 needs compute capability >= 8.0, this GPU has {major}.{minor}"
        if requested == "auto" and not TRITON_AUTO_ON_CUDA:
            return "not chosen automatically until benchmarked on GPU (pass backend='triton')"
    return None


def _kernel_kwargs(causal, dropout_p, scale, window, layout, max_seqlen_q, max_seqlen_k, seed):
    return {
        "causal": causal,
        "scale": scale,
        "window": window,
        "dropout_p": dropout_p,
        "seed": seed,
        "layout": layout,
        "max_seqlen_q": max_seqlen_q,
        "max_seqlen_k": max_seqlen_k,
    }


def _triton_fwd(q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k, **params):
    from turbolm.kernels import attention as kernels

    out, lse = kernels.attention_fwd(
        q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, **_kernel_kwargs(**params)
    )
    return out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k


def _triton_bwd(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, **params):
    from turbolm.kernels import attention as kernels

    dq, dk, dv = kernels.attention_bwd(
        grad_out, q, k, v, out, lse,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, **_kernel_kwargs(**params),
    )  # fmt: skip
    return dq, dk, dv, None, None, None


registry.register(
    "attention",
    "triton",
    fwd=_triton_fwd,
    bwd=_triton_bwd,
    supports=_triton_supports,
    available=_triton_available,
)


# ---- functional API -------------------------------------------------------------------------


def _check_attention_inputs(q, k, v, attn_mask, dropout_p, scale, layout="bhsd"):
    """Checks in the (B, H, T, D) view (``bshd`` inputs are checked through a transpose)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        dims = (
            "(batch, heads, seq, head_dim)" if layout == "bhsd" else "(batch, seq, heads, head_dim)"
        )
        check_ndim(name, t, 4, dims)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
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
            + (" (in the bhsd view of bshd inputs)" if layout == "bshd" else "")
        )
    if k.shape[1] == 0 or hq % k.shape[1] != 0:
        raise ShapeError(f"q heads ({hq}) must be a multiple of k/v heads ({k.shape[1]})")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            check_float("attn_mask", attn_mask)
        target = (b, hq, q.shape[2], k.shape[2])
        # Broadcasts to the target (sizes 1 or equal, right-aligned); a plain loop, as
        # torch.broadcast_shapes costs tens of microseconds per call.
        shape = tuple(attn_mask.shape)
        fits = len(shape) <= 4 and all(m in (1, t) for m, t in zip(shape[::-1], target[::-1]))
        if not fits:
            raise ShapeError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                f"(batch, heads, seq_q, seq_k) = {(b, hq, q.shape[2], k.shape[2])}"
            )
    _check_scalars(dropout_p, scale)


def _check_scalars(dropout_p, scale):
    if not 0.0 <= dropout_p < 1.0:
        raise InputError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise InputError(f"scale must be a finite number > 0, got {scale}")


def _pair(value, name):
    if isinstance(value, tuple | list):
        if len(value) != 2:
            raise InputError(f"{name} must be one value or a (q, k) pair, got {len(value)} values")
        return value[0], value[1]
    return value, value


def _check_varlen(q, k, v, cu_seqlens, max_seqlen, attn_mask, dropout_p, scale):
    """Validate packed inputs; returns (cu_q, cu_k, max_q, max_k)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        check_ndim(name, t, 3, "(total_tokens, heads, head_dim) with cu_seqlens")
    check_same_dtype(q=q, k=k, v=v)
    if attn_mask is not None:
        raise InputError("attn_mask cannot be combined with cu_seqlens (use causal= / window=)")
    cu_q, cu_k = _pair(cu_seqlens, "cu_seqlens")
    for name, cu in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        check_tensor(name, cu)
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
            raise ShapeError(
                f"{name} must be a 1-D int32 tensor of batch + 1 offsets, got "
                f"{str(cu.dtype).replace('torch.', '')} of shape {tuple(cu.shape)}"
            )
    check_same_device(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    if cu_q.numel() != cu_k.numel():
        raise ShapeError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length, got {cu_q.numel()} "
            f"and {cu_k.numel()}"
        )
    if k.shape != v.shape:
        raise ShapeError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[-1] != q.shape[-1]:
        raise ShapeError(
            f"k must be (total_k, kv_heads, head_dim={q.shape[-1]}), got {tuple(k.shape)}"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ShapeError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]})")
    _check_scalars(dropout_p, scale)
    max_q, max_k = _pair(max_seqlen, "max_seqlen")
    if max_q is None or max_k is None or q.device.type == "cpu":
        # Needs the offsets on the host (a sync on GPU): validate them while at it.
        for name, cu, total in (
            ("cu_seqlens_q", cu_q, q.shape[0]),
            ("cu_seqlens_k", cu_k, k.shape[0]),
        ):
            host = cu.cpu()
            lengths = host[1:] - host[:-1]
            if host[0] != 0 or host[-1] != total or (lengths < 0).any():
                raise ShapeError(
                    f"{name} must rise from 0 to the number of tokens ({total}), got "
                    f"{host.tolist()}"
                )
            longest = int(lengths.max()) if lengths.numel() else 0
            if name == "cu_seqlens_q":
                max_q = longest if max_q is None else max_q
            else:
                max_k = longest if max_k is None else max_k
    return cu_q, cu_k, int(max_q), int(max_k)


def _run_native(chosen, q, k, v, causal, dropout_p, attn_mask, scale, window, layout, varlen):
    """An autograd-native backend on any layout: transposed views, or one call per sequence."""

    def call(q, k, v, mask):
        extra = {} if window is None else {"window": window}
        return chosen.fn(q, k, v, causal, dropout_p, mask, scale, **extra)

    if varlen is not None:
        cu_q, cu_k = (c.tolist() for c in varlen)
        outs = []
        for b in range(len(cu_q) - 1):
            sq, sk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
            # (T, H, D) -> (1, H, T, D)
            qb, kb, vb = (t[s].transpose(0, 1).unsqueeze(0) for t, s in ((q, sq), (k, sk), (v, sk)))
            outs.append(call(qb, kb, vb, None)[0].transpose(0, 1))  # (T, H, D)
        if not outs:
            return q.new_empty(q.shape)
        return torch.cat(outs, dim=0)
    if layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D) views
        return call(q, k, v, attn_mask).transpose(1, 2)
    return call(q, k, v, attn_mask)


_AUTOCAST_FROM = (torch.float32, torch.float16, torch.bfloat16)


def _autocast_inputs(q, k, v):
    """Under ``torch.autocast``, q / k / v in fp32 / fp16 / bf16 are cast to the autocast dtype
    (as autocast does for SDPA on CUDA), so e.g. a model whose rotary embedding returns fp32
    q / k next to a bf16 v works as it does with SDPA; fp64 is left alone."""
    if not isinstance(q, torch.Tensor) or not torch.is_autocast_enabled(q.device.type):
        return q, k, v
    dtype = torch.get_autocast_dtype(q.device.type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_FROM else t
        for t in (q, k, v)
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    window: int | tuple[int, int] | None = None,
    layout: str = "bhsd",
    cu_seqlens: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen: int | tuple[int, int] | None = None,
    seed: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of ``q`` over ``k``/``v`` (layouts and options: see the module docstring)."""
    if layout not in LAYOUTS:
        raise InputError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    q, k, v = _autocast_inputs(q, k, v)
    left, right = window_bounds(window)
    norm_window = None if (left, right) == (-1, -1) else (left, right)
    varlen = None
    if cu_seqlens is not None:
        cu_q, cu_k, max_q, max_k = _check_varlen(
            q, k, v, cu_seqlens, max_seqlen, attn_mask, dropout_p, scale
        )
        varlen = (cu_q, cu_k)
    else:
        _check_attention_inputs(q, k, v, attn_mask, dropout_p, scale, layout)
    requested, _ = registry.requested_backend("attention", backend)
    chosen = registry.select(
        "attention", q.device.type, backend,
        q=q, k=k, v=v, attn_mask=attn_mask, causal=causal, window=norm_window,
        layout="varlen" if varlen else layout, dropout_p=dropout_p, requested=requested,
    )  # fmt: skip
    if chosen.is_autograd_native:
        args = (chosen, q, k, v, causal, dropout_p, attn_mask, scale, norm_window, layout, varlen)
        if seed is None or dropout_p == 0.0:
            return _run_native(*args)
        devices = [q.device] if q.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return _run_native(*args)
    # Kernel backends: fwd(q, k, v, attn_mask, cu_q, cu_k, **params) -> (out, *saved).
    if dropout_p > 0.0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    params = {
        "causal": causal,
        "dropout_p": dropout_p,
        "scale": scale,
        "window": norm_window,
        "layout": "varlen" if varlen else layout,
        "max_seqlen_q": max_q if varlen else None,
        "max_seqlen_k": max_k if varlen else None,
        "seed": seed,
    }
    cu_q, cu_k = varlen if varlen else (None, None)
    return run_backend(chosen, (q, k, v, attn_mask, cu_q, cu_k), params)


# The decode backends (cpu / cuda) register themselves; registering builds nothing.
from turbolm.ops import decode_kernels as _decode_kernels  # noqa: E402, F401
