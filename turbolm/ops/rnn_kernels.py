"""Kernel backends of ``lstm`` / ``gru`` / ``rnn`` and their cells: ``cpu``, ``cuda``, ``triton``.

All follow the per-layer kernel-backend contract of :mod:`turbolm.ops.rnn` (one layer, every
direction, the whole sequence per call; cells: one step of one layer).

* ``cpu`` / ``cuda`` (``csrc/rnn``, ``torch.ops.turbolm.rnn_layer_fwd/bwd``,
  ``rnn_cell_fwd/bwd``): the time loop runs in C++ (``csrc/rnn/rnn_layer.h``, shared by both):
  one GEMM for the input projections of all steps, then per step and direction exactly one
  recurrent GEMM (raw pointers into buffers allocated once per call) and one fused gate
  kernel; backward per step one fused gate-gradient kernel and one GEMM, and dx and the weight
  gradients as single GEMMs over all steps. Every float dtype; states, cell, gate math and
  saved activations in float32 (float64 for float64); float16 / bfloat16 layers run every GEMM
  on half-precision operands (x, weights, a rounded copy of h, dG) with fp32 accumulation and
  results. Variable lengths sort the batch once so that padded steps cost nothing. On CPU the
  float32 GEMMs go to oneDNN's brgemm micro-kernel where this torch has it, else ATen (MKL);
  on CUDA straight to cuBLAS (the allow_tf32 setting applies to fp32). How the CUDA time loop
  runs is chosen by :func:`cuda_variant` (env ``TURBOLM_RNN_CUDA_VARIANT``): ``loop`` (the
  default, host loop), ``graph`` (each layer / direction's step loop recorded into a cached
  CUDA graph and replayed, forward and backward) or ``persistent`` (the forward loop of
  hidden sizes <= 256 as one cooperative kernel keeping W_hh in shared memory); combinations
  like ``persistent,graph``. Cases a variant does not cover run the plain loop.
  :func:`release_cuda_caches` frees what the CUDA backend keeps between calls (cached graphs,
  cuBLAS handles; both bounded).
* ``triton`` (``kernels/rnn.py``): the same algorithm with the fused gate kernels written in
  Triton and the time loop in Python (see that module for the trade-off; its per-step GEMMs
  stay fp32). CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1`` (tests).

Nothing is built or imported at registration. When ``auto`` picks the backend, ``cpu`` is used
only if the extension is already built (or ``TURBOLM_BUILD_EXT=1``): ``auto`` never starts a
compiler on a CPU machine; ``backend="cpu"`` builds it on first use. A backend named
explicitly never falls back: ``supports`` returns the reason and the registry raises
``BackendError`` with it.
"""

from __future__ import annotations

import contextlib
import os

import torch

from turbolm.ops import ext_support, registry, triton_support

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
SAVED = {"lstm": 5, "gru": 4, "rnn_tanh": 1, "rnn_relu": 1}  # saved values per unit (rnn_math.h)
_EXT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- how the backend was asked for -----------------------------------------------------------


def _picked_by_auto(auto: bool | None) -> bool:
    """Whether ``registry.select`` is trying this backend for ``auto`` (vs. asked by name);
    ``select`` always says so through ``auto=``; without it, assume ``auto`` (conservative)."""
    return True if auto is None else bool(auto)


# Until the GPU tests of these kernels pass on a real GPU, `auto` does not choose them on CUDA
# (a first H200 run found the Triton step kernels failing for bf16); by name they still run.
GPU_AUTO = False
_GPU_UNVERIFIED = "not yet verified on a GPU, so auto skips it (name the backend to use it)"


# ---- CUDA time-loop variants ------------------------------------------------------------------

CUDA_VARIANT_ENV = "TURBOLM_RNN_CUDA_VARIANT"
CUDA_VARIANTS = ("loop", "graph", "persistent")
_VARIANT_FLAGS = ("strict",)  # tests: a variant that cannot run raises instead of falling back


def _check_variant(name: str) -> str:
    tokens = [t for t in name.replace("+", ",").split(",") if t]
    bad = [t for t in tokens if t not in CUDA_VARIANTS + _VARIANT_FLAGS]
    if bad or not tokens:
        raise ValueError(
            f"unknown CUDA RNN variant {name!r}: expected one of {', '.join(CUDA_VARIANTS)} "
            "or a ','-separated combination"
        )
    return ",".join(tokens)


