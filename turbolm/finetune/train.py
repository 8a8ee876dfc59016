"""The fine-tuning loop: base checkpoint -> (LoRA | full) fine-tuning -> adapter or checkpoint.

Order of work, so that bad input costs nothing: load the base, read and check the data, build
the model and resolve the LoRA targets, and only then create (or, with ``overwrite``, replace)
the output folder. Outputs in ``train.out_dir``:

    adapter/                   LoRA (lora.r > 0): adapter_config.json, adapter_model.safetensors
                               (peft), turbolm_adapter.json, tokenizer.json; written to a
                               hidden folder and renamed, so it is complete or absent
    checkpoints/step_XXXXXXXX/ full fine-tuning (lora.r = 0): a turbolm checkpoint (atomic)
    metrics.jsonl              train loss, lr; val loss (+ accuracy, macro-F1 for classify)
    finetune_config.json       the resolved fine-tuning config and the base checkpoint
    result.json                final val metrics, parameter counts, the majority baseline

Pieces shared with ``turbolm train`` (device / precision selection, autocast, the warm-up +
cosine schedule, the run-folder rules) are imported from ``turbolm.train.trainer``. Runs are
short and are not resumable: an interrupted fine-tune is simply run again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from turbolm.errors import ConfigError, DataError
from turbolm.finetune.classifier import SequenceClassifier
from turbolm.finetune.config import FinetuneConfig, finetune_config_to_dict
from turbolm.finetune.data import (
    ClassBatches,
    ClassificationData,
    check_labels,
    encode_examples,
    label_set,
    lm_token_splits,
    read_labelled_jsonl,
    split_examples,
)
from turbolm.finetune.lora import (
    ADAPTER_SUBDIR,
    add_lora,
    lora_config,
    parameter_counts,
    resolve_targets,
)
from turbolm.finetune.metrics import classification_report, majority_baseline


@dataclass
class FinetuneResult:
    out_dir: str
    task: str
    step: int
    output: str  # adapter folder or checkpoint folder
    trainable_params: int
    total_params: int
    train_loss: float | None = None
    val: dict = field(default_factory=dict)
    baseline: dict | None = None
    labels: list | None = None
    targets: dict | None = None
    seconds: float = 0.0

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / max(1, self.total_params)


def _decay_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class Finetuner:
    """One fine-tuning run of ``base`` (a checkpoint or run folder) described by ``cfg``."""

    def __init__(
        self,
        cfg: FinetuneConfig,
        base: str | Path,
        *,
        overwrite: bool = False,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
    ):
        self.cfg, self.tc, self.fc = cfg, cfg.train, cfg.finetune
        self.base_path = base
        self.overwrite = overwrite
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.out_dir = Path(self.tc.out_dir)

    # --------------------------------------------------------------------------------- setup

    def _load_base(self) -> None:
        from turbolm.models import model_config_dict
        from turbolm.train.loading import load_trained

        self.base = load_trained(self.base_path, "cpu")
        self.lm = self.base.model
        self.tokenizer = self.base.tokenizer
        self.lm_kwargs = model_config_dict(self.lm)
        context = self.lm_kwargs.get("context")
        limit = getattr(self.lm, "max_context", None)  # None: the RNN has no length limit
        self.max_len = self.fc.max_len or context
        if limit is not None and self.max_len > limit:
            raise ConfigError(
                f"finetune.max_len={self.max_len} exceeds the base model's context {limit}"
            )

    def _load_data(self) -> None:
        fc, seed = self.fc, self.tc.seed
        if self.fc.task == "lm":
            self.train_tokens, self.val_tokens, info = lm_token_splits(
                fc.data,
                fc.val_data,
                self.tokenizer,
                val_fraction=fc.val_fraction,
                seed=seed,
                jsonl_field=fc.text_field,
            )
            self.data_info = info
            self.context = min(self.max_len, int(self.val_tokens.size) - 1)
            for name, n in (("train", self.train_tokens.size), ("val", self.val_tokens.size)):
                if n < 2 or n < self.context + 1:
                    raise DataError(
                        f"the {name} text has {n} tokens, too few for windows of "
                        f"{self.context} tokens: give more text or a smaller finetune.max_len"
                    )
            return
        if not fc.data:
            raise DataError("no classification data given (--data FILE.jsonl)")
        train = read_labelled_jsonl(fc.data, fc.text_field, fc.label_field)
        if fc.val_data:
            labels = label_set(train)
            val = read_labelled_jsonl(fc.val_data, fc.text_field, fc.label_field)
            check_labels(val, labels, "val data")
        else:
            labels = label_set(train)
            train, val = split_examples(train, fc.val_fraction, seed)
        tr_ids, tr_y = encode_examples(train, self.tokenizer, labels, self.max_len)
        va_ids, va_y = encode_examples(val, self.tokenizer, labels, self.max_len)
        self.cdata = ClassificationData(labels, tr_ids, tr_y, va_ids, va_y, self.tokenizer.eot_id)
        self.data_info = {
            "train_examples": len(tr_ids),
            "val_examples": len(va_ids),
            "labels": len(labels),
        }

    def _build_model(self) -> None:
        cfg, lo = self.cfg, self.cfg.lora
        if self.tc.activation_checkpointing:
            if self.lm.arch != "transformer":
                raise ConfigError(
                    "train.activation_checkpointing applies to Transformer bases only (this "
                    f"base is arch {self.lm.arch!r}; its recurrent layers run as one fused stack)"
                )
            self.lm.activation_checkpointing = True
        torch.manual_seed(self.tc.seed)
        classify = self.fc.task == "classify"
        model = (
            SequenceClassifier(self.lm, len(self.cdata.labels), self.fc.pool)
            if classify
            else self.lm
        )
        self.targets = None
        if lo.r > 0:
            self.targets = resolve_targets(self.lm, lo.target)
            dropout = lo.dropout
            if self.targets.parameters and dropout:
                # peft's parameter LoRA (recurrent weights) cannot apply dropout to its input
                self.log(f"lora.dropout={dropout} -> 0: recurrent-weight adapters take none")
                dropout = 0.0
            peft_cfg = lora_config(
                self.targets,
                lo.r,
                lo.alpha,
                dropout,
                prefix="lm." if classify else "",
                modules_to_save=["score"] if classify else None,
            )
            model = add_lora(model, peft_cfg, base_path=str(self.base.path))
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        self.model = model.to(self.device).train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable, self.total = parameter_counts(self.model)
        self.optimizer = torch.optim.AdamW(
            _decay_groups(params, self.tc.weight_decay),
            lr=self.tc.lr,
            betas=(self.tc.beta1, self.tc.beta2),
            fused=self.device.type == "cuda",
        )
        tc = cfg.train
        from turbolm.train.trainer import lr_factor

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    # ------------------------------------------------------------------------------ steps

    def _loss(self, batch) -> torch.Tensor:
        if self.fc.task == "lm":
            x, y = batch
            with self.autocast:
                _, loss = self.model(x.to(self.device), y.to(self.device))
            return loss
        x, lengths, y = batch
        with self.autocast:
            logits = self.model(x.to(self.device), lengths.to(self.device))
        return F.cross_entropy(logits.float(), y.to(self.device))

    def _train_step(self) -> float:
        total = 0.0
        for _ in range(self.tc.grad_accum):
            loss = self._loss(self.batches.next())
            self.scaler.scale(loss / self.tc.grad_accum).backward()
            total += loss.item()
        self.scaler.unscale_(self.optimizer)
        if self.tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.tc.grad_clip
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return total / self.tc.grad_accum

    def evaluate(self, full: bool = False) -> dict:
        """Val loss (+ accuracy and macro-F1 for classification; the whole report if ``full``)."""
        if self.fc.task == "lm":
            from turbolm.eval.lm import evaluate_lm

            return evaluate_lm(
                self.model,
                self.val_tokens,
                batch_size=self.tc.batch_size,
                context=self.context,
                max_batches=None if full else self.tc.eval_batches,
                device=self.device,
                autocast=self.autocast,
            )
        from turbolm.finetune.loading import predict_logits

        d = self.cdata
        with self.autocast:
            logits = predict_logits(
                self.model, d.val_ids, d.pad_id, self.tc.batch_size, self.device
            )
        y = torch.tensor(d.val_y)
        preds = logits.argmax(dim=-1).tolist()
        report = classification_report(d.val_y, preds, d.labels)
        metrics = {"loss": float(F.cross_entropy(logits, y)), **report}
        if not full:
            metrics = {k: metrics[k] for k in ("loss", "accuracy", "macro_f1")}
        return metrics

    # -------------------------------------------------------------------------------- run

    def run(self) -> FinetuneResult:
        from turbolm.ops.registry import use_backend
        from turbolm.train.trainer import (
            autocast_for,
            prepare_run_dir,
            resolve_device,
            resolve_precision,
        )

        t0 = time.perf_counter()
        tc = self.tc
        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        self.device = resolve_device(tc.device)
        self.precision = resolve_precision(tc.precision, self.device)
        self.autocast = autocast_for(self.precision, self.device)
        self._load_base()
        self._load_data()
        self._build_model()
        out, base = self.out_dir.resolve(), Path(self.base.path).resolve()
        if out == base or out in base.parents:
            raise ConfigError(
                f"train.out_dir {self.out_dir} holds the base checkpoint {self.base.path}; "
                "write the fine-tuned model somewhere else"
            )
        # Everything is checked: only now touch the output folder.
        prepare_run_dir(self.out_dir, resume=False, overwrite=self.overwrite)
        if self.fc.task == "lm":
            from turbolm.data import TrainBatches

            self.batches = TrainBatches(self.train_tokens, tc.batch_size, self.context, tc.seed)
        else:
            d = self.cdata
            self.batches = ClassBatches(d.train_ids, d.train_y, tc.batch_size, tc.seed, d.pad_id)
        (self.out_dir / "finetune_config.json").write_text(
            json.dumps(
                {
                    "finetune": finetune_config_to_dict(self.cfg),
                    "base": str(self.base.path),
                    "data": self.data_info,
                },
                indent=2,
            )
        )
        self.log(
            f"fine-tuning {self.lm_kwargs['arch']} from {self.base.path} ({self.fc.task}, "
            + (
                f"LoRA r={self.cfg.lora.r} on {self.targets.describe()}"
                if self.targets
                else "full fine-tuning"
            )
            + f"): {self.trainable:,} of {self.total:,} parameters trainable "
            f"({100 * self.trainable / self.total:.2f}%); {self.data_info}"
        )
        backend = use_backend(tc.backend) if tc.backend != "auto" else contextlib.nullcontext()
        with backend:
            result = self._loop()
        result.seconds = time.perf_counter() - t0
        (self.out_dir / "result.json").write_text(
            json.dumps({k: v for k, v in dataclasses.asdict(result).items()}, indent=2)
        )
        return result

    def _write_metrics(self, record: dict) -> None:
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _loop(self) -> FinetuneResult:
        from tqdm.auto import tqdm

        tc = self.tc
        self.step, best, bad = 0, None, 0
        loss = None
        bar = tqdm(total=tc.max_steps, disable=not self.progress, unit="step", dynamic_ncols=True)
        try:
            while self.step < tc.max_steps:
                loss = self._train_step()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {self.step}")
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                    lr = self.scheduler.get_last_lr()[0]
                    self._write_metrics({"step": self.step, "loss": loss, "lr": lr})
                if self.step % tc.eval_every == 0 and self.step < tc.max_steps:
                    val = self.evaluate()
                    self._write_metrics(
                        {"step": self.step, **{f"val_{k}": v for k, v in val.items()}}
                    )
                    bar.write(
                        f"step {self.step}: train loss {loss:.4f}, "
                        + ", ".join(
                            f"val {k} {v:.4f}" for k, v in val.items() if isinstance(v, float)
                        ),
                        file=sys.stderr,  # stdout is for the result
                    )
                    if best is None or val["loss"] < best:
                        best, bad = val["loss"], 0
                    else:
                        bad += 1
                        if tc.early_stop_patience and bad >= tc.early_stop_patience:
                            self.log(f"early stop at step {self.step}")
                            break
        finally:
            bar.close()
        val = self.evaluate(full=True)
        self._write_metrics(
            {
                "step": self.step,
                **{f"val_{k}": v for k, v in val.items() if isinstance(v, (int, float))},
            }
        )
        result = FinetuneResult(
            out_dir=str(self.out_dir),
            task=self.fc.task,
            step=self.step,
            output="",
            trainable_params=self.trainable,
            total_params=self.total,
            train_loss=loss,
            val=val,
            targets=self.targets.groups if self.targets else None,
        )
        if self.fc.task == "classify":
            d = self.cdata
            counts = [d.train_y.count(i) for i in range(len(d.labels))]
            result.labels = d.labels
            result.baseline = majority_baseline(d.val_y, counts.index(max(counts)), d.labels)
        result.output = str(self._save())
        return result

    # ------------------------------------------------------------------------------- save

    def _task_entry(self) -> dict:
        if self.fc.task == "lm":
            return {"type": "lm", "max_len": self.max_len}
        d = self.cdata
        return {
            "type": "classify",
            "labels": d.labels,
            "pool": self.fc.pool,
            "max_len": self.max_len,
            "label_counts": d.label_counts(),
            "text_field": self.fc.text_field,
            "label_field": self.fc.label_field,
            "val_data": [os.path.abspath(p) for p in self.fc.val_data],
        }

    def _save(self) -> Path:
        tok = self.base.path / "tokenizer.json"
        if self.cfg.lora.r == 0:
            from turbolm.train.checkpoint import save_checkpoint

            config = {
                "run": self.base.config.get("run", {}),
                "model": self.lm_kwargs,
                "task": self._task_entry(),
                "finetune": finetune_config_to_dict(self.cfg),
                "base_checkpoint": str(self.base.path),
            }
            return save_checkpoint(
                self.out_dir,
                self.step,
                self.model.state_dict(),
                config,
                {"step": self.step, "finetune": True},
                tokenizer_path=tok,
                keep=1,
            )
        from turbolm.finetune.lora import save_adapter

        meta = {
            "format": 1,
            "task": self._task_entry(),
            "base": {
                "checkpoint": str(self.base.path),
                "step": self.base.step,
                "model": self.lm_kwargs,
            },
            "lora": dataclasses.asdict(self.cfg.lora),
            "targets": self.targets.groups,
            "steps": self.step,
        }
        return save_adapter(self.model, self.out_dir / ADAPTER_SUBDIR, meta, tok)


def finetune(cfg: FinetuneConfig, base: str | Path, **kwargs) -> FinetuneResult:
    """``Finetuner(cfg, base, **kwargs).run()``."""
    return Finetuner(cfg, base, **kwargs).run()


__all__ = ["Finetuner", "FinetuneResult", "finetune"]
