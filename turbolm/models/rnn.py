"""A recurrent language model: Embedding -> dropout -> LSTM / GRU / RNN -> dropout -> Linear.

The recurrent stack is ``turbolm.nn.LSTM`` / ``GRU`` / ``RNN`` (drop-ins for the torch.nn
modules running turbolm's op backends), batch first, with dropout between layers. With
``tie_embeddings`` the output layer shares the embedding matrix (Press & Wolf, 2017). When
``d_hidden != d_embed`` a tied model gets a bias-free projection ``proj`` (d_hidden ->
d_embed) in front of the output layer, so the common "small embedding, wide recurrent state"
shape can still tie; untied models never have it.

``layer_norm`` (LSTM / GRU only) makes the recurrent stack the layer-normalised LSTM / GRU of
Ba et al. 2016 (``turbolm.nn.LSTM(..., layer_norm=True)``; formulas in
``turbolm/ops/layernorm_rnn.py``): a Python loop over time, slower than the fused plain cells.

``context`` is the training sequence length; the model itself has no length limit (``step``
carries the hidden state indefinitely).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from turbolm.errors import ConfigError, InputError
from turbolm.models.common import (
    check_bool,
    check_choice,
    check_float,
    check_idx,
    check_int,
    fused_lm_loss,
    lm_loss,
    optimizer_groups,
)

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}  # weight blocks per layer
INIT_RANGE = 0.1
LAYER_NORM_CELLS = ("lstm", "gru")  # cells with a layer_norm variant

HiddenState = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class RNNConfig:
    """Hyperparameters of :class:`RNNLM`; ``dataclasses.asdict`` round-trips."""

    vocab_size: int
    cell: str = "lstm"  # "lstm" | "gru" | "rnn_tanh" | "rnn_relu"
    n_layer: int = 2
    d_embed: int = 256
    d_hidden: int = 256
    dropout: float = 0.0
    tie_embeddings: bool = True
    context: int = 256
    layer_norm: bool = False  # LayerNorm-LSTM / -GRU (Ba et al. 2016); lstm and gru only

    def __post_init__(self):
        cls = type(self).__name__
        for name in ("vocab_size", "n_layer", "d_embed", "d_hidden", "context"):
            check_int(cls, name, getattr(self, name))
        check_choice(cls, "cell", self.cell, CELLS)
        check_float(cls, "dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_bool(cls, "tie_embeddings", self.tie_embeddings)
        check_bool(cls, "layer_norm", self.layer_norm)
        if self.layer_norm and self.cell not in LAYER_NORM_CELLS:
            raise ConfigError(
                f"{cls}.layer_norm=True needs cell in {LAYER_NORM_CELLS}, got {self.cell!r}"
            )

    @property
    def projects(self) -> bool:
        """Whether the model has the d_hidden -> d_embed projection (tied, sizes differ)."""
        return self.tie_embeddings and self.d_embed != self.d_hidden


def _recurrent_stack(config: RNNConfig) -> nn.Module:
    from turbolm.nn.rnn import GRU, LSTM, RNN  # the drop-in modules (imported when built)

    kwargs = dict(
        input_size=config.d_embed,
        hidden_size=config.d_hidden,
        num_layers=config.n_layer,
        batch_first=True,
        dropout=config.dropout if config.n_layer > 1 else 0.0,  # only between layers
    )
    if config.cell == "lstm":
        return LSTM(layer_norm=config.layer_norm, **kwargs)
    if config.cell == "gru":
        return GRU(layer_norm=config.layer_norm, **kwargs)
    return RNN(nonlinearity=config.cell.removeprefix("rnn_"), **kwargs)


class RNNLM(nn.Module):
    """Recurrent LM. ``forward(idx, targets=None) -> (logits, loss)``."""

    arch = "rnn"

    def __init__(self, config: RNNConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_embed)
        self.drop = nn.Dropout(config.dropout)
        self.rnn = _recurrent_stack(config)
        self.proj = (
            nn.Linear(config.d_hidden, config.d_embed, bias=False) if config.projects else None
        )
        d_out = config.d_embed if config.projects else config.d_hidden
        self.head = nn.Linear(d_out, config.vocab_size)
        self.fused_loss = False  # see forward
        if config.tie_embeddings:
            self.head.weight = self.embed.weight  # one tensor, two uses
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Embedding and output weights U(-0.1, 0.1), output bias 0 (the classic word-level LM
        recipe); the recurrent weights and ``proj`` keep torch's defaults."""
        nn.init.uniform_(self.embed.weight, -INIT_RANGE, INIT_RANGE)
        if not self.config.tie_embeddings:
            nn.init.uniform_(self.head.weight, -INIT_RANGE, INIT_RANGE)
        nn.init.zeros_(self.head.bias)
        self.rnn.reset_parameters()
        if self.proj is not None:
            self.proj.reset_parameters()

    def _features(self, idx: torch.Tensor, state: HiddenState):
        """idx (B, T) -> what the head reads (B, T, D), after dropout, and the new state."""
        x = self.drop(self.embed(idx))  # (B, T, E)
        out, state = self.rnn(x, state)  # (B, T, H)
        if self.proj is not None:
            out = self.proj(out)  # (B, T, E)
        return self.drop(out), state

    def _run(self, idx: torch.Tensor, state: HiddenState):
        features, state = self._features(idx, state)
        return self.head(features), state  # (B, T, V)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, T) int64 -> logits (B, T, V) from a zero hidden state, and the mean
        cross-entropy against ``targets`` (B, T) (entries -100 ignored), or None.

        ``fused_loss = True`` (``train.fused_cross_entropy``): with targets, the loss comes
        from the fused linear cross-entropy op and the logits are not formed: ``(None, loss)``.
        """
        check_idx(idx)
        if self.fused_loss and targets is not None:
            features, _ = self._features(idx, None)
            return None, fused_lm_loss(features, self.head, targets, idx)
        logits, _ = self._run(idx, None)
        return logits, lm_loss(logits, targets, idx)

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> the features (B, T, D) the output layer reads, from a zero state: the
        recurrent output, through ``proj`` when there is one (D = d_embed, else d_hidden).
        ``forward``'s logits are ``head(dropout(hidden_states(idx)))``; used by fine-tuning."""
        check_idx(idx)
        out, _ = self.rnn(self.drop(self.embed(idx)), None)  # (B, T, H)
        return self.proj(out) if self.proj is not None else out  # (B, T, D)

    # -----------------------------------------------------------------------------------------
    # generation

    max_context = None  # no limit: the hidden state summarises everything seen

    def init_state(self, batch_size: int, max_len: int | None = None) -> HiddenState:
        """Zero hidden state: (n_layer, B, d_hidden), a pair (h, c) for the LSTM. ``max_len``
        is accepted for interface symmetry and ignored. ``step`` also takes None."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be an int >= 1, got {batch_size!r}")
        w = self.embed.weight
        shape = (self.config.n_layer, batch_size, self.config.d_hidden)
        h = torch.zeros(shape, dtype=w.dtype, device=w.device)
        return (h, torch.zeros_like(h)) if self.config.cell == "lstm" else h

    def step(self, idx: torch.Tensor, state: HiddenState):
        """Run the next tokens ``idx`` (B, t) from hidden ``state`` -> (logits (B, t, V), new
        state). ``forward(idx)`` equals ``step`` over the same tokens from ``init_state``."""
        check_idx(idx)
        return self._run(idx, state)

    # -----------------------------------------------------------------------------------------
    # accounting

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters, tied ones counted once. ``exclude_embeddings`` leaves out the
        embedding table unless it is tied to the output layer (then it is a matmul weight)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings and not self.config.tie_embeddings:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward) of the matmuls:

            6 * (sum over layers of G * H * (I_l + H)  +  [H * E]  +  D * V)

        G weight blocks per layer (LSTM 4, GRU 3, RNN 1), H = d_hidden, I_l the layer's input
        width (d_embed for the first, d_hidden after), [H * E] the projection when there is one,
        D its output width (else H), V = vocab_size: 2 FLOPs per multiply-add forward, twice
        that backward. Gate nonlinearities and biases are left out.
        """
        c = self.config
        gates, H, E = GATES[c.cell], c.d_hidden, c.d_embed
        recurrent = sum(gates * H * ((E if i == 0 else H) + H) for i in range(c.n_layer))
        head = H * E + E * c.vocab_size if c.projects else H * c.vocab_size
        return 6 * (recurrent + head)

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Param groups as nanoGPT: decay on >= 2-D weights (matmuls, embeddings), none on
        biases."""
        return optimizer_groups(self, weight_decay)
