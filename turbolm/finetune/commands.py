"""The ``turbolm finetune`` / ``turbolm merge`` commands and classification ``turbolm eval``.

Kept out of ``turbolm/cli.py`` (which only registers them) so that importing the CLI stays
cheap: peft and scikit-learn are imported when a command needs them.
"""

from __future__ import annotations

import json
import os


def add_parsers(sub) -> None:
    """Register ``finetune`` and ``merge`` on the CLI's sub-parser collection."""
    p = sub.add_parser(
        "finetune",
        help="fine-tune a checkpoint: LoRA (peft) or full, causal LM or classification",
        description=(
            "Fine-tune BASE on new text (task=lm) or labelled JSONL (task=classify). "
            "Keys: finetune.* (task, data, val_data, pool, max_len, ...), lora.* (r, alpha, "
            "dropout, target; r=0 = full fine-tuning), train.* (as turbolm train)."
        ),
    )
    p.add_argument("--checkpoint", required=True, help="base checkpoint or run folder")
    p.add_argument("--data", nargs="+", help="training data: text files/folders/.jsonl")
    p.add_argument("--val-data", nargs="+", help="validation data (default: split from --data)")
    p.add_argument("-c", "--config", help="YAML fine-tuning config (configs/finetune*.yaml)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. lora.r=4 task=classify")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("merge", help="merge a LoRA adapter into a plain turbolm checkpoint")
    p.add_argument("--checkpoint", required=True, help="the base the adapter was trained on")
    p.add_argument("--adapter", required=True, help="adapter folder (or fine-tuning run folder)")
    p.add_argument("--out", required=True, help="output run folder")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_merge)


def cmd_finetune(args) -> int:
    from turbolm.finetune.config import load_finetune_config
    from turbolm.finetune.train import Finetuner

    overrides = list(args.overrides)
    # `--data a.jsonl task=classify`: nargs="+" swallows the overrides; give them back.
    for name in ("data", "val_data"):
        values = getattr(args, name) or []
        moved = [v for v in values if "=" in v and not os.path.exists(v)]
        overrides += moved
        setattr(args, name, [v for v in values if v not in moved])
    if args.data:
        overrides.append("finetune.data=" + json.dumps(args.data))
    if args.val_data:
        overrides.append("finetune.val_data=" + json.dumps(args.val_data))
    cfg = load_finetune_config(args.config, overrides)
    result = Finetuner(
        cfg, args.checkpoint, overwrite=args.overwrite, progress=not args.no_progress
    ).run()
    pct = 100 * result.trainable_fraction
    print(
        f"fine-tuned {result.step} steps ({result.task}); trainable parameters "
        f"{result.trainable_params:,} of {result.total_params:,} ({pct:.2f}%)"
    )
    if result.task == "classify":
        from turbolm.finetune.metrics import format_report

        print(format_report(result.val, result.baseline))
    else:
        v = result.val
        print(
            f"val loss {v['loss']:.4f}, perplexity {v['perplexity']:.2f}, "
            f"accuracy {v['accuracy']:.4f}"
        )
    print(f"output: {result.output}")
    if cfg.lora.r > 0:
        print(
            f"use it: turbolm eval --checkpoint {args.checkpoint} --adapter {result.output}"
            + (" --data TEST.jsonl" if result.task == "classify" else "")
        )
    return 0


def cmd_merge(args) -> int:
    from turbolm.finetune.merge import merge_adapter

    ckpt = merge_adapter(args.checkpoint, args.adapter, args.out, overwrite=args.overwrite)
    print(f"merged checkpoint: {ckpt}")
    return 0


def is_classification(args) -> bool:
    """Whether ``turbolm eval`` was pointed at a classification adapter or checkpoint."""
    from turbolm.finetune.loading import adapter_task, checkpoint_task

    if getattr(args, "adapter", None):
        task = adapter_task(args.adapter)
    else:
        task = checkpoint_task(args.checkpoint)
    return task.get("type") == "classify"


def eval_classification(args, device: str) -> int:
    """Accuracy, per-class / macro precision, recall, F1, confusion matrix, baseline."""
    from turbolm.errors import DataError
    from turbolm.finetune.data import check_labels, encode_examples, read_labelled_jsonl
    from turbolm.finetune.loading import load_classifier, predict_logits
    from turbolm.finetune.metrics import classification_report, format_report, majority_baseline

    loaded = load_classifier(args.checkpoint, getattr(args, "adapter", None), device)
    task, labels = loaded.task, loaded.labels
    paths = args.data or task.get("val_data") or []
    if not paths:
        raise DataError("give the labelled data to evaluate on: --data FILE.jsonl")
    examples = read_labelled_jsonl(
        paths, task.get("text_field", "text"), task.get("label_field", "label")
    )
    check_labels(examples, labels, "eval data")
    max_len = task.get("max_len") or loaded.lm_kwargs.get("context")
    ids, y = encode_examples(examples, loaded.tokenizer, labels, int(max_len))
    logits = predict_logits(loaded.model, ids, loaded.tokenizer.eot_id, args.batch_size, device)
    report = classification_report(y, logits.argmax(dim=-1).tolist(), labels)
    counts = task.get("label_counts") or {}
    train_counts = [int(counts.get(str(lab), 0)) for lab in labels]
    majority = train_counts.index(max(train_counts)) if any(train_counts) else 0
    baseline = majority_baseline(y, majority, labels)
    result = {
        "checkpoint": str(loaded.path),
        "adapter": str(loaded.adapter) if loaded.adapter else None,
        "data": list(paths),
        "task": "classify",
        **report,
        "majority_baseline": baseline,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        where = f"{loaded.path}" + (f" + adapter {loaded.adapter}" if loaded.adapter else "")
        print(f"{where} on {', '.join(paths)} ({report['examples']} examples):")
        print(format_report(report, baseline))
    return 0