def get_cuda_variant() -> str:
    """The variant the CUDA layer ops use now (``loop`` unless set)."""
    return os.environ.get(CUDA_VARIANT_ENV) or "loop"


def set_cuda_variant(name: str) -> None:
    """Sets how the CUDA layer ops run their time loop (read by the C++ side on every call)."""
    os.environ[CUDA_VARIANT_ENV] = _check_variant(name)


@contextlib.contextmanager
def cuda_variant(name: str):
    """``with cuda_variant("graph"): ...`` runs the CUDA RNN layers with that variant."""
    old = os.environ.get(CUDA_VARIANT_ENV)
    set_cuda_variant(name)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(CUDA_VARIANT_ENV, None)
        else:
            os.environ[CUDA_VARIANT_ENV] = old


CUDA_STATS = (
    "graph_replays",
    "graph_warmups",
    "graph_captures",
    "graph_updates",
    "graph_instantiations",
    "graph_fallbacks",
    "persistent_launches",
    "persistent_refusals",
    "graph_evictions",
)


def cuda_stats() -> dict[str, int] | None:
    """Process-wide counters of what the CUDA variants did (``CUDA_STATS``; rnn.cu "Stat"), or
    None when the loaded extension has no CUDA part. Differences between two reads tell a
    benchmark whether graphs were replayed or recaptured and whether the persistent kernel ran."""
    ops = torch.ops.turbolm
    if not hasattr(ops, "rnn_cuda_stats"):
        return None
    return dict(zip(CUDA_STATS, ops.rnn_cuda_stats()))


def release_cuda_caches() -> dict[str, int] | None:
    """Frees what the CUDA backend keeps between calls: every cached CUDA graph of the
    ``graph`` variant (process-wide), then the cuBLAS handles idle in the pool (left by threads
    that exited) and the calling thread's own. Returns how many of each were destroyed, or None
    when the loaded extension has no CUDA part (nothing is built or loaded here). Other threads
    keep their handles until they exit; the next call simply creates what it needs again.

    No GPU buffer is cached: the graph variant's cuBLAS workspace and the persistent kernel's
    buffers come from torch's caching allocator per call, so ``torch.cuda.empty_cache()``
    returns them to the driver. Destroying handles synchronizes the device."""
    ops = torch.ops.turbolm
    if not hasattr(ops, "rnn_release_cuda_caches"):
        return None
    graphs, handles = ops.rnn_release_cuda_caches()
    return {"graphs": graphs, "handles": handles}


# ---- C++ / CUDA extension --------------------------------------------------------------------

_fakes_registered = False


def _ext():
    from turbolm import ext  # imported on first use: `python -m turbolm.ext` stays clean

    return ext


def _register_fakes() -> None:
    """Shape/dtype-only twins of the ops (torch.compile, FakeTensor, opcheck)."""
    global _fakes_registered
    if _fakes_registered or not hasattr(torch.ops.turbolm, "rnn_layer_fwd"):
        return
    lib = torch.library

    @lib.register_fake("turbolm::rnn_layer_fwd")
    def _layer_fwd(x, h0, c0, lengths, weights, mode, proj_size, has_biases, bidirectional):
        steps, batch, _ = x.shape
        dirs = 2 if bidirectional else 1
        hidden = weights[1].shape[0] // GATES[mode]
        out = proj_size or hidden
        acc = _acc(x.dtype)
        return (
            x.new_empty((steps, batch, dirs * out)),
            x.new_empty((dirs, batch, out)),
            x.new_empty((dirs, batch, hidden) if mode == "lstm" else (0,)),
            x.new_empty((dirs, steps, batch, SAVED[mode] * hidden), dtype=acc),
            x.new_empty((dirs, steps, batch, out), dtype=acc),
            x.new_empty((dirs, steps, batch, hidden) if proj_size else (0,), dtype=acc),
        )

    @lib.register_fake("turbolm::rnn_layer_bwd")
    def _layer_bwd(dy, dh_n, dc_n, x, h0, c0, lengths, weights, ws, hprev, hraw, mode, *_):
        dirs, batch, hidden = ws.shape[0], x.shape[1], ws.shape[3] // SAVED[mode]
        return (
            x.new_empty(x.shape),
            x.new_empty(h0.shape),
            x.new_empty((dirs, batch, hidden) if mode == "lstm" else (0,)),
            [w.new_empty(w.shape) for w in weights],
        )

    @lib.register_fake("turbolm::rnn_cell_fwd")
    def _cell_fwd(x, h, c, w_ih, w_hh, b_ih, b_hh, mode):
        batch, hidden = x.shape[0], w_hh.shape[1]
        acc = _acc(x.dtype)
        return (
            x.new_empty((batch, hidden)),
            x.new_empty((batch, hidden) if mode == "lstm" else (0,)),
            x.new_empty((1, 1, batch, SAVED[mode] * hidden), dtype=acc),
            x.new_empty((1, 1, batch, hidden), dtype=acc),
        )

    @lib.register_fake("turbolm::rnn_cell_bwd")
    def _cell_bwd(dh, dc, x, h, c, w_ih, w_hh, b_ih, b_hh, ws, hprev, mode):
        return (
            x.new_empty(x.shape),
            x.new_empty(h.shape),
            x.new_empty(h.shape if mode == "lstm" else (0,)),
            w_ih.new_empty(w_ih.shape),
            w_hh.new_empty(w_hh.shape),
            x.new_empty(b_ih.shape if b_ih is not None else (0,)),
            x.new_empty(b_hh.shape if b_hh is not None else (0,)),
        )

    _fakes_registered = True


