"""Fused linear cross-entropy for ``transformers`` causal LMs (``apply_turbolm(model, loss=True)``).

A ``*ForCausalLM`` forward with ``labels`` projects every position to the vocabulary and then
takes the cross-entropy: at 8 x 4096 tokens and a 128K vocabulary the fp32 logits alone are
16 GiB. Patched, a training forward (labels given, gradients on) computes the same loss
through :func:`turbolm.ops.linear_cross_entropy`, which never holds the logits, and returns
``logits=None``. Everything else (no labels, ``torch.no_grad`` evaluation, ``generate``)
runs the model's own forward unchanged.

How, without rewriting each family's forward: the model gets an instance-level ``forward``
(:class:`FusedLossForward`) that runs the class's forward with ``labels=None`` while the
``lm_head`` (class-switched to :class:`DeferredLMHead`) returns its input instead of logits,
so the forward hands back the final hidden states in ``logits``; then the loss is computed
from them and ``lm_head``'s weight with the semantics of transformers' ``ForCausalLMLoss``
(labels shifted left by one, ``-100`` ignored, ``shift_labels`` and ``num_items_in_batch``
honoured). That needs nothing between ``lm_head`` and the loss, so it is limited to the
families whose forward is exactly ``lm_head`` -> ``loss_function`` (:data:`FAMILIES`, each
covered by the tests) with transformers' causal-LM loss; others are skipped with the reason.
Not under DeepSpeed ZeRO-3 (the head's weight is read outside its module's forward).
Wrappers of the instance ``forward`` (accelerate's mixed precision) are seen through by
``__wrapped__``; ``nn.DataParallel`` replicas get their own forward
(:class:`ReplicateForDataParallel`).
"""

from __future__ import annotations

import contextvars
import dataclasses
import inspect

import torch
from torch import nn

from turbolm.ops.cross_entropy import linear_cross_entropy
from turbolm.patching.torch_modules import is_swapped, restore_class, swap_class

# model_type values whose *ForCausalLM forward ends in lm_head -> loss_function (checked by
# tests/test_patching.py against the unpatched model, logits and every gradient).
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2")
IGNORE_INDEX = -100
_FORWARD_ATTR = "forward"
_REPLICATE_ATTR = "_replicate_for_data_parallel"

# The lm_head that returns its input during one fused call (a context variable, so threads
# and nested models do not see each other's calls).
_DEFERRED: contextvars.ContextVar[nn.Module | None] = contextvars.ContextVar(
    "turbolm_deferred_lm_head", default=None
)


