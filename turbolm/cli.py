"""The ``turbolm`` command: prepare, train, consolidate, eval, generate, doctor.

Every expected failure (bad argument, config, data or checkpoint) prints one line
``turbolm <command>: error: ...`` and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from turbolm.errors import TurboLMError

EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors in the same one-line style as everything else."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


# --------------------------------------------------------------------------------- prepare


def _cmd_prepare(args) -> int:
    from turbolm.data import prepare

    meta = prepare(
        args.out,
        args.paths or None,
        vocab_size=args.vocab_size,
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        seed=args.seed,
        include=args.include or None,
        jsonl_field=args.jsonl_field,
        max_docs=args.max_docs,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    splits = meta["splits"]
    print(
        f"prepared {args.out}: vocab {meta['vocab_size']}, "
        f"train {splits['train']['tokens']:,} tokens ({splits['train']['documents']} docs), "
        f"val {splits['val']['tokens']:,} tokens ({splits['val']['documents']} docs)"
    )
    return 0


# ----------------------------------------------------------------------------------- train


def _cmd_train(args) -> int:
    from turbolm.config import load_config
    from turbolm.train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(
        cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress
    )
    result = trainer.run()
    if result.interrupted_by:
        return EXIT_SIGINT if result.interrupted_by == "SIGINT" else EXIT_SIGTERM
    if result.rank != 0:  # data-parallel run: rank 0 reports for all
        return 0
    val = result.val
    print(
        f"step {result.step}: val loss {val['loss']:.4f} nats/token "
        f"(unigram entropy of the val split: {result.unigram_entropy:.4f}), "
        f"perplexity {val['perplexity']:.2f}, next-token accuracy {val['accuracy']:.3f}"
    )
    print(f"checkpoint: {result.checkpoint}")
    if result.sample:
        print("--- sample ---")
        print(result.sample)
        print("--------------")
    return 0


# ----------------------------------------------------------------------------- consolidate


def _cmd_consolidate(args) -> int:
    from turbolm.train.distributed import consolidate

    out = consolidate(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"consolidated {args.checkpoint} -> {out}")
    return 0


# ------------------------------------------------------------------------------------ eval


def _eval_tokens(args, trained):
    """The tokens to evaluate on: --data (prepared folder or raw files) or the run's val split."""
    import numpy as np

    from turbolm.data import TokenData, collect_documents, is_prepared

    if args.data is None:
        data_dir = trained.config["run"]["data"]["dir"]
        return TokenData(data_dir).val, f"{data_dir} (val split)"
    if len(args.data) == 1 and is_prepared(args.data[0]):
        return TokenData(args.data[0]).val, f"{args.data[0]} (val split)"
    docs = collect_documents(args.data)
    tok = trained.tokenizer
    ids: list[int] = []
    for encoded in tok.encode_batch([d.text for d in docs]):
        ids.extend(encoded)
        ids.append(tok.eot_id)
    return np.asarray(ids, dtype=np.int64), f"{len(docs)} document(s) from {', '.join(args.data)}"


def _cmd_eval(args) -> int:
    import torch

    from turbolm.eval.lm import evaluate_lm
    from turbolm.train.loading import load_trained

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    from turbolm.finetune.commands import eval_classification, is_classification

    if is_classification(args):  # a classification adapter or checkpoint: its own metrics
        return eval_classification(args, device)
    trained = load_trained(args.checkpoint, device, adapter=args.adapter)
    tokens, source = _eval_tokens(args, trained)
    context = args.context or trained.config["model"]["context"]
    if context > trained.config["model"]["context"]:
        raise TurboLMError(
            f"--context {context} is larger than the model's maximum context "
            f"{trained.config['model']['context']}"
        )
    metrics = evaluate_lm(
        trained.model,
        tokens,
        batch_size=args.batch_size,
        context=context,
        max_batches=args.max_batches,
        device=device,
    )
    metrics.update(checkpoint=str(trained.path), step=trained.step, data=source)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(
            f"{trained.path} on {source}: loss {metrics['loss']:.4f}, "
            f"perplexity {metrics['perplexity']:.2f}, accuracy {metrics['accuracy']:.4f} "
            f"({metrics['tokens']:,} tokens)"
        )
    return 0


# -------------------------------------------------------------------------------- generate


def _say_which_decode_kernel(model, device: str) -> None:
    """One stderr line when a Transformer decodes on CPU without the C++ decode kernel
    (``auto`` does not compile the extension on its own; see turbolm/ops/decode_kernels.py)."""
    from turbolm import ext
    from turbolm.ops import registry

    if device != "cpu" or getattr(model, "max_context", None) is None:  # RNNs: no attention
        return
    if registry.requested_backend("attention")[0] == "auto" and not ext.is_built():
        print(
            "turbolm: the C++ decode kernel is not built, so decoding uses torch's SDPA "
            "(build it once with `python -m turbolm.ext`; auto uses it for caches of 1024+ "
            "keys, where it is faster)",
            file=sys.stderr,
        )


