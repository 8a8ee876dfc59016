"""Drop-in LSTM / GRU / RNN and their cells: subclasses of the torch.nn modules (same constructor
arguments, parameters, ``state_dict`` keys, ``flatten_parameters``) whose forward runs
turbolm's op backends (``turbolm.ops.rnn``; pick one with ``turbolm.use_backend``).

Sequence modules accept what torch.nn's do: a padded tensor (T, B, I) / (B, T, I) with
``batch_first``, an unbatched (T, I) tensor, or a ``PackedSequence``. A PackedSequence is
unpacked to a padded tensor plus ``lengths``, run through the op, and repacked with the input's
own ``batch_sizes`` / ``sorted_indices`` so the result is laid out exactly as torch.nn's.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

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


class LSTM(torch.nn.LSTM):
    """``torch.nn.LSTM`` running ``turbolm.ops.lstm``. Returns ``(output, (h_n, c_n))``."""

    def forward(self, input, hx=None):
        return _sequence_forward(self, lstm, input, hx, proj_size=self.proj_size)


class GRU(torch.nn.GRU):
    """``torch.nn.GRU`` running ``turbolm.ops.gru``. Returns ``(output, h_n)``."""

    def forward(self, input, hx=None):
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
