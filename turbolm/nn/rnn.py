"""Drop-in LSTM / GRU / RNN and their cells: subclasses of the torch.nn modules (same constructor
arguments, parameters, ``state_dict`` keys, ``flatten_parameters``) whose forward runs
turbolm's op backends (``turbolm.ops.rnn``; pick one with ``turbolm.use_backend``).

Sequence modules accept what torch.nn's do: a padded tensor (T, B, I) / (B, T, I) with
``batch_first``, an unbatched (T, I) tensor, or a ``PackedSequence``. A PackedSequence is
unpacked to a padded tensor plus ``lengths``, run through the op, and repacked with the input's
own ``batch_sizes`` / ``sorted_indices`` so the result is laid out exactly as torch.nn's.

``LSTM`` and ``GRU`` take two extra keyword arguments: ``layer_norm=True`` makes them the
layer-normalised recurrences of Ba et al. 2016 (formulas, parameters and implementation in
``turbolm/ops/layernorm_rnn.py``) and ``layer_norm_eps`` (1e-5) is their LayerNorm epsilon.
With the default ``layer_norm=False`` the modules, their parameters and ``state_dict`` are
exactly torch.nn's.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from turbolm.errors import InputError
from turbolm.ops.layernorm_rnn import DEFAULT_EPS, layernorm_gru, layernorm_lstm, ln_weight_names
from turbolm.ops.rnn import gru, gru_cell, lstm, lstm_cell, rnn, rnn_cell


def _repack(output: torch.Tensor, lengths: torch.Tensor, like: PackedSequence, batch_first: bool):
    """Padded ``output`` (original batch order) -> PackedSequence laid out like ``like``."""
    if like.sorted_indices is not None:
        # Reorder to the input's packing order so ``data`` rows match its batch_sizes exactly.
        batch_dim = 0 if batch_first else 1
        output = output.index_select(batch_dim, like.sorted_indices.to(output.device))
        lengths = lengths.index_select(0, like.sorted_indices.to(lengths.device))
    data = pack_padded_sequence(output, lengths, batch_first=batch_first, enforce_sorted=True).data
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


def _sequence_forward(module: torch.nn.RNNBase, op, input, hx, **extra):
    """Shared forward of LSTM / GRU / RNN: run ``op`` on the module's flat weights."""
    module._update_flat_weights()  # as torch.nn: pick up reassigned / moved parameters
    options = {
        "num_layers": module.num_layers,
        "bias": module.bias,
        "batch_first": module.batch_first,
        "dropout": float(module.dropout),
        "training": module.training,
        "bidirectional": module.bidirectional,
        **extra,
    }
    if not isinstance(input, PackedSequence):
        return op(input, hx, module._flat_weights, **options)
    padded, lengths = pad_packed_sequence(input, batch_first=module.batch_first)
    output, hidden = op(padded, hx, module._flat_weights, lengths=lengths, **options)
    return _repack(output, lengths, input, module.batch_first), hidden


class _LayerNormOption:
    """The ``layer_norm`` option of :class:`LSTM` / :class:`GRU` (mixed in before torch.nn's).

    With ``layer_norm=True`` the module gets, per layer and direction, the LayerNorm gains
    (init 1) and shifts (init 0) ``ln_ih_weight_l{k}``, ``ln_ih_bias_l{k}``,
    ``ln_hh_weight_l{k}``, ``ln_hh_bias_l{k}`` (4H / 3H wide) and, for the LSTM,
    ``ln_c_weight_l{k}``, ``ln_c_bias_l{k}`` (H wide), ``_reverse`` for the reverse direction.
    They are ordinary parameters (not in ``_flat_weights``), so a plain torch.nn checkpoint
    loads only with ``strict=False``.
    """

    _mode: str

    def _init_layer_norm(self, layer_norm, layer_norm_eps) -> None:
        if not isinstance(layer_norm, bool):
            raise InputError(f"layer_norm must be True or False, got {layer_norm!r}")
        ok = isinstance(layer_norm_eps, (int, float)) and not isinstance(layer_norm_eps, bool)
        if not (ok and 0 <= layer_norm_eps < float("inf")):
            raise InputError(f"layer_norm_eps must be a finite number >= 0, got {layer_norm_eps!r}")
        self.layer_norm = layer_norm
        self.layer_norm_eps = float(layer_norm_eps)
        self._ln_names: list[str] = []
        if not layer_norm:
            return
        if getattr(self, "proj_size", 0):
            raise InputError(
                f"layer_norm=True does not support proj_size (got {self.proj_size}); "
                "use proj_size=0"
            )
        like = self.weight_ih_l0
        gates = like.shape[0]
        self._ln_names = ln_weight_names(self._mode, self.num_layers, self.bidirectional)
        for name in self._ln_names:
            size = self.hidden_size if name.startswith("ln_c_") else gates
            self.register_parameter(
                name, torch.nn.Parameter(torch.empty(size, device=like.device, dtype=like.dtype))
            )
        self._reset_layer_norm()

    def _reset_layer_norm(self) -> None:
        with torch.no_grad():
            for name in getattr(self, "_ln_names", ()):
                getattr(self, name).fill_(1.0 if "_weight_" in name else 0.0)

    def reset_parameters(self) -> None:
        """torch.nn's init (uniform +-1/sqrt(H)) for the torch.nn weights; LayerNorm 1 / 0."""
        super().reset_parameters()  # re-draws every parameter, the LayerNorm ones included
        self._reset_layer_norm()

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text + ", layer_norm=True" if getattr(self, "layer_norm", False) else text

    def _forward_layer_norm(self, op, input, hx):
        ln_weights = [getattr(self, name) for name in self._ln_names]
        return _sequence_forward(
            self, op, input, hx, ln_weights=ln_weights, eps=self.layer_norm_eps
        )


