"""Hugging Face ``transformers`` models: their RMSNorm modules and their attention.

**RMSNorm.** Every family defines its own RMSNorm class (``LlamaRMSNorm``, ``Qwen2RMSNorm``,
``GemmaRMSNorm``, ...). Two formulas cover them, with ``n = x * rsqrt(mean(x^2) + eps)`` in fp32:

* ``scaled``: ``weight * n.to(x.dtype)`` (Llama, Mistral, Qwen2/3, Phi-3, ...; eps in
  ``variance_epsilon``);
* ``offset``: ``(n * (1 + weight)).to(x.dtype)`` (Gemma; eps in ``eps``; weight stored as
  the offset from 1).

A module is patched only after a probe shows that its class's own ``forward`` computes one of
them: on CPU, in fp32, with a random weight, the original ``forward`` and the formula must
agree (once per class). A class that matches neither, or that has no 1-D ``weight``, is left
alone and reported. The patched module's class becomes a subclass of its own class (so every
``isinstance`` check in ``transformers`` still holds) whose ``forward`` calls
``turbolm.ops.rms_norm``. Inputs whose dtype differs from the weight's (an fp32 weight under
autocast) take the original ``forward``: ``transformers`` returns the promoted dtype there,
which a same-dtype kernel does not. turbolm's kernels round once, at the end, where
``scaled`` rounds ``n`` to the input dtype before multiplying by the weight, so 16-bit outputs
can differ from the original in the last bit; ``offset`` forms ``1 + weight`` in the input's
dtype.

**Attention.** ``transformers`` looks a model's attention function up by
``config._attn_implementation`` in its ``AttentionInterface``. turbolm registers
:func:`turbolm_attention_forward` there under the name ``"turbolm"``, with SDPA's mask builder
(so padding, packed sequences and sliding windows arrive as the same boolean masks SDPA gets,
and no mask at all where causal alignment suffices), and switches the model to it with
``model.set_attn_implementation("turbolm")``; reverting switches back.
"""

from __future__ import annotations

import copyreg
import warnings

import torch
from torch.utils.weak import WeakIdKeyDictionary

from turbolm.errors import BackendError, InputError
from turbolm.ops import registry
from turbolm.ops.attention import attention
from turbolm.ops.norm import rms_norm
from turbolm.patching.torch_modules import is_swapped, swap_class

ATTN_NAME = "turbolm"

# Keyword arguments some families pass to their attention function that turbolm's attention
# does not implement. A non-None value is refused rather than silently ignored.
UNSUPPORTED_ATTENTION_KWARGS = ("softcap", "position_bias", "s_aux", "sinks")

# Config fields and module attributes that mean the family's attention needs one of the
# features above: such models keep their own attention.
UNSUPPORTED_CONFIG_FIELDS = ("attn_logit_softcapping",)
UNSUPPORTED_MODULE_ATTRS = {
    "sinks": "attention sinks",
    "relative_attention_bias": "a relative position bias",
}


def is_hf_model(model: torch.nn.Module) -> bool:
    """True for a ``transformers.PreTrainedModel`` (without importing transformers)."""
    return any(
        c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
        for c in type(model).__mro__
    )


