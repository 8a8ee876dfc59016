"""Causal self-attention with rotary embeddings and a KV cache.

``CausalSelfAttention`` is the attention block of ``TransformerLM``: one fused ``qkv``
projection, rotary position embeddings on q and k, ``turbolm.ops.attention`` (so the backend
registry picks the kernel), and the output projection ``proj``. Grouped-query attention uses
fewer k/v heads than q heads (``n_kv_head``); ``n_kv_head == 1`` is multi-query attention.

For generation each layer keeps a ``KVCache``: keys and values of the tokens seen so far in
buffers preallocated to ``max_len``. ``forward(x, cache)`` rotates the new tokens' q/k with
positions offset by the cache length, appends k/v, and attends over the whole cache
(causal, bottom-right aligned, so a prompt of many tokens and single decoded tokens both work).
The cache is for inference (``torch.no_grad()``): it is written in place.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from turbolm.errors import DTypeError, InputError, ShapeError
from turbolm.ops.attention import attention


def _rope_tables(head_dim: int, length: int, theta: float, device) -> tuple[torch.Tensor, ...]:
    """cos, sin of shape (length, head_dim // 2) in fp32, computed in fp64."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (D/2,)
    positions = torch.arange(length, dtype=torch.float64)  # (L,)
    angles = torch.outer(positions, inv_freq)  # (L, D/2)
    return angles.cos().float().to(device), angles.sin().float().to(device)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE), "rotate half" layout.

    Feature pairs ``(x[i], x[i + D/2])`` at position ``p`` are rotated by the angle
    ``p * theta ** (-2i / D)``, so the dot product of a rotated query at position m and a
    rotated key at position n depends on m - n only. cos/sin tables are cached in
    non-persistent fp32 buffers (not in the state_dict) and grow on demand past
    ``max_seq_len``. After materialising a module built on the ``meta`` device
    (``to_empty``), call :meth:`reset_parameters` to refill them.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, max_seq_len: int = 2048):
        super().__init__()
        if head_dim <= 0 or head_dim % 2:
            raise InputError(f"RotaryEmbedding: head_dim must be even and > 0, got {head_dim}")
        if not (math.isfinite(theta) and theta > 0):
            raise InputError(f"RotaryEmbedding: theta must be a finite number > 0, got {theta}")
        self.head_dim, self.theta, self.max_seq_len = head_dim, float(theta), int(max_seq_len)
        cos, sin = _rope_tables(head_dim, self.max_seq_len, self.theta, None)
        self.register_buffer("cos", cos, persistent=False)  # (L, D/2)
        self.register_buffer("sin", sin, persistent=False)  # (L, D/2)

    def reset_parameters(self) -> None:
        """Recompute the cos/sin tables (on the buffers' current device)."""
        device = self.cos.device if self.cos.device.type != "meta" else None
        self._rebuild(self.max_seq_len, device)

    def _rebuild(self, length: int, device) -> None:
        self.max_seq_len = max(self.max_seq_len, length)
        self.cos, self.sin = _rope_tables(self.head_dim, self.max_seq_len, self.theta, device)

    def tables(self, offset: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions ``offset .. offset + length - 1``: (length, D/2) fp32."""
        end = offset + length
        # model.to(bfloat16) casts buffers too; rebuild in fp32 rather than rotate in bf16.
        if end > self.cos.shape[0] or self.cos.dtype != torch.float32 or self.cos.device != device:
            self._rebuild(end, device)
        return self.cos[offset:end], self.sin[offset:end]

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate ``x`` (B, H, T, D) for positions ``offset + t``; same shape and dtype."""
        if x.shape[-1] != self.head_dim:
            raise ShapeError(
                f"RotaryEmbedding: last dim must be head_dim={self.head_dim}, "
                f"got shape {tuple(x.shape)}"
            )
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = self.tables(offset, x.shape[-2], x.device)  # (T, D/2) each
        cos, sin = cos.to(compute), sin.to(compute)
        x1, x2 = x.to(compute).chunk(2, dim=-1)  # (B, H, T, D/2) each
        rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, H, T, D)
        return rotated.to(x.dtype)


