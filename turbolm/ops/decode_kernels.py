"""Decode backends of ``attention``: ``cpu`` and ``cuda`` (``csrc/attention``, C++ / CUDA C++).

These kernels serve generation: a few new queries (usually one token) against a KV cache,
inference only. The keys are cut into chunks processed in parallel and merged exactly
("flash-decoding", see ``csrc/attention/decode.cu``), grouped-query heads read each k/v row
once, and the cache may be any strided view with a unit stride on head_dim (a slice of the
preallocated ``KVCache`` buffers is read in place).

Supported: ``bhsd`` / ``bshd`` layouts, any query / key lengths (causal bottom-right aligned),
sliding windows, GQA/MQA, custom scale; fp16 / bf16 / fp32 (and fp64 on CPU); head_dim <= 256
on CUDA. Not supported (``supports`` says so, the registry raises BackendError when the
backend was named): gradients (run under ``torch.no_grad()``), ``attn_mask``, ``dropout_p > 0``
and ``cu_seqlens``.

``auto`` takes them only for decode-sized queries (``q_len <= AUTO_MAX_Q_LEN``) against caches
of at least ``CPU_AUTO_MIN_KEYS`` keys on CPU (measured on 2 threads, Hq 32 / Hkv 8 / D 128,
fp32: PyTorch's SDPA is as fast or up to ~25% faster below ~1k keys, the kernel 2.5-3x faster
from 2k keys on; ``benchmarks/bench_decode.py``), and:

* ``cpu`` when the extension is already built (``auto`` never starts a compiler on CPU; see
  ``turbolm/ops/norm_kernels.py``) or ``TURBOLM_BUILD_EXT=1``;
* ``cuda`` only once ``CUDA_AUTO`` is True: it stays False until the kernel has run and won on a
  GPU (``benchmarks/gpu_check.sh``); until then pass ``backend="cuda"`` or
  ``TURBOLM_BACKEND=attention=cuda``.
"""

from __future__ import annotations

import math

import torch

from turbolm.errors import BackendError
from turbolm.ops import ext_support, registry

AUTO_MAX_Q_LEN = 16
CPU_AUTO_MIN_KEYS = 1024
CUDA_AUTO = False
_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_fakes_registered = False


def _ext():
    from turbolm import ext  # imported on first use

    return ext


def _register_fakes() -> None:
    """Shape/dtype-only twin of the op (torch.compile, FakeTensor, opcheck)."""
    global _fakes_registered
    if _fakes_registered or not hasattr(torch.ops.turbolm, "attention_decode"):
        return

    @torch.library.register_fake("turbolm::attention_decode")
    def _decode(q, k, v, scale, causal, window_left, window_right, num_splits):
        stat = torch.float64 if q.dtype == torch.float64 else torch.float32
        return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=stat)

    _fakes_registered = True


def _ext_reason(auto: bool, compile_ok: bool) -> str | None:
    """None when the extension with the decode op is loaded (building it now if allowed)."""
    return ext_support.ext_reason(
        auto, compile_ok, "attention_decode", "attention", on_loaded=_register_fakes
    )


def _common_reason(q, k, v, attn_mask, dropout_p, layout) -> str | None:
    if layout == "varlen":
        return "cu_seqlens (packed batches) is not supported by the decode kernel"
    if attn_mask is not None:
        return "attn_mask is not supported by the decode kernel; use causal= / window="
    if dropout_p:
        return "dropout is not supported by the decode kernel (inference only)"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return (
            "the decode kernel is inference only (no backward): run it under torch.no_grad(), "
            "or use the torch / triton backends for training"
        )
    return None


def _dtype_reason(q, allowed) -> str | None:
    if q.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        return f"dtype {str(q.dtype).replace('torch.', '')} is not supported ({names})"
    return None


def _seq_len(t, layout) -> int:
    return t.shape[1] if layout == "bshd" else t.shape[2]


def _auto_reason(q, k, layout, min_keys: int = 0) -> str | None:
    if _seq_len(q, layout) > AUTO_MAX_Q_LEN:
        return (
            f"auto uses the decode kernel for at most {AUTO_MAX_Q_LEN} queries, got "
            f"{_seq_len(q, layout)} (name the backend to use it anyway)"
        )
    if _seq_len(k, layout) < min_keys:
        return (
            f"auto uses the decode kernel for caches of at least {min_keys} keys (SDPA is as "
            f"fast below), got {_seq_len(k, layout)} (name the backend to use it anyway)"
        )
    return None


def _cpu_supports(
    q, k, v, attn_mask=None, dropout_p=0.0, layout="bhsd", auto=False, **_
) -> str | None:
    if q.device.type != "cpu":
        return f"needs CPU tensors, got {q.device.type}"
    reason = (
        _common_reason(q, k, v, attn_mask, dropout_p, layout)
        or _dtype_reason(q, _CPU_DTYPES)
        or (_auto_reason(q, k, layout, CPU_AUTO_MIN_KEYS) if auto else None)
    )
    if reason:
        return reason
    return _ext_reason(auto, compile_ok=ext_support.cpu_compile_allowed())


def _cuda_available() -> str | None:
    return None if torch.cuda.is_available() else "no CUDA device"


def _cuda_supports(
    q, k, v, attn_mask=None, dropout_p=0.0, layout="bhsd", auto=False, **_
) -> str | None:
    if q.device.type != "cuda":
        return f"needs CUDA tensors, got {q.device.type}"
    reason = _common_reason(q, k, v, attn_mask, dropout_p, layout) or _dtype_reason(q, _CUDA_DTYPES)
    if reason:
        return reason
    if q.shape[-1] > 256:
        return f"head_dim {q.shape[-1]} > 256 is not supported by the CUDA decode kernel"
    if auto:
        if not CUDA_AUTO:
            return "not chosen automatically until verified on a GPU (pass backend='cuda')"
        reason = _auto_reason(q, k, layout)
        if reason:
            return reason
    reason = _ext_reason(auto, compile_ok=True)
    if reason:
        return reason
    if not _ext().has_cuda_kernels():
        return f"extension was built without CUDA ({_ext().cuda_choice()[1]})"
    return None


def decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    num_splits: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decode kernel on (B, H, T, D) views: ``(out, lse)``.

    ``out`` has q's shape, dtype and layout; ``lse`` (B, Hq, Tq) is float32 (float64 for
    float64 inputs), -inf for rows that see no key. ``window`` is a normalized (left, right)
    pair or None; ``num_splits`` fixes the number of key chunks (0 = chosen by the kernel).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    left, right = window if window is not None else (-1, -1)
    ext = _ext()
    ops = ext.ops()
    _register_fakes()
    return ext.call(ops.attention_decode, q, k, v, scale, causal, left, right, num_splits)


def _fwd(q, k, v, attn_mask, cu_seqlens_q, cu_seqlens_k, *, causal, scale, window, layout, **_):
    if layout == "bshd":  # (B, T, H, D) -> (B, H, T, D) views; out follows q's layout
        out, _lse = decode(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            causal=causal, scale=scale, window=window,
        )  # fmt: skip
        return (out.transpose(1, 2),)
    out, _lse = decode(q, k, v, causal=causal, scale=scale, window=window)
    return (out,)


def _bwd(grad_out, *saved, **params):
    raise BackendError("the decode kernel has no backward (inference only)")


registry.register("attention", "cpu", fwd=_fwd, bwd=_bwd, supports=_cpu_supports)
registry.register(
    "attention",
    "cuda",
    fwd=_fwd,
    bwd=_bwd,
    supports=_cuda_supports,
    available=_cuda_available,
)