def ops():
    """``torch.ops.turbolm`` with the RNN ops (building the extension if needed) and their
    fake implementations registered; BackendError if the extension is not available."""
    ops = _ext().ops()
    _register_fakes()
    return ops


def _call(name: str, *args):
    return _ext().call(getattr(ops(), name), *args)


def _ext_reason(auto: bool, compile_ok: bool) -> str | None:
    """None when the extension with the RNN ops is loaded (loading / building it if allowed)."""
    return ext_support.ext_reason(
        auto, compile_ok, "rnn_layer_fwd", "rnn", on_loaded=_register_fakes
    )


def _tensor_reason(x, device_type: str, dtypes) -> str | None:
    if x is None:
        return "no input given"
    if x.device.type != device_type:
        return f"needs {device_type.upper()} tensors, got {x.device.type}"
    if x.dtype not in dtypes:
        names = ", ".join(_dtype_name(d) for d in dtypes)
        return f"dtype {_dtype_name(x.dtype)} is not supported (supported: {names})"
    return None


def _seq_reason(input, weights, device_type, dtypes) -> str | None:
    reason = _tensor_reason(input, device_type, dtypes)
    if reason:
        return reason
    if input.dim() != 3:
        return f"needs batched time-major input (T, B, I), got shape {tuple(input.shape)}"
    for w in weights or ():
        if w.dtype != input.dtype:
            return (
                f"weight dtype {_dtype_name(w.dtype)} differs from input dtype "
                f"{_dtype_name(input.dtype)} (kernel backends need one dtype)"
            )
    return None


def _cpu_ext_reason(auto) -> str | None:
    # Built (or loaded) already: usable whoever asks, without finding out who (this is also
    # the path torch.compile traces). Not built: only a request by name may compile it.
    if _ext().is_built():
        return _ext_reason(False, True)
    compile_ok = ext_support.cpu_compile_allowed()
    return _ext_reason(_picked_by_auto(auto), compile_ok)


def _cpu_supports(input=None, weights=None, auto=None, **_) -> str | None:
    return _seq_reason(input, weights, "cpu", _EXT_DTYPES) or _cpu_ext_reason(auto)


def _cpu_cell_supports(input=None, auto=None, **_) -> str | None:
    return _tensor_reason(input, "cpu", _EXT_DTYPES) or _cpu_ext_reason(auto)


def _cuda_available() -> str | None:
    return None if torch.cuda.is_available() else "no CUDA device"


def _cuda_ext_reason(auto) -> str | None:
    if _picked_by_auto(auto) and not GPU_AUTO:
        return _GPU_UNVERIFIED
    reason = _ext_reason(False, compile_ok=True)  # a GPU machine may compile (as norm)
    if reason:
        return reason
    ext = _ext()
    if not ext.has_cuda_kernels():
        return f"extension was built without CUDA ({ext.cuda_choice()[1]})"
    return None


