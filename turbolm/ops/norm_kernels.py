"""Kernel backends of ``layer_norm`` / ``rms_norm``: ``triton``, ``cuda`` and ``cpu``.

Each registers ``fwd(x2d, weight[, bias][, residual2d], eps=) -> (y2d, *saved)`` and
``bwd(dy2d, *saved, eps=) -> (dx2d, dweight[, dbias][, dresidual2d])`` for the op's
KernelFunction (``turbolm/ops/function.py``); ``x2d`` is (rows, N) with a contiguous last
dimension, weight / bias are (N,). (The op flattens outside the Function: an output that is a
view made inside a custom Function could not be modified in place.)

* ``triton`` (``kernels/norm.py``): CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1`` (tests). float16 / bfloat16 / float32.
* ``cuda`` / ``cpu`` (``csrc/norm``, ``torch.ops.turbolm.*``): every float dtype.

``residual=`` (y = norm(x + residual), returned with the sum) is fused into the Triton
kernels (the fwd takes the residual as one more input); for the other backends the op adds
first (``FUSED_RESIDUAL``).

Nothing is built or imported at registration: the Triton module is imported on first use and
the C++ extension builds on first use (``turbolm/ext.py``).

When ``auto`` picks the backend (no ``backend=``, ``use_backend`` or ``TURBOLM_BACKEND``):

* ``cuda`` and ``triton`` on CUDA tensors: only once ``GPU_AUTO`` is True. It stays False
  until the GPU tests pass and the benchmark shows them fastest on a real GPU
  (``benchmarks/gpu_check.sh``): the CUDA kernels have not run on a GPU yet, and the Triton
  kernels measured slower than PyTorch's on an H200 before their rework. Until then ``auto``
  takes ``torch`` on GPUs; by name (``backend="cuda"``) they run, and ``cuda`` builds the
  extension on its first call (one line on stderr, about a minute).
* ``cpu`` is used only when the extension is already built (ahead of time, or an earlier
  just-in-time build from the same sources) or ``TURBOLM_BUILD_EXT=1`` is set: ``auto``
  never starts a compiler on its own on a CPU machine, so the default training path works
  without one (it uses ``torch``). ``backend="cpu"`` builds on first use.

A backend named explicitly never falls back: ``supports`` returns the reason (dtype, device,
"extension not built: <why>"), and the registry raises BackendError with it.
"""

from __future__ import annotations

import sys

import torch

from turbolm.ops import ext_support, registry, triton_support

# Backends whose kernels fuse `residual=` (y = norm(x + residual)); the others add first.
FUSED_RESIDUAL = frozenset({"triton"})

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_EXT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _mixed_dtypes(x, weight, bias) -> str | None:
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            return (
                f"{name} dtype {_dtype_name(t.dtype)} differs from x dtype "
                f"{_dtype_name(x.dtype)} (kernel backends need one dtype)"
            )
    return None


def _dtype_reason(x, allowed) -> str | None:
    if x.dtype not in allowed:
        names = ", ".join(_dtype_name(d) for d in allowed)
        return f"dtype {_dtype_name(x.dtype)} is not supported (supported: {names})"
    return None


def selection_key(x, weight, bias) -> tuple:
    """``registry.select``'s cache key for these inputs: what the backends' ``supports`` /
    ``available`` answers depend on (dtypes; GPU_AUTO; whether the extension is built, and
    while it is not, whether ``auto`` may build it). The device type is part of the slot."""
    ext = sys.modules.get("turbolm.ext")  # not imported yet: nothing built or loaded by us
    built = ext.is_built() if ext is not None else None
    return (
        x.dtype,
        None if weight is None else weight.dtype,
        None if bias is None else bias.dtype,
        GPU_AUTO,
        built if built else (built, ext_support.cpu_compile_allowed()),
    )


# ---- triton -------------------------------------------------------------------------------

_KN = None


def _kn():
    global _KN
    if _KN is None:
        from turbolm.kernels import norm as kn  # imported on first use (after TRITON_INTERPRET)

        _KN = kn
    return _KN


def triton_interpreting() -> bool:
    """Whether the norm Triton kernels run under the interpreter (fixed when imported)."""
    return triton_support.triton_interpreting("turbolm.kernels.norm")


_triton_available = triton_support.triton_available

# Whether `auto` may choose the cuda / triton kernels for CUDA tensors (see the module docstring).
GPU_AUTO = False
_GPU_UNVERIFIED = (
    "not yet verified and benchmarked on a GPU, so auto skips it (name the backend to use it)"
)


def _triton_supports(x, weight=None, bias=None, auto=False, **_) -> str | None:
    reason = _dtype_reason(x, _TRITON_DTYPES) or _mixed_dtypes(x, weight, bias)
    if reason:
        return reason
    if x.device.type == "cuda":
        return _GPU_UNVERIFIED if auto and not GPU_AUTO else None
    if x.device.type == "cpu":
        return None if triton_interpreting() else "CPU tensors need TRITON_INTERPRET=1"
    return f"device {x.device.type} is not supported (CUDA tensors)"


# With a fused residual (one more input), the outputs are (y, s = x + residual), s is saved as
# the normalized input, and the backward gets (dy, ds): dx = dnorm + ds serves x and residual.


def _triton_ln_fwd(x, weight, bias, residual=None, *, eps):
    if residual is None:
        y, mean, rstd = _kn().layer_norm_fwd(x, weight, bias, eps)
        return y, x, weight, bias, mean, rstd
    y, mean, rstd, s = _kn().layer_norm_fwd(x, weight, bias, eps, residual)
    return (y, s), s, weight, bias, mean, rstd


