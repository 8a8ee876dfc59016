"""Layer-normalised LSTM and GRU (Ba, Kiros & Hinton 2016, "Layer Normalization", sec. 3.1 / A).

The torch.nn recurrences with LayerNorm on the input projection, on the recurrent projection
(each with its own gain ``γ`` and shift ``β`` over the whole gates dimension ``G``) and, for the
LSTM, on the cell state before the output ``tanh``. ``LN(a; γ, β) = (a - mean(a)) /
sqrt(var(a) + eps) * γ + β`` over the last dimension (biased variance, as torch). Gate order and
bias placement are torch.nn's (i, f, g, o for LSTM; r, z, n for GRU)::

    LSTM  a_x = LN(x_t W_ih^T; γ_ih, β_ih) + b_ih          (G = 4H, all steps in one LN)
          a_h = LN(h_{t-1} W_hh^T; γ_hh, β_hh) + b_hh      (G = 4H, per step)
          i, f, g, o = chunk4(a_x + a_h)
          c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)        (c carried un-normalised)
          h_t = sigmoid(o) * tanh(LN(c_t; γ_c, β_c))               (H wide, per step)
    GRU   a_x = LN(x_t W_ih^T; γ_ih, β_ih) + b_ih;  a_h = LN(h_{t-1} W_hh^T; γ_hh, β_hh) + b_hh
          (x_r, x_z, x_n) = chunk3(a_x);  (h_r, h_z, h_n) = chunk3(a_h)
          r = sigmoid(x_r + h_r);  z = sigmoid(x_z + h_z)
          n = tanh(x_n + r * h_n)     # torch.nn.GRU's reset-gate placement: r scales the whole
                                      # normalised recurrent n-block, b_hn (and β_hh's n part) in
          h_t = (1 - z) * n + z * h_{t-1}

The torch.nn biases ``b_ih`` / ``b_hh`` are added *after* the LayerNorm (as the paper's ``+ b``),
so with ``bias=True`` they duplicate the LN shifts (``β + b`` is what counts; both are kept so
the torch.nn parameter names stay and ``bias=False`` still has a gate bias). The implementation
folds ``β + b`` into one LayerNorm shift.

LayerNorm parameters, per layer ``k`` and direction (suffix ``""`` / ``"_reverse"``), in this
order (:func:`ln_weight_names`): ``ln_ih_weight_l{k}`` (G,), ``ln_ih_bias_l{k}`` (G,),
``ln_hh_weight_l{k}`` (G,), ``ln_hh_bias_l{k}`` (G,) and, for the LSTM only,
``ln_c_weight_l{k}`` (H,), ``ln_c_bias_l{k}`` (H,); initialised to 1 / 0.

Everything else (layouts of ``input`` / ``hx`` / ``weights`` / ``lengths`` / outputs, dropout
between layers, unbatched input) is exactly :mod:`turbolm.ops.rnn`'s. ``proj_size`` is not
supported (:class:`~turbolm.errors.InputError`).

Implementation
--------------
Each LayerNorm is ``turbolm.ops.norm.layer_norm`` (the backend registry picks the
cpu / cuda / triton / torch kernel; ``backend=`` here is passed to it, e.g. ``"cpu"``).
Per layer and direction: one GEMM ``x W_ih^T`` for all time steps and one LayerNorm over the
(T*B, G) rows; then a **Python loop over time** runs per step the recurrent GEMM, the recurrent
LayerNorm, the gate math and (LSTM) the cell LayerNorm, and autograd walks the loop backwards.
That costs a few Python-dispatched kernels per step (see ``benchmarks/bench_rnn.py``, row
``turbolm-layernorm``): fine for moderate T, but not the fused C++ time loop of the plain cells.

Precision: the GEMMs and the projection LayerNorms run in the input dtype (bf16 / fp16 tensor
cores; LayerNorm statistics in fp32 inside the kernels); the gate math, the cell state, the
cell LayerNorm and the carried hidden state are fp32 (fp64 for fp64 inputs); ``h`` is cast to
the input dtype only as the next GEMM's operand and for ``output`` / the returned states.
Padded steps (``lengths``) are computed and discarded: they leave the states unchanged and
output zeros.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from turbolm.errors import InputError
from turbolm.ops.checks import check_float, check_shape
from turbolm.ops.norm import layer_norm
from turbolm.ops.rnn import (
    GATES,
    _autocast_cast,
    _autocast_dtype,
    _check_like_input,
    _check_sequence_inputs,
    _split_direction,
    _states_tuple,
)

LN_MODES = ("lstm", "gru")
DEFAULT_EPS = 1e-5


def ln_weight_names(mode: str, num_layers: int, bidirectional: bool) -> list[str]:
    """Names of the LayerNorm parameters in ``ln_weights`` order (see the module docstring)."""
    if mode not in LN_MODES:
        raise InputError(f"layer_norm is available for {LN_MODES}, got mode {mode!r}")
    kinds = ("ih", "hh", "c") if mode == "lstm" else ("ih", "hh")
    names = []
    for k in range(num_layers):
        for d in range(2 if bidirectional else 1):
            suffix = f"_l{k}" + ("_reverse" if d else "")
            names += [f"ln_{kind}_{p}{suffix}" for kind in kinds for p in ("weight", "bias")]
    return names


def _ln_shape(name: str, mode: str, hidden: int) -> tuple[int]:
    return (hidden,) if name.startswith("ln_c_") else (GATES[mode] * hidden,)


def _check_ln(mode, input, ln_weights, num_layers, bidirectional, hidden, eps) -> None:
    if isinstance(ln_weights, torch.Tensor) or not isinstance(ln_weights, Sequence):
        raise InputError("ln_weights must be a list of tensors (see ln_weight_names)")
    names = ln_weight_names(mode, num_layers, bidirectional)
    if len(ln_weights) != len(names):
        raise InputError(
            f"ln_weights must hold {len(names)} tensors for {mode}, num_layers={num_layers}, "
            f"bidirectional={bidirectional} ({', '.join(names[: len(names) // num_layers])}, "
            f"...), got {len(ln_weights)}"
        )
    for name, w in zip(names, ln_weights):
        check_float(name, w)
        check_shape(name, w, _ln_shape(name, mode, hidden))
    _check_like_input(input, dict(zip(names, ln_weights)))
    ok = isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps)
    if not (ok and eps >= 0):
        raise InputError(f"eps must be a finite number >= 0, got {eps!r}")


def _shift(beta: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``LN(a) * γ + β + b`` is one LayerNorm with shift ``β + b``."""
    return beta if bias is None else beta + bias