def outermost_hf_models(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of the ``PreTrainedModel`` modules of ``model`` (itself included) not
    inside another one: the model itself, or those a wrapper (a peft ``PeftModel``, a user
    module) holds. The model itself is named ``<attention>`` in reports."""
    found: list[tuple[str, torch.nn.Module]] = []
    inner: set[int] = set()
    for name, module in model.named_modules():  # parents come before their children
        if id(module) in inner or not is_hf_model(module):
            continue
        found.append((f"{name}.<attention>" if name else "<attention>", module))
        inner.update(id(m) for m in module.modules())
    return found


# ----------------------------------------------------------------------------------------------
# RMSNorm


def _forward_scaled(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """``weight * normalize(x)`` (Llama-style RMSNorm); x (..., N) -> (..., N), x's dtype."""
    weight = self.weight
    if weight.dtype != hidden_states.dtype:
        return self._turbolm_base.forward(self, hidden_states)
    eps = getattr(self, self._turbolm_eps_attr)
    return rms_norm(hidden_states, (weight.shape[-1],), weight, eps)


def _forward_offset(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """``(1 + weight) * normalize(x)`` (Gemma-style RMSNorm); x (..., N) -> (..., N), x's dtype."""
    weight = self.weight
    if weight.dtype != hidden_states.dtype:
        return self._turbolm_base.forward(self, hidden_states)
    eps = getattr(self, self._turbolm_eps_attr)
    return rms_norm(hidden_states, (weight.shape[-1],), 1.0 + weight, eps)


_STYLES = {"scaled": _forward_scaled, "offset": _forward_offset}

# (original RMSNorm class, eps attribute) -> its patched subclass, or why it cannot be patched.
_PATCHED_CLASSES: dict[tuple[type, str], type | str] = {}


def _eps_attr(module: torch.nn.Module) -> str | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float | int) and not isinstance(value, bool):
            return name
    return None


def _probe_style(cls: type, module: torch.nn.Module, eps_attr: str) -> str | None:
    """Which formula ``cls.forward`` computes, on a CPU fp32 probe; None if neither."""
    n = module.weight.shape[-1]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, n, generator=gen) * 3.0
    weight = torch.randn(n, generator=gen)
    eps = float(getattr(module, eps_attr))
    probe = cls.__new__(cls)
    probe.__dict__.update(module.__dict__)
    probe._parameters = {"weight": torch.nn.Parameter(weight)}
    probe._buffers = {}
    probe._modules = {}
    try:
        with torch.no_grad():
            expected = cls.forward(probe, x)
    except Exception:  # noqa: BLE001 - a forward we cannot run is one we do not patch
        return None
    if not isinstance(expected, torch.Tensor) or expected.shape != x.shape:
        return None
    candidates = {"scaled": weight, "offset": 1.0 + weight}
    for style, w in candidates.items():
        got = rms_norm(x, (n,), w, eps, backend="reference")
        if torch.allclose(got, expected.float(), rtol=1e-5, atol=1e-5):
            return style
    return None


class PatchedRMSNormType(type):
    """Metaclass of the patched RMSNorm classes: they are made at patch time, so pickle
    cannot find them by name; it stores (original class, eps attribute, formula) instead
    (registered with ``copyreg`` below) and makes the class again when it loads, in any
    process that can import turbolm and the original class."""


def rmsnorm_class_for(base: type, eps_attr: str, style: str) -> type:
    """The patched subclass of ``base`` computing ``style`` (made once per (base, eps_attr))."""
    key = (base, eps_attr)
    known = _PATCHED_CLASSES.get(key)
    if isinstance(known, type):
        return known
    patched = PatchedRMSNormType(
        f"Turbolm{base.__name__}",
        (base,),
        {
            "forward": _STYLES[style],
            "__module__": __name__,
            "__doc__": f"{base.__name__} running turbolm.ops.rms_norm ({style}).",
            "_turbolm_base": base,
            "_turbolm_eps_attr": eps_attr,
            "_turbolm_style": style,
        },
    )
    _PATCHED_CLASSES[key] = patched
    return patched


def _reduce_patched_class(cls: PatchedRMSNormType):
    return rmsnorm_class_for, (cls._turbolm_base, cls._turbolm_eps_attr, cls._turbolm_style)


copyreg.pickle(PatchedRMSNormType, _reduce_patched_class)


def patched_rmsnorm_class(module: torch.nn.Module) -> type | str:
    """The patched subclass for ``module``, or why it cannot be patched.

    Eligibility is checked on every module (instances of one class can differ: Gemma3n's
    RMSNorm has a weight or not by ``with_scale``); the formula probe runs once per class.
    """
    cls = type(module)
    weight = getattr(module, "weight", None)
    eps_attr = _eps_attr(module)
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 1 or weight.numel() == 0:
        return "no 1-D weight parameter"
    if eps_attr is None:
        return "no numeric variance_epsilon / eps attribute"
    known = _PATCHED_CLASSES.get((cls, eps_attr))
    if known is not None:
        return known
    style = _probe_style(cls, module, eps_attr)
    if style is None:
        reason = "its forward matches neither RMSNorm formula turbolm implements"
        _PATCHED_CLASSES[(cls, eps_attr)] = reason
        return reason
    return rmsnorm_class_for(cls, eps_attr, style)


def _is_rmsnorm_candidate(module: torch.nn.Module) -> bool:
    cls = type(module)
    return (
        cls.__name__.endswith("RMSNorm")
        and cls.__module__.startswith("transformers.")
        and not is_swapped(module)
    )


def patch_rmsnorms(model: torch.nn.Module, report) -> None:
    """Swap every patchable transformers RMSNorm of ``model`` (see the module docstring)."""
    for name, module in model.named_modules():
        if not _is_rmsnorm_candidate(module):
            continue
        target = patched_rmsnorm_class(module)
        if isinstance(target, str):
            report.add_skipped(name, f"{type(module).__name__}: {target}")
            continue
        original = type(module).__name__
        swap_class(module, target)
        report.add_patched("norm", name, original)


