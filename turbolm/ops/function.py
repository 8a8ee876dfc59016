"""The one ``torch.autograd.Function`` that runs every kernel backend.

A kernel backend registers ``fwd(*inputs, **params) -> (out, *saved)`` and
``bwd(grad_out, *saved, **params) -> tuple of grads (one per input, None where not needed)``.
``out`` is a tensor or a tuple of tensors; ``grad_out`` then has the same structure.
``saved`` holds tensors (or None) only, so autograd can check they were not modified in place.
"""

from __future__ import annotations

import torch

from turbolm.ops.registry import Backend


class KernelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: Backend, params: dict, *inputs):
        out, *saved = backend.fwd(*inputs, **params)
        ctx.backend, ctx.params = backend, params
        ctx.tuple_out = isinstance(out, tuple)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, *grad_outs):
        grad_out = tuple(grad_outs) if ctx.tuple_out else grad_outs[0]
        grads = ctx.backend.bwd(grad_out, *ctx.saved_tensors, **ctx.params)
        return (None, None, *grads)


def run_backend(backend: Backend, inputs: tuple, params: dict):
    """Call ``backend`` on positional tensor ``inputs`` and keyword ``params``."""
    if backend.fn is not None:  # autograd-native
        return backend.fn(*inputs, **params)
    if torch.is_grad_enabled():
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                return KernelFunction.apply(backend, params, *inputs)
    # Nothing to differentiate (inference, eval): skip the autograd.Function's overhead.
    return backend.fwd(*inputs, **params)[0]
