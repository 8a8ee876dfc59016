"""The one ``torch.autograd.Function`` that runs every kernel backend.

A kernel backend registers ``fwd(*inputs, **params) -> (out, *saved)`` and
``bwd(grad_out, *saved, **params) -> tuple of grads (one per input, None where not needed)``.
``out`` is a tensor or a tuple of tensors; ``grad_out`` then has the same structure.
``saved`` holds tensors (or None) only, so autograd can check they were not modified in place.

Kernel backwards are not differentiable themselves. When a backward runs with
``create_graph=True`` (gradients of gradients: gradient penalties, Hessian-vector products)
and its result depends on something that requires grad, the gradients it returns carry a
node that raises a clear error if anything differentiates through them, instead of silently
dropping the second-order terms (the kernels' outputs have no graph, and the C++ ops only
warn). The autograd-native backends (``torch``, ``reference``) support double backward.
"""

from __future__ import annotations

import torch

from turbolm.errors import BackendError
from turbolm.ops.registry import Backend


def _requires_grad(values) -> bool:
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)


class _NoDoubleBackward(torch.autograd.Function):
    """Passes a kernel backward's gradients through (copies); differentiating them raises.

    Its inputs are the gradients and everything they depend on that requires grad (the
    incoming gradients, the saved inputs), so autograd reaches this node, and raises, whenever
    a second-order gradient flows through the kernel. (``torch.autograd.function.
    once_differentiable`` detaches the gradients instead, so a gradient penalty taken with
    respect to a weight upstream of the op silently lost the op's second-order terms.)
    """

    @staticmethod
    def forward(ctx, op: str, name: str, count: int, *tensors):
        ctx.op, ctx.name = op, name
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def backward(ctx, *_):
        raise BackendError(
            f"turbolm {ctx.op}: the {ctx.name!r} backend's backward is not differentiable, so "
            "gradients of its gradients (create_graph=True: a gradient penalty, a "
            "Hessian-vector product) cannot be computed; use backend='torch' or 'reference' "
            "for this op (e.g. with turbolm.use_backend('torch'))"
        )


def _no_double_backward(backend: Backend, grads: tuple, depends_on: list) -> tuple:
    """``grads`` behind a :class:`_NoDoubleBackward` node tied to ``depends_on``."""
    present = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
    if not present:
        return grads
    wrapped = _NoDoubleBackward.apply(
        backend.op, backend.name, len(present), *[grads[i] for i in present], *depends_on
    )
    out = list(grads)
    for i, g in zip(present, wrapped):
        out[i] = g
    return tuple(out)


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
        saved = ctx.saved_tensors
        if not torch.is_grad_enabled():
            grads = ctx.backend.bwd(grad_out, *saved, **ctx.params)
            return (None, None, *grads)
        # create_graph=True: the kernels build no graph. Run them without one, and make the
        # result raise if it is differentiated and depends on anything that requires grad
        # (the incoming gradients or the saved inputs: x, weights, states).
        with torch.no_grad():
            grads = tuple(ctx.backend.bwd(grad_out, *saved, **ctx.params))
        depends_on = [t for t in (*grad_outs, *saved) if _requires_grad((t,))]
        if depends_on:
            grads = _no_double_backward(ctx.backend, grads, depends_on)
        return (None, None, *grads)


def eager_at_compile_time(fn):
    """``torch.compiler.assume_constant_result(fn)``: torch.compile calls ``fn`` eagerly while
    tracing and uses its (constant) result. Marked directly, because the public decorator
    imports ``torch._dynamo`` -- and with it ``triton.language`` -- when the decorated module
    is imported: about a second of import time, and a Triton interpreter that
    ``TRITON_INTERPRET=1`` set after ``import turbolm`` could no longer run (``tl.zeros``
    stayed a JITFunction), which broke the interpreter tests."""
    fn._dynamo_marked_constant = True  # what torch._dynamo.assume_constant_result sets
    return fn


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