# ----------------------------------------------------------------------------------------------
# Attention


def _mask_plan(
    mask: torch.Tensor, batch: int, q_len: int, k_len: int, causal: bool, left: int
) -> dict | None:
    """Describe a boolean (B, 1, Tq, Tk) mask as packed variable-length calls of the op, or
    None when it is anything else.

    What it recognises, in each batch row: padding (keys no query sees); packed sequences
    (segments: under ``causal``, a query that sees only its own key starts one); the op's
    ``causal`` and ``window=(left, 0)`` rule inside each segment, bottom-right aligned, with
    the Tq queries at the last Tq key positions; and, when Tq == Tk, padded queries after the
    row's last real token that see the row's keys (right padding: they get one more,
    non-causal call, so their outputs are SDPA's too). Left padding's padded queries see
    nothing and output zeros. The description is checked against every element of ``mask``,
    so a mask it does not reproduce exactly is never replaced.

    Returns {} (one segment per row, no padding: causal / window alone), or
    ``{"calls": [...]}``, each call a dict of ``causal``, ``window``, ``cu_seqlens``,
    ``max_seqlen`` and the flat (B * T) ``q_index`` / ``k_index`` it gathers.
    """
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch, 1, q_len, k_len):
        return None  # broadcast masks (batch 1, per-head) are left to backends that take masks
    if k_len < q_len or q_len == 0 or (left >= 0 and not causal):
        return None
    allowed = mask[:, 0]  # (B, Tq, Tk)
    if not bool(allowed.any()):
        return {"calls": []}  # no query sees a key: all zeros
    device = mask.device
    offset = k_len - q_len  # query i sits at key position offset + i
    k_valid = allowed.any(dim=1)  # (B, Tk): keys some query may see
    q_valid = k_valid[:, offset:]  # (B, Tq): queries at such positions
    rank = k_valid.cumsum(dim=1) - 1  # index of each key among its row's valid keys
    q_rank = rank[:, offset:]
    if causal:
        own = torch.arange(q_len, device=device) + offset
        sees_only_own = (allowed.sum(dim=-1) == 1) & allowed[:, torch.arange(q_len), own]
        starts = torch.zeros_like(k_valid)
        starts[:, offset:] = q_valid & sees_only_own
        starts |= k_valid & (rank == 0)
        segment = starts.cumsum(dim=1)  # (B, Tk): segment of each key
    else:
        segment = torch.zeros_like(rank)
    q_segment = segment[:, offset:]
    expected = (
        k_valid[:, None, :] & q_valid[:, :, None] & (segment[:, None, :] == q_segment[:, :, None])
    )
    if causal:
        expected &= rank[:, None, :] <= q_rank[:, :, None]
    if left >= 0:
        expected &= rank[:, None, :] >= q_rank[:, :, None] - left
    # Right padding: queries after the row's last valid key (no valid key at or after them).
    trailing = torch.zeros_like(q_valid)
    if q_len == k_len and left < 0:
        trailing = k_valid.flip(1).cumsum(dim=1).flip(1) == 0
        expected |= trailing[:, :, None] & k_valid[:, None, :]
    if not torch.equal(expected, allowed):
        return None
    single_segment = bool((segment.amax(dim=1) <= 1).all())
    if bool(k_valid.all()) and single_segment:
        return {}
    calls = [_segments_call(k_valid, q_valid, segment, q_segment, causal, left)]
    if bool(trailing.any()):
        calls.append(_trailing_call(k_valid, trailing))
    return {"calls": calls}


def _packed_call(q_valid, k_valid, q_ids, k_ids, n_ids, causal, window) -> dict:
    """One varlen call: valid queries / keys (B, T) bool, grouped by sequence ids (B, T) in
    [0, n_ids) that grow along the flattened (batch, position) order."""
    q_counts = torch.bincount(q_ids[q_valid], minlength=n_ids)
    k_counts = torch.bincount(k_ids[k_valid], minlength=n_ids)
    used = (q_counts > 0) | (k_counts > 0)
    q_counts, k_counts = q_counts[used], k_counts[used]
    zero = q_counts.new_zeros(1)
    return {
        "causal": causal,
        "window": window,
        "cu_seqlens": (
            torch.cat([zero, q_counts.cumsum(0)]).to(torch.int32),
            torch.cat([zero, k_counts.cumsum(0)]).to(torch.int32),
        ),
        "max_seqlen": (int(q_counts.max()), int(k_counts.max())),
        "q_index": q_valid.flatten().nonzero().squeeze(1),
        "k_index": k_valid.flatten().nonzero().squeeze(1),
    }