class KVCache:
    """Keys and values of one attention layer for incremental decoding.

    Buffers ``k``/``v`` of shape (batch_size, n_kv_head, max_len, head_dim) are allocated on
    the first :meth:`append`, with the dtype and device of the keys appended (so autocast and
    ``model.to(...)`` need no extra arguments); ``length`` counts the positions filled.
    """

    def __init__(self, batch_size: int, n_kv_head: int, max_len: int, head_dim: int):
        for name, value in (
            ("batch_size", batch_size),
            ("n_kv_head", n_kv_head),
            ("max_len", max_len),
            ("head_dim", head_dim),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"KVCache: {name} must be an int > 0, got {value!r}")
        self.batch_size, self.n_kv_head = batch_size, n_kv_head
        self.max_len, self.head_dim = max_len, head_dim
        self.k: torch.Tensor | None = None  # (B, Hkv, max_len, D) once allocated
        self.v: torch.Tensor | None = None
        self.length = 0

    def __repr__(self) -> str:
        shape = (self.batch_size, self.n_kv_head, self.max_len, self.head_dim)
        return f"KVCache(shape={shape}, length={self.length})"

    @property
    def remaining(self) -> int:
        return self.max_len - self.length

    def reset(self) -> None:
        """Forget every position (keeps the buffers)."""
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``/``v`` (B, Hkv, t, D); returns all cached k, v: (B, Hkv, length, D)."""
        expected = (self.batch_size, self.n_kv_head, k.shape[2], self.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ShapeError(
                f"KVCache: k and v must be (batch={self.batch_size}, kv_heads={self.n_kv_head}, "
                f"t, head_dim={self.head_dim}), got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        t = k.shape[2]
        if t > self.remaining:
            raise InputError(
                f"KVCache: cannot append {t} positions, {self.length} of max_len={self.max_len} "
                "are used (crop the input or start a new state with a larger max_len)"
            )
        if self.k is None:
            shape = (self.batch_size, self.n_kv_head, self.max_len, self.head_dim)
            self.k = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(shape, dtype=v.dtype, device=v.device)
        elif k.dtype != self.k.dtype or v.dtype != self.v.dtype:
            raise DTypeError(f"KVCache holds {self.k.dtype}, got k {k.dtype} and v {v.dtype}")
        end = self.length + t
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, Hkv, length, D) each


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: x (B, T, d_model) -> (B, T, d_model).

    Parameters: ``qkv`` Linear(d_model, (n_head + 2 * n_kv_head) * head_dim), rows ordered
    [q heads | k heads | v heads], and ``proj`` Linear(d_model, d_model). ``dropout`` is applied
    to the attention probabilities and to the output, in training mode only. ``rope=False``
    leaves positions to the caller (e.g. learned position embeddings).
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        n_kv_head: int | None = None,
        bias: bool = False,
        dropout: float = 0.0,
        rope: bool = True,
        rope_theta: float = 10000.0,
        max_seq_len: int = 2048,
    ):
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_head <= 0 or d_model % n_head:
            raise InputError(
                f"d_model ({d_model}) must be a positive multiple of n_head ({n_head})"
            )
        if n_kv_head <= 0 or n_head % n_kv_head:
            raise InputError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
        if not 0.0 <= dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {dropout}")
        self.d_model, self.n_head, self.n_kv_head = d_model, n_head, n_kv_head
        self.head_dim = d_model // n_head
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, (n_head + 2 * n_kv_head) * self.head_dim, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.rotary = RotaryEmbedding(self.head_dim, rope_theta, max_seq_len) if rope else None

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache for this layer."""
        return KVCache(batch_size, self.n_kv_head, max_len, self.head_dim)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model). With ``cache``, x holds the next T tokens."""
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ShapeError(
                f"x must be (batch, seq, d_model={self.d_model}), got shape {tuple(x.shape)}"
            )
        B, T, C = x.size()
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.rotary is not None:
            offset = cache.length if cache is not None else 0
            q = self.rotary(q, offset)  # (B, nh, T, hs)
            k = self.rotary(k, offset)  # (B, nkv, T, hs)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nkv, Tk, hs), Tk = cached + T
        # One query sees every cached key: causal masking is a no-op, skip it.
        causal = T > 1
        dropout_p = self.dropout if self.training else 0.0
        y = attention(q, k, v, causal=causal, dropout_p=dropout_p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))  # (B, T, C)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_head={self.n_head}, n_kv_head={self.n_kv_head}, "
            f"rope={self.rotary is not None}, dropout={self.dropout}"
        )
