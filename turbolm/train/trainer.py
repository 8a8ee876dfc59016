"""The trainer: data -> model -> AdamW loop with evaluation, early stopping, logging (JSONL +
TensorBoard + progress bar), atomic checkpoints and exact resume.

One process by default. With ``train.deepspeed`` (a DeepSpeed JSON config) or under a launcher
(``torchrun``, the ``deepspeed`` launcher, SLURM) the same loop runs data parallel through a
DeepSpeed engine (ZeRO 0-3; see ``turbolm/train/distributed.py``): every rank draws its own
disjoint batch stream, rank 0 alone writes logs, metrics, TensorBoard and the progress bar, and
train/val metrics are averaged over all ranks. The single-process path never imports deepspeed.

Exact resume: everything that decides the next step is checkpointed (model, optimizer,
scheduler, loss scaler, RNG states of every rank, data position, early-stopping counters), so
a run stopped after step N (even by SIGKILL) and resumed from its checkpoint at N gives the same
losses as an uninterrupted run. SIGINT/SIGTERM finish the current step, save a checkpoint and
stop (under DeepSpeed every rank stops at the same step: the flag is all-reduced each step).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from turbolm.config import DataConfig, RunConfig, config_to_dict, model_kwargs
from turbolm.data import TokenData, TrainBatches, ensure_prepared, is_prepared, unigram_entropy
from turbolm.data.prepare import read_meta
from turbolm.errors import CheckpointError, ConfigError, DataError
from turbolm.eval.lm import evaluate_lm
from turbolm.generate import generate_tokens
from turbolm.models import build_model
from turbolm.ops.registry import use_backend
from turbolm.train.checkpoint import (
    find_latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports."""

    out_dir: str
    step: int
    train_loss: float | None = None
    val: dict[str, float] = field(default_factory=dict)
    unigram_entropy: float | None = None
    stopped_early: bool = False
    interrupted_by: str | None = None  # "SIGINT" / "SIGTERM" when a signal stopped the run
    checkpoint: str | None = None
    sample: str = ""
    rank: int = 0  # under DeepSpeed: this process's rank (only rank 0 reports)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is available (use cpu or auto)")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """fp32 on CPU; bf16 on GPUs that support it, else fp16 (with loss scaling)."""
    if device.type != "cuda":
        if name in ("bf16", "fp16"):
            raise ConfigError(f"train.precision={name} needs a CUDA GPU; on CPU use fp32 (or auto)")
        return "fp32"
    if name == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return name


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def prepare_run_dir(
    out_dir: Path,
    resume: bool,
    overwrite: bool,
    find: Callable[[Path], Path | None] = find_latest_checkpoint,
) -> Path | None:
    """Create the run folder; returns the checkpoint to resume from (or None).

    An existing non-empty folder is never silently reused: it needs ``resume`` (continue it)
    or ``overwrite`` (delete it first). ``find`` picks the checkpoint to resume from.
    """
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    exists = out_dir.exists() and any(out_dir.iterdir())
    if exists and resume:
        return find(out_dir)  # None: nothing complete yet, start afresh
    if exists and not overwrite:
        raise ConfigError(
            f"run folder {out_dir} already exists: pass --resume to continue it "
            "or --overwrite to replace it"
        )
    if exists:
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return None


def _prepare_settings(d: DataConfig) -> dict:
    """The ``prepare``/``ensure_prepared`` keyword arguments a data config asks for."""
    return {
        "sources": d.sources or None,
        "include": d.include or None,
        "jsonl_field": d.jsonl_field,
        "vocab_size": d.vocab_size,
        "tokenizer": d.tokenizer,
        "val_fraction": d.val_fraction,
        "max_docs": d.max_docs,
    }