def _segments_call(k_valid, q_valid, segment, q_segment, causal, left) -> dict:
    """The real queries, one sequence per (batch row, segment)."""
    b, k_len = k_valid.shape
    row = torch.arange(b, device=k_valid.device)[:, None] * (k_len + 1)
    window = (left, 0) if left >= 0 else None
    return _packed_call(
        q_valid, k_valid, row + q_segment, row + segment, b * (k_len + 1), causal, window
    )


def _trailing_call(k_valid, trailing) -> dict:
    """Right padding's padded queries: each sees every valid key of its row (non-causal)."""
    b = k_valid.shape[0]
    row = torch.arange(b, device=k_valid.device)[:, None]
    return _packed_call(
        trailing, k_valid, row.expand_as(trailing), row.expand_as(k_valid), b, False, None
    )


# mask tensor -> {call shape: plan}; entries go with their mask (a weak reference each).
_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _cached_mask_plan(mask, batch, q_len, k_len, causal, left) -> dict | None:
    """:func:`_mask_plan`, computed once per mask tensor: transformers hands every layer the
    same mask object, so the checks and host syncs happen once per forward. The cache is
    keyed on the tensor object and its version counter, so in-place changes are seen;
    inference tensors have no version counter, their masks are planned on every call;
    writes through ``mask.data`` bypass the counter."""
    args = (mask, batch, q_len, k_len, causal, left)
    if mask.is_inference():
        return _mask_plan(*args)
    key = (batch, q_len, k_len, causal, left, mask._version)
    plans = _PLANS.get(mask)
    if plans is None or plans[0] != mask._version:
        plans = (mask._version, {})  # keep the current version's plans only
        _PLANS[mask] = plans
    if key not in plans[1]:
        plans[1][key] = _mask_plan(*args)
    return plans[1][key]


def _mask_accepted(query, key, value, mask, dropout) -> bool:
    """Whether the backend the op would choose runs ``mask`` as it is."""
    try:
        registry.select(
            "attention", query.device.type, None,
            q=query, k=key, v=value, attn_mask=mask, causal=False, window=None,
            layout="bhsd", dropout_p=dropout,
            requested=registry.requested_backend("attention")[0],
        )  # fmt: skip
    except BackendError:
        return False
    return True


def _varlen_attention(query, key, value, plan, dropout_p, scale) -> torch.Tensor:
    """The plan's packed calls; (B, Tq, Hq, D) with zeros where no call writes."""
    b, hq, q_len, d = query.shape
    flat_q = query.transpose(1, 2).reshape(b * q_len, hq, d)
    flat_k, flat_v = (t.transpose(1, 2).reshape(-1, t.shape[1], d) for t in (key, value))
    out = query.new_zeros(b * q_len, hq, d)
    for call in plan["calls"]:
        packed = attention(
            flat_q.index_select(0, call["q_index"]),
            flat_k.index_select(0, call["k_index"]),
            flat_v.index_select(0, call["k_index"]),
            causal=call["causal"],
            window=call["window"],
            cu_seqlens=call["cu_seqlens"],
            max_seqlen=call["max_seqlen"],
            dropout_p=dropout_p,
            scale=scale,
        )  # (total_q, Hq, D)
        out = out.index_copy(0, call["q_index"], packed)
    return out.view(b, q_len, hq, d)


