"""Fused linear + cross-entropy: the LM head and its loss without materialising the logits.

``linear_cross_entropy(x, weight, targets, bias=None)`` equals
``F.cross_entropy(F.linear(x, weight, bias).float(), targets)``: ``x`` (..., C), ``weight``
(V, C), ``bias`` (V,) or None, ``targets`` (...) int64 (x's leading shape) with
``ignore_index`` entries skipped. ``reduction`` "mean" (over the targets not ignored) or
"sum"; ``label_smoothing`` as torch. Returns a 0-dim fp32 tensor (fp64 for fp64 inputs).

Why: an LM's logits are (tokens, vocab). At 8 x 4096 tokens and a 128K vocabulary they take
16 GiB in fp32, plus as much again for their gradient, more than the rest of the step. The
kernel backends never hold them: rows are processed in chunks (``chunk_rows``; default about
as many logits as ``x`` has elements, at least 4M), and for each chunk

    logits = x_chunk @ W^T (+ b)                 (a GEMM, in x's dtype)
    losses, dlogits = step(logits)               (in place: softmax - one-hot, fp32 math)
    dx_chunk = dlogits @ W,  dW += dlogits^T @ x_chunk,  db += sum(dlogits)

so the gradients are computed during the forward pass (Liger-Kernel's design) and backward
only scales them by the incoming gradient (times 1 / number of counted targets for "mean").
Memory beyond the inputs: one chunk of logits, plus dx (x's size) and an fp32 dW (W's size),
which backward would allocate anyway. Gradients are only computed for the inputs that
require them.

Backends:

* ``reference``: ``F.linear`` + ``F.cross_entropy`` written out (logsumexp, gather), any
  dtype including fp64; the oracle.
* ``torch``: ``F.cross_entropy(F.linear(...).float(), ...)``, what a model does without
  turbolm (materialises the logits).
* ``cpu``: the chunked algorithm with the C++ step kernel (``csrc/cross_entropy``).
* ``triton``: the chunked algorithm with the Triton step kernel (``kernels/cross_entropy.py``);
  CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.

``auto`` takes ``cpu`` on CPU when the extension is already built (it never compiles it on
its own, see ``ext_support``), else ``torch``; on CUDA ``triton`` once ``GPU_AUTO`` is True
(after its GPU tests and benchmark pass), else ``torch``.

Under ``torch.autocast`` the op follows ``F.linear``: ``x``, ``weight`` and ``bias`` are cast
to the autocast dtype first (the loss itself is always computed in fp32).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from turbolm.errors import DTypeError, InputError, ShapeError
from turbolm.ops import ext_support, registry, triton_support
from turbolm.ops.checks import check_float, check_same_device, check_same_dtype, check_tensor
from turbolm.ops.function import eager_at_compile_time, run_backend

OP = "linear_cross_entropy"
REDUCTIONS = ("mean", "sum")

# Whether `auto` may choose the Triton kernel for CUDA tensors: not before its GPU tests and
# benchmark have run on a GPU (benchmarks/gpu_check.sh).
GPU_AUTO = False


# ---- reference and torch (autograd-native) ----------------------------------------------------


def _counted(targets, ignore_index):
    return targets != ignore_index


def linear_cross_entropy_reference(
    x, weight, targets, bias=None, ignore_index=-100, label_smoothing=0.0, reduction="mean"
):
    """Readable math; fp64 inputs stay fp64 (the harness's oracle), others compute in fp32."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = F.linear(x, weight, bias).to(compute)  # (N, V)
    lse = torch.logsumexp(logits, dim=-1)  # (N,)
    keep = _counted(targets, ignore_index)
    z_t = logits.gather(-1, torch.where(keep, targets, 0).unsqueeze(-1)).squeeze(-1)
    losses = lse - (1 - label_smoothing) * z_t - label_smoothing * logits.mean(dim=-1)
    losses = torch.where(keep, losses, 0.0)
    total = losses.sum()
    return total / keep.sum() if reduction == "mean" else total


def _linear_cross_entropy_torch(
    x, weight, targets, bias=None, ignore_index=-100, label_smoothing=0.0, reduction="mean"
):
    logits = F.linear(x, weight, bias)
    return F.cross_entropy(
        logits.float(),
        targets,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )


registry.register(OP, "reference", fn=linear_cross_entropy_reference)
registry.register(OP, "torch", fn=_linear_cross_entropy_torch)


# ---- the chunked algorithm (kernel backends) ----------------------------------------------------


# Small problems: a few large GEMMs beat many tiny ones. 4M logits (16 MiB in fp32): on 2 CPU
# threads, fused / torch time at (1024, 256 -> 8192), (2048, 512 -> 16384), (512, 1024 ->
# 32000) went 0.69 / 0.99 / 1.36 -> 0.62 / 0.86 / 1.10 from a 2M floor.
MIN_CHUNK_LOGITS = 2**22


def default_chunk_rows(n: int, c: int, v: int) -> int:
    """Rows per chunk: about as many logits as ``x`` has elements (but at least
    MIN_CHUNK_LOGITS), at least 1 row, at most n, a multiple of 8 rows for the GEMMs."""
    budget = max(n * c, MIN_CHUNK_LOGITS)
    rows = max(1, budget // max(v, 1))
    rows = 8 * (rows // 8) if rows >= 8 else rows
    return max(1, min(n, rows))


def _chunked_fwd(step, x, weight, bias, targets, *, ignore_index, label_smoothing, reduction,
                 needs, chunk_rows):  # fmt: skip
    """(loss, dx, dW, db, scale): the loss, dx of the summed loss (per row; backward scales it
    by ``scale``, 1 / counted targets for "mean") and dW, db already scaled by ``scale``."""
    n, c = x.shape
    v = weight.shape[0]
    need_x, need_w, need_b = needs
    need_b = need_b and bias is not None
    rows = chunk_rows or default_chunk_rows(n, c, v)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if reduction == "mean":
        counted = _counted(targets, ignore_index).sum().to(acc)  # 0-dim, no host sync
        # When nothing counts the loss is NaN (0 / 0) as torch's, and the gradients are zero
        # as torch's: every row was ignored, so dx, dW, db are zeros (scaled by 1, not inf).
        scale = 1.0 / counted.clamp(min=1)
    else:
        counted, scale = None, torch.ones((), dtype=acc, device=x.device)
    # dW and db sum over every row, so for fp16 the chunk's logit gradients are scaled before
    # their GEMM (as torch's backward of the mean does): the summed-loss sums can exceed
    # 65504. Other dtypes scale the fp32 / fp64 accumulators once at the end.
    prescale = x.dtype == torch.float16 and reduction == "mean" and (need_w or need_b)
    losses = torch.empty(n, dtype=acc, device=x.device)
    dx = torch.empty_like(x) if need_x else None
    dw = torch.zeros(v, c, dtype=acc, device=x.device) if need_w else None
    db = torch.zeros(v, dtype=acc, device=x.device) if need_b else None
    for start in range(0, n, rows):
        end = min(n, start + rows)
        xc = x[start:end]
        logits = F.linear(xc, weight, bias)  # (rows, V), x's dtype, contiguous
        losses[start:end] = step(logits, targets[start:end], label_smoothing, ignore_index)
        if need_x:
            torch.mm(logits, weight, out=dx[start:end])  # (rows, C)
        if prescale:
            logits.mul_(scale)
        if need_w:
            if logits.dtype == acc:
                dw.addmm_(logits.t(), xc)
            else:  # 16-bit GEMM, accumulated across chunks in fp32 (no fp32 copy of it)
                dw.add_(logits.t() @ xc)
        if need_b:
            db += logits.sum(0, dtype=acc)
    total = losses.sum()
    loss = total / counted if counted is not None else total
    if not prescale and reduction == "mean":
        dw = None if dw is None else dw.mul_(scale)
        db = None if db is None else db.mul_(scale)
    dw = None if dw is None else dw.to(weight.dtype)
    db = None if db is None else db.to(bias.dtype)
    return loss, dx, dw, db, scale


def _chunked_bwd(grad_out, dx, dw, db, scale):
    grad_out = grad_out.to(scale.dtype)  # 0-dim
    # 0-dim fp32 factors keep each gradient's dtype (no rounding of the factor to 16 bits)
    dx = None if dx is None else dx * (grad_out * scale)
    dw = None if dw is None else dw * grad_out
    db = None if db is None else db * grad_out
    return dx, dw, None, db  # (x, weight, targets, bias)


def _make_fwd(step):
    def fwd(x, weight, targets, bias, **params):
        loss, dx, dw, db, scale = _chunked_fwd(step, x, weight, bias, targets, **params)
        # x / weight / bias that require grad are saved too (references, not copies; torch's
        # F.linear saves x and weight as well): not read by backward, but they let
        # KernelFunction tie the gradients to them, so differentiating the gradients again
        # (create_graph=True: a gradient penalty) raises instead of silently dropping the
        # second-order terms (the gradients formed in forward have no graph).
        live = tuple(t if need else None for t, need in zip((x, weight, bias), params["needs"]))
        return loss, dx, dw, db, scale, *live

    return fwd


def _bwd(grad_out, dx, dw, db, scale, *_inputs, **_):
    return _chunked_bwd(grad_out, dx, dw, db, scale)


# ---- cpu: the C++ step ------------------------------------------------------------------------

_EXT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_STEP_OP = None


def _cpu_step(logits, targets, label_smoothing, ignore_index):
    global _STEP_OP
    from turbolm import ext

    if _STEP_OP is None:
        ext.load_extension()
        _STEP_OP = torch.ops.turbolm.cross_entropy_step_.default
    # tagged C++ errors become turbolm.errors
    return ext.call(_STEP_OP, logits, targets, float(label_smoothing), int(ignore_index))


def _register_fakes() -> None:
    if getattr(_register_fakes, "done", False):
        return

    @torch.library.register_fake("turbolm::cross_entropy_step_")
    def _(logits, targets, label_smoothing, ignore_index):
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return logits.new_empty((logits.shape[0],), dtype=dtype)

    _register_fakes.done = True


def _cpu_supports(x, weight=None, bias=None, auto=False, **_) -> str | None:
    if x.device.type != "cpu":
        return f"device {x.device.type} is not supported (CPU tensors)"
    if x.dtype not in _EXT_DTYPES:
        return f"dtype {x.dtype} is not supported"
    return ext_support.ext_reason(
        auto,
        ext_support.cpu_compile_allowed(),
        "cross_entropy_step_",
        "cross_entropy",
        on_loaded=_register_fakes,
    )


registry.register(OP, "cpu", fwd=_make_fwd(_cpu_step), bwd=_bwd, supports=_cpu_supports)


# ---- triton: the Triton step ------------------------------------------------------------------

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KCE = None


def _triton_step(logits, targets, label_smoothing, ignore_index):
    global _KCE
    if _KCE is None:
        from turbolm.kernels import cross_entropy as kce  # after TRITON_INTERPRET is set

        _KCE = kce
    return _KCE.cross_entropy_step_(logits, targets, label_smoothing, ignore_index)


def _triton_supports(x, weight=None, bias=None, auto=False, **_) -> str | None:
    if x.dtype not in _TRITON_DTYPES:
        return f"dtype {x.dtype} is not supported (float16, bfloat16, float32)"
    if x.device.type == "cuda":
        if auto and not GPU_AUTO:
            return "not yet verified and benchmarked on a GPU, so auto skips it (name it to use it)"
        return None
    if x.device.type == "cpu":
        interpreting = triton_support.triton_interpreting("turbolm.kernels.cross_entropy")
        return None if interpreting else "CPU tensors need TRITON_INTERPRET=1"
    return f"device {x.device.type} is not supported (CUDA tensors)"


registry.register(
    OP,
    "triton",
    fwd=_make_fwd(_triton_step),
    bwd=_bwd,
    supports=_triton_supports,
    available=triton_support.triton_available,
)


# ---- functional API ---------------------------------------------------------------------------


def _check_inputs(x, weight, targets, bias, ignore_index, label_smoothing, reduction, chunk_rows):
    check_float("x", x)
    check_float("weight", weight)
    check_tensor("targets", targets)
    if bias is not None:
        check_float("bias", bias)
    if targets.dtype not in (torch.int64, torch.int32):
        raise DTypeError(f"targets must be int64 class ids, got {targets.dtype}")
    check_same_device(x=x, weight=weight, targets=targets, bias=bias)
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ShapeError(
            f"weight must be (vocab, {x.shape[-1] if x.dim() else '?'}) for x of shape "
            f"{tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if tuple(targets.shape) != tuple(x.shape[:-1]):
        raise ShapeError(
            f"targets must have x's leading shape {tuple(x.shape[:-1])}, got {tuple(targets.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ShapeError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if reduction not in REDUCTIONS:
        raise InputError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not (isinstance(label_smoothing, int | float) and 0.0 <= label_smoothing <= 1.0):
        raise InputError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise InputError(f"chunk_rows must be None or an int >= 1, got {chunk_rows!r}")


def _selection_key(x, weight, bias) -> tuple:
    """``registry.select``'s cache key: what the backends' ``supports`` / ``available`` answers
    depend on (dtypes; GPU_AUTO; whether the extension is built, and while it is not, whether
    ``auto`` may build it; whether Triton interprets). The device type is part of the slot."""
    ext = sys.modules.get("turbolm.ext")  # not imported yet: nothing built or loaded by us
    built = ext.is_built() if ext is not None else None
    return (
        x.dtype,
        weight.dtype,
        None if bias is None else bias.dtype,
        GPU_AUTO,
        built if built else (built, ext_support.cpu_compile_allowed()),
        os.environ.get("TRITON_INTERPRET"),
    )


@eager_at_compile_time
def _prepare_for_compile(device_type, backend, x_dtype, weight_dtype, bias_dtype) -> str:
    """Run by torch.compile outside the traced code (eagerly, once per trace): select the
    backend for inputs of these dtypes, which loads the extension (or imports the Triton
    kernels) and caches the selection, and run a kernel backend's fwd / bwd once on a tiny
    input, which resolves what they look up on first use. Tracing those first-time steps
    (file locks, registering fake kernels) failed ``torch.compile`` of a model using this op
    that had not run eagerly in this process, with or without fullgraph. Returns the chosen
    backend's name, which the traced code looks up without reading the selection cache (a
    dictionary Dynamo snapshots when an earlier op in the frame reads it, so an entry added
    here failed its guards: "Guard failed on the same frame it was created"), or "" when the
    selection fails (the traced ``registry.select`` then raises as in eager mode)."""
    x = torch.ones(2, 4, dtype=x_dtype, device=device_type)
    weight = torch.ones(3, 4, dtype=weight_dtype, device=x.device)
    bias = None if bias_dtype is None else torch.zeros(3, dtype=bias_dtype, device=x.device)
    key = _selection_key(x, weight, bias)
    try:
        chosen = registry.select(
            OP, device_type, backend, cache_key=key, x=x, weight=weight, bias=bias
        )
    except Exception:  # noqa: BLE001 - raised again, typed, by the traced selection
        return ""
    if chosen.fn is None:
        with torch.no_grad():
            targets = torch.zeros(2, dtype=torch.long, device=x.device)
            params = {"ignore_index": -100, "label_smoothing": 0.0, "reduction": "mean",
                      "needs": (True, True, bias is not None), "chunk_rows": None}  # fmt: skip
            out, *saved = chosen.fwd(x, weight, targets, bias, **params)
            chosen.bwd(torch.ones_like(out), *saved, **params)
    return chosen.name


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_rows: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``cross_entropy(x @ weight.T + bias, targets)`` without the logits (module docstring).

    x (..., C) float; weight (V, C); bias (V,) or None; targets (...) int64 (int32 accepted)
    with ``ignore_index`` entries skipped. Returns a 0-dim fp32 loss.
    """
    _check_inputs(x, weight, targets, bias, ignore_index, label_smoothing, reduction, chunk_rows)
    cast = _autocast_dtype(x.device.type)
    if cast is not None:
        x, weight = x.to(cast), weight.to(cast)
        bias = None if bias is None else bias.to(cast)
    else:
        check_same_dtype(x=x, weight=weight, bias=bias)
    x2d = x.reshape(-1, x.shape[-1])
    t1d = targets.reshape(-1).long()
    compiling = torch.compiler.is_compiling()
    name = ""
    if compiling:
        name = _prepare_for_compile(
            x.device.type, backend, x2d.dtype, weight.dtype, None if bias is None else bias.dtype
        )
    if name:
        chosen = registry.registered(OP)[name]
    elif compiling:  # the selection failed: raise its error (not cached)
        chosen = registry.select(OP, x.device.type, backend, x=x2d, weight=weight, bias=bias)
    else:
        key = _selection_key(x2d, weight, bias)
        chosen = registry.select(
            OP, x.device.type, backend, cache_key=key, x=x2d, weight=weight, bias=bias
        )
    params = {"ignore_index": int(ignore_index), "label_smoothing": float(label_smoothing),
              "reduction": reduction}  # fmt: skip
    if chosen.is_autograd_native:
        return chosen.fn(x2d, weight, t1d, bias, **params)
    # (a data-dependent check: not while torch.compile traces; the C++ step checks the targets
    # itself, the Triton step gives NaN)
    if x2d.device.type == "cpu" and x2d.shape[0] and not compiling:
        bad = (t1d != ignore_index) & ((t1d < 0) | (t1d >= weight.shape[0]))
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise InputError(
                f"targets[{first}] = {int(t1d[first])} is out of range for {weight.shape[0]} "
                f"classes (ignore_index is {ignore_index})"
            )
    grad_on = torch.is_grad_enabled()
    needs = tuple(grad_on and t is not None and t.requires_grad for t in (x2d, weight, bias))
    with torch.autocast(x.device.type, enabled=False):
        return run_backend(
            chosen,
            (x2d.contiguous(), weight.contiguous(), t1d.contiguous(), bias),
            {**params, "needs": needs, "chunk_rows": chunk_rows},
        )
