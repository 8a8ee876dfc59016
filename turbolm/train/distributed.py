"""Data-parallel training through DeepSpeed (ZeRO stages 0-3) on GPUs or CPU ranks.

The trainer (``turbolm/train/trainer.py``) stays one loop; this module holds what changes when
``train.deepspeed`` names a DeepSpeed JSON config or a launcher started several processes:

* **Launch environment** (``launch_env``): ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as set by
  ``torchrun`` and the ``deepspeed`` launcher, or ``SLURM_PROCID`` / ``SLURM_NTASKS`` /
  ``SLURM_LOCALID`` for ``srun`` with one task per device. A plain ``turbolm train`` is world
  size 1 and needs no launcher, with or without DeepSpeed.
* **DeepSpeed config** (``resolve_ds_config``): the JSON is read, checked (ZeRO stage 0-3,
  offload devices) and every ``"auto"`` is filled from the run config, so the run YAML stays the
  one source of truth: micro batch = ``train.batch_size`` (per rank), gradient accumulation =
  ``train.grad_accum``, global batch = both times the world size, ``gradient_clipping`` =
  ``train.grad_clip``, ``bf16``/``fp16`` from ``train.precision``, AdamW ``lr``/``betas``/
  ``weight_decay`` (``eps`` 1e-8) and the ZeRO-3 bucket sizes from the model width. An explicit
  value that contradicts the run config is an error rather than a silent winner.
* **Optimizer and schedule**: with an ``"optimizer"`` block DeepSpeed builds it (turbolm's
  weight-decay parameter groups are passed in; ``"torch_adam": true`` gives
  ``torch.optim.AdamW``; with ZeRO-Offload DeepSpeed uses its CPU Adam); without one, turbolm's
  own ``torch.optim.AdamW`` is the client optimizer. The learning-rate schedule is always
  turbolm's warm-up + cosine ``LambdaLR``, handed to DeepSpeed as a client scheduler (DeepSpeed
  steps it and checkpoints it), so a DeepSpeed run follows exactly the single-process schedule;
  a ``"scheduler"`` block in the JSON is refused (one schedule, one place to set it).
* **Collectives** used by the trainer: averaged train loss, evaluation sums and counts, the
  "stop now" flag after SIGINT/SIGTERM, broadcasts of rank 0's decisions (run folder, resume
  point) with errors re-raised on every rank. On gloo each of them returns only once the gloo
  worker thread has let go of its buffers, and a job that ran to completion ends with a barrier
  (``DeepSpeedRuntime.finish_job``), so that no rank enters interpreter shutdown while a gloo
  thread still has to take the GIL.
* **Checkpoints** (``DeepSpeedRuntime.save`` / ``load``): ``engine.save_checkpoint`` into a
  hidden temporary folder, every rank fsyncs, barrier, then rank 0 writes ``config.json``,
  ``tokenizer.json``, ``trainer_state.pt`` (data position, every rank's RNG state, early
  stopping), hashes the files (shared over the ranks), writes ``COMPLETE`` last and renames the
  folder to ``checkpoints/step_XXXXXXXX`` -- the same guarantee as single-process checkpoints: a
  ``step_*`` folder with a valid marker is complete, anything else is ignored on resume.
* **Consolidation** (``consolidate``): DeepSpeed's ``zero_to_fp32`` rebuilds the full fp32
  weights from the ZeRO shards into one ``model.safetensors`` + ``config.json`` +
  ``tokenizer.json`` that ``turbolm eval`` / ``generate`` load. The last checkpoint of every
  DeepSpeed run is consolidated in place (it is then also a normal turbolm checkpoint).

Run-folder layout of a DeepSpeed checkpoint::

    checkpoints/step_00000200/
        deepspeed/          engine.save_checkpoint(tag="deepspeed"): model + ZeRO shards per rank
        zero_to_fp32.py     DeepSpeed's offline consolidation script (copied by DeepSpeed)
        config.json         {"run", "model", "deepspeed": {"world_size", "zero_stage", "config"}, ...}
        tokenizer.json
        trainer_state.pt    step, data position, RNG state of every rank, early-stopping state
        model.safetensors   only in consolidated checkpoints (the last one of a run)
        COMPLETE            {"kind": "deepspeed", "files": {relative path: size, sha256}, ...}

Models need nothing DeepSpeed-specific (model code never imports deepspeed). Under ZeRO-3 every
parameter is gathered by the pre-forward hook of the module that owns it, and turbolm's models
only read a weight inside its owner's forward (the tied LM head is the ``lm_head`` module's own
parameter; RNN weights are read by the LSTM/GRU module itself), so no
``register_external_parameter`` is needed; ``register_external_parameters`` below is there for
models that do. ``torch.nn.RNNBase.flatten_parameters`` is switched off on DeepSpeed models
(see ``disable_rnn_flattening``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from turbolm.config import RunConfig, read_config_text
from turbolm.data.loader import val_batches
from turbolm.errors import CheckpointError, ConfigError, DataError, InputError, TurboLMError
from turbolm.train.checkpoint import (
    CHECKPOINTS_DIR,
    COMPLETE_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    TRAINER_FILE,
    _delete_checkpoint,
    _fsync_path,
    _install,
    _plain,
    _remove_stale,
    _remove_tree,
    _save_model_state,
    _save_trainer_state,
    _sha256,
    _step_dirs,
    _turbolm_version,
    _write_json,
    step_dir_name,
)

DS_TAG = "deepspeed"  # the engine's tag folder inside a step folder
DS_KIND = "deepspeed"
ZERO_STAGES = (0, 1, 2, 3)
AUTO = "auto"
ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which the single-process trainer uses
OFFLOAD_DEVICES = ("cpu", "nvme", "none")

__all__ = [
    "LaunchEnv",
    "launch_env",
    "read_ds_json",
    "resolve_ds_config",
    "DeepSpeedRuntime",
    "is_ds_checkpoint",
    "verify_ds_checkpoint",
    "find_latest_resumable",
    "consolidate",
    "parse_hostfile",
    "disable_rnn_flattening",
    "register_external_parameters",
]


# ---------------------------------------------------------------------------------------------
# Launch environment
# ---------------------------------------------------------------------------------------------


@dataclass
class LaunchEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"  # "torchrun/deepspeed" (RANK...), "slurm", "none"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, env: dict) -> int:
    raw = env.get(name, "")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def launch_env(env: dict | None = None) -> LaunchEnv:
    """Read the rank layout set by a launcher (``os.environ`` by default).

    ``torchrun`` and the ``deepspeed`` launcher export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
    (and ``MASTER_ADDR``/``MASTER_PORT``). ``srun`` with one task per device exports
    ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; those are copied to ``RANK``/... (in
    ``os.environ`` too, for ``torch.distributed``'s ``env://``), and ``MASTER_ADDR`` must then
    be set by the batch script (``scripts/launch/slurm.sbatch`` uses torchrun instead).
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        world, rank = _env_int("WORLD_SIZE", env), _env_int("RANK", env)
        local = _env_int("LOCAL_RANK", env) if "LOCAL_RANK" in env else rank
        launcher = "torchrun/deepspeed"
    elif "SLURM_NTASKS" in env and "SLURM_PROCID" in env and _env_int("SLURM_NTASKS", env) > 1:
        world, rank = _env_int("SLURM_NTASKS", env), _env_int("SLURM_PROCID", env)
        local = _env_int("SLURM_LOCALID", env) if "SLURM_LOCALID" in env else 0
        if "MASTER_ADDR" not in env:
            raise ConfigError(
                "running under srun with several tasks but MASTER_ADDR is not set: export "
                "MASTER_ADDR (the first node) and MASTER_PORT, or launch with "
                "scripts/launch/slurm.sbatch (torchrun on every node)"
            )
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        env.setdefault("MASTER_PORT", "29500")
        launcher = "slurm"
    else:
        return LaunchEnv()
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"bad launch environment: rank {rank}, world size {world}, local {local}")
    return LaunchEnv(rank=rank, world_size=world, local_rank=local, launcher=launcher)