def _triton_ln_bwd(grad_out, x, weight, bias, mean, rstd, *, eps):
    if isinstance(grad_out, tuple):
        dy, ds = grad_out
        dx, dw, db = _kn().layer_norm_bwd(dy, x, weight, mean, rstd, bias is not None, dsum=ds)
        return dx, dw, db, dx
    return _kn().layer_norm_bwd(grad_out, x, weight, mean, rstd, bias is not None)


def _triton_rms_fwd(x, weight, residual=None, *, eps):
    if residual is None:
        y, rstd = _kn().rms_norm_fwd(x, weight, eps)
        return y, x, weight, rstd
    y, rstd, s = _kn().rms_norm_fwd(x, weight, eps, residual)
    return (y, s), s, weight, rstd


def _triton_rms_bwd(grad_out, x, weight, rstd, *, eps):
    if isinstance(grad_out, tuple):
        dy, ds = grad_out
        dx, dw = _kn().rms_norm_bwd(dy, x, weight, rstd, dsum=ds)
        return dx, dw, dx
    return _kn().rms_norm_bwd(grad_out, x, weight, rstd)


# ---- C++ / CUDA extension --------------------------------------------------------------------


_EXT = None
_EXT_OPS: dict = {}  # op name -> torch.ops.turbolm.<name>.default, once the extension has it


def _ext():
    global _EXT
    if _EXT is None:
        from turbolm import ext  # imported on first use: `python -m turbolm.ext` stays clean

        _EXT = ext
    return _EXT


def _reraise(exc: BaseException):
    raise exc


def _ext_call(name: str, *args):
    """``torch.ops.turbolm.<name>(*args)``; its tagged C++ errors become turbolm.errors
    (through ``ext.call``, which builds / loads the extension on first use)."""
    op = _EXT_OPS.get(name)
    if op is None:
        op = _EXT_OPS[name] = getattr(_ext().ops(), name).default
    try:
        return op(*args)
    except (RuntimeError, ValueError, TypeError) as exc:
        return _ext().call(_reraise, exc)  # raises exc, typed when the C++ code tagged it


def _ext_reason(auto: bool, compile_ok: bool) -> str | None:
    """None when the extension with the norm ops is loaded (loading / building it if allowed)."""
    return ext_support.ext_reason(auto, compile_ok, "layer_norm_fwd", "norm")


def _cpu_supports(x, weight=None, bias=None, auto=False, **_) -> str | None:
    if x.device.type != "cpu":
        return f"needs CPU tensors, got {x.device.type}"
    reason = _dtype_reason(x, _EXT_DTYPES) or _mixed_dtypes(x, weight, bias)
    if reason:
        return reason
    return _ext_reason(auto, compile_ok=ext_support.cpu_compile_allowed())


def _cuda_available() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def _cuda_supports(x, weight=None, bias=None, auto=False, **_) -> str | None:
    if x.device.type != "cuda":
        return f"needs CUDA tensors, got {x.device.type}"
    reason = _dtype_reason(x, _EXT_DTYPES) or _mixed_dtypes(x, weight, bias)
    if reason:
        return reason
    if auto and not GPU_AUTO:
        return _GPU_UNVERIFIED
    reason = _ext_reason(auto, compile_ok=True)
    if reason:
        return reason
    ext = _ext()
    if not ext.has_cuda_kernels():
        return f"extension was built without CUDA ({ext.cuda_choice()[1]})"
    return None


# Names of torch.ops.turbolm.norm_cuda_stats()'s counters (csrc/norm/norm.cu "PathStat").
CUDA_PATH_STATS = ("fwd_register", "fwd_generic", "bwd_register", "bwd_generic")


def cuda_stats() -> dict[str, int] | None:
    """Process-wide counts of the cuda backend's launches by path (register-resident kernels,
    ``TURBOLM_NORM_REG=1``, or the generic ones), or None when the loaded extension has no CUDA
    part (or is not loaded). Differences between two reads tell which path a call took."""
    ops = torch.ops.turbolm
    if not hasattr(ops, "norm_cuda_stats"):
        return None
    return dict(zip(CUDA_PATH_STATS, ops.norm_cuda_stats()))


def _ext_ln_fwd(x, weight, bias, *, eps):
    y, mean, rstd = _ext_call("layer_norm_fwd", x, weight, bias, eps)
    return y, x, weight, bias, mean, rstd


def _ext_ln_bwd(dy, x, weight, bias, mean, rstd, *, eps):
    dx, dw, db = _ext_call("layer_norm_bwd", dy, x, weight, mean, rstd, bias is not None)
    return dx, dw if weight is not None else None, db if bias is not None else None


def _ext_rms_fwd(x, weight, *, eps):
    y, rstd = _ext_call("rms_norm_fwd", x, weight, eps)
    return y, x, weight, rstd


def _ext_rms_bwd(dy, x, weight, rstd, *, eps):
    dx, dw = _ext_call("rms_norm_bwd", dy, x, weight, rstd)
    return dx, dw if weight is not None else None


# ---- registration -----------------------------------------------------------------------------


def register() -> None:
    for name, supports, available, fns in (
        ("triton", _triton_supports, _triton_available, "triton"),
        ("cuda", _cuda_supports, _cuda_available, "ext"),
        ("cpu", _cpu_supports, None, "ext"),
    ):
        ln = (_triton_ln_fwd, _triton_ln_bwd) if fns == "triton" else (_ext_ln_fwd, _ext_ln_bwd)
        rms = (
            (_triton_rms_fwd, _triton_rms_bwd) if fns == "triton" else (_ext_rms_fwd, _ext_rms_bwd)
        )
        registry.register(
            "layer_norm", name, fwd=ln[0], bwd=ln[1], supports=supports, available=available
        )
        registry.register(
            "rms_norm", name, fwd=rms[0], bwd=rms[1], supports=supports, available=available
        )


register()