def _cuda_supports(input=None, weights=None, auto=None, **_) -> str | None:
    return _seq_reason(input, weights, "cuda", _EXT_DTYPES) or _cuda_ext_reason(auto)


def _cuda_cell_supports(input=None, auto=None, **_) -> str | None:
    return _tensor_reason(input, "cuda", _EXT_DTYPES) or _cuda_ext_reason(auto)


def _ext_layer_fwd(
    x, h0, c0, lengths, *weights, mode, hidden_size, proj_size, has_biases, bidirectional
):
    y, h_n, c_n, ws, hprev, hraw = _call(
        "rnn_layer_fwd",
        x,
        h0,
        c0,
        lengths,
        list(weights),
        mode,
        proj_size,
        has_biases,
        bidirectional,
    )
    out = (y, h_n, c_n) if mode == "lstm" else (y, h_n)
    return (out, x, h0, c0, lengths, ws, hprev, hraw, *weights)


def _ext_layer_bwd(
    grads,
    x,
    h0,
    c0,
    lengths,
    ws,
    hprev,
    hraw,
    *weights,
    mode,
    hidden_size,
    proj_size,
    has_biases,
    bidirectional,
):
    dy, dh_n = grads[0], grads[1]
    dc_n = grads[2] if mode == "lstm" else None
    dx, dh0, dc0, dweights = _call(
        "rnn_layer_bwd",
        dy,
        dh_n,
        dc_n,
        x,
        h0,
        c0,
        lengths,
        list(weights),
        ws,
        hprev,
        hraw,
        mode,
        proj_size,
        has_biases,
        bidirectional,
    )
    return (dx, dh0, dc0 if mode == "lstm" else None, None, *dweights)


def _cell_biases(w_ih, b_ih, b_hh):
    """torch's cells take biases together; one given alone is paired with zeros."""
    if (b_ih is None) == (b_hh is None):
        return b_ih, b_hh
    zeros = w_ih.new_zeros(w_ih.shape[0])
    return (b_ih if b_ih is not None else zeros), (b_hh if b_hh is not None else zeros)


def _ext_cell_fwd(x, h, c, w_ih, w_hh, b_ih, b_hh, *, mode):
    bi, bh = _cell_biases(w_ih, b_ih, b_hh)
    h1, c1, ws, hprev = _call(
        "rnn_cell_fwd", x, h, c if mode == "lstm" else None, w_ih, w_hh, bi, bh, mode
    )
    out = (h1, c1) if mode == "lstm" else (h1,)
    return (out, x, h, c, w_ih, w_hh, b_ih, b_hh, ws, hprev)


def _ext_cell_bwd(grads, x, h, c, w_ih, w_hh, b_ih, b_hh, ws, hprev, *, mode):
    bi, bh = _cell_biases(w_ih, b_ih, b_hh)
    dc = grads[1] if mode == "lstm" else None
    dx, dh, dc0, dw_ih, dw_hh, db_ih, db_hh = _call(
        "rnn_cell_bwd",
        grads[0],
        dc,
        x,
        h,
        c if mode == "lstm" else None,
        w_ih,
        w_hh,
        bi,
        bh,
        ws,
        hprev,
        mode,
    )
    return (
        dx,
        dh,
        dc0 if mode == "lstm" else None,
        dw_ih,
        dw_hh,
        db_ih if b_ih is not None else None,
        db_hh if b_hh is not None else None,
    )


# ---- triton ----------------------------------------------------------------------------------


def _kr():
    from turbolm.kernels import rnn as kr  # imported on first use (after TRITON_INTERPRET)

    return kr


def triton_interpreting() -> bool:
    """Whether the rnn Triton kernels run under the interpreter (fixed when imported)."""
    return triton_support.triton_interpreting("turbolm.kernels.rnn")


_triton_available = triton_support.triton_available


def _triton_tensor_reason(x) -> str | None:
    if x is not None and x.device.type == "cpu":
        if not triton_interpreting():
            return "CPU tensors need TRITON_INTERPRET=1"
        return _tensor_reason(x, "cpu", _TRITON_DTYPES)
    return _tensor_reason(x, "cuda", _TRITON_DTYPES)


def _triton_gpu_auto_reason(input, auto) -> str | None:
    if input is not None and input.is_cuda and _picked_by_auto(auto) and not GPU_AUTO:
        return _GPU_UNVERIFIED
    return None


