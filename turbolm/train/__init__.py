"""Training: trainer, atomic checkpoints, schedules."""

from turbolm.train.checkpoint import (
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)

__all__ = [
    "find_latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_weights",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "verify_checkpoint",
]
