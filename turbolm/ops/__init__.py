"""Ops: functional API over interchangeable backends (see ``turbolm.ops.registry``)."""

from turbolm.ops.attention import attention
from turbolm.ops.cross_entropy import linear_cross_entropy
from turbolm.ops.norm import layer_norm, rms_norm
from turbolm.ops.registry import registered, select, use_backend
from turbolm.ops.rnn import gru, gru_cell, lstm, lstm_cell, rnn, rnn_cell

__all__ = [
    "attention",
    "gru",
    "gru_cell",
    "layer_norm",
    "linear_cross_entropy",
    "lstm",
    "lstm_cell",
    "registered",
    "rms_norm",
    "rnn",
    "rnn_cell",
    "select",
    "use_backend",
]