class _StopSignals:
    """Turn SIGINT/SIGTERM into a flag checked between steps (a second SIGINT aborts)."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.received == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not in the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Runs one training job described by a validated ``RunConfig`` (one process, or one rank
    of a DeepSpeed job)."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
    ):
        self.cfg = cfg
        self.tc = cfg.train
        self.resume = resume
        self.overwrite = overwrite
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.out_dir = Path(self.tc.out_dir)
        self.rt = None  # DeepSpeedRuntime when data parallel
        self._resume_from: str | None = None
        self.rank, self.world_size = 0, 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _on_main(self, fn: Callable[[], object]) -> object:
        """``fn()`` on rank 0, its result (or its error) on every rank."""
        return fn() if self.rt is None else self.rt.on_main(fn)

    # ----------------------------------------------------------------------------- setup

    def _setup_data(self) -> None:
        """Use ``data.dir`` if it is prepared, else prepare it (default: embedded corpus).

        A prepared folder is never re-prepared behind the user's back: if the config asks for
        data settings that differ from the folder's, that is an error. Under DeepSpeed rank 0
        prepares and the others wait (the folder must be on a shared file system, or prepared
        on every node beforehand).
        """
        d = self.cfg.data
        wanted = _prepare_settings(d)

        def prepare() -> None:
            if is_prepared(d.dir):
                self._check_prepared_matches(d.dir, wanted)
            else:
                ensure_prepared(d.dir, progress=self.progress, **wanted)

        self._on_main(prepare)
        if not self.is_main and not is_prepared(d.dir):
            raise DataError(
                f"rank {self.rank} cannot see the prepared data in {d.dir}: put data.dir on a "
                "file system shared by all nodes, or run `turbolm prepare` on every node first"
            )
        self.data = TokenData(d.dir)
        context = self.cfg.model.context
        for split in ("train", "val"):
            n = getattr(self.data, split).size
            if n < context + 1:
                raise DataError(
                    f"the {split} split of {d.dir} has {n} tokens, fewer than "
                    f"model.context + 1 = {context + 1}: use a smaller context or more data"
                )
        self.batches = self._make_train_batches()

    def _make_train_batches(self) -> TrainBatches:
        """This rank's batch stream (disjoint from the other ranks', resumable)."""
        return TrainBatches(
            self.data.train,
            self.tc.batch_size,
            self.cfg.model.context,
            seed=self.tc.seed,
            rank=self.rank,
            world_size=self.world_size,
        )

    @staticmethod
    def _check_prepared_matches(data_dir: str, wanted: dict) -> None:
        defaults = _prepare_settings(DataConfig())
        changed = {k for k in wanted if wanted[k] != defaults[k]}
        have = read_meta(data_dir).get("settings", {})
        differ = [
            f"data.{k}={wanted[k]!r} (folder: {have.get(k)!r})"
            for k in sorted(changed)
            if have.get(k) != wanted[k]
        ]
        if differ:
            raise ConfigError(
                f"data.dir {data_dir} was prepared with other settings: {', '.join(differ)}; "
                "use another data.dir or re-run `turbolm prepare --overwrite`"
            )

    def _make_optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        tc = self.tc
        return torch.optim.AdamW(
            groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=self.device.type == "cuda"
        )

    def _lr_lambda(self, step: int) -> float:
        tc = self.tc
        return lr_factor(step, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)

    def _setup_model(self) -> None:
        self.model_kwargs = model_kwargs(self.cfg.model, self.data.vocab_size)
        torch.manual_seed(self.tc.seed)  # every rank builds the same initial weights
        self.model = build_model(self.model_kwargs).to(self.device)
        # (validate() allows it for the Transformer only)
        self.model.activation_checkpointing = self.tc.activation_checkpointing
        self.model.fused_loss = self.tc.fused_cross_entropy
        # counted before ZeRO-3 partitions the parameters (each rank then holds a slice)
        self.n_params, self.flops = self.model.num_params(), self.model.flops_per_token()
        groups = self.model.configure_optimizer_groups(self.tc.weight_decay)
        if self.rt is not None:
            if self.rank > 0:
                torch.manual_seed(self.tc.seed + self.rank)  # own dropout masks per rank
            if self._resume_from is not None:
                self.rt.plan_resume(Path(self._resume_from))  # may switch to a universal load
            engine = self.rt.initialize(self.model, groups, self._make_optimizer, self._lr_lambda)
            self.forward_model = engine
            return
        self.optimizer = self._make_optimizer(groups)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.forward_model = torch.compile(self.model) if self.tc.compile else self.model

    def _restore(self, checkpoint: Path) -> None:
        from turbolm.train.distributed import is_ds_checkpoint

        if self.rt is not None:
            if not is_ds_checkpoint(checkpoint):
                raise CheckpointError(
                    f"{checkpoint} was written by a single-process run; resume it without "
                    "train.deepspeed and without a launcher (or start a new run folder)"
                )
            ts = self.rt.load(checkpoint)
        else:
            if is_ds_checkpoint(checkpoint):
                raise CheckpointError(
                    f"{checkpoint} was written by a DeepSpeed run: resume it with the same "
                    "train.deepspeed config (and launcher), or turn it into plain weights with "
                    "`turbolm consolidate`"
                )
            state = load_checkpoint(checkpoint, map_location=self.device)
            load_model_weights(self.model, state["model_state"])
            ts = state["trainer_state"]
            self.optimizer.load_state_dict(ts["optimizer"])
            self.scheduler.load_state_dict(ts["scheduler"])
            self.scaler.load_state_dict(ts["scaler"])
        self.batches.load_state_dict(ts["data"])
        set_rng_state(ts["rng"])
        self.step = int(ts["step"])
        self.best_val = ts.get("best_val_loss")
        self.bad_evals = int(ts.get("bad_evals", 0))
        self.tokens_seen = int(ts.get("tokens_seen", 0))
        self.log(f"resumed from {checkpoint} (step {self.step})")

    # ------------------------------------------------------------------------- the loop

    def _train_step(self, stop_requested: bool = False) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss (over
        all ranks under DeepSpeed, which also agree on ``self.stop_all``)."""
        tc = self.tc
        if self.rt is not None:
            loss, self.grad_norm, self.stop_all = self.rt.train_step(
                self.batches, tc.grad_accum, stop_requested
            )
            self.step += 1
            self.tokens_seen += (
                tc.batch_size * tc.grad_accum * self.cfg.model.context * self.world_size
            )
            return loss
        total = 0.0
        for _ in range(tc.grad_accum):
            x, y = self.batches.next()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.autocast:
                _, loss = self.forward_model(x, y)
            self.scaler.scale(loss / tc.grad_accum).backward()
            total += loss.item()
        self.scaler.unscale_(self.optimizer)
        if tc.grad_clip > 0:
            self.grad_norm = float(
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += tc.batch_size * tc.grad_accum * self.cfg.model.context
        self.stop_all = stop_requested
        return total / tc.grad_accum

    def _current_lr(self) -> float:
        return self.rt.lr() if self.rt is not None else self.scheduler.get_last_lr()[0]

    def _evaluate(self) -> dict[str, float]:
        kwargs = dict(
            batch_size=self.tc.batch_size,
            context=self.cfg.model.context,
            max_batches=self.tc.eval_batches,
        )
        if self.rt is not None:
            return self.rt.evaluate(self.data.val, **kwargs)
        return evaluate_lm(
            self.model, self.data.val, device=self.device, autocast=self.autocast, **kwargs
        )

    def _write_metrics(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.out_dir / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def _checkpoint(self, final: bool = False) -> Path:
        """Save a checkpoint; ``final`` (the run is ending) also consolidates DeepSpeed
        weights into ``model.safetensors``."""
        trainer_state = {
            "step": self.step,
            "data": self.batches.state_dict(),
            "best_val_loss": self.best_val,
            "bad_evals": self.bad_evals,
            "tokens_seen": self.tokens_seen,
        }
        config = {"run": config_to_dict(self.cfg), "model": self.model_kwargs}
        tokenizer = os.path.join(self.cfg.data.dir, "tokenizer.json")
        if self.rt is not None:
            return self.rt.save(
                self.out_dir,
                self.step,
                config,
                trainer_state,
                rng_state(),
                tokenizer,
                keep=self.tc.keep_checkpoints,
                consolidate_weights=final,
            )
        trainer_state.update(
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            rng=rng_state(),
        )
        return save_checkpoint(
            self.out_dir,
            self.step,
            self.model.state_dict(),
            config,
            trainer_state,
            tokenizer_path=tokenizer,
            keep=self.tc.keep_checkpoints,
        )

    def _after_eval(self, metrics: dict[str, float]) -> bool:
        """Track the best val loss; returns True when early stopping says stop."""
        if self.best_val is None or metrics["loss"] < self.best_val:
            self.best_val, self.bad_evals = metrics["loss"], 0
            return False
        self.bad_evals += 1
        patience = self.tc.early_stop_patience
        return patience > 0 and self.bad_evals >= patience

    def sample(self, prompt: str = "def ", max_new_tokens: int | None = None) -> str:
        n = self.tc.sample_tokens if max_new_tokens is None else max_new_tokens
        if n <= 0:
            return ""
        if self.rt is not None and not self.is_main and self.rt.stage < 3:
            return ""  # ZeRO-3 gathers weights collectively: every rank samples in lockstep
        tok = self.data.tokenizer
        ids = tok.encode(prompt) or [tok.eot_id]
        new = list(
            generate_tokens(
                self.model, ids, n, temperature=0.8, top_k=50, seed=self.tc.seed, stop_id=tok.eot_id
            )
        )
        return prompt + tok.decode(new)

    def _setup_parallel(self) -> tuple[bool, bool]:
        """Start DeepSpeed when asked for (``train.deepspeed``) or launched with several ranks;
        returns the effective ``(resume, overwrite)``."""
        from turbolm.train.distributed import (
            DeepSpeedRuntime,
            ds_config_from_train,
            launch_env,
            restarted_by_elastic_agent,
        )

        resume, overwrite = self.resume, self.overwrite
        env = launch_env()
        if not (self.tc.deepspeed.strip() or env.distributed):
            return resume, overwrite
        if self.tc.compile:
            raise ConfigError("train.compile=true is not supported with DeepSpeed yet")
        self.rank, self.world_size = env.rank, env.world_size
        if self.device.type == "cuda":
            self.device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        ds_config = ds_config_from_train(self.cfg, env.world_size, self.precision)
        if restarted_by_elastic_agent():
            # torchrun restarted the job after a failure: continue the run folder of the first
            # attempt (never delete it, even if that attempt was started with --overwrite).
            resume, overwrite = True, False
        self.rt = DeepSpeedRuntime(env, ds_config, self.device)
        if self.rt.stage == 3 and self.tc.fused_cross_entropy:
            # ZeRO-3 gathers a weight only inside its module's forward; the fused op reads
            # the head's weight outside it.
            raise ConfigError("train.fused_cross_entropy=true is not supported with ZeRO-3")
        self.rt.init_process_group()
        if not self.is_main:
            self.log = lambda msg: None
            self.progress = False
        return resume, overwrite

    def run(self) -> TrainResult:
        """Train to ``max_steps`` (or early stop / signal); returns the result."""
        from turbolm.train.distributed import find_latest_resumable

        tc = self.tc
        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        self.device = resolve_device(tc.device)
        self.precision = resolve_precision(tc.precision, self.device)
        resume, overwrite = self._setup_parallel()
        # DeepSpeed applies bf16/fp16 itself (16-bit weights, fp32 master copy): no autocast.
        self.autocast = (
            autocast_for(self.precision, self.device)
            if self.rt is None
            else contextlib.nullcontext()
        )

        def run_dir() -> str | None:
            found = prepare_run_dir(self.out_dir, resume, overwrite, find=find_latest_resumable)
            return None if found is None else str(found)

        resume_from = self._resume_from = self._on_main(run_dir)
        backend_ctx = use_backend(tc.backend) if tc.backend != "auto" else contextlib.nullcontext()
        with backend_ctx, _StopSignals() as signals:
            self._setup_data()
            self._setup_model()
            self.step, self.best_val, self.bad_evals, self.tokens_seen = 0, None, 0, 0
            self.grad_norm = float("nan")
            self.stop_all = False
            self._resumed = resume_from is not None
            if self._resumed:
                self._restore(Path(resume_from))
            if self.is_main:
                (self.out_dir / "run_config.json").write_text(
                    json.dumps(
                        {"run": config_to_dict(self.cfg), "model": self.model_kwargs}, indent=2
                    )
                )
            result = self._loop(signals)
        if self.rt is not None:
            self.rt.finish_job()  # every rank got here: leave together (see finish_job)
        return result

    def _open_tensorboard(self):
        if not self.tc.tensorboard or not self.is_main:
            return None
        from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

        return SummaryWriter(str(self.out_dir / "tensorboard"))

    def _loop(self, signals: _StopSignals) -> TrainResult:
        from tqdm.auto import tqdm

        tc = self.tc
        self.log(
            f"model: {self.cfg.model.arch}, {self.n_params / 1e6:.2f}M parameters, "
            f"{self.flops / 1e6:.1f} MFLOPs/token; device {self.device}, "
            f"precision {self.precision}; train {self.data.train.size:,} tokens, "
            f"val {self.data.val.size:,} tokens"
        )
        if self.rt is not None:
            self.log(self.rt.describe())
        self.tb = self._open_tensorboard()
        result = TrainResult(out_dir=str(self.out_dir), step=self.step, rank=self.rank)
        bar = tqdm(
            total=tc.max_steps,
            initial=self.step,
            disable=not self.progress,
            unit="step",
            dynamic_ncols=True,
        )
        last_ckpt_step = self.step if self._resumed else -1
        t_last, tokens_last = time.perf_counter(), self.tokens_seen
        try:
            while self.step < tc.max_steps:
                loss = self._train_step(signals.received is not None)
                result.train_loss = loss
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {self.step}")
                now = time.perf_counter()
                tok_s = (self.tokens_seen - tokens_last) / max(now - t_last, 1e-9)
                t_last, tokens_last = now, self.tokens_seen
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}")
                if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                    self._write_metrics(
                        {
                            "step": self.step,
                            "loss": loss,
                            "lr": self._current_lr(),
                            "grad_norm": self.grad_norm,
                            "tokens_per_s": tok_s,
                        }
                    )
                stop = False
                if self.step % tc.eval_every == 0 or self.step == tc.max_steps:
                    result.val = self._evaluate()
                    self._write_metrics(
                        {
                            "step": self.step,
                            "val_loss": result.val["loss"],
                            "val_perplexity": result.val["perplexity"],
                            "val_accuracy": result.val["accuracy"],
                        }
                    )
                    if self.is_main:
                        bar.write(
                            f"step {self.step}: train loss {loss:.4f}, val loss "
                            f"{result.val['loss']:.4f}, ppl {result.val['perplexity']:.2f}, "
                            f"acc {result.val['accuracy']:.3f}"
                        )
                    stop = self._after_eval(result.val)
                    result.stopped_early = stop
                if self.stop_all:
                    result.interrupted_by = signals.received or "SIGTERM"
                    stop = True
                final = stop or self.step == tc.max_steps
                if final or self.step % tc.checkpoint_every == 0:
                    result.checkpoint = str(self._checkpoint(final=final))
                    last_ckpt_step = self.step
                if stop:
                    break
            if last_ckpt_step != self.step:  # e.g. resumed at max_steps already
                result.checkpoint = str(self._checkpoint(final=True))
        finally:
            bar.close()
            if self.tb is not None:
                self.tb.close()
        result.step = self.step
        if result.interrupted_by:
            self.log(
                f"{result.interrupted_by}: stopped at step {self.step}, checkpoint saved to "
                f"{result.checkpoint}; continue with --resume"
            )
            return result
        if result.stopped_early:
            self.log(
                f"early stop at step {self.step}: val loss did not improve for "
                f"{tc.early_stop_patience} evaluations (best {self.best_val:.4f})"
            )
        if not result.val:
            result.val = self._evaluate()
        if self.is_main:
            result.unigram_entropy = unigram_entropy(self.data.val, self.data.vocab_size)
        result.sample = self.sample()
        return result


def train(cfg: RunConfig, **kwargs) -> TrainResult:
    """Convenience wrapper: ``Trainer(cfg, **kwargs).run()``."""
    return Trainer(cfg, **kwargs).run()