def _cmd_generate(args) -> int:
    import torch

    from turbolm.generate import generate_tokens
    from turbolm.ops.registry import use_backend
    from turbolm.train.loading import load_trained

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    trained = load_trained(args.checkpoint, device, adapter=args.adapter)
    tok = trained.tokenizer
    prompt_ids = tok.encode(args.prompt) or [tok.eot_id]
    stream = tok.decode_stream()
    out = sys.stdout
    with use_backend(args.backend):
        _say_which_decode_kernel(trained.model, device)
    out.write(args.prompt)
    with use_backend(args.backend):
        for token_id in generate_tokens(
            trained.model,
            prompt_ids,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop_id=None if args.no_stop else tok.eot_id,
        ):
            out.write(stream.push(token_id))
            out.flush()
    out.write(stream.flush() + "\n")
    return 0


# ---------------------------------------------------------------------------------- doctor


def _cmd_doctor(args) -> int:
    import platform

    import torch

    from turbolm.ops import registry

    print(f"turbolm {__import__('turbolm').__version__}, Python {platform.python_version()}")
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    try:
        import transformers

        print(f"transformers {transformers.__version__} (turbolm.patching)")
    except ImportError:
        print("transformers: not installed (turbolm.patching patches plain PyTorch models only)")
    if torch.cuda.is_available():
        print(
            f"GPU: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})"
        )
    else:
        print("GPU: none")
    import turbolm.ops  # noqa: F401  (registers every op)

    for op in registry.ops():
        states = []
        for name, backend in registry.registered(op).items():
            reason = backend.available()
            states.append(name if reason is None else f"{name} (unavailable: {reason})")
        print(f"  {op}: {', '.join(states)}")
    return 0


# ----------------------------------------------------------------------------------- bench


def _benchmarks_dir():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "benchmarks"


def _cmd_bench(args) -> int:
    """Run ``benchmarks/bench_<op>.py`` with the remaining arguments (source checkouts)."""
    import runpy

    script = _benchmarks_dir() / f"bench_{args.op}.py"
    if not script.is_file():
        known = sorted(p.stem.removeprefix("bench_") for p in _benchmarks_dir().glob("bench_*.py"))
        raise TurboLMError(
            f"no benchmark named {args.op!r} in {_benchmarks_dir()} (known: {', '.join(known)})"
        )
    sys.argv = [str(script), *args.bench_args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


# ---------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="turbolm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version="turbolm 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prepare", help="tokenize a corpus into memory-mapped token shards")
    p.add_argument("paths", nargs="*", help="files, folders or .jsonl (default: embedded corpus)")
    p.add_argument("--out", default="data_cache/stdlib", help="output folder")
    p.add_argument("--vocab-size", type=_positive_int, default=4096)
    p.add_argument("--tokenizer", choices=["bpe", "bytes"], default="bpe")
    p.add_argument("--include", action="append", help="glob filter for folders (repeatable)")
    p.add_argument("--jsonl-field", default="text")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--max-docs", type=_positive_int, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("train", help="train a model (no arguments: the default run)")
    p.add_argument("-c", "--config", help="YAML run config")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.lr=3e-4")
    # The deepspeed launcher appends --local_rank=N unless given --no_local_rank; the rank
    # is read from the environment (LOCAL_RANK) either way.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "consolidate",
        help="DeepSpeed (ZeRO) checkpoint -> one model.safetensors that eval/generate load",
    )
    p.add_argument("--checkpoint", required=True, help="DeepSpeed step folder or run folder")
    p.add_argument("--out", required=True, help="output folder (a turbolm checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_cmd_consolidate)

    p = sub.add_parser("eval", help="loss, perplexity and accuracy of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint or run folder")
    p.add_argument("--data", nargs="+", help="prepared folder, or text files/folders/.jsonl")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--context", type=_positive_int, default=None)
    p.add_argument("--max-batches", type=_positive_int, default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--adapter", help="LoRA adapter folder to apply (from turbolm finetune)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("generate", help="sample text from a checkpoint (streams to stdout)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--max-new-tokens", type=_positive_int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=_positive_int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-stop", action="store_true", help="do not stop at end-of-text")
    p.add_argument("--backend", default="auto", help="op backend (see turbolm doctor)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--adapter", help="LoRA adapter folder to merge in (from turbolm finetune)")
    p.set_defaults(func=_cmd_generate)

    from turbolm.finetune.commands import add_parsers as add_finetune_parsers

    add_finetune_parsers(sub)  # finetune, merge

    p = sub.add_parser("bench", help="run benchmarks/bench_<op>.py (e.g. norm, attention, rnn)")
    p.add_argument("op", help="benchmark name: norm, attention, rnn, zero, finetune, ...")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("doctor", help="versions, GPU, and which backends are available")
    p.set_defaults(func=_cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after options (argparse stops collecting a
    # positional list at the first option), so gather leftovers of that shape here.
    args, extra = parser.parse_known_args(argv)
    overrides = [x for x in extra if "=" in x and not x.startswith("-")]
    unknown = [x for x in extra if x not in overrides]
    if unknown or (overrides and args.command not in ("train", "finetune")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    try:
        return args.func(args)
    except TurboLMError as e:
        print(f"turbolm {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"turbolm {args.command}: interrupted", file=sys.stderr)
        return EXIT_SIGINT
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
