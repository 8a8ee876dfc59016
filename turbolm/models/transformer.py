"""A GPT / Llama style decoder-only Transformer language model.

Pre-norm blocks (``x + attn(norm(x))``, ``x + mlp(norm(x))``), a final norm and an LM head that
shares the token embedding when ``tie_embeddings``. Every norm and attention is a
``turbolm.nn`` module, so choosing a backend (``turbolm.use_backend``, ``TURBOLM_BACKEND``)
swaps every kernel in the model. GPT-2 flavour: ``norm="layernorm"``, ``mlp="gelu"``,
``pos="learned"``; Llama flavour: ``norm="rmsnorm"``, ``mlp="swiglu"``, ``pos="rope"``,
``n_kv_head < n_head``.

Generation: ``init_state`` gives one ``KVCache`` per layer; ``step`` runs new tokens (a whole
prompt, then one token at a time) against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from turbolm.errors import ConfigError, InputError
from turbolm.models.common import (
    check_bool,
    check_choice,
    check_float,
    check_idx,
    check_int,
    check_positive,
    fused_lm_loss,
    lm_loss,
    optimizer_groups,
)
from turbolm.nn.attention import CausalSelfAttention, KVCache, RotaryEmbedding
from turbolm.nn.norm import LayerNorm, RMSNorm

NORM_EPS = 1e-5
INIT_STD = 0.02


@dataclass
class TransformerConfig:
    """Hyperparameters of :class:`TransformerLM`; ``dataclasses.asdict`` round-trips.

    ``n_kv_head=None`` means ``n_head`` (plain multi-head attention). ``context`` is the
    longest sequence the model takes (and the length of learned position embeddings).
    """

    vocab_size: int
    context: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None
    d_model: int = 256
    mlp: str = "gelu"  # "gelu" | "swiglu"
    mlp_ratio: float = 4.0
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    pos: str = "rope"  # "rope" | "learned"
    rope_theta: float = 10000.0
    bias: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0

    def __post_init__(self):
        cls = type(self).__name__
        for name in ("vocab_size", "context", "n_layer", "n_head", "d_model"):
            check_int(cls, name, getattr(self, name))
        if self.n_kv_head is not None:
            check_int(cls, "n_kv_head", self.n_kv_head)
        check_choice(cls, "mlp", self.mlp, ("gelu", "swiglu"))
        check_choice(cls, "norm", self.norm, ("layernorm", "rmsnorm"))
        check_choice(cls, "pos", self.pos, ("rope", "learned"))
        check_positive(cls, "mlp_ratio", self.mlp_ratio)
        check_positive(cls, "rope_theta", self.rope_theta)
        check_float(cls, "dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_bool(cls, "bias", self.bias)
        check_bool(cls, "tie_embeddings", self.tie_embeddings)
        if self.d_model % self.n_head:
            raise ConfigError(
                f"{cls}.d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
            )
        if self.n_head % self.kv_heads:
            raise ConfigError(
                f"{cls}.n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})"
            )
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(
                f"{cls}.d_model / n_head = head dim {self.head_dim} must be even for pos='rope'"
            )
        if self.hidden_size < 1:
            raise ConfigError(f"{cls}.mlp_ratio ({self.mlp_ratio}) gives an empty MLP")

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def hidden_size(self) -> int:
        """MLP hidden width: ``mlp_ratio * d_model`` for GELU; for SwiGLU ``2/3`` of that (same
        parameter count with three matrices), rounded up to a multiple of 64 (Llama)."""
        if self.mlp == "swiglu":
            hidden = int(2 * self.mlp_ratio * self.d_model / 3)
            return 64 * math.ceil(hidden / 64)
        return int(self.mlp_ratio * self.d_model)


def make_norm(config: TransformerConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, eps=NORM_EPS)
    return LayerNorm(config.d_model, eps=NORM_EPS, bias=config.bias)


class MLP(nn.Module):
    """GELU MLP (``proj(gelu(fc(x)))``) or SwiGLU (``proj(silu(gate) * up)``, with gate and up
    fused in ``fc``): x (B, T, C) -> (B, T, C)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        hidden = config.hidden_size
        self.fc = nn.Linear(config.d_model, (2 if self.swiglu else 1) * hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, T, H) or (B, T, 2H)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)  # (B, T, H) each
            h = F.silu(gate) * up  # (B, T, H)
        else:
            h = F.gelu(h)  # (B, T, H)
        return self.dropout(self.proj(h))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(
            config.d_model,
            config.n_head,
            config.kv_heads,
            bias=config.bias,
            dropout=config.dropout,
            rope=config.pos == "rope",
            rope_theta=config.rope_theta,
            max_seq_len=config.context,
        )
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache)  # (B, T, C)
        x = x + self.mlp(self.norm2(x))  # (B, T, C)
        return x