class DeferredLMHead(nn.Linear):
    """``nn.Linear`` that, inside a fused-loss call of its model, returns its input (the
    hidden states) instead of the logits; a plain Linear otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _DEFERRED.get() is self:
            return x
        return super().forward(x)


def causal_lm_loss(
    hidden: torch.Tensor,
    head: nn.Linear,
    labels: torch.Tensor | None,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss(head(hidden), labels)`` without the logits.

    hidden (B, T, C); labels (B, T) (position t's target is labels[t + 1]) or ``shift_labels``
    (B, T) already shifted; ``num_items_in_batch``: the sum over the batch divided by it (the
    gradient-accumulation normalisation of transformers' Trainer) instead of the mean.
    """
    if shift_labels is None:
        padded = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)
        shift_labels = padded[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(
        hidden, head.weight, shift_labels, head.bias, ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )  # fmt: skip
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


class FusedLossForward:
    """The instance-level ``forward`` of a patched causal LM (module docstring). A plain class
    (not a bound method) so that a patched model pickles and deep-copies."""

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def __signature__(self) -> inspect.Signature:
        # What inspect.signature(model.forward) reports: the class's forward. transformers'
        # Trainer reads it to decide which dataset columns to keep (with (*args, **kwargs)
        # it dropped input_ids).
        return inspect.signature(type(self.model).forward.__get__(self.model))

    def __call__(self, *args, **kwargs):
        model = self.model
        if args and args[0] is model:
            # Bound to the model with types.MethodType (accelerate's
            # unwrap_model(keep_fp32_wrapper=False) rebinds the forward it unwrapped so).
            args = args[1:]
        original = type(model).forward
        if not isinstance(getattr(model, "lm_head", None), DeferredLMHead):
            # Reverted while someone else's wrapper (accelerate's autocast) still calls us.
            return original(model, *args, **kwargs)
        named, extra = _bind(original, model, args, kwargs)
        labels = named.get("labels")
        keep = named.get("logits_to_keep")
        if (
            labels is None
            or not torch.is_grad_enabled()
            or not (keep is None or (isinstance(keep, int) and keep == 0))  # ints or index tensors
            or False in (named.get("return_dict"), extra.get("return_dict"))
        ):
            return original(model, *args, **kwargs)
        named["labels"] = None
        token = _DEFERRED.set(model.lm_head)
        try:
            out = original(model, **named, **extra)
        finally:
            _DEFERRED.reset(token)
        loss = causal_lm_loss(
            out.logits, model.lm_head, labels, extra.get("shift_labels"),
            extra.get("num_items_in_batch"),
        )  # fmt: skip
        # A new output rather than out.loss = ...; out.logits = None: a ModelOutput keeps a
        # field set to None in its dict, so out[0], out["logits"], to_tuple() and accelerate's
        # fp32 conversion (which rebuilds it from the dict) would hand out the hidden states.
        fields = {field.name: getattr(out, field.name) for field in dataclasses.fields(out)}
        return type(out)(**{**fields, "loss": loss, "logits": None})


class ReplicateForDataParallel:
    """The instance-level ``_replicate_for_data_parallel`` of a patched causal LM: the
    replicas ``nn.DataParallel`` makes share the model's ``__dict__``, so each would run the
    original model through its :class:`FusedLossForward`; a replica gets its own."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self) -> nn.Module:
        model = self.model
        replica = type(model)._replicate_for_data_parallel(model)
        replica.__dict__.pop(_REPLICATE_ATTR, None)
        if isinstance(replica.__dict__.get(_FORWARD_ATTR), FusedLossForward):
            replica.__dict__[_FORWARD_ATTR] = FusedLossForward(replica)
        return replica


def _installed(forward) -> FusedLossForward | None:
    """The FusedLossForward behind an instance ``forward``: itself, or under wrappers that
    say what they wrap (``__wrapped__``: functools.wraps, accelerate's autocast and fp32
    output wrappers; ``__func__``: a method bound with types.MethodType)."""
    for _ in range(64):
        if forward is None or isinstance(forward, FusedLossForward):
            return forward
        forward = getattr(forward, "__wrapped__", None) or getattr(forward, "__func__", None)
    return None


def _bind(function, model, args, kwargs) -> tuple[dict, dict]:
    """A forward call's arguments: (named parameters, what its ``**kwargs`` received)."""
    signature = inspect.signature(function)
    bound = signature.bind(model, *args, **kwargs)
    named, extra = {}, {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            extra = dict(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL and name != "self":
            named[name] = value
    return named, extra


def _refusal(model: nn.Module) -> str | None:
    """Why the fused loss cannot be installed on this transformers model, or None."""
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        return f"fused loss: model_type {family!r} is not one of the verified {FAMILIES}"
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear:
        kind = type(head).__name__ if head is not None else "no lm_head"
        return f"fused loss: lm_head is {kind}, not a plain nn.Linear (e.g. a LoRA layer)"
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        return "fused loss: this transformers version has no transformers.loss.ForCausalLMLoss"
    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        return "fused loss: the model's loss_function is not transformers' ForCausalLMLoss"
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return f"fused loss: config.{attr} changes the logits between lm_head and the loss"
    return None


def patch_loss(model: nn.Module, report, name: str) -> None:
    """Install the fused loss on the transformers causal LM ``model`` (recorded in report)."""
    installed = _installed(model.__dict__.get(_FORWARD_ATTR))
    if installed is not None and isinstance(getattr(model, "lm_head", None), DeferredLMHead):
        return  # already patched
    reason = _refusal(model)
    if reason is not None:
        report.add_skipped(name, reason)
        return
    swap_class(model.lm_head, DeferredLMHead)
    if installed is None:  # else: reverted under another wrapper, which still calls it
        model.__dict__[_FORWARD_ATTR] = FusedLossForward(model)
    model.__dict__[_REPLICATE_ATTR] = ReplicateForDataParallel(model)
    report.add_patched("loss", name, type(model).__name__)


def revert_loss(module: nn.Module) -> int:
    """Undo :func:`patch_loss` on ``module`` (any module); returns 1 if it was patched."""
    forward = module.__dict__.get(_FORWARD_ATTR)
    installed = _installed(forward)
    if installed is None:
        return 0
    changed = False
    if installed is forward or getattr(forward, "__func__", None) is installed:
        del module.__dict__[_FORWARD_ATTR]
        changed = True
    # else someone else's wrapper (accelerate's mixed precision) calls it: left in place, it
    # runs the class's forward once the head below is a plain nn.Linear again.
    if isinstance(module.__dict__.get(_REPLICATE_ATTR), ReplicateForDataParallel):
        del module.__dict__[_REPLICATE_ATTR]
        changed = True
    head = getattr(module, "lm_head", None)
    if head is not None and is_swapped(head) and isinstance(head, DeferredLMHead):
        restore_class(head)
        changed = True
    return int(changed)