def _triton_supports(input=None, weights=None, auto=None, **_) -> str | None:
    reason = _triton_tensor_reason(input) or _triton_gpu_auto_reason(input, auto)
    if reason:
        return reason
    return _seq_reason(input, weights, input.device.type, _TRITON_DTYPES)


def _triton_cell_supports(input=None, auto=None, **_) -> str | None:
    return _triton_tensor_reason(input) or _triton_gpu_auto_reason(input, auto)


def _triton_layer_fwd(
    x, h0, c0, lengths, *weights, mode, hidden_size, proj_size, has_biases, bidirectional
):
    y, h_n, c_n, ws, hprev, hraw = _kr().layer_fwd(
        x, h0, c0, lengths, weights, mode, proj_size, has_biases, bidirectional
    )
    out = (y, h_n, c_n) if mode == "lstm" else (y, h_n)
    return (out, x, lengths, ws, hprev, hraw, *weights)


def _triton_layer_bwd(
    grads,
    x,
    lengths,
    ws,
    hprev,
    hraw,
    *weights,
    mode,
    hidden_size,
    proj_size,
    has_biases,
    bidirectional,
):
    dc_n = grads[2] if mode == "lstm" else None
    dx, dh0, dc0, dweights = _kr().layer_bwd(
        grads[0],
        grads[1],
        dc_n,
        x,
        lengths,
        weights,
        ws,
        hprev,
        hraw,
        mode,
        proj_size,
        has_biases,
        bidirectional,
    )
    return (dx, dh0, dc0, None, *dweights)


def _triton_cell_fwd(x, h, c, w_ih, w_hh, b_ih, b_hh, *, mode):
    bi, bh = _cell_biases(w_ih, b_ih, b_hh)
    weights = [w_ih, w_hh] + ([bi, bh] if bi is not None else [])
    c3 = c[None] if mode == "lstm" else None
    _, h_n, c_n, ws, hprev, _ = _kr().layer_fwd(
        x[None], h[None], c3, None, weights, mode, 0, bi is not None, False
    )
    out = (h_n[0], c_n[0]) if mode == "lstm" else (h_n[0],)
    return (out, x, w_ih, w_hh, b_ih, b_hh, ws, hprev)


def _triton_cell_bwd(grads, x, w_ih, w_hh, b_ih, b_hh, ws, hprev, *, mode):
    bi, bh = _cell_biases(w_ih, b_ih, b_hh)
    weights = [w_ih, w_hh] + ([bi, bh] if bi is not None else [])
    dc = grads[1][None] if mode == "lstm" else None
    dx, dh, dc0, dw = _kr().layer_bwd(
        None,
        grads[0][None],
        dc,
        x[None],
        None,
        weights,
        ws,
        hprev,
        None,
        mode,
        0,
        bi is not None,
        False,
    )
    db_ih = dw[2] if b_ih is not None else None
    db_hh = dw[3] if b_hh is not None else None
    return (dx[0], dh[0], dc0[0] if dc0 is not None else None, dw[0], dw[1], db_ih, db_hh)


# ---- registration -----------------------------------------------------------------------------


def register() -> None:
    for op in ("lstm", "gru", "rnn"):
        registry.register(op, "cpu", fwd=_ext_layer_fwd, bwd=_ext_layer_bwd, supports=_cpu_supports)
        registry.register(
            op,
            "cuda",
            fwd=_ext_layer_fwd,
            bwd=_ext_layer_bwd,
            supports=_cuda_supports,
            available=_cuda_available,
        )
        registry.register(
            f"{op}_cell", "cpu", fwd=_ext_cell_fwd, bwd=_ext_cell_bwd, supports=_cpu_cell_supports
        )
        registry.register(
            f"{op}_cell",
            "cuda",
            fwd=_ext_cell_fwd,
            bwd=_ext_cell_bwd,
            supports=_cuda_cell_supports,
            available=_cuda_available,
        )
        registry.register(
            op,
            "triton",
            fwd=_triton_layer_fwd,
            bwd=_triton_layer_bwd,
            supports=_triton_supports,
            available=_triton_available,
        )
        registry.register(
            f"{op}_cell",
            "triton",
            fwd=_triton_cell_fwd,
            bwd=_triton_cell_bwd,
            supports=_triton_cell_supports,
            available=_triton_available,
        )


register()