class TransformerLM(nn.Module):
    """Decoder-only Transformer LM. ``forward(idx, targets=None) -> (logits, loss)``.

    ``activation_checkpointing = True`` (``train.activation_checkpointing``) keeps only each
    block's input from the forward pass when gradients are being recorded and recomputes the
    block in backward (``torch.utils.checkpoint``, non-reentrant, RNG state restored so
    dropout masks repeat): activation memory per block drops from every intermediate to one
    (B, T, d_model) tensor for about one more forward pass of compute.

    ``fused_loss = True`` (``train.fused_cross_entropy``): ``forward(idx, targets)`` computes
    the loss with the fused linear cross-entropy op and returns ``(None, loss)``, never
    holding the (B, T, vocab) logits; without targets it returns the logits as usual.
    """

    arch = "transformer"

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = (
            nn.Embedding(config.context, config.d_model) if config.pos == "learned" else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.activation_checkpointing = False
        self.fused_loss = False
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one tensor, two uses
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) for linear and embedding weights, zero biases, unit norm
        gains; the projections that write into the residual stream (attention ``proj``, MLP
        ``proj``) use std 0.02 / sqrt(2 * n_layer) so the residual's variance stays bounded."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (LayerNorm, RMSNorm, RotaryEmbedding)):
                module.reset_parameters()
        residual_std = INIT_STD / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    # -----------------------------------------------------------------------------------------
    # training / evaluation

    def _check_len(self, T: int, what: str) -> None:
        if T > self.config.context:
            raise InputError(
                f"{what} of {T} tokens exceeds the model's context={self.config.context} "
                "(crop the input to the last `context` tokens)"
            )

    def _trunk(self, idx: torch.Tensor, state: list[KVCache] | None) -> torch.Tensor:
        """Token ids (B, T) -> final-norm hidden states (B, T, C)."""
        B, T = idx.size()
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            start = state[0].length if state else 0
            pos = torch.arange(start, start + T, device=idx.device)  # (T,)
            x = x + self.pos_emb(pos)  # (B, T, C)
        x = self.drop(x)
        recompute = self.activation_checkpointing and state is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, state[i] if state is not None else None)  # (B, T, C)
        return self.norm(x)  # (B, T, C)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, T) int64, T <= context -> logits (B, T, V) and the mean cross-entropy
        against ``targets`` (B, T) int64 (entries -100 ignored), or None without targets.

        Token ids are not range-checked here (that would synchronise with the GPU).
        """
        check_idx(idx)
        self._check_len(idx.size(1), "idx")
        hidden = self._trunk(idx, None)  # (B, T, C)
        if self.fused_loss and targets is not None:
            return None, fused_lm_loss(hidden, self.lm_head, targets, idx)
        logits = self.lm_head(hidden)  # (B, T, V)
        return logits, lm_loss(logits, targets, idx)

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) -> the final-norm hidden states (B, T, d_model) that ``lm_head`` reads
        (``forward``'s logits are ``lm_head(hidden_states(idx))``); used by fine-tuning heads."""
        check_idx(idx)
        self._check_len(idx.size(1), "idx")
        return self._trunk(idx, None)  # (B, T, C)

    # -----------------------------------------------------------------------------------------
    # generation

    @property
    def max_context(self) -> int:
        """The most tokens one state can hold (generation crops to this)."""
        return self.config.context

    def init_state(self, batch_size: int, max_len: int | None = None) -> list[KVCache]:
        """One empty ``KVCache`` per layer, for up to ``max_len`` (default ``context``)
        positions. Buffers are allocated on the first ``step``."""
        max_len = self.config.context if max_len is None else max_len
        if not isinstance(max_len, int) or not 1 <= max_len <= self.config.context:
            raise InputError(
                f"max_len must be an int in [1, context={self.config.context}], got {max_len!r}"
            )
        return [block.attn.new_cache(batch_size, max_len) for block in self.blocks]

    def step(self, idx: torch.Tensor, state: list[KVCache]):
        """Run the next tokens ``idx`` (B, t) after those already in ``state`` (updated in
        place and returned): -> (logits (B, t, V), state). Use under ``torch.no_grad()``."""
        check_idx(idx)
        if not isinstance(state, list) or len(state) != len(self.blocks):
            raise InputError(f"state must be the list of {len(self.blocks)} caches from init_state")
        t, cache = idx.size(1), state[0]
        if t > cache.remaining:
            raise InputError(
                f"step: {t} new tokens do not fit the state ({cache.length} of max_len="
                f"{cache.max_len} used; context={self.config.context})"
            )
        logits = self.lm_head(self._trunk(idx, state))  # (B, t, V)
        return logits, state

    # -----------------------------------------------------------------------------------------
    # accounting

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters, tied ones counted once. ``exclude_embeddings`` leaves out the
        lookup-only tables: position embeddings, and the token embedding unless it is tied to
        the LM head (then it is a matmul weight and counts)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward), the PaLM / nanoGPT estimate:

            6 * N + 12 * n_layer * d_model * context

        N = ``num_params(exclude_embeddings=True)``: each weight does one multiply-add (2 FLOPs)
        per token forward and twice that backward. The second term is attention's QK^T and
        AV products (2 * 2 * context * d_model forward per layer, times 3), counted over the
        full context as PaLM does (a causal kernel does about half). GQA does not change it.
        """
        c = self.config
        return 6 * self.num_params(exclude_embeddings=True) + 12 * c.n_layer * c.d_model * c.context

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Param groups as nanoGPT: decay on >= 2-D weights (matmuls, embeddings), none on
        biases and norm gains."""
        return optimizer_groups(self, weight_decay)
