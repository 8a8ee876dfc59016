"""LayerNorm and RMSNorm: reference math, the torch baseline, and the functional API.

Shapes: ``x`` is (..., *normalized_shape); ``weight``/``bias`` are ``normalized_shape``.
Statistics are computed in fp32 (fp64 for fp64 inputs); the output has ``x``'s dtype.

Kernel backends (added by the kernel issues) see ``x`` flattened to (rows, N) with a contiguous
last dimension and register ``fwd(x2d, weight, bias, eps) -> (y2d, *saved)`` /
``bwd(dy2d, *saved) -> (dx2d, dweight, dbias)`` (RMSNorm: no bias).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from turbolm.errors import InputError
from turbolm.ops import registry
from turbolm.ops.checks import check_float, check_same_device, check_same_dtype, check_shape
from turbolm.ops.function import run_backend


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def layer_norm_reference(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Readable LayerNorm over the trailing ``len(normalized_shape)`` dims."""
    dims = tuple(range(-len(normalized_shape), 0))
    xf = x.to(_compute_dtype(x))
    mean = xf.mean(dim=dims, keepdim=True)
    var = (xf - mean).pow(2).mean(dim=dims, keepdim=True)  # biased, as torch
    y = (xf - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype)


def rms_norm_reference(x, normalized_shape, weight=None, eps=None):
    """Readable RMSNorm: ``x / sqrt(mean(x^2) + eps) * weight``."""
    if eps is None:
        eps = torch.finfo(x.dtype).eps  # torch.nn.RMSNorm's default
    dims = tuple(range(-len(normalized_shape), 0))
    xf = x.to(_compute_dtype(x))
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    return y.to(x.dtype)


def _layer_norm_torch(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def _rms_norm_torch(x, normalized_shape, weight=None, eps=None):
    return F.rms_norm(x, normalized_shape, weight, eps)


registry.register("layer_norm", "reference", fn=layer_norm_reference)
registry.register("layer_norm", "torch", fn=_layer_norm_torch)
registry.register("rms_norm", "reference", fn=rms_norm_reference)
registry.register("rms_norm", "torch", fn=_rms_norm_torch)


def _check_norm_inputs(x, normalized_shape, weight, bias, eps):
    normalized_shape = tuple(int(s) for s in normalized_shape)
    check_float("x", x)
    if weight is not None:
        check_float("weight", weight)
    if bias is not None:
        check_float("bias", bias)
    check_same_device(x=x, weight=weight, bias=bias)
    if x.dim() < len(normalized_shape) or tuple(x.shape[-len(normalized_shape) :]) != (
        normalized_shape
    ):
        raise InputError(
            f"x must end with normalized_shape {normalized_shape}, got shape {tuple(x.shape)}"
        )
    check_shape("weight", weight, normalized_shape)
    check_shape("bias", bias, normalized_shape)
    if eps is not None and not (eps >= 0 and math.isfinite(eps)):
        raise InputError(f"eps must be a finite number >= 0, got {eps}")
    return normalized_shape


def _run_norm(op, x, normalized_shape, weight, bias, eps, backend):
    chosen = registry.select(op, x.device.type, backend, x=x, weight=weight, bias=bias)
    extra = (bias,) if op == "layer_norm" else ()
    if chosen.is_autograd_native:
        return chosen.fn(x, normalized_shape, weight, *extra, eps)
    # Kernel backends work on (rows, N) with a contiguous last dim and one dtype.
    check_same_dtype(x=x, weight=weight, bias=bias)
    n = math.prod(normalized_shape)
    x2d = x.reshape(-1, n).contiguous()
    flat = [None if t is None else t.reshape(n) for t in (weight, *extra)]
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    y2d = run_backend(chosen, (x2d, *flat), {"eps": float(eps)})
    return y2d.view(x.shape)


def layer_norm(
    x: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm of ``x`` (..., *normalized_shape) -> same shape and dtype as ``x``."""
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = _check_norm_inputs(x, normalized_shape, weight, bias, eps)
    return _run_norm("layer_norm", x, normalized_shape, weight, bias, eps, backend)


def rms_norm(
    x: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """RMSNorm of ``x`` (..., *normalized_shape) -> same shape and dtype as ``x``.

    ``eps=None`` means ``torch.finfo(x.dtype).eps``, as ``torch.nn.RMSNorm``.
    """
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    normalized_shape = _check_norm_inputs(x, normalized_shape, weight, None, eps)
    return _run_norm("rms_norm", x, normalized_shape, weight, None, eps, backend)
