"""LSTM, GRU and Elman RNN: reference math, the torch baseline, and the functional API.

Sequence ops ``lstm`` / ``gru`` / ``rnn`` run a stack of ``num_layers`` recurrent layers (each
optionally bidirectional) over a sequence; cell ops ``lstm_cell`` / ``gru_cell`` / ``rnn_cell``
run one time step of one layer. The math is exactly torch.nn's (gate order i, f, g, o for LSTM
and r, z, n for GRU; ``G`` = 4H, 3H, H for LSTM, GRU, RNN)::

    LSTM  i, f, g, o = chunk4(x W_ih^T + b_ih + h W_hh^T + b_hh)
          c' = sigmoid(f) * c + sigmoid(i) * tanh(g);  h' = sigmoid(o) * tanh(c')
          h' = h' W_hr^T                                   (only when proj_size > 0)
    GRU   gi_r, gi_z, gi_n = chunk3(x W_ih^T + b_ih);  gh_r, gh_z, gh_n = chunk3(h W_hh^T + b_hh)
          r = sigmoid(gi_r + gh_r);  z = sigmoid(gi_z + gh_z)
          n = tanh(gi_n + r * gh_n)        # reset gate applied to (W_hn h + b_hn), as torch.nn.GRU
          h' = (1 - z) * n + z * h
    RNN   h' = tanh or relu(x W_ih^T + b_ih + h W_hh^T + b_hh)

Layouts (``L`` layers, ``D`` = 2 if bidirectional else 1, ``H_out`` = proj_size or H):

* ``input`` (T, B, I), (B, T, I) with ``batch_first``, or unbatched (T, I).
* ``hx``: h0 (L*D, B, H_out) [LSTM: plus c0 (L*D, B, H)], unbatched (L*D, H_out); None = zeros.
* ``weights``: the flat list in torch.nn order, i.e. ``torch.nn.LSTM(...)._flat_weights``: for
  each layer k, for each direction (``""`` then ``"_reverse"``): ``weight_ih_l{k}`` (G, I_k),
  ``weight_hh_l{k}`` (G, H_out), [``bias_ih_l{k}`` (G,), ``bias_hh_l{k}`` (G,)],
  [``weight_hr_l{k}`` (H_out, H) when proj_size > 0]; ``I_0 = I``, ``I_k = D * H_out``.
* ``output`` (T, B, D*H_out) (batch_first / unbatched like ``input``); final states like ``hx``.
* ``lengths`` (B,) integer, optional, 1 <= lengths[b] <= T (CPU or ``input``'s device): steps
  ``t >= lengths[b]`` are padding; they leave the states unchanged and output zeros, so final
  states are those at each sequence's last valid step (the reverse direction starts there):
  the semantics of a PackedSequence.
* Inter-layer dropout (``dropout`` on every layer's output but the last) runs only when
  ``training``. All tensors share one dtype; the reference computes in fp32 (fp64 for fp64).

Backends
--------
Autograd-native backends (``reference``, ``torch``) register
``fn(input, hx, weights, lengths, *, mode, num_layers, has_biases, dropout, training,
bidirectional, proj_size) -> (output, states)`` with ``input`` time-major (T, B, I), ``hx`` the
tuple ``(h0,)`` or ``(h0, c0)`` of batched states, ``states`` the same tuple of final states and
``mode`` one of :data:`GATES`; ``torch`` calls ``torch._VF.lstm/gru/rnn_tanh/rnn_relu`` (what
torch.nn.LSTM calls: cuDNN on GPU, native/oneDNN on CPU), packing when ``lengths`` is given.

Kernel-backend contract (implemented by the CUDA/C++/Triton issues)
-------------------------------------------------------------------
A kernel backend of ``lstm`` / ``gru`` / ``rnn`` runs **one layer, both directions**, over the
whole sequence per call; the op layer loops over layers and applies inter-layer dropout with
``F.dropout`` between calls (so kernels never need an RNG), and autograd chains the layers::

    fwd(x, h0, c0, lengths, *layer_weights, mode, hidden_size, proj_size, has_biases,
        bidirectional) -> ((y, h_n, c_n) | (y, h_n), *saved)
    bwd((dy, dh_n, dc_n) | (dy, dh_n), *saved, **same params)
        -> (dx, dh0, dc0 | None, None, *dlayer_weights)

* ``x`` (T, B, I_k) contiguous time-major; ``h0`` (D, B, H_out), ``c0`` (D, B, H) contiguous or
  None (GRU/RNN); ``lengths`` None or (B,) int64 on ``x``'s device; ``layer_weights`` this
  layer's slice of ``weights`` (D directions, torch.nn order); all floats share one dtype.
* ``y`` (T, B, D*H_out), forward direction in ``[..., :H_out]``, zeros at padded steps;
  ``h_n``/``c_n`` like ``h0``/``c0``. ``dy`` etc. may be non-contiguous; weight grads are
  accumulated in fp32 and returned in the weights' dtype.
* Why this cut: a time-loop kernel does the input projection ``x W_ih^T`` for all steps (and
  both directions) as one large GEMM, runs only ``h W_hh^T`` + the fused gate math inside the
  sequential loop (persistently, both directions concurrently), and in backward computes
  ``dW_ih = dG^T x`` and ``dW_hh = dG^T h_{t-1}`` as single GEMMs over all steps after the loop.
  All of that lives inside one layer; across layers the only coupling is dropout.
* ``supports(input, hx, weights, lengths, mode, num_layers, bidirectional, proj_size, dropout,
  training)`` decides whether the backend can run (``input`` time-major, batched).
* :func:`rnn_layer_reference` takes ``fwd``'s arguments and returns its ``out``: the oracle for
  kernel tests of one layer.

Cell kernel backends: ``fwd(x, h, c, w_ih, w_hh, b_ih, b_hh, *, mode) -> ((h', c') | (h',),
*saved)`` / ``bwd(grads like out, *saved, mode=) -> (dx, dh, dc | None, dw_ih, dw_hh, db_ih,
db_hh)`` with ``x`` (B, I), ``h`` (B, H), ``c`` (B, H) or None, biases possibly None;
``supports(input, hx, mode)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import _VF
from torch.amp.autocast_mode import is_autocast_available
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from turbolm.errors import DeviceError, DTypeError, InputError, ShapeError
from turbolm.ops import registry
from turbolm.ops.checks import check_float, check_ndim, check_shape, check_tensor
from turbolm.ops.function import eager_at_compile_time, run_backend

# Gate count per mode: weights have G = GATES[mode] * hidden_size rows.
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}

State = tuple[torch.Tensor, ...]  # (h,) or (h, c)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Reference math
# ---------------------------------------------------------------------------------------------


def cell_step(mode, gi, h, c, w_hh, b_hh=None, w_hr=None):
    """One time step from the precomputed input projection ``gi = x W_ih^T + b_ih`` (B, G).

    ``h`` (B, H_out), ``c`` (B, H) or None; returns ``(h', c')`` (``c'`` None unless LSTM).
    """
    gh = F.linear(h, w_hh, b_hh)  # (B, G)
    if mode == "lstm":
        i, f, g, o = (gi + gh).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if w_hr is not None:
            h = F.linear(h, w_hr)  # (B, H) -> (B, proj_size)
        return h, c
    if mode == "gru":
        i_r, i_z, i_n = gi.chunk(3, dim=1)
        h_r, h_z, h_n = gh.chunk(3, dim=1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        # The reset gate scales (W_hn h + b_hn), bias included: torch.nn.GRU / cuDNN semantics.
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h, None
    pre = gi + gh
    return (torch.tanh(pre) if mode == "rnn_tanh" else torch.relu(pre)), None


def _split_direction(ws: Sequence[torch.Tensor], has_biases: bool):
    """One direction's weights, torch.nn order -> (w_ih, w_hh, b_ih, b_hh, w_hr), None if absent."""
    w_ih, w_hh, *rest = ws
    b_ih, b_hh = (rest[0], rest[1]) if has_biases else (None, None)
    rest = rest[2:] if has_biases else rest
    return w_ih, w_hh, b_ih, b_hh, (rest[0] if rest else None)


def _run_direction(mode, x, h, c, w, lengths, reverse):
    """One direction of one layer. ``x`` (T, B, I) in compute dtype -> (y (T, B, H_out), h, c).

    ``lengths`` (B,) on ``x``'s device or None: padded steps keep the state and output zeros.
    """
    w_ih, w_hh, b_ih, b_hh, w_hr = w
    gi_all = F.linear(x, w_ih, b_ih)  # (T, B, G): the input projection of every step at once
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    ys: list[torch.Tensor | None] = [None] * x.shape[0]
    for t in steps:
        h_new, c_new = cell_step(mode, gi_all[t], h, c, w_hh, b_hh, w_hr)
        if lengths is None:
            h, c, ys[t] = h_new, c_new, h_new
            continue
        valid = (lengths > t)[:, None]  # (B, 1)
        h = torch.where(valid, h_new, h)
        c = torch.where(valid, c_new, c) if c is not None else None
        ys[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
    return torch.stack(ys), h, c


def _layer(mode, x, h0, c0, lengths, layer_weights, has_biases, bidirectional):
    """One layer, all directions, in the compute dtype. h0 (D, B, H_out) -> y (T, B, D*H_out)."""
    num_dirs = 2 if bidirectional else 1
    per_dir = len(layer_weights) // num_dirs
    ys, hs, cs = [], [], []
    for d in range(num_dirs):
        w = _split_direction(layer_weights[d * per_dir : (d + 1) * per_dir], has_biases)
        c = c0[d] if c0 is not None else None
        y, h, c = _run_direction(mode, x, h0[d], c, w, lengths, reverse=d == 1)
        ys.append(y)
        hs.append(h)
        cs.append(c)
    h_n = torch.stack(hs)
    c_n = torch.stack(cs) if c0 is not None else None
    return torch.cat(ys, dim=-1), h_n, c_n


def rnn_layer_reference(
    x,
    h0,
    c0,
    lengths,
    *layer_weights,
    mode,
    hidden_size=None,
    proj_size=0,
    has_biases=True,
    bidirectional=False,
):
    """Per-layer oracle with the kernel-backend signature (see module docstring).

    ``x`` (T, B, I), ``h0`` (D, B, H_out), ``c0`` (D, B, H) or None -> ``(y, h_n[, c_n])`` in
    ``x``'s dtype, computed in fp32 (fp64 for fp64). ``hidden_size``/``proj_size`` are implied by
    the weights and accepted for signature compatibility.
    """
    compute = _compute_dtype(x)
    ws = [w.to(compute) for w in layer_weights]
    lengths = lengths.to(x.device) if lengths is not None else None
    c0c = c0.to(compute) if c0 is not None else None
    y, h_n, c_n = _layer(
        mode, x.to(compute), h0.to(compute), c0c, lengths, ws, has_biases, bidirectional
    )
    out = (y.to(x.dtype), h_n.to(x.dtype))
    return out + (c_n.to(x.dtype),) if c_n is not None else out


def rnn_reference(
    input,
    hx,
    weights,
    lengths=None,
    *,
    mode,
    num_layers,
    has_biases=True,
    dropout=0.0,
    training=False,
    bidirectional=False,
    proj_size=0,
):
    """Readable multi-layer RNN: a per-time-step loop of :func:`cell_step` per layer/direction.

    ``input`` (T, B, I), ``hx`` ``(h0,)`` or ``(h0, c0)`` (L*D, B, *) -> ``(output, states)``.
    """
    compute = _compute_dtype(input)
    num_dirs = 2 if bidirectional else 1
    per_layer = len(weights) // num_layers
    lengths = lengths.to(input.device) if lengths is not None else None
    x = input.to(compute)
    hs, cs = [], []
    for k in range(num_layers):
        ws = [w.to(compute) for w in weights[k * per_layer : (k + 1) * per_layer]]
        rows = slice(k * num_dirs, (k + 1) * num_dirs)
        c0 = hx[1][rows].to(compute) if mode == "lstm" else None
        x, h_n, c_n = _layer(
            mode, x, hx[0][rows].to(compute), c0, lengths, ws, has_biases, bidirectional
        )
        hs.append(h_n)
        cs.append(c_n)
        if training and dropout > 0 and k < num_layers - 1:
            x = F.dropout(x, p=dropout, training=True)  # between layers only, as torch.nn
    states = (torch.cat(hs),) + ((torch.cat(cs),) if mode == "lstm" else ())
    return x.to(input.dtype), tuple(s.to(input.dtype) for s in states)


def cell_reference(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, *, mode):
    """One step of one layer: ``input`` (B, I), ``hx`` (h,) or (h, c), each (B, H) -> same tuple."""
    compute = _compute_dtype(input)
    cast = [t.to(compute) if t is not None else None for t in (w_ih, w_hh, b_ih, b_hh)]
    gi = F.linear(input.to(compute), cast[0], cast[2])
    c = hx[1].to(compute) if mode == "lstm" else None
    h, c = cell_step(mode, gi, hx[0].to(compute), c, cast[1], cast[3])
    return (h.to(input.dtype),) + ((c.to(input.dtype),) if c is not None else ())


# ---------------------------------------------------------------------------------------------
# torch baseline
# ---------------------------------------------------------------------------------------------

_VF_SEQ = {"lstm": _VF.lstm, "gru": _VF.gru, "rnn_tanh": _VF.rnn_tanh, "rnn_relu": _VF.rnn_relu}
_VF_CELL = {
    "lstm": _VF.lstm_cell,
    "gru": _VF.gru_cell,
    "rnn_tanh": _VF.rnn_tanh_cell,
    "rnn_relu": _VF.rnn_relu_cell,
}


def _rnn_torch(
    input,
    hx,
    weights,
    lengths=None,
    *,
    mode,
    num_layers,
    has_biases=True,
    dropout=0.0,
    training=False,
    bidirectional=False,
    proj_size=0,
):
    """``torch._VF`` (cuDNN / native). Variable lengths go through a PackedSequence."""
    fn = _VF_SEQ[mode]
    # _VF's `train` also tells cuDNN to keep what its backward needs (cuDNN refuses a backward
    # of an inference-mode forward): train whenever a gradient may flow, with dropout only
    # when `training`.
    needs_grad = torch.is_grad_enabled() and (
        input.requires_grad
        or any(h.requires_grad for h in hx)
        or any(w.requires_grad for w in weights)
    )
    drop = float(dropout) if training else 0.0
    args = (list(weights), has_biases, num_layers, drop, training or needs_grad, bidirectional)
    if lengths is None:
        output, *states = fn(input, hx if mode == "lstm" else hx[0], *args, False)
        return output, tuple(states)
    # Packing sorts the batch by length; the states follow that order inside _VF.
    packed = pack_padded_sequence(input, lengths.cpu(), enforce_sorted=False)
    hx = tuple(h.index_select(1, packed.sorted_indices) for h in hx)
    data, *states = fn(packed.data, packed.batch_sizes, hx if mode == "lstm" else hx[0], *args)
    packed_out = PackedSequence(
        data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices
    )
    output, _ = pad_packed_sequence(packed_out, total_length=input.shape[0])
    return output, tuple(s.index_select(1, packed.unsorted_indices) for s in states)


def _cell_torch(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, *, mode):
    out = _VF_CELL[mode](input, hx if mode == "lstm" else hx[0], w_ih, w_hh, b_ih, b_hh)
    return tuple(out) if mode == "lstm" else (out,)


for _op in ("lstm", "gru", "rnn"):
    registry.register(_op, "reference", fn=rnn_reference)
    registry.register(_op, "torch", fn=_rnn_torch)
    registry.register(f"{_op}_cell", "reference", fn=cell_reference)
    registry.register(f"{_op}_cell", "torch", fn=_cell_torch)


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _weight_names(layer: int, direction: int, has_biases: bool, proj_size: int) -> list[str]:
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if has_biases else [])
    names += ["weight_hr"] if proj_size > 0 else []
    return [n + suffix for n in names]


def _all_weight_names(num_layers, bidirectional, has_biases, proj_size) -> list[str]:
    """torch.nn's parameter names in ``_flat_weights`` order."""
    dirs = range(2 if bidirectional else 1)
    return [
        n
        for k in range(num_layers)
        for d in dirs
        for n in _weight_names(k, d, has_biases, proj_size)
    ]


def _check_options(num_layers, dropout, proj_size):
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise InputError(f"num_layers must be an int >= 1, got {num_layers!r}")
    if not 0.0 <= dropout < 1.0:
        raise InputError(f"dropout must be in [0, 1), got {dropout}")
    if isinstance(proj_size, bool) or not isinstance(proj_size, int) or proj_size < 0:
        raise InputError(f"proj_size must be an int >= 0, got {proj_size!r}")


def _check_weights(mode, weights, num_layers, has_biases, bidirectional, proj_size):
    """Validate the flat weight list; returns (input_size, hidden_size)."""
    if isinstance(weights, torch.Tensor) or not isinstance(weights, Sequence):
        raise InputError("weights must be a list of tensors (torch.nn.LSTM(...)._flat_weights)")
    num_dirs = 2 if bidirectional else 1
    names = _all_weight_names(num_layers, bidirectional, has_biases, proj_size)
    if len(weights) != len(names):
        raise InputError(
            f"weights must hold {len(names)} tensors for num_layers={num_layers}, "
            f"bidirectional={bidirectional}, bias={has_biases}, proj_size={proj_size} "
            f"({', '.join(names[: len(names) // num_layers])}, ...), got {len(weights)}"
        )
    for name, w in zip(names, weights):
        check_float(name, w)
    w_ih0 = weights[0]
    check_ndim(names[0], w_ih0, 2, "(gates * hidden_size, input_size)")
    gates = GATES[mode]
    if w_ih0.shape[0] == 0 or w_ih0.shape[0] % gates:
        raise ShapeError(
            f"{names[0]} must have {gates} * hidden_size rows for {mode}, got {tuple(w_ih0.shape)}"
        )
    input_size, hidden = w_ih0.shape[1], w_ih0.shape[0] // gates
    if proj_size >= hidden and proj_size > 0:
        raise InputError(f"proj_size ({proj_size}) must be smaller than hidden_size ({hidden})")
    out = proj_size or hidden
    for name, w in zip(names, weights):
        kind, layer = name.split("_l")[0], int(name.split("_l")[1].split("_")[0])
        layer_in = input_size if layer == 0 else num_dirs * out
        expected = {
            "weight_ih": (gates * hidden, layer_in),
            "weight_hh": (gates * hidden, out),
            "bias_ih": (gates * hidden,),
            "bias_hh": (gates * hidden,),
            "weight_hr": (proj_size, hidden),
        }[kind]
        check_shape(name, w, expected)
    return input_size, hidden


def _check_lengths(lengths, batch, steps, device):
    check_tensor("lengths", lengths)
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise DTypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
    check_shape("lengths", lengths, (batch,))
    if lengths.device.type != "cpu" and lengths.device != device:
        raise InputError(
            f"lengths must be on the CPU or on input's device {device}, got {lengths.device}"
        )
    # The values are data: not checked while torch.compile traces (the kernels check them).
    if (
        batch
        and not torch.compiler.is_compiling()
        and (lengths.min().item() < 1 or lengths.max().item() > steps)
    ):
        raise InputError(
            f"lengths must be in [1, {steps}] (the sequence length), got "
            f"min {lengths.min().item()}, max {lengths.max().item()}"
        )


def _states_tuple(mode, hx) -> State | None:
    """``hx`` as given by the user -> tuple (h0,) / (h0, c0), or None."""
    if hx is None:
        return None
    if mode == "lstm":
        if isinstance(hx, torch.Tensor) or not isinstance(hx, Sequence) or len(hx) != 2:
            raise InputError("lstm hx must be None or a tuple (h0, c0)")
        return (check_tensor("hx[0]", hx[0]), check_tensor("hx[1]", hx[1]))
    return (check_tensor("hx", hx),)


def _state_names(mode, states) -> dict[str, torch.Tensor]:
    if states is None:
        return {}
    return dict(zip(("hx[0] (h0)", "hx[1] (c0)") if mode == "lstm" else ("hx",), states))


def _check_states(mode, states, expected_h, expected_c):
    for (name, s), shape in zip(_state_names(mode, states).items(), (expected_h, expected_c)):
        check_float(name, s)
        check_shape(name, s, shape)


def _check_like_input(input, tensors: dict[str, torch.Tensor | None]) -> None:
    """Every tensor shares ``input``'s device and dtype; names the first that does not."""
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device != input.device:
            raise DeviceError(
                f"{name} is on {t.device} but input is on {input.device}; "
                "all tensors must be on the same device"
            )
        if t.dtype != input.dtype:
            raise DTypeError(
                f"{name} has dtype {str(t.dtype).replace('torch.', '')} but input has "
                f"{str(input.dtype).replace('torch.', '')}; all tensors must share one dtype"
            )


# ---------------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------------


def _dtype_or_none(t):
    return None if t is None else t.dtype


@eager_at_compile_time
def _prepare_for_compile(op, device_type, backend, dtypes, options) -> bool:
    """Run by torch.compile outside the traced code (eagerly, once per trace): select the
    backend for inputs of these dtypes (input, weights..., states..., lengths) and ``options``
    (``registry.select``'s keyword arguments, as a tuple of pairs), which loads the extension
    and registers its fake implementations when the backend needs them. Tracing that first
    load (file locks, filling caches) broke ``torch.compile(fullgraph=True)`` of code whose
    RNN ops had not run eagerly in this process. Returns whether the selection succeeded;
    when not, the traced ``registry.select`` raises the error as in eager mode."""
    x_dtype, weight_dtypes, state_dtypes, lengths_dtype = dtypes
    options = dict(options)
    dims = 2 if op.endswith("_cell") else 3
    x = torch.ones((1,) * dims, dtype=x_dtype, device=device_type)
    inputs = {"input": x, "hx": tuple(x.new_ones(1, 1, 1, dtype=d) for d in state_dtypes)}
    if dims == 3:
        inputs["weights"] = [x.new_ones(1, dtype=d) for d in weight_dtypes]
        inputs["lengths"] = None if lengths_dtype is None else x.new_ones(1, dtype=lengths_dtype)
    try:
        registry.select(op, device_type, backend, **inputs, **options)
    except Exception:  # noqa: BLE001 - raised again, typed, by the traced selection
        return False
    return True


def _run_kernel_layers(chosen, mode, x, states, weights, lengths, opts, hidden):
    """Kernel backends: one ``run_backend`` call per layer; dropout between layers here."""
    num_layers, num_dirs = opts["num_layers"], 2 if opts["bidirectional"] else 1
    per_layer = len(weights) // num_layers
    params = {
        "mode": mode,
        "hidden_size": hidden,
        "proj_size": opts["proj_size"],
        "has_biases": opts["has_biases"],
        "bidirectional": opts["bidirectional"],
    }
    lengths = lengths.to(x.device) if lengths is not None else None
    finals: list[list[torch.Tensor]] = [[] for _ in states]
    for k in range(num_layers):
        rows = slice(k * num_dirs, (k + 1) * num_dirs)
        h0 = states[0][rows].contiguous()
        c0 = states[1][rows].contiguous() if mode == "lstm" else None
        layer_weights = weights[k * per_layer : (k + 1) * per_layer]
        y, *layer_states = run_backend(
            chosen, (x.contiguous(), h0, c0, lengths, *layer_weights), params
        )
        for acc, s in zip(finals, layer_states):
            acc.append(s)
        if opts["training"] and opts["dropout"] > 0 and k < num_layers - 1:
            y = F.dropout(y, p=opts["dropout"], training=True)
        x = y
    return x, tuple(torch.cat(acc) for acc in finals)


def _check_sequence_inputs(mode, input, states, weights, lengths, batch_first, opts):
    """Validate everything the user passed; returns (hidden_size, seq_len, batch)."""
    num_layers, bidirectional, proj_size = (
        opts["num_layers"],
        opts["bidirectional"],
        opts["proj_size"],
    )
    _check_options(num_layers, opts["dropout"], proj_size)
    check_float("input", input)
    check_ndim("input", input, (2, 3), "(seq, batch, input_size), (seq, input_size) unbatched")
    input_size, hidden = _check_weights(
        mode, weights, num_layers, opts["has_biases"], bidirectional, proj_size
    )
    if input.shape[-1] != input_size:
        raise ShapeError(
            f"input must have input_size={input_size} (from weight_ih_l0) as its last "
            f"dimension, got shape {tuple(input.shape)}"
        )
    batched = input.dim() == 3
    steps = input.shape[1 if batched and batch_first else 0]
    batch = input.shape[0 if batch_first else 1] if batched else 1
    if steps == 0:
        raise ShapeError(f"input must have at least one time step, got shape {tuple(input.shape)}")
    if states is not None:
        rows = num_layers * (2 if bidirectional else 1)
        lead = (rows, batch) if batched else (rows,)
        _check_states(mode, states, lead + (proj_size or hidden,), lead + (hidden,))
    names = _all_weight_names(num_layers, bidirectional, opts["has_biases"], proj_size)
    _check_like_input(input, {**dict(zip(names, weights)), **_state_names(mode, states)})
    if lengths is not None:
        if not batched:
            raise InputError("lengths needs batched input (seq, batch, input_size)")
        _check_lengths(lengths, batch, steps, input.device)
    return hidden, steps, batch


_AUTOCAST_ELIGIBLE = (torch.float16, torch.bfloat16, torch.float32)


def _autocast_dtype(input) -> torch.dtype | None:
    """The autocast dtype when autocast is on for ``input``'s device, else None."""
    if not isinstance(input, torch.Tensor):
        return None
    device_type = input.device.type
    if device_type not in ("cpu", "cuda") and not is_autocast_available(device_type):
        return None  # e.g. meta: torch.is_autocast_enabled would raise
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast_cast(value, dtype):
    """``value`` (a tensor, a sequence of tensors, or anything else) with its fp16 / bf16 / fp32
    tensors cast to ``dtype`` (differentiably), as autocast casts an op's arguments."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.dtype in _AUTOCAST_ELIGIBLE else value
    if isinstance(value, (list, tuple)):
        return type(value)(_autocast_cast(v, dtype) for v in value)
    return value


def _run_sequence(op, mode, input, hx, weights, lengths, backend, **opts):
    """Check, normalize to batched time-major, dispatch, and restore the caller's layout.

    Under autocast the op runs in the autocast dtype, as torch.nn's recurrent modules do
    (cuDNN's RNN and oneDNN's on CPU are autocast lower-precision ops): input, states and
    weights are cast (the weight gradients flow back to the fp32 weights) and the backends run
    with autocast off, so an input that an earlier autocast op made bf16 meets bf16 weights.
    """
    dtype = _autocast_dtype(input)
    if dtype is not None:
        input, hx, weights = (_autocast_cast(v, dtype) for v in (input, hx, weights))
        with torch.autocast(input.device.type, enabled=False):
            return _run_sequence(op, mode, input, hx, weights, lengths, backend, **opts)
    batch_first = opts.pop("batch_first")
    states = _states_tuple(mode, hx)
    hidden, _, batch = _check_sequence_inputs(
        mode, input, states, weights, lengths, batch_first, opts
    )
    batched = input.dim() == 3
    if not batched:
        x = input.unsqueeze(1)  # (T, 1, I)
    else:
        x = input.transpose(0, 1) if batch_first else input  # (T, B, I), a view
    rows = opts["num_layers"] * (2 if opts["bidirectional"] else 1)
    if states is None:
        widths = (opts["proj_size"] or hidden, hidden) if mode == "lstm" else (hidden,)
        states = tuple(x.new_zeros(rows, batch, w) for w in widths)
    elif not batched:
        states = tuple(s.unsqueeze(1) for s in states)
    lengths = lengths.long() if lengths is not None else None
    weights = list(weights)
    if torch.compiler.is_compiling():
        dtypes = (
            x.dtype,
            tuple(w.dtype for w in weights),
            tuple(s.dtype for s in states),
            _dtype_or_none(lengths),
        )
        options = (
            ("mode", mode),
            ("num_layers", opts["num_layers"]),
            ("bidirectional", opts["bidirectional"]),
            ("proj_size", opts["proj_size"]),
            ("dropout", opts["dropout"]),
            ("training", opts["training"]),
        )
        _prepare_for_compile(op, x.device.type, backend, dtypes, options)
    chosen = registry.select(
        op,
        x.device.type,
        backend,
        input=x,
        hx=states,
        weights=weights,
        lengths=lengths,
        mode=mode,
        num_layers=opts["num_layers"],
        bidirectional=opts["bidirectional"],
        proj_size=opts["proj_size"],
        dropout=opts["dropout"],
        training=opts["training"],
    )
    if chosen.is_autograd_native:
        out, final = chosen.fn(x, states, weights, lengths, mode=mode, **opts)
    else:
        out, final = _run_kernel_layers(chosen, mode, x, states, weights, lengths, opts, hidden)
    if not batched:
        return out.squeeze(1), tuple(s.squeeze(1) for s in final)
    return (out.transpose(0, 1) if batch_first else out), final


def lstm(
    input: torch.Tensor,
    hx: tuple[torch.Tensor, torch.Tensor] | None,
    weights: Sequence[torch.Tensor],
    *,
    num_layers: int,
    bias: bool = True,
    batch_first: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    bidirectional: bool = False,
    proj_size: int = 0,
    lengths: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Multi-layer LSTM over ``input`` -> ``(output, (h_n, c_n))`` (layouts: module docstring).

    ``weights`` is ``torch.nn.LSTM(...)._flat_weights``; ``lengths`` (B,) marks padded steps.
    """
    output, (h_n, c_n) = _run_sequence(
        "lstm",
        "lstm",
        input,
        hx,
        weights,
        lengths,
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


def gru(
    input: torch.Tensor,
    hx: torch.Tensor | None,
    weights: Sequence[torch.Tensor],
    *,
    num_layers: int,
    bias: bool = True,
    batch_first: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    bidirectional: bool = False,
    lengths: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-layer GRU over ``input`` -> ``(output, h_n)`` (layouts: module docstring)."""
    output, (h_n,) = _run_sequence(
        "gru",
        "gru",
        input,
        hx,
        weights,
        lengths,
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


def _rnn_mode(nonlinearity: str) -> str:
    if nonlinearity not in ("tanh", "relu"):
        raise InputError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    return f"rnn_{nonlinearity}"


def rnn(
    input: torch.Tensor,
    hx: torch.Tensor | None,
    weights: Sequence[torch.Tensor],
    *,
    num_layers: int,
    nonlinearity: str = "tanh",
    bias: bool = True,
    batch_first: bool = False,
    dropout: float = 0.0,
    training: bool = False,
    bidirectional: bool = False,
    lengths: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-layer Elman RNN (tanh or relu) over ``input`` -> ``(output, h_n)``."""
    output, (h_n,) = _run_sequence(
        "rnn",
        _rnn_mode(nonlinearity),
        input,
        hx,
        weights,
        lengths,
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


def _check_cell_inputs(mode, input, states, w_ih, w_hh, b_ih, b_hh) -> int:
    """Validate one cell step's inputs; returns hidden_size."""
    check_float("input", input)
    check_ndim("input", input, (1, 2), "(batch, input_size) or (input_size,) unbatched")
    gates = GATES[mode]
    check_float("weight_ih", w_ih)
    check_ndim("weight_ih", w_ih, 2, "(gates * hidden_size, input_size)")
    if w_ih.shape[0] == 0 or w_ih.shape[0] % gates:
        raise ShapeError(
            f"weight_ih must have {gates} * hidden_size rows for {mode}, got {tuple(w_ih.shape)}"
        )
    hidden, input_size = w_ih.shape[0] // gates, w_ih.shape[1]
    check_float("weight_hh", w_hh)
    check_shape("weight_hh", w_hh, (gates * hidden, hidden))
    for name, bias in (("bias_ih", b_ih), ("bias_hh", b_hh)):
        if bias is not None:
            check_float(name, bias)
            check_shape(name, bias, (gates * hidden,))
    if input.shape[-1] != input_size:
        raise ShapeError(
            f"input must have input_size={input_size} (from weight_ih) as its last dimension, "
            f"got shape {tuple(input.shape)}"
        )
    if states is not None:
        expected = (input.shape[0], hidden) if input.dim() == 2 else (hidden,)
        _check_states(mode, states, expected, expected)
    tensors = {"weight_ih": w_ih, "weight_hh": w_hh, "bias_ih": b_ih, "bias_hh": b_hh}
    _check_like_input(input, {**tensors, **_state_names(mode, states)})
    return hidden


def _run_cell(op, mode, input, hx, w_ih, w_hh, b_ih, b_hh, backend):
    """Check, normalize to batched (B, I), dispatch, restore unbatched (autocast: as
    :func:`_run_sequence`; torch's cells are autocast lower-precision ops on CUDA, and on CPU
    their matmuls are)."""
    dtype = _autocast_dtype(input)
    if dtype is not None:
        args = [_autocast_cast(v, dtype) for v in (input, hx, w_ih, w_hh, b_ih, b_hh)]
        with torch.autocast(input.device.type, enabled=False):
            return _run_cell(op, mode, *args, backend)
    states = _states_tuple(mode, hx)
    hidden = _check_cell_inputs(mode, input, states, w_ih, w_hh, b_ih, b_hh)
    batched = input.dim() == 2
    x = input if batched else input.unsqueeze(0)  # (B, I)
    if states is None:
        states = tuple(x.new_zeros(x.shape[0], hidden) for _ in range(2 if mode == "lstm" else 1))
    elif not batched:
        states = tuple(s.unsqueeze(0) for s in states)
    if torch.compiler.is_compiling():
        dtypes = (x.dtype, (), tuple(s.dtype for s in states), None)
        _prepare_for_compile(op, x.device.type, backend, dtypes, (("mode", mode),))
    chosen = registry.select(op, x.device.type, backend, input=x, hx=states, mode=mode)
    if chosen.is_autograd_native:
        out = chosen.fn(x, states, w_ih, w_hh, b_ih, b_hh, mode=mode)
    else:
        c = states[1] if mode == "lstm" else None
        out = run_backend(chosen, (x, states[0], c, w_ih, w_hh, b_ih, b_hh), {"mode": mode})
    return out if batched else tuple(s.squeeze(0) for s in out)


def lstm_cell(
    input: torch.Tensor,
    hx: tuple[torch.Tensor, torch.Tensor] | None,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor | None = None,
    bias_hh: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step: ``input`` (B, I) or (I,), ``hx`` (h, c) each (B, H) or None -> (h', c')."""
    h, c = _run_cell(
        "lstm_cell", "lstm", input, hx, weight_ih, weight_hh, bias_ih, bias_hh, backend
    )
    return h, c


def gru_cell(
    input: torch.Tensor,
    hx: torch.Tensor | None,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor | None = None,
    bias_hh: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """One GRU step: ``input`` (B, I) or (I,), ``hx`` (B, H) / (H,) or None -> h'."""
    (h,) = _run_cell("gru_cell", "gru", input, hx, weight_ih, weight_hh, bias_ih, bias_hh, backend)
    return h


def rnn_cell(
    input: torch.Tensor,
    hx: torch.Tensor | None,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor | None = None,
    bias_hh: torch.Tensor | None = None,
    *,
    nonlinearity: str = "tanh",
    backend: str | None = None,
) -> torch.Tensor:
    """One Elman RNN step (tanh or relu): ``input`` (B, I) or (I,), ``hx`` (B, H) or None -> h'."""
    mode = _rnn_mode(nonlinearity)
    (h,) = _run_cell("rnn_cell", mode, input, hx, weight_ih, weight_hh, bias_ih, bias_hh, backend)
    return h


from turbolm.ops import rnn_kernels  # noqa: E402,F401  (registers the cpu/cuda/triton backends)
