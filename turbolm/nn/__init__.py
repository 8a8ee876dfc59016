"""Drop-in modules: same constructor arguments and state_dict keys as their torch.nn twins."""

from turbolm.nn.attention import CausalSelfAttention, KVCache, RotaryEmbedding
from turbolm.nn.multihead_attention import MultiheadAttention
from turbolm.nn.norm import LayerNorm, RMSNorm
from turbolm.nn.rnn import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

__all__ = [
    "CausalSelfAttention",
    "KVCache",
    "RotaryEmbedding",
    "GRU",
    "GRUCell",
    "LSTM",
    "LSTMCell",
    "LayerNorm",
    "MultiheadAttention",
    "RMSNorm",
    "RNN",
    "RNNCell",
]
