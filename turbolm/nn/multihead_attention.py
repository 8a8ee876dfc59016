"""Drop-in ``torch.nn.MultiheadAttention`` whose attention runs ``turbolm.ops.attention``.

:class:`MultiheadAttention` subclasses ``torch.nn.MultiheadAttention`` and only replaces
``forward``: constructor arguments, parameters, buffers and ``state_dict`` keys are torch's,
it adds no instance attributes, so a torch.nn instance can be converted in place by switching
its ``__class__`` (what ``turbolm.patching`` does) and a checkpoint loads either way.

Fast path. A call runs the in-projections, ``turbolm.ops.attention`` (so the backend registry
picks the kernel: ``turbolm.use_backend(...)``) and ``out_proj`` when all of these hold:

* ``need_weights=False`` (torch's default is ``True``: the op returns no attention weights);
* the module has no ``add_bias_kv`` (``bias_k`` / ``bias_v`` are None) and no ``add_zero_attn``;
* the inputs are what torch.nn accepts without error: batched (3-D, ``batch_first`` either
  way) or unbatched (2-D) query / key / value with the embedding sizes ``embed_dim`` / ``kdim``
  / ``vdim`` (self- or cross-attention, packed or separate projection weights, bias or not),
  no empty sequence or batch, no nested tensors or ``__torch_function__`` tensor subclasses,
  one floating dtype for the inputs and every parameter, one device for everything;
* ``key_padding_mask`` (batched (B, S), unbatched (S,)) and ``attn_mask`` ((L, S), or
  (B * num_heads, L, S) / unbatched (num_heads, L, S)) are each None, bool, or floating in the
  query's dtype;
* ``is_causal=True`` comes with an ``attn_mask`` (torch raises otherwise);
* the dropout probability in use (``self.dropout`` in training, 0 in eval) is below 1.

Anything else calls ``torch.nn.MultiheadAttention.forward`` unchanged (exactly torch's result,
including its own native fast path and its errors). :meth:`MultiheadAttention.why_not_fast_path`
says which rule a call breaks. A fast-path call under a backend named explicitly
(``turbolm.use_backend("attention=triton")``) that this backend cannot run (a mask, for
triton) raises its ``BackendError``, as named backends do everywhere in turbolm.
``torch.jit.script`` is refused with an ``InputError`` (``torch.compile`` and
``torch.export`` work).

Semantics on the fast path follow ``torch.nn.functional.multi_head_attention_forward`` with
``need_weights=False`` (torch 2.14):

* torch's bool masks mean True = NOT allowed (the op's are True = may attend): they are inverted.
  Float masks are additive. ``key_padding_mask`` and ``attn_mask`` combine as torch's do (a bool
  mask becomes -inf where True and the two are added), and a pair of masks with different dtypes
  gives torch's deprecation warning.
* ``is_causal=True`` without ``key_padding_mask``: torch ignores ``attn_mask`` and runs
  SDPA's top-left aligned causal mask (query i sees keys j <= i); with a ``key_padding_mask``
  torch ignores ``is_causal`` and uses ``attn_mask``. Same here. (The op's ``causal=`` is
  bottom-right aligned, so it is used only when L == S; otherwise a top-left bool mask is passed.)
* A query row that may see no key outputs ``out_proj.bias`` (zero attention output), which is
  what torch's SDPA path gives on CPU. torch's own native fast path
  (``torch._native_multi_head_attention``: eval, no grad, self-attention, batch_first) gives NaN
  for such rows instead.
* Dropout (``self.dropout`` while ``self.training``) uses turbolm's op, so its random mask
  differs from torch's; it is reproducible under ``torch.manual_seed``.

The result is ``(attn_output, None)``: (L, B, E) seq-first, (B, L, E) with ``batch_first``,
(L, E) unbatched; ``average_attn_weights`` has no effect on the fast path.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.overrides import has_torch_function

from turbolm.errors import InputError
from turbolm.ops.attention import attention


def _is_mask_dtype(t: torch.Tensor) -> bool:
    return t.dtype == torch.bool or t.is_floating_point()


class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` running ``turbolm.ops.attention`` when it can.

    Same constructor as torch's: ``MultiheadAttention(embed_dim, num_heads, dropout=0.0,
    bias=True, add_bias_kv=False, add_zero_attn=False, kdim=None, vdim=None, batch_first=False,
    device=None, dtype=None)``. See the module docstring for which calls take the fast path.

    Shapes (E = embed_dim, L = query length, S = key length, B = batch, H = num_heads):

    * ``query`` (L, B, E), ``key`` (S, B, kdim), ``value`` (S, B, vdim); with ``batch_first``
      (B, L, E), (B, S, kdim), (B, S, vdim); unbatched (L, E), (S, kdim), (S, vdim).
    * ``key_padding_mask`` (B, S) or unbatched (S,): bool True = ignore that key, or additive.
    * ``attn_mask`` (L, S) or (B * H, L, S) (unbatched (H, L, S)): bool True = not allowed, or
      additive.
    * returns ``(attn_output, None)`` on the fast path, ``attn_output`` shaped like ``query``
      (with E channels); torch's ``(attn_output, attn_weights)`` otherwise.
    """

    def __prepare_scriptable__(self):
        """TorchScript cannot compile this forward; say so plainly (torch's own message is
        about comprehensions). Handing TorchScript torch's class instead would work, but
        ``torch.jit.script`` then puts that copy into the parent module, unpatching the eager
        model behind the user's back."""
        raise InputError(
            "turbolm.nn.MultiheadAttention cannot be compiled by torch.jit.script; use "
            "torch.compile or torch.export, or turbolm.patching.revert_turbolm(model) first"
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        reason = self.why_not_fast_path(
            query, key, value, key_padding_mask, need_weights, attn_mask, is_causal
        )
        if reason is not None:
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        return self._fast_forward(query, key, value, key_padding_mask, attn_mask, is_causal), None

    # ---- which calls run the op ---------------------------------------------------------------

    def _weights(self) -> list[torch.Tensor | None]:
        if self._qkv_same_embed_dim:
            proj = [self.in_proj_weight]
        else:
            proj = [self.q_proj_weight, self.k_proj_weight, self.v_proj_weight]
        return [*proj, self.in_proj_bias, self.out_proj.weight, self.out_proj.bias]

    def why_not_fast_path(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> str | None:
        """None when ``forward`` with these arguments runs ``turbolm.ops.attention``, else why
        it falls back to ``torch.nn.MultiheadAttention.forward``."""
        if need_weights:
            return "need_weights=True (the op returns no attention weights)"
        if self.bias_k is not None or self.bias_v is not None:
            return "add_bias_kv=True"
        if self.add_zero_attn:
            return "add_zero_attn=True"
        inputs = (query, key, value)
        if not all(isinstance(t, torch.Tensor) for t in inputs):
            return "query, key and value must be tensors"
        if any(t.is_nested for t in inputs):
            return "nested tensor input"
        masks = [m for m in (key_padding_mask, attn_mask) if m is not None]
        if not all(isinstance(m, torch.Tensor) for m in masks):
            return "masks must be tensors"
        weights = [w for w in self._weights() if w is not None]
        if has_torch_function((*inputs, *masks, *weights)):
            return "a tensor argument overrides __torch_function__"
        # Shapes torch.nn accepts.
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            return "query / key / value must all be 3-D (batched) or all 2-D (unbatched)"
        batched = query.dim() == 3
        if batched and self.batch_first:
            (b, tq, e), (bk, tk, ek), (bv, tv, ev) = query.shape, key.shape, value.shape
        elif batched:
            (tq, b, e), (tk, bk, ek), (tv, bv, ev) = query.shape, key.shape, value.shape
        else:
            (tq, e), (tk, ek), (tv, ev) = query.shape, key.shape, value.shape
            b = bk = bv = 1
        if (e, ek, ev) != (self.embed_dim, self.kdim, self.vdim):
            return (
                f"embedding sizes (query {e}, key {ek}, value {ev}) are not "
                f"(embed_dim {self.embed_dim}, kdim {self.kdim}, vdim {self.vdim})"
            )
        if not (b == bk == bv and tk == tv):
            return "query / key / value batch sizes or key / value lengths differ"
        if 0 in (b, tq, tk):
            return "empty batch or sequence"
        dtype, device = query.dtype, query.device
        if not dtype.is_floating_point:
            return f"query dtype {dtype} is not floating point"
        if any(t.dtype != dtype for t in (key, value, *weights)):
            return "query, key, value and the parameters do not all have one dtype"
        if any(t.device != device for t in (key, value, *masks, *weights)):
            return "tensors on more than one device"
        # Masks.
        for m in masks:
            if not _is_mask_dtype(m):
                return f"mask dtype {m.dtype} is neither bool nor floating point"
            if m.is_floating_point() and m.dtype != dtype:
                return f"float mask of dtype {m.dtype} with {dtype} inputs"
        if key_padding_mask is not None:
            want = (b, tk) if batched else (tk,)
            if tuple(key_padding_mask.shape) != want:
                return f"key_padding_mask of shape {tuple(key_padding_mask.shape)}, not {want}"
        if attn_mask is not None:
            heads = self.num_heads * b
            allowed = [(tq, tk), (heads, tq, tk)]
            if tuple(attn_mask.shape) not in allowed:
                return f"attn_mask of shape {tuple(attn_mask.shape)}, not one of {allowed}"
        if is_causal and attn_mask is None:
            return "is_causal=True without attn_mask (torch.nn requires the mask)"
        p = float(self.dropout) if self.training else 0.0
        if not 0.0 <= p < 1.0:
            return f"dropout {p} is not in [0, 1)"
        return None

    # ---- the fast path ------------------------------------------------------------------------

    def _in_projection(self, query, key, value):
        """(B, L, E), (B, S, kdim), (B, S, vdim) -> q (B, L, H, D), k, v (B, S, H, D)."""
        e, h, d = self.embed_dim, self.num_heads, self.head_dim
        bias = self.in_proj_bias
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.split(e)
        if not self._qkv_same_embed_dim:
            q = F.linear(query, self.q_proj_weight, b_q)
            k = F.linear(key, self.k_proj_weight, b_k)
            v = F.linear(value, self.v_proj_weight, b_v)
        elif query is key and key is value:  # self-attention: one matmul
            qkv = F.linear(query, self.in_proj_weight, bias)  # (B, L, 3E)
            qkv = qkv.unflatten(-1, (3, h, d))  # (B, L, 3, H, D)
            return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        elif key is value:  # encoder-decoder attention: one matmul for k and v
            w_q, w_kv = self.in_proj_weight.split([e, 2 * e])
            b_kv = None if bias is None else bias[e:]
            q = F.linear(query, w_q, b_q)
            kv = F.linear(key, w_kv, b_kv).unflatten(-1, (2, h, d))  # (B, S, 2, H, D)
            return q.unflatten(-1, (h, d)), kv[:, :, 0], kv[:, :, 1]
        else:
            w_q, w_k, w_v = self.in_proj_weight.split(e)
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        return tuple(t.unflatten(-1, (h, d)) for t in (q, k, v))

    def _op_mask(self, key_padding_mask, attn_mask, is_causal, b, tq, tk, dtype, device):
        """torch's masks -> (causal, op mask broadcastable to (B, H, L, S) or None, empty rows).

        ``empty`` is None or a (B|1, H|1, L, 1) bool of the rows whose float mask is -inf
        everywhere: they are unmasked for the op and their output zeroed (as torch's SDPA does).
        """
        if is_causal and key_padding_mask is None:
            # torch drops attn_mask and runs SDPA's top-left causal mask; the op's causal is
            # bottom-right aligned, equal only when tq == tk.
            if tq == tk:
                return True, None, None
            rows = torch.arange(tq, device=device)[:, None]
            return False, torch.arange(tk, device=device)[None, :] <= rows, None  # (L, S)
        parts = []
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                parts.append(attn_mask.view(1, 1, tq, tk))
            else:
                parts.append(attn_mask.view(b, self.num_heads, tq, tk))
        if key_padding_mask is not None:
            parts.append(key_padding_mask.view(b, 1, 1, tk))
        if not parts:
            return False, None, None
        if all(m.dtype == torch.bool for m in parts):
            allowed = ~parts[0]
            for m in parts[1:]:
                allowed = allowed & ~m
            return False, allowed, None
        additive = None
        for m in parts:
            if m.dtype == torch.bool:
                m = torch.zeros(m.shape, dtype=dtype, device=device).masked_fill(m, float("-inf"))
            additive = m if additive is None else additive + m
        empty = torch.isneginf(additive).all(dim=-1, keepdim=True)  # (B|1, H|1, L, 1)
        return False, additive.masked_fill(empty, 0.0), empty

    def _fast_forward(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        if key_padding_mask is not None and attn_mask is not None:
            if key_padding_mask.dtype != attn_mask.dtype:
                warnings.warn(  # torch.nn.functional._canonical_mask's warning
                    "Support for mismatched key_padding_mask and attn_mask is deprecated. "
                    "Use same type for both instead.",
                    stacklevel=2,
                )
        batched = query.dim() == 3
        seq_first = batched and not self.batch_first
        # Views in (B, T, C) order; `is` identities (self- / cross-attention) are kept.
        views = {}
        for t in (query, key, value):
            if id(t) not in views:
                views[id(t)] = (
                    t.unsqueeze(0) if not batched else t.transpose(0, 1) if seq_first else t
                )
        q_in, k_in, v_in = (views[id(t)] for t in (query, key, value))
        b, tq, _ = q_in.shape
        tk = k_in.shape[1]
        if key_padding_mask is not None and not batched:
            key_padding_mask = key_padding_mask.unsqueeze(0)  # (1, S)

        q, k, v = self._in_projection(q_in, k_in, v_in)  # (B, L, H, D), (B, S, H, D) x2
        causal, mask, empty = self._op_mask(
            key_padding_mask, attn_mask, is_causal, b, tq, tk, query.dtype, query.device
        )
        dropout_p = float(self.dropout) if self.training else 0.0
        out = attention(
            q, k, v, causal=causal, dropout_p=dropout_p, attn_mask=mask, layout="bshd"
        )  # (B, L, H, D)
        if empty is not None:
            out = out.masked_fill(empty.transpose(1, 2), 0.0)  # (B|1, L, H|1, 1) rows
        if seq_first:
            out = out.transpose(0, 1).reshape(tq, b, self.embed_dim)  # (L, B, E)
        else:
            out = out.reshape(b, tq, self.embed_dim)  # (B, L, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        return out if batched else out.squeeze(0)  # unbatched: (L, E)
