"""LayerNorm and RMSNorm: reference math, the torch baseline, and the functional API.

Shapes: ``x`` is (..., *normalized_shape); ``weight``/``bias`` are ``normalized_shape``.
Statistics are computed in fp32 (fp64 for fp64 inputs); the output has ``x``'s dtype.

Kernel backends (``triton``, ``cuda``, ``cpu``: registered in ``turbolm/ops/norm_kernels.py``)
see ``x`` flattened to (rows, N) with a contiguous last dimension and register
``fwd(x2d, weight, bias, eps=) -> (y2d, *saved)`` / ``bwd(dy2d, *saved, eps=) -> (dx2d, dweight,
dbias)`` (RMSNorm: no bias). The flattening adds no autograd node where there is nothing to
flatten (2-D x, 1-D weight and bias).

The functional API runs on every layer of every step, so its host path is kept short: the
input checks test the common, valid case first and fall back to the full, message-building
checks only when something is off (same typed errors); the backend choice is cached per
(device type, dtypes, requested backend) by the registry (``norm_kernels.selection_key``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from turbolm.errors import InputError, ShapeError
from turbolm.ops import registry
from turbolm.ops.checks import (
    FLOAT_DTYPES,
    check_float,
    check_same_device,
    check_same_dtype,
    check_shape,
)
from turbolm.ops.function import eager_at_compile_time, run_backend


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


def _eps_ok(eps) -> bool:
    """eps is a finite number >= 0 (no math.isfinite: under torch.compile(dynamic=True) eps can
    be a symbolic float, which math.isfinite cannot take)."""
    try:
        return 0 <= eps < math.inf
    except TypeError:  # a string, a tensor with several elements...
        return False


def _check_norm_inputs(x, normalized_shape, weight, bias, eps):
    """normalized_shape as a tuple of ints, after checking every argument (typed errors)."""
    if isinstance(normalized_shape, int):
        normalized_shape = (int(normalized_shape),)
    else:
        try:
            if isinstance(normalized_shape, (str, bytes)):  # "16" would become (1, 6)
                raise TypeError
            normalized_shape = tuple([int(s) for s in normalized_shape])
        except (TypeError, ValueError):
            raise InputError(
                f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}"
            ) from None
    # The common, valid case in one expression; anything else goes through the full checks
    # below, which raise the typed error (in the same order as they always did).
    if (
        isinstance(x, torch.Tensor)
        and x.dtype in FLOAT_DTYPES
        and x.shape[-len(normalized_shape) :] == normalized_shape
        and (
            weight is None
            or (
                isinstance(weight, torch.Tensor)
                and weight.dtype in FLOAT_DTYPES
                and weight.shape == normalized_shape
                and weight.device == x.device
            )
        )
        and (
            bias is None
            or (
                isinstance(bias, torch.Tensor)
                and bias.dtype in FLOAT_DTYPES
                and bias.shape == normalized_shape
                and bias.device == x.device
            )
        )
    ):
        if eps is not None and not _eps_ok(eps):
            raise InputError(f"eps must be a finite number >= 0, got {eps!r}")
        return normalized_shape
    check_float("x", x)
    if weight is not None:
        check_float("weight", weight)
    if bias is not None:
        check_float("bias", bias)
    check_same_device(x=x, weight=weight, bias=bias)
    if x.dim() < len(normalized_shape) or tuple(x.shape[-len(normalized_shape) :]) != (
        normalized_shape
    ):
        raise ShapeError(
            f"x must end with normalized_shape {normalized_shape}, got shape {tuple(x.shape)}"
        )
    check_shape("weight", weight, normalized_shape)
    check_shape("bias", bias, normalized_shape)
    if eps is not None and not _eps_ok(eps):
        raise InputError(f"eps must be a finite number >= 0, got {eps!r}")
    return normalized_shape


def _check_residual(x, residual):
    if residual is None:
        return
    check_float("residual", residual)
    check_same_device(x=x, residual=residual)
    check_same_dtype(x=x, residual=residual)
    if residual.shape != x.shape:
        raise ShapeError(
            f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
        )


_DEFAULT_RMS_EPS: dict[torch.dtype, float] = {}


def _dtype_or_none(t):
    return None if t is None else t.dtype


@eager_at_compile_time
def _prepare_for_compile(op, device_type, backend, x_dtype, weight_dtype, bias_dtype) -> bool:
    """Run by torch.compile outside the traced code (eagerly, once per trace): select the
    backend for inputs of these dtypes, which loads the extension (or imports the Triton
    kernels) and caches the selection, and call a kernel backend's fwd / bwd once on a tiny
    input, which resolves what they look up on first use. Tracing those first-time steps
    (file locks, imports, filling caches) broke ``torch.compile(fullgraph=True)`` of a model
    whose norms had not run eagerly in this process (and graph-broke without fullgraph).
    Returns whether the selection succeeded; when not, the traced ``registry.select`` raises
    the error as in eager mode."""
    n = 4
    x = torch.ones(2, n, dtype=x_dtype, device=device_type)
    weight = None if weight_dtype is None else torch.ones(n, dtype=weight_dtype, device=x.device)
    bias = None if bias_dtype is None else torch.zeros(n, dtype=bias_dtype, device=x.device)
    try:
        chosen = registry.select(
            op,
            device_type,
            backend,
            cache_key=norm_kernels.selection_key(x, weight, bias),
            x=x,
            weight=weight,
            bias=bias,
        )
    except Exception:  # noqa: BLE001 - raised again, typed, by the traced selection
        return False
    if chosen.fn is None:
        with torch.no_grad():
            inputs = (x, weight, bias) if op == "layer_norm" else (x, weight)
            out, *saved = chosen.fwd(*inputs, eps=1e-5)
            chosen.bwd(torch.ones_like(out), *saved, eps=1e-5)
    return True


def _run_norm(op, x, normalized_shape, weight, bias, eps, backend, residual=None):
    if torch.compiler.is_compiling():
        _prepare_for_compile(
            op, x.device.type, backend, x.dtype, _dtype_or_none(weight), _dtype_or_none(bias)
        )
    chosen = registry.select(
        op,
        x.device.type,
        backend,
        cache_key=norm_kernels.selection_key(x, weight, bias),
        x=x,
        weight=weight,
        bias=bias,
    )
    layer = op == "layer_norm"
    if chosen.fn is not None:  # autograd-native (reference, torch): one add first
        if residual is not None:
            x = x + residual
        if layer:
            y = chosen.fn(x, normalized_shape, weight, bias, eps)
        else:
            y = chosen.fn(x, normalized_shape, weight, eps)
        return y if residual is None else (y, x)
    # Kernel backends need one dtype (their supports() already refused mixed ones).
    if (weight is not None and weight.dtype != x.dtype) or (
        bias is not None and bias.dtype != x.dtype
    ):
        check_same_dtype(x=x, weight=weight, bias=bias)
    # residual: y = norm(x + residual), returned with the sum. Fused into the kernel where the
    # backend can (triton); otherwise one add first.
    fused = residual is not None and chosen.name in norm_kernels.FUSED_RESIDUAL
    if residual is not None and not fused:
        x = x + residual
    if eps is None:
        eps = _DEFAULT_RMS_EPS.get(x.dtype)
        if eps is None:
            eps = _DEFAULT_RMS_EPS[x.dtype] = torch.finfo(x.dtype).eps
    # Kernel backends work on (rows, N) with a contiguous last dim: reshape only what needs it
    # (each reshape of a tensor that requires grad is one more autograd node).
    n = normalized_shape[0] if len(normalized_shape) == 1 else math.prod(normalized_shape)
    flat = x.dim() == 2 and x.shape[1] == n
    inputs = [(x if flat else x.reshape(-1, n)).contiguous()]
    for t in (weight, bias) if layer else (weight,):
        inputs.append(t if t is None or t.dim() == 1 else t.reshape(n))
    if fused:
        inputs.append((residual if flat else residual.reshape(-1, n)).contiguous())
    out = run_backend(chosen, tuple(inputs), {"eps": float(eps)})
    if fused:
        y2d, s2d = out
        return (y2d, s2d) if flat else (y2d.view(x.shape), s2d.view(x.shape))
    y = out if flat else out.view(x.shape)
    return y if residual is None else (y, x)


def layer_norm(
    x: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm of ``x`` (..., *normalized_shape) -> same shape and dtype as ``x``.

    With ``residual`` (x's shape and dtype): returns ``(layer_norm(x + residual), x + residual)``
    (the pre-norm residual stream update; fused into one kernel by the triton backend).
    """
    normalized_shape = _check_norm_inputs(x, normalized_shape, weight, bias, eps)
    _check_residual(x, residual)
    return _run_norm("layer_norm", x, normalized_shape, weight, bias, eps, backend, residual)


def rms_norm(
    x: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x`` (..., *normalized_shape) -> same shape and dtype as ``x``.

    ``eps=None`` means ``torch.finfo(x.dtype).eps``, as ``torch.nn.RMSNorm``. With
    ``residual``: returns ``(rms_norm(x + residual), x + residual)`` (see :func:`layer_norm`).
    """
    normalized_shape = _check_norm_inputs(x, normalized_shape, weight, None, eps)
    _check_residual(x, residual)
    return _run_norm("rms_norm", x, normalized_shape, weight, None, eps, backend, residual)


# Kernel backends (triton / cuda / cpu); registering builds and imports nothing.
from turbolm.ops import norm_kernels  # noqa: E402