def turbolm_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The ``transformers`` attention-function contract on ``turbolm.ops.attention``.

    query (B, Hq, Tq, D), key / value (B, Hkv, Tk, D) with ``Hq % Hkv == 0``;
    ``attention_mask`` None or boolean, broadcastable to (B, Hq, Tq, Tk), True = may attend
    (SDPA's mask builder). Returns ((B, Tq, Hq, D) contiguous, None): no attention weights.

    Without a mask the causal rule is SDPA's: more than one query row and a causal module
    means causal attention, and when the keys outnumber the queries (the first prefill of a
    static cache) only the first Tq keys count; one query row attends to every key.

    With a mask, the op gets it as it is when the backend it chooses takes masks (reference,
    torch). When it does not (triton), a mask that is exactly padding (left or right) and
    packed sequences under causal + the family's ``sliding_window`` (checked element by
    element, see :func:`_mask_plan`) becomes the op's ``window`` and packed variable-length
    calls over the valid tokens; any other mask goes to the op unchanged, which then says
    why that backend cannot run it.
    """
    for name in UNSUPPORTED_ATTENTION_KWARGS:
        if kwargs.get(name) is not None:
            raise InputError(
                f"turbolm attention does not support {name!r} (passed by "
                f"{type(module).__name__}); load the model with attn_implementation='eager' "
                "or 'sdpa' instead"
            )
    if kwargs.get("output_attentions"):
        warnings.warn(
            "turbolm attention returns no attention weights (output_attentions=True gives None)",
            stacklevel=2,
        )
    q_len = query.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    options = {"dropout_p": dropout, "scale": scaling}
    if attention_mask is None:
        causal = bool(is_causal) and q_len > 1
        if causal and key.shape[2] > q_len:
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        out = attention(query, key, value, causal=causal, **options)  # (B, Hq, Tq, D)
        return out.transpose(1, 2).contiguous(), None
    # The plan reads the mask on the host, which torch.compile cannot trace: compiled
    # models keep their masks (and need a backend that takes them).
    if not torch.compiler.is_compiling() and not _mask_accepted(
        query, key, value, attention_mask, dropout
    ):
        left = sliding_window - 1 if sliding_window else -1
        shape = (query.shape[0], q_len, key.shape[2])
        plan = _cached_mask_plan(attention_mask, *shape, bool(is_causal), left)
        if plan == {}:
            window = (left, 0) if left >= 0 else None
            out = attention(query, key, value, causal=bool(is_causal), window=window, **options)
            return out.transpose(1, 2).contiguous(), None
        if plan is not None:
            return _varlen_attention(query, key, value, plan, **options), None
    out = attention(query, key, value, attn_mask=attention_mask, **options)
    return out.transpose(1, 2).contiguous(), None


class AttentionSwitch:
    """Kept on a patched transformers model (in its ``__dict__``): the attention
    implementation it had before. Unpickling it registers ``"turbolm"`` with transformers, so
    a whole patched model saved with ``torch.save`` runs in a process that never patched."""

    __slots__ = ("before",)

    def __init__(self, before: str):
        self.before = before

    def __reduce__(self):
        return _registered_switch, (self.before,)


def _registered_switch(before: str) -> AttentionSwitch:
    register_attention()
    return AttentionSwitch(before)


def register_attention() -> None:
    """Register ``"turbolm"`` in transformers' attention and attention-mask interfaces."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, turbolm_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _attention_refusal(model) -> str | None:
    """Why ``model``'s attention cannot run on turbolm's, or None."""
    try:
        from transformers.masking_utils import AttentionMaskInterface  # noqa: F401
    except ImportError:
        return "this transformers has no AttentionMaskInterface (tested with 5.x)"
    if not hasattr(model, "set_attn_implementation"):
        return "this transformers has no set_attn_implementation (tested with 5.x)"
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is None or not can_set():
        return (
            f"{type(model).__name__} does not dispatch attention through transformers' "
            "AttentionInterface"
        )
    configs = [model.config] + [
        getattr(model.config, name)
        for name in getattr(model.config, "sub_configs", {})
        if getattr(model.config, name, None) is not None
    ]
    for config in configs:
        for field in UNSUPPORTED_CONFIG_FIELDS:
            if getattr(config, field, None) is not None:
                return f"config.{field} is set; turbolm attention has no logit soft-capping"
        v_dim = getattr(config, "v_head_dim", None)
        qk_dim = getattr(config, "qk_head_dim", None) or (
            (getattr(config, "qk_nope_head_dim", 0) or 0)
            + (getattr(config, "qk_rope_head_dim", 0) or 0)
        )
        if v_dim and qk_dim and v_dim != qk_dim:
            return (
                f"query/key head dim {qk_dim} differs from value head dim {v_dim}; "
                "turbolm attention needs one head dim"
            )
    for name, module in model.named_modules():
        for attr, what in UNSUPPORTED_MODULE_ATTRS.items():
            if isinstance(getattr(module, attr, None), torch.Tensor | torch.nn.Module):
                return f"{name or type(model).__name__} has {what} ({attr}), which turbolm lacks"
    return None


def patch_attention(model, report, name: str = "<attention>") -> str | None:
    """Switch ``model`` (and its sub-models) to the ``"turbolm"`` attention function; returns
    the implementation it had, or None when nothing was switched."""
    current = model.config._attn_implementation
    if current == ATTN_NAME:
        return None
    reason = _attention_refusal(model)
    if reason is not None:
        report.add_skipped(name, reason)
        return None
    register_attention()
    model.set_attn_implementation(ATTN_NAME)
    report.add_patched("attention", name, f"attn_implementation {current!r}")
    return current


def revert_attention(model, before: str | None) -> None:
    if before is not None and model.config._attn_implementation == ATTN_NAME:
        model.set_attn_implementation(before)
