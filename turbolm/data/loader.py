"""Token loaders over a prepared folder: random training windows and sequential val windows.

A window of T+1 consecutive ids gives one row: x = ids[:T], y = ids[1:], so y[t] is the
token that follows x[t]. Windows cross document boundaries freely; the eot id between
documents tells the model where one ends.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import numpy as np
import torch

from turbolm.data.prepare import SPLIT_FILES, TOKENIZER_FILE, read_meta
from turbolm.data.tokenizer import Tokenizer
from turbolm.errors import DataError, InputError


class TokenData:
    """A prepared data folder (see `prepare`), opened read-only.

    .train, .val  1-D np.memmap of ids (dtype from meta.json: uint16 or uint32)
    .meta         the meta.json dict
    .vocab_size   int
    .tokenizer    the `Tokenizer` (loaded on first use: training workers never need it)
    """

    def __init__(self, data_dir: str):
        self.data_dir = os.fspath(data_dir)
        self.meta = read_meta(self.data_dir)  # DataError "not a prepared data folder: ..."
        self.vocab_size = int(self.meta["vocab_size"])
        self.dtype = np.dtype(self.meta["dtype"])
        self.train = self._open(SPLIT_FILES["train"])
        self.val = self._open(SPLIT_FILES["val"])

    def _open(self, fname: str) -> np.ndarray:
        path = os.path.join(self.data_dir, fname)
        if os.path.getsize(path) == 0:  # numpy cannot memory-map an empty file
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(os.path.join(self.data_dir, TOKENIZER_FILE))

    def __repr__(self) -> str:
        return (
            f"TokenData({self.data_dir!r}, vocab_size={self.vocab_size}, "
            f"train={self.train.size} tokens, val={self.val.size} tokens)"
        )


def _check_window(tokens: np.ndarray, batch_size: int, context: int, what: str) -> None:
    if tokens.ndim != 1:
        raise InputError(f"{what} tokens must be 1-D, got shape {tokens.shape}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(context, int) or context < 1:
        raise InputError(f"context must be a positive int, got {context!r}")
    if tokens.size < context + 1:
        raise DataError(
            f"{what} split has {tokens.size} tokens, fewer than context + 1 = {context + 1}: "
            "use a smaller context or more data"
        )


def _check_rank(rank: int, world_size: int) -> None:
    if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise InputError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _check_seed(seed: int) -> None:
    # numpy's SeedSequence takes non-negative ints only.
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed must be a non-negative int, got {seed!r}")


def _rows_to_xy(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) ids of any int dtype -> x, y int64 tensors (B, T), y shifted by one."""
    rows = torch.from_numpy(np.array(rows, dtype=np.int64))  # (B, T+1), plain ndarray copy
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class TrainBatches:
    """Endless random training batches: each row a window at a uniform random start.

    Batch number `step` is drawn from its own generator, seeded by (seed, rank, step), so:
    * the same seed gives the same batches, on any machine;
    * each rank draws an independent stream (batches differ across ranks);
    * the state is just (seed, step): resuming is exact and costs nothing. Every rank
      steps in lockstep, so rank 0's state restores all ranks (the rank is not part of it).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        context: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        _check_window(tokens, batch_size, context, "train")
        _check_rank(rank, world_size)
        _check_seed(seed)
        self.tokens = tokens
        self.batch_size = batch_size
        self.context = context
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.step = 0  # batches drawn so far

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (batch_size, context) int64 CPU tensors; y[:, t] == x[:, t+1] within a row."""
        rng = np.random.default_rng([self.seed, self.rank, self.step])
        # Start s is valid when s + context + 1 <= len(tokens); integers() excludes `high`.
        starts = rng.integers(0, self.tokens.size - self.context, size=self.batch_size)
        rows = self.tokens[starts[:, None] + np.arange(self.context + 1)]  # (B, T+1)
        self.step += 1
        return _rows_to_xy(rows)

    __next__ = next

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        try:
            seed, step = int(state["seed"]), int(state["step"])
        except (KeyError, TypeError, ValueError):
            raise InputError(
                f"TrainBatches state must have int 'seed' and 'step', got {state!r}"
            ) from None
        if step < 0:
            raise InputError(f"TrainBatches state step must be >= 0, got {step}")
        _check_seed(seed)
        self.seed, self.step = seed, step


def val_batches(
    tokens: np.ndarray,
    batch_size: int,
    context: int,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Walk `tokens` in order as non-overlapping windows; yield x, y (B, T) int64.

    Window i covers ids[i*T : i*T + T + 1] (targets reach one id into the next window), so
    every id after the first is predicted exactly once. The last batch may have fewer than
    `batch_size` rows; ids after the last full window (fewer than T) are dropped, never
    padded. Batch j belongs to rank j % world_size; `max_batches` caps the total over all
    ranks (ranks may then get one batch fewer than others: reduce sums, not per-batch).
    Raises DataError (eagerly) if `tokens` is shorter than context + 1.
    """
    _check_window(tokens, batch_size, context, "val")
    _check_rank(rank, world_size)
    n_windows = (tokens.size - 1) // context
    n_batches = -(-n_windows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    return _val_iter(tokens, batch_size, context, n_windows, n_batches, rank, world_size)


def _val_iter(tokens, batch_size, context, n_windows, n_batches, rank, world_size):
    offsets = np.arange(context + 1)
    for j in range(rank, n_batches, world_size):
        first = j * batch_size
        starts = np.arange(first, min(first + batch_size, n_windows)) * context
        yield _rows_to_xy(tokens[starts[:, None] + offsets])  # (b, T+1) -> (b, T) x2