class LSTM(_LayerNormOption, torch.nn.LSTM):
    """``torch.nn.LSTM`` running ``turbolm.ops.lstm``. Returns ``(output, (h_n, c_n))``.

    ``layer_norm=True``: the LayerNorm-LSTM of Ba et al. 2016 (``turbolm.ops.layernorm_lstm``)::

        i, f, g, o = chunk4(LN(x W_ih^T) + b_ih + LN(h W_hh^T) + b_hh)
        c' = sigmoid(f) * c + sigmoid(i) * tanh(g);   h' = sigmoid(o) * tanh(LN(c'))

    each LN with its own gain/shift (``ln_ih_*``, ``ln_hh_*`` over 4H, ``ln_c_*`` over H);
    not with ``proj_size``.
    """

    _mode = "lstm"

    def __init__(
        self, *args, layer_norm: bool = False, layer_norm_eps: float = DEFAULT_EPS, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self._init_layer_norm(layer_norm, layer_norm_eps)

    def forward(self, input, hx=None):
        if getattr(self, "layer_norm", False):
            return self._forward_layer_norm(layernorm_lstm, input, hx)
        return _sequence_forward(self, lstm, input, hx, proj_size=self.proj_size)


class GRU(_LayerNormOption, torch.nn.GRU):
    """``torch.nn.GRU`` running ``turbolm.ops.gru``. Returns ``(output, h_n)``.

    ``layer_norm=True``: the LayerNorm-GRU (``turbolm.ops.layernorm_gru``), torch.nn.GRU's
    reset-gate placement kept::

        x_r, x_z, x_n = chunk3(LN(x W_ih^T) + b_ih);  h_r, h_z, h_n = chunk3(LN(h W_hh^T) + b_hh)
        r = sigmoid(x_r + h_r);  z = sigmoid(x_z + h_z);  n = tanh(x_n + r * h_n)
        h' = (1 - z) * n + z * h

    each LN with its own gain/shift over 3H (``ln_ih_*``, ``ln_hh_*``).
    """

    _mode = "gru"

    def __init__(
        self, *args, layer_norm: bool = False, layer_norm_eps: float = DEFAULT_EPS, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self._init_layer_norm(layer_norm, layer_norm_eps)

    def forward(self, input, hx=None):
        if getattr(self, "layer_norm", False):
            return self._forward_layer_norm(layernorm_gru, input, hx)
        return _sequence_forward(self, gru, input, hx)


class RNN(torch.nn.RNN):
    """``torch.nn.RNN`` (tanh or relu) running ``turbolm.ops.rnn``. Returns ``(output, h_n)``."""

    def forward(self, input, hx=None):
        return _sequence_forward(self, rnn, input, hx, nonlinearity=self.nonlinearity)


class LSTMCell(torch.nn.LSTMCell):
    """``torch.nn.LSTMCell`` running ``turbolm.ops.lstm_cell``: (B, I) or (I,) -> (h', c')."""

    def forward(self, input, hx=None):
        return lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


class GRUCell(torch.nn.GRUCell):
    """``torch.nn.GRUCell`` running ``turbolm.ops.gru_cell``: (B, I) or (I,) -> h'."""

    def forward(self, input, hx=None):
        return gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


class RNNCell(torch.nn.RNNCell):
    """``torch.nn.RNNCell`` running ``turbolm.ops.rnn_cell``: (B, I) or (I,) -> h'."""

    def forward(self, input, hx=None):
        return rnn_cell(
            input,
            hx,
            self.weight_ih,
            self.weight_hh,
            self.bias_ih,
            self.bias_hh,
            nonlinearity=self.nonlinearity,
        )