def _direction(mode, x, h0, c0, w, ln, lengths, reverse, eps, backend):
    """One direction of one layer. ``x`` (T, B, I) in the storage dtype; ``h0``/``c0`` (B, H).

    Returns ``(y (T, B, H) storage dtype, h_n, c_n)`` with the states in the compute dtype.
    """
    w_ih, w_hh, b_ih, b_hh, _ = w
    dtype = x.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    gates = w_ih.shape[0]
    hidden = gates // GATES[mode]
    ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b = ln[:4]
    shift_hh = _shift(ln_hh_b, b_hh)
    # Input side for every step at once: one GEMM, one LayerNorm over (T*B, G) rows.
    a_x = layer_norm(F.linear(x, w_ih), gates, ln_ih_w, _shift(ln_ih_b, b_ih), eps, backend=backend)
    # unbind: one backward node for all steps (indexing a_x[t] per step would make autograd
    # build a zero-filled (T, B, G) gradient for every step)
    a_x = a_x.to(compute).unbind(0)
    if mode == "lstm":
        ln_c_w, ln_c_b = ln[4].to(compute), ln[5].to(compute)
    h = h0.to(compute)
    c = c0.to(compute) if c0 is not None else None
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    ys: list[torch.Tensor | None] = [None] * x.shape[0]
    for t in steps:
        a_h = layer_norm(
            F.linear(h.to(dtype), w_hh), gates, ln_hh_w, shift_hh, eps, backend=backend
        )
        a_h = a_h.to(compute)
        if mode == "lstm":
            i, f, g, o = (a_x[t] + a_h).chunk(4, dim=1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            c_norm = layer_norm(c_new, hidden, ln_c_w, ln_c_b, eps, backend=backend)
            h_new = torch.sigmoid(o) * torch.tanh(c_norm)
        else:
            x_r, x_z, x_n = a_x[t].chunk(3, dim=1)
            h_r, h_z, h_n = a_h.chunk(3, dim=1)
            r = torch.sigmoid(x_r + h_r)
            z = torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
            h_new, c_new = (1 - z) * n + z * h, None
        if lengths is None:
            h, c, ys[t] = h_new, c_new, h_new
            continue
        valid = (lengths > t)[:, None]  # (B, 1): padded steps keep the state, output zeros
        h = torch.where(valid, h_new, h)
        c = torch.where(valid, c_new, c) if c is not None else None
        ys[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
    return torch.stack(ys).to(dtype), h, c


def _run(mode, input, hx, weights, ln_weights, lengths, eps, backend, **opts):
    """Check, normalise to batched time-major, run the layers, restore the caller's layout.

    Under autocast it runs in the autocast dtype, as the plain recurrent ops do (input, states,
    weights and LayerNorm parameters cast differentiably; the ops below with autocast off)."""
    dtype = _autocast_dtype(input)
    if dtype is not None:
        input, hx, weights, ln_weights = (
            _autocast_cast(v, dtype) for v in (input, hx, weights, ln_weights)
        )
        with torch.autocast(input.device.type, enabled=False):
            return _run(mode, input, hx, weights, ln_weights, lengths, eps, backend, **opts)
    batch_first = opts.pop("batch_first")
    if opts["proj_size"]:
        raise InputError(
            f"layer_norm does not support proj_size (got {opts['proj_size']}); use proj_size=0"
        )
    states = _states_tuple(mode, hx)
    hidden, _, batch = _check_sequence_inputs(
        mode, input, states, weights, lengths, batch_first, opts
    )
    num_layers, bidirectional = opts["num_layers"], opts["bidirectional"]
    _check_ln(mode, input, ln_weights, num_layers, bidirectional, hidden, eps)
    batched = input.dim() == 3
    if not batched:
        x = input.unsqueeze(1)  # (T, 1, I)
    else:
        x = input.transpose(0, 1) if batch_first else input  # (T, B, I)
    num_dirs = 2 if bidirectional else 1
    rows = num_layers * num_dirs
    if states is None:
        states = tuple(x.new_zeros(rows, batch, hidden) for _ in range(2 if mode == "lstm" else 1))
    elif not batched:
        states = tuple(s.unsqueeze(1) for s in states)
    lengths = lengths.to(x.device).long() if lengths is not None else None
    per_layer, ln_per_layer = len(weights) // num_layers, len(ln_weights) // num_layers
    per_dir, ln_per_dir = per_layer // num_dirs, ln_per_layer // num_dirs
    hs, cs = [], []
    for k in range(num_layers):
        ys = []
        for d in range(num_dirs):
            start = k * per_layer + d * per_dir
            w = _split_direction(weights[start : start + per_dir], opts["has_biases"])
            start = k * ln_per_layer + d * ln_per_dir
            ln = ln_weights[start : start + ln_per_dir]
            row = k * num_dirs + d
            c0 = states[1][row] if mode == "lstm" else None
            y, h, c = _direction(mode, x, states[0][row], c0, w, ln, lengths, d == 1, eps, backend)
            ys.append(y)
            hs.append(h)
            cs.append(c)
        x = torch.cat(ys, dim=-1) if num_dirs > 1 else ys[0]
        if opts["training"] and opts["dropout"] > 0 and k < num_layers - 1:
            x = F.dropout(x, p=opts["dropout"], training=True)  # between layers, as torch.nn
    final = (torch.stack(hs).to(input.dtype),)
    if mode == "lstm":
        final += (torch.stack(cs).to(input.dtype),)
    if not batched:
        return x.squeeze(1), tuple(s.squeeze(1) for s in final)
    return (x.transpose(0, 1) if batch_first else x), final


def layernorm_lstm(
    input: torch.Tensor,
    hx: tuple[torch.Tensor, torch.Tensor] | None,
    weights: Sequence[torch.Tensor],
    ln_weights: Sequence[torch.Tensor],
    *,
    num_layers: int,
    bias: bool = True,
    batch_first: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    bidirectional: bool = False,
    proj_size: int = 0,
    lengths: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
    backend: str | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Multi-layer LayerNorm-LSTM -> ``(output, (h_n, c_n))`` (formulas: module docstring).

    ``weights`` as :func:`turbolm.ops.rnn.lstm`; ``ln_weights`` in :func:`ln_weight_names`
    order; ``backend`` selects the LayerNorm kernel (None: the registry's choice).
    """
    output, (h_n, c_n) = _run(
        "lstm",
        input,
        hx,
        weights,
        ln_weights,
        lengths,
        eps,
        backend,
        num_layers=num_layers,
        has_biases=bias,
        batch_first=batch_first,
        dropout=dropout,
        training=training,
        bidirectional=bidirectional,
        proj_size=proj_size,
    )
    return output, (h_n, c_n)


def layernorm_gru(
    input: torch.Tensor,
    hx: torch.Tensor | None,
    weights: Sequence[torch.Tensor],
    ln_weights: Sequence[torch.Tensor],
    *,
    num_layers: int,
    bias: bool = True,
    batch_first: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    bidirectional: bool = False,
    lengths: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-layer LayerNorm-GRU -> ``(output, h_n)`` (formulas: module docstring)."""
    output, (h_n,) = _run(
        "gru",
        input,
        hx,
        weights,
        ln_weights,
        lengths,
        eps,
        backend,
        num_layers=num_layers,
        has_biases=bias,
        batch_first=batch_first,
        dropout=dropout,
        training=training,
        bidirectional=bidirectional,
        proj_size=0,
    )
    return output, h_n