def restarted_by_elastic_agent(env: dict | None = None) -> bool:
    """True in a worker that ``torchrun --max-restarts`` restarted (it must resume, not start
    over: the run folder already holds the first attempt)."""
    env = os.environ if env is None else env
    try:
        return int(env.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False


def _init_elastic_process_group(backend: str | None, rank: int, world_size: int) -> None:
    """Under torchrun's shared rendezvous store, start the process group on a per-attempt key
    prefix (no-op otherwise: DeepSpeed then starts it from the environment).

    With c10d rendezvous, torchrun (torch 2.4+) hands the workers of every restart attempt the
    same TCPStore and torch no longer prefixes worker keys per attempt, so after
    ``--max-restarts`` a new rank can read the gloo/NCCL address its dead predecessor
    published and fail with "connection refused". Prefixing the keys with
    ``TORCHELASTIC_RESTART_COUNT`` gives each attempt a clean namespace.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    from datetime import timedelta

    timeout = timedelta(minutes=30)
    if backend is None:
        from deepspeed.accelerator import get_accelerator

        backend = get_accelerator().communication_backend_name()
    store = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timeout,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    torch.distributed.init_process_group(
        backend,
        store=torch.distributed.PrefixStore(f"turbolm/attempt_{attempt}", store),
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )


def _pickled(obj: Any, device: torch.device) -> torch.Tensor:
    """``obj`` pickled into a uint8 tensor on ``device`` (for the object collectives)."""
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)


def _unpickled(t: torch.Tensor) -> Any:
    return pickle.loads(t.cpu().numpy().tobytes())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# DeepSpeed JSON config
# ---------------------------------------------------------------------------------------------


def read_ds_json(path: str | Path) -> dict[str, Any]:
    """Parse a DeepSpeed JSON config file; ``ConfigError`` with the position of a syntax error."""
    p = Path(path)
    text = read_config_text(p, "train.deepspeed: DeepSpeed config")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"train.deepspeed: {str(p)!r} is not valid JSON: {e.msg} at line {e.lineno}, "
            f"column {e.colno}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"train.deepspeed: {str(p)!r} must hold a JSON object, got {type(data).__name__}"
        )
    return data


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


class _Filler:
    """Fills ``"auto"`` (or missing) keys; an explicit value must agree with the run config."""

    def __init__(self, where: str):
        self.where = where

    def __call__(self, d: dict, key: str, value: Any, source: str, dotted: str = "") -> None:
        name = dotted or key
        current = d.get(key, AUTO)
        if current == AUTO:
            d[key] = value
        elif not _same(current, value):
            raise ConfigError(
                f"{self.where}: {name} is {current!r} but {source} gives {value!r}; set it to "
                f'"auto" (filled from the run config) or to {value!r}'
            )


def _section(d: dict, key: str, where: str) -> dict:
    value = d.setdefault(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key!r} must be a JSON object, got {value!r}")
    return value


def _check_zero(zero: dict, where: str) -> int:
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in ZERO_STAGES:
        raise ConfigError(
            f"{where}: zero_optimization.stage must be 0, 1, 2 or 3 (ZeRO stage {stage!r} does "
            "not exist)"
        )
    for key, min_stage in (("offload_optimizer", 1), ("offload_param", 3)):
        block = zero.get(key)
        if block is None:
            continue
        if not isinstance(block, dict):
            raise ConfigError(f"{where}: zero_optimization.{key} must be a JSON object")
        device = block.get("device", "none")
        if device not in OFFLOAD_DEVICES:
            raise ConfigError(
                f"{where}: zero_optimization.{key}.device must be one of "
                f"{', '.join(OFFLOAD_DEVICES)}, got {device!r}"
            )
        if device != "none" and stage < min_stage:
            raise ConfigError(
                f"{where}: zero_optimization.{key} needs ZeRO stage >= {min_stage}, "
                f"the config has stage {stage}"
            )
        if device == "nvme" and not block.get("nvme_path"):
            raise ConfigError(f"{where}: zero_optimization.{key} on nvme needs an nvme_path")
    return stage


def _leftover_autos(d: Any, prefix: str = "") -> list[str]:
    if isinstance(d, dict):
        return [k for key, v in d.items() for k in _leftover_autos(v, f"{prefix}{key}.")]
    if isinstance(d, list):
        return [k for i, v in enumerate(d) for k in _leftover_autos(v, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if d == AUTO else []


def model_width(cfg: RunConfig) -> int:
    """The hidden size used to size ZeRO-3 buckets (HF Trainer's rule)."""
    m = cfg.model
    return m.d_model if m.arch == "transformer" else max(m.d_model, m.d_hidden)


def resolve_ds_config(
    raw: dict[str, Any],
    cfg: RunConfig,
    world_size: int,
    precision: str,
    where: str = "train.deepspeed",
) -> dict[str, Any]:
    """A copy of the DeepSpeed config ``raw`` with ``"auto"`` values filled from ``cfg`` and
    checked against it; see the module docstring for the mapping. Raises ``ConfigError``."""
    ds = json.loads(json.dumps(raw))  # deep copy of plain JSON
    tc = cfg.train
    fill = _Filler(where)
    fill(ds, "train_micro_batch_size_per_gpu", tc.batch_size, "train.batch_size")
    fill(ds, "gradient_accumulation_steps", tc.grad_accum, "train.grad_accum")
    fill(
        ds,
        "train_batch_size",
        tc.batch_size * tc.grad_accum * world_size,
        f"train.batch_size x train.grad_accum x world size {world_size}",
    )
    fill(ds, "gradient_clipping", float(tc.grad_clip), "train.grad_clip")
    if "bfloat16" in ds and "bf16" not in ds:
        ds["bf16"] = ds.pop("bfloat16")
    for key in ("bf16", "fp16"):
        block = _section(ds, key, where)
        fill(block, "enabled", precision == key, f"train.precision (resolved: {precision})",
             f"{key}.enabled")  # fmt: skip
    zero = _section(ds, "zero_optimization", where)
    stage = _check_zero(zero, where)
    width = model_width(cfg)
    for key, value in (
        ("reduce_bucket_size", width * width),
        ("stage3_prefetch_bucket_size", int(0.9 * width * width)),
        ("stage3_param_persistence_threshold", 10 * width),
    ):
        if zero.get(key) == AUTO:
            zero[key] = value
    if "optimizer" in ds:
        opt = ds["optimizer"]
        if not isinstance(opt, dict) or not isinstance(opt.get("type"), str):
            raise ConfigError(f'{where}: "optimizer" must be an object with a "type" string')
        if opt["type"].lower() not in ("adamw", "adam"):
            raise ConfigError(
                f"{where}: optimizer type {opt['type']!r} is not supported: turbolm trains with "
                'AdamW; use "AdamW" or leave the optimizer out (turbolm passes its own AdamW)'
            )
        params = _section(opt, "params", where)
        fill(params, "lr", tc.lr, "train.lr", "optimizer.params.lr")
        fill(params, "betas", [tc.beta1, tc.beta2], "train.beta1/beta2", "optimizer.params.betas")
        fill(params, "weight_decay", tc.weight_decay, "train.weight_decay",
             "optimizer.params.weight_decay")  # fmt: skip
        if params.get("eps", AUTO) == AUTO:
            params["eps"] = ADAM_EPS
    if "scheduler" in ds:
        raise ConfigError(
            f'{where}: remove the "scheduler" block: turbolm always uses its own warm-up + cosine '
            "schedule (train.lr, train.warmup_steps, train.min_lr_ratio, train.max_steps) and "
            "hands it to DeepSpeed as a client scheduler"
        )
    ds.setdefault("steps_per_print", 2**31 - 1)  # turbolm logs progress itself
    ds.setdefault("wall_clock_breakdown", False)
    left = _leftover_autos(ds)
    if left:
        raise ConfigError(
            f'{where}: turbolm cannot fill "auto" for {", ".join(left)}; give explicit values'
        )
    if stage == 0 and zero.get("offload_optimizer"):
        raise ConfigError(f"{where}: offload_optimizer needs ZeRO stage >= 1")
    return ds


def ds_config_from_train(cfg: RunConfig, world_size: int, precision: str) -> dict[str, Any]:
    """The resolved DeepSpeed config of a run: ``train.deepspeed`` read and filled, or plain
    data parallelism (ZeRO stage 0) for a multi-process run that names no config."""
    path = cfg.train.deepspeed.strip()
    if path:
        raw, where = read_ds_json(path), f"train.deepspeed ({path})"
    else:
        raw, where = {"zero_optimization": {"stage": 0}}, "default DeepSpeed config"
    return resolve_ds_config(raw, cfg, world_size, precision, where)


# ---------------------------------------------------------------------------------------------
# Model preparation
# ---------------------------------------------------------------------------------------------


def _no_flatten() -> None:
    """Replacement for ``RNNBase.flatten_parameters`` on DeepSpeed models (see below)."""


def disable_rnn_flattening(model: torch.nn.Module) -> int:
    """Make ``flatten_parameters`` a no-op on every ``torch.nn`` RNN inside ``model``.

    On CUDA, ``flatten_parameters`` (called by ``Module._apply``: ``.to()``, ``.cuda()``,
    ``.half()``) copies the RNN weights into one new cuDNN buffer and re-points every
    parameter's ``.data`` at a view of it. DeepSpeed owns parameter storage: ZeRO-1/2 keep the
    (16-bit) weights as views into their own flat buffers and ZeRO-3 swaps ``.data`` between a
    partition and the gathered tensor. A later flatten would silently detach the weights the
    optimizer updates from those the forward reads. turbolm's RNN modules pass their weights to
    the op on every call and never use the cuDNN buffer, so flattening buys nothing here.
    Returns the number of modules changed.
    """
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.RNNBase):
            module.flatten_parameters = _no_flatten  # instance attribute shadows the method
            n += 1
    return n


def register_external_parameters(model: torch.nn.Module, uses: Iterable[tuple]) -> None:
    """For ZeRO-3: declare ``(module, parameter)`` pairs where ``module``'s forward reads a
    parameter owned by another module (e.g. ``F.linear(x, self.embed.weight)`` in a head).
    turbolm's models need none; a model can list its pairs in ``zero3_external_parameters()``."""
    import deepspeed

    for module, param in uses:
        deepspeed.zero.register_external_parameter(module, param)


# ---------------------------------------------------------------------------------------------
# The runtime
# ---------------------------------------------------------------------------------------------


def _quiet_deepspeed() -> None:
    """DeepSpeed logs its whole config at INFO on every rank; turbolm logs what matters."""
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    warnings.filterwarnings(
        "ignore",
        message=r".*is deprecated\. Please use `torch\.distributed",
        category=FutureWarning,
    )


class DeepSpeedRuntime:
    """One process's handle on a DeepSpeed job: process group, engine, collectives, checkpoints."""

    def __init__(self, env: LaunchEnv, ds_config: dict[str, Any], device: torch.device):
        self.env = env
        self.rank = env.rank
        self.world_size = env.world_size
        self.is_main = env.rank == 0
        self.ds_config = ds_config
        self.device = device
        self.stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.engine = None
        self._universal = False  # resuming a ZeRO-1/2 checkpoint written by another world size
        self._settle: bool | None = None  # wait for gloo to release buffers (see _settled)

    # ------------------------------------------------------------------ process group

    def init_process_group(self) -> None:
        if self.device.type == "cpu":
            # DeepSpeed picks its accelerator once, at first use: on CPU ranks it must be "cpu"
            # (gloo for collectives) even when the machine has a GPU.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if not self.env.distributed and "MASTER_ADDR" not in os.environ:
            # DeepSpeed wants a process group even for one process: a private local one.
            os.environ.update(
                RANK="0",
                WORLD_SIZE="1",
                LOCAL_RANK="0",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()),
            )
        import deepspeed
        import deepspeed.ops

        _quiet_deepspeed()
        # DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce used only by its
        # inference kernels (minutes on a fresh machine); training uses torch.distributed.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        backend = "gloo" if self.device.type == "cpu" else None
        if not torch.distributed.is_initialized():
            _init_elastic_process_group(backend, self.rank, self.world_size)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # idempotent
        if torch.distributed.get_world_size() != self.world_size:
            raise ConfigError(
                f"process group has {torch.distributed.get_world_size()} ranks but the launch "
                f"environment says {self.world_size}"
            )

    def finish_job(self) -> None:
        """Orderly end of a job that ran to completion: every rank calls it last.

        Why: torch hands a collective to a gloo worker thread, which drops its references to
        the tensors after the collective completed (the caller may already be running on), and
        dropping a reference to a tensor that has a Python object takes the GIL
        (``TensorImpl::decref_pyobject``). The process groups are never destroyed (DeepSpeed
        keeps references to them, so ``destroy_process_group`` would not join the threads
        either), and a thread that asks for the GIL once the interpreter has begun to finalize
        is ended with ``pthread_exit``, whose unwinding through that ``noexcept`` destructor
        calls ``std::terminate``: "terminate called without an active exception", SIGABRT
        from a rank whose run had finished, now and then, when a rank left right after its
        last collective. Hence: every collective of this runtime returns only once gloo has
        let go of its buffers (``_settled``), and the job ends with this barrier (no tensors),
        during which the GIL is free for any gloo thread still releasing an earlier one
        (DeepSpeed's); no rank leaves while another is still inside a collective.
        """
        self.barrier()

    def barrier(self) -> None:
        torch.distributed.barrier()

    def _settled(self, *tensors: torch.Tensor) -> None:
        """Wait until the gloo worker thread has dropped its references to ``tensors`` (ours
        is then the only one left), sleeping so that it can take the GIL (see ``finish_job``).
        Typically 0-1 polls of 0.1 ms; should another reference ever linger, stop waiting for
        good. Not with NCCL, whose watchdog thread releases finished work up to ~0.1 s later."""
        if self._settle is None:
            self._settle = torch.distributed.get_backend() == "gloo" and hasattr(
                torch.Tensor, "_use_count"
            )
        if not self._settle:
            return
        deadline = time.monotonic() + 0.5
        while any(t._use_count() > 1 for t in tensors):
            if time.monotonic() > deadline:
                self._settle = False
                return
            time.sleep(1e-4)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; our own buffers, see ``_settled``)."""
        dev = self._comm_device()
        data = _pickled(obj, dev) if self.is_main else None
        size = torch.tensor([0 if data is None else data.numel()], dtype=torch.int64, device=dev)
        torch.distributed.broadcast(size, src=0)
        self._settled(size)
        if data is None:
            data = torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
        torch.distributed.broadcast(data, src=0)
        self._settled(data)
        return obj if self.is_main else _unpickled(data)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (pickled; our own buffers, see ``_settled``)."""
        dev = self._comm_device()
        data = _pickled(obj, dev)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=dev)
        sizes = [torch.empty_like(size) for _ in range(self.world_size)]
        torch.distributed.all_gather(sizes, size)
        self._settled(size, *sizes)
        lengths = [int(n.item()) for n in sizes]
        padded = torch.zeros(max(lengths), dtype=torch.uint8, device=dev)  # same size on all
        padded[: data.numel()] = data
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch.distributed.all_gather(out, padded)
        self._settled(padded, *out)
        return [_unpickled(t[:n]) for t, n in zip(out, lengths)]

    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(t)
        self._settled(t)
        return t.tolist()

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 and give its result to every rank. A turbolm error raised by
        ``fn`` is raised on every rank (same type and message), so no rank waits forever in
        a collective that the others skipped."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except TurboLMError as e:
                error = (type(e).__name__, str(e))
            except BaseException as e:
                self.broadcast((None, ("TurboLMError", f"rank 0 failed: {e!r}")))
                raise
        result, error = self.broadcast((result, error))
        if error is not None:
            import turbolm.errors as errors

            raise getattr(errors, error[0], TurboLMError)(error[1])
        return result

    # ------------------------------------------------------------------ engine

    def initialize(self, model: torch.nn.Module, groups: list[dict], make_optimizer, lr_lambda):
        """Wrap ``model`` in a DeepSpeed engine. ``groups`` are the weight-decay parameter
        groups (built before ZeRO-3 partitions the parameters and hides their shapes);
        ``make_optimizer(groups)`` gives the client optimizer when the config has none."""
        import deepspeed

        disable_rnn_flattening(model)
        if self.stage == 3 and hasattr(model, "zero3_external_parameters"):
            register_external_parameters(model, model.zero3_external_parameters())
        optimizer = None if "optimizer" in self.ds_config else make_optimizer(groups)

        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

        try:
            engine, _, _, _ = deepspeed.initialize(
                model=model,
                optimizer=optimizer,
                model_parameters=groups if optimizer is None else None,
                lr_scheduler=scheduler,
                config=self.ds_config,
                dist_init_required=False,
            )
        except (ValueError, TypeError, AssertionError) as e:
            raise ConfigError(f"DeepSpeed rejected the config: {_one_line(e)}") from e
        except Exception as e:  # pydantic's ValidationError without importing pydantic
            if type(e).__name__ == "ValidationError":
                raise ConfigError(f"DeepSpeed rejected the config: {_one_line(e)}") from e
            raise
        self.engine = engine
        return engine

    def describe(self) -> str:
        ds = self.ds_config
        zero = ds.get("zero_optimization", {})
        off = [
            f"{k.split('_')[1]}->{zero[k].get('device')}"
            for k in ("offload_optimizer", "offload_param")
            if isinstance(zero.get(k), dict) and zero[k].get("device", "none") != "none"
        ]
        opt = type(self.engine.basic_optimizer).__name__ if self.engine else "?"
        return (
            f"DeepSpeed ZeRO-{self.stage} on {self.world_size} rank(s) "
            f"({torch.distributed.get_backend()}), micro batch "
            f"{ds['train_micro_batch_size_per_gpu']} x accumulation "
            f"{ds['gradient_accumulation_steps']} x {self.world_size} = global batch "
            f"{ds['train_batch_size']}, optimizer {opt}"
            + (f", offload {' '.join(off)}" if off else "")
        )

    def train_step(self, batches, grad_accum: int, stop_requested: bool):
        """One optimizer step (``grad_accum`` micro-batches on every rank). Returns the loss
        averaged over all ranks and micro-batches, the global grad norm (nan when DeepSpeed
        did not compute one) and whether any rank asked to stop."""
        engine = self.engine
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for _ in range(grad_accum):
            x, y = batches.next()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            _, loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            total += loss.detach().double()
        loss_sum, count, stops = self.all_sum(
            [float(total), float(grad_accum), float(stop_requested)]
        )
        norm = engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        return loss_sum / count, norm, stops > 0

    def lr(self) -> float:
        return float(self.engine.lr_scheduler.get_last_lr()[0])

    @torch.no_grad()
    def evaluate(
        self, tokens: np.ndarray, *, batch_size: int, context: int, max_batches: int | None
    ) -> dict[str, float]:
        """``evaluate_lm`` over all ranks: val batch j runs on rank j % world_size and the
        loss sums, correct counts and token counts are summed over ranks, so the result equals
        a single-process evaluation of the same batches. Under ZeRO-3 a rank with one batch
        fewer runs a throw-away forward so every rank joins every parameter gather."""
        if len(tokens) < 2:
            raise DataError(f"evaluation needs at least 2 tokens, got {len(tokens)}")
        context = min(context, len(tokens) - 1)
        n_windows = (len(tokens) - 1) // context
        n_batches = -(-n_windows // batch_size)
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        rounds = -(-n_batches // self.world_size)
        engine = self.engine
        was_training = engine.module.training
        engine.eval()
        loss_sum, correct, count = 0.0, 0, 0
        mine = val_batches(tokens, batch_size, context, max_batches, self.rank, self.world_size)
        try:
            for _ in range(rounds):
                batch = next(mine, None)
                if batch is None:
                    if self.stage == 3:
                        engine(torch.zeros(1, context, dtype=torch.long, device=self.device))
                    continue
                x, y = batch[0].to(self.device), batch[1].to(self.device)
                logits, _ = engine(x)
                logits = logits.float()  # (B, T, V)
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
                loss_sum += loss.item()
                correct += int((logits.argmax(dim=-1) == y).sum().item())
                count += y.numel()
        finally:
            engine.train(was_training)
        loss_sum, correct, count = self.all_sum([loss_sum, float(correct), float(count)])
        if count == 0:
            raise DataError("evaluation saw no tokens")
        mean = loss_sum / count
        return {
            "loss": mean,
            "perplexity": math.exp(min(mean, 700.0)),
            "accuracy": correct / count,
            "tokens": int(count),
        }

    # ------------------------------------------------------------------ checkpoints

    def save(
        self,
        run_dir: Path,
        step: int,
        config: dict[str, Any],
        trainer_state: dict[str, Any],
        rng: dict[str, Any],
        tokenizer_path: str | None,
        keep: int,
        consolidate_weights: bool,
    ) -> Path:
        """Atomically write ``run_dir/checkpoints/step_XXXXXXXX`` (collective: every rank calls
        it). ``trainer_state`` is rank 0's (data position, counters); ``rng`` is this rank's RNG
        state (all are stored). With ``consolidate_weights`` the folder also gets the full fp32
        ``model.safetensors`` (via ``zero_to_fp32``), which makes it a normal turbolm checkpoint."""
        ckpt_dir = run_dir / CHECKPOINTS_DIR
        final = ckpt_dir / step_dir_name(step)

        def make_tmp() -> str:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            tmp = ckpt_dir / f".tmp-{final.name}-{os.getpid()}"
            _remove_tree(tmp)
            tmp.mkdir()
            return str(tmp)

        tmp = Path(self.on_main(make_tmp))
        rngs = self.all_gather(_plain(rng, "rng"))
        ok = self.engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
        if ok is False:
            raise CheckpointError(f"DeepSpeed could not save a checkpoint into {tmp}")
        for p in sorted((tmp / DS_TAG).iterdir()):  # every rank: its own writes reach the disk
            if p.is_file():
                _fsync_path(p)
        self.barrier()

        def write_metadata() -> list[str]:
            meta = {
                **config,
                "turbolm_version": _turbolm_version(),
                "step": step,
                DS_KIND: {
                    "world_size": self.world_size,
                    "zero_stage": self.stage,
                    "tag": DS_TAG,
                    "config": self.ds_config,
                },
            }
            _write_json(tmp / CONFIG_FILE, meta)
            if tokenizer_path is not None:
                shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
                _fsync_path(tmp / TOKENIZER_FILE)
            state = _plain({**trainer_state, "rng": rngs, "world_size": self.world_size}, "state")
            _save_trainer_state(tmp / TRAINER_FILE, state)
            if consolidate_weights:
                weights = fp32_state_dict(tmp, self.stage)
                _save_model_state(tmp / MODEL_FILE, weights)
            return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())

        files = self.on_main(write_metadata)
        mine = {name: _file_info(tmp / name) for name in files[self.rank :: self.world_size]}
        hashes = self.all_gather(mine)

        def finish() -> str:
            info = {name: h for part in hashes for name, h in part.items()}
            complete = {
                "format": 1,
                "kind": DS_KIND,
                "step": step,
                "turbolm_version": _turbolm_version(),
                "created": time.time(),
                "world_size": self.world_size,
                "zero_stage": self.stage,
                "files": dict(sorted(info.items())),
            }
            _write_json(tmp / COMPLETE_FILE, complete)
            _fsync_path(tmp)
            _install(tmp, final)
            _rotate_ds(ckpt_dir, keep, final)
            _remove_stale(ckpt_dir)
            return str(final)

        return Path(self.on_main(finish))

    def plan_resume(self, checkpoint: Path) -> None:
        """Check, before the engine exists, that ``checkpoint`` can be resumed by this job.

        Same ZeRO stage (1 and 2 share a format) and same world size resume exactly. ZeRO-1/2
        (and ZeRO-0, whose optimizer state is not partitioned) also resume on another world
        size: the checkpoint is converted to DeepSpeed's universal format (``ds_to_universal``)
        and loaded with ``load_universal`` (weights and Adam moments restored exactly; the data
        streams of the new ranks differ, so losses are not those of the old world size).
        ZeRO-3 on another world size is refused: with DeepSpeed 0.19.8 the universal load gives
        every parameter group the first group's weight decay, and the next step differs.
        """
        if not is_ds_checkpoint(checkpoint):
            return  # the trainer reports the kind mismatch
        meta = json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
        saved = meta.get(DS_KIND, {})
        saved_world, saved_stage = saved.get("world_size"), saved.get("zero_stage")
        if saved_stage != self.stage and not (saved_stage in (1, 2) and self.stage in (1, 2)):
            raise CheckpointError(
                f"checkpoint {checkpoint} was written with ZeRO stage {saved_stage}; this run "
                f"uses stage {self.stage}: resume with the same stage (or consolidate it with "
                "`turbolm consolidate` and start a new run from the weights)"
            )
        if saved_world == self.world_size or self.stage == 0:
            return
        if self.stage == 3:
            raise CheckpointError(
                f"checkpoint {checkpoint} was written by {saved_world} ranks under ZeRO-3; "
                f"resuming it on {self.world_size} ranks is not supported (DeepSpeed's universal "
                "checkpoint does not restore ZeRO-3 optimizer parameter groups exactly): resume "
                f"on {saved_world} ranks, or consolidate it and start a new run from the weights"
            )
        self._universal = True
        self.ds_config = {**self.ds_config, "checkpoint": {"load_universal": True}}

    def _to_universal(self, checkpoint: Path) -> Path:
        """Rank 0: convert ``checkpoint``'s DeepSpeed files into a hidden universal folder."""
        # a hidden .tmp-* name: a leftover of a crash is removed by the next checkpoint save
        out = checkpoint.parent / f".tmp-universal-{checkpoint.name}-{os.getpid()}"
        _remove_tree(out)
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(checkpoint / DS_TAG),
            "--output_folder",
            str(out / DS_TAG),
            "--inject_missing_state",
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ]
        env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            _remove_tree(out)
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise CheckpointError(
                f"converting {checkpoint} to a universal checkpoint failed: {tail}"
            )
        return out

    def load(self, checkpoint: Path) -> dict[str, Any]:
        """Restore engine (weights, optimizer, scheduler) from a DeepSpeed checkpoint folder and
        return the trainer state with this rank's RNG state under ``"rng"``."""
        source = checkpoint
        if self._universal:
            source = Path(self.on_main(lambda: str(self._to_universal(checkpoint))))
        try:
            load_path, _ = self.engine.load_checkpoint(
                str(source),
                tag=DS_TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
        finally:
            if source != checkpoint:
                self.barrier()
                if self.is_main:
                    _remove_tree(source)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {checkpoint}")
        state = torch.load(checkpoint / TRAINER_FILE, map_location="cpu", weights_only=True)
        rngs = state.get("rng") or []
        if isinstance(rngs, list) and rngs:
            state["rng"] = rngs[self.rank] if self.rank < len(rngs) else rngs[0]
        return state


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _file_info(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": _sha256(path)}


# ---------------------------------------------------------------------------------------------
# Checkpoint discovery
# ---------------------------------------------------------------------------------------------


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((path / COMPLETE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        return None
    return marker


def is_ds_checkpoint(path: str | Path) -> bool:
    marker = _read_marker(Path(path))
    return marker is not None and marker.get("kind") == DS_KIND


def verify_ds_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check a DeepSpeed checkpoint folder against its ``COMPLETE`` marker (every listed file
    present with its recorded size); returns the marker or raises ``CheckpointError``."""
    path = Path(path)
    marker = _read_marker(path)
    if marker is None:
        raise CheckpointError(f"incomplete checkpoint {path}: no readable {COMPLETE_FILE} marker")
    if marker.get("kind") != DS_KIND:
        raise CheckpointError(f"checkpoint {path} was not written by a DeepSpeed run")
    files = marker["files"]
    for required in (CONFIG_FILE, TRAINER_FILE):
        if required not in files:
            raise CheckpointError(f"checkpoint {path}: {COMPLETE_FILE} does not list {required}")
    if not any(name.startswith(f"{DS_TAG}/") for name in files):
        raise CheckpointError(f"checkpoint {path}: {COMPLETE_FILE} lists no DeepSpeed files")
    for name, info in files.items():
        p = path / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if not isinstance(info, dict) or p.stat().st_size != info.get("size"):
            raise CheckpointError(f"checkpoint {path}: {name} is truncated or modified")
    return marker


def _is_complete_any(path: Path) -> bool:
    """Complete single-process or DeepSpeed checkpoint."""
    from turbolm.train.checkpoint import verify_checkpoint

    try:
        if is_ds_checkpoint(path):
            verify_ds_checkpoint(path)
        else:
            verify_checkpoint(path)
    except CheckpointError:
        return False
    return True


def find_latest_resumable(run_dir: str | Path) -> Path | None:
    """Newest complete checkpoint of either kind in ``run_dir/checkpoints`` (or None)."""
    for _, p in _step_dirs(Path(run_dir) / CHECKPOINTS_DIR):
        if _is_complete_any(p):
            return p
    return None


def _rotate_ds(ckpt_dir: Path, keep: int, current: Path) -> None:
    """Keep the ``keep`` newest complete checkpoints (``current`` always stays)."""
    others = [p for _, p in _step_dirs(ckpt_dir) if p != current and _is_complete_any(p)]
    for p in others[keep - 1 :]:
        _delete_checkpoint(p)


# ---------------------------------------------------------------------------------------------
# Consolidation (ZeRO shards -> one fp32 safetensors file)
# ---------------------------------------------------------------------------------------------


def fp32_state_dict(step_dir: Path, stage: int) -> dict[str, torch.Tensor]:
    """Full fp32 model state dict from the DeepSpeed files of ``step_dir`` (any ZeRO stage)."""
    ds_dir = step_dir / DS_TAG
    if stage == 0:
        files = sorted(ds_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise CheckpointError(f"{ds_dir}: no mp_rank_*_model_states.pt file")
        # DeepSpeed's own pickle (not tensors only): it is our checkpoint, so full unpickling.
        module = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # it prints a line per merge step and shows progress bars: keep the console clean
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=DS_TAG)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"cannot consolidate {step_dir}: {_one_line(e)}") from e
    return {k: v.contiguous() for k, v in state.items()}


def _resolve_ds_source(path: Path) -> Path:
    """A DeepSpeed step folder for ``path``: itself, or the newest complete one of a run."""
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if (path / COMPLETE_FILE).exists():
        verify_ds_checkpoint(path)
        return path
    ckpt_dir = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    steps = _step_dirs(ckpt_dir)
    for _, p in steps:
        if is_ds_checkpoint(p):
            try:
                verify_ds_checkpoint(p)
            except CheckpointError:
                continue
            return p
    raise CheckpointError(
        f"no complete DeepSpeed checkpoint in {ckpt_dir} "
        f"(step folders: {', '.join(p.name for _, p in steps[:5]) or 'none'})"
    )


def consolidate(source: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Turn a DeepSpeed checkpoint (a step folder, or the newest of a run folder) into a
    turbolm checkpoint folder ``out_dir``: ``model.safetensors`` (full fp32 weights rebuilt by
    ``zero_to_fp32``), ``config.json``, ``tokenizer.json``, ``trainer_state.pt`` (step only)
    and ``COMPLETE``, written atomically. ``turbolm eval`` / ``generate`` load it."""
    src = _resolve_ds_source(Path(source))
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"{out} already exists and is not empty (use --overwrite)")
        if out.resolve() == src.resolve():
            raise InputError("--out must differ from the checkpoint folder")
    meta = json.loads((src / CONFIG_FILE).read_text(encoding="utf-8"))
    stage = int(meta.get(DS_KIND, {}).get("zero_stage", 0))
    weights = fp32_state_dict(src, stage)
    _check_weights(weights, meta.get("model"), src)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    _remove_tree(tmp)
    tmp.mkdir()
    try:
        from turbolm.train.checkpoint import _write_files

        config = {k: v for k, v in meta.items() if k not in ("turbolm_version", "step")}
        config["consolidated_from"] = str(src)
        tok = src / TOKENIZER_FILE
        _write_files(
            tmp,
            int(meta.get("step", 0)),
            weights,
            config,
            {"step": int(meta.get("step", 0)), "consolidated_from": str(src)},
            tok if tok.is_file() else None,
        )
    except BaseException:
        _remove_tree(tmp)
        raise
    _install(tmp, out)
    return out


def _check_weights(weights: dict[str, torch.Tensor], model_kwargs: Any, src: Path) -> None:
    """The rebuilt state dict must fit the model the checkpoint describes."""
    from turbolm.models import build_model

    if not isinstance(model_kwargs, dict):
        raise CheckpointError(f"{src}: config.json has no model description")
    with torch.device("meta"):
        model = build_model(dict(model_kwargs))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise CheckpointError(f"{src}: consolidated weights lack {', '.join(missing[:5])}")
    bad = [k for k in expected if tuple(weights[k].shape) != tuple(expected[k].shape)]
    if bad:
        raise CheckpointError(f"{src}: consolidated weights have wrong shapes for {bad[:5]}")


# ---------------------------------------------------------------------------------------------
# Hostfiles (deepspeed launcher)
# ---------------------------------------------------------------------------------------------

_HOST_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.:\-\[\]]+)\s+slots=(?P<slots>\d+)$")


def parse_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """``[(host, slots), ...]`` from a DeepSpeed hostfile (``host slots=N`` per line; blank
    lines and ``#`` comments allowed). ``ConfigError`` names the file, line and problem."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"hostfile {str(p)!r} does not exist")
    hosts: list[tuple[str, int]] = []
    seen: set[str] = set()
    for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        m = _HOST_LINE.match(text)
        if not m:
            raise ConfigError(
                f"hostfile {str(p)!r} line {n}: expected 'HOST slots=N', got {line.strip()!r}"
            )
        host, slots = m.group("host"), int(m.group("slots"))
        if slots < 1:
            raise ConfigError(f"hostfile {str(p)!r} line {n}: slots must be >= 1, got {slots}")
        if host in seen:
            raise ConfigError(f"hostfile {str(p)!r} line {n}: host {host!r} is listed twice")
        seen.add(host)
        hosts.append((host, slots))
    if not hosts:
        raise ConfigError(f"hostfile {str(p)!r} lists no hosts")
    return hosts


def main(argv: list[str] | None = None) -> int:
    """``python -m turbolm.train.distributed hostfile PATH``: validate a hostfile and print
    ``host slots`` lines (used by ``scripts/launch/deepspeed_multinode.sh``)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "hostfile":
        print("usage: python -m turbolm.train.distributed hostfile PATH", file=sys.stderr)
        return 2
    try:
        hosts = parse_hostfile(argv[1])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for host, slots in hosts:
        print(host, slots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
