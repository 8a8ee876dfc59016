"""LoRA vs full fine-tuning: trainable parameters, optimizer-state and gradient bytes, peak
memory of a training step, and step time, for the Transformer and the RNN LM.

Each row builds a fresh model with random weights (the numbers do not depend on the weights),
wraps it as ``turbolm finetune`` does (``turbolm.finetune``: peft LoRA on the resolved targets,
or every parameter trainable for full fine-tuning; a ``SequenceClassifier`` head for the
classification rows), and times AdamW training steps (forward, backward, clip, step,
zero_grad) on random token batches.

* optimizer state: bytes of AdamW's ``exp_avg`` / ``exp_avg_sq`` (+ ``step``) after a step;
* grads: bytes of the gradients one step produces (trainable parameters only);
* step peak: extra memory allocated at the peak of one training step beyond what was live
  before it (GPU: allocator statistics; CPU: the profiler's allocation events) -- activations
  kept for backward, gradients, optimizer temporaries;
* step time: median (and min) wall time of a training step after warm-up.

    python benchmarks/bench_finetune.py                    # CPU, writes results/cpu/finetune.*
    python benchmarks/bench_finetune.py --device cuda      # results/<gpu>/finetune.*
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import peak_memory_mb, set_threads, time_stats_ms, write_results  # noqa: E402

from turbolm.models import build_model  # noqa: E402

TRANSFORMER = {
    "arch": "transformer",
    "vocab_size": 4096,
    "n_layer": 4,
    "n_head": 4,
    "d_model": 192,
    "context": 128,
}  # the default `turbolm train` model
RNN = {
    "arch": "rnn",
    "vocab_size": 4096,
    "n_layer": 2,
    "d_embed": 256,
    "d_hidden": 256,
    "context": 128,
    "cell": "lstm",
}

# (model name, model kwargs, task, method label, lora r, lora targets)
CASES = [
    ("transformer", TRANSFORMER, "lm", "full", 0, None),
    ("transformer", TRANSFORMER, "lm", "LoRA r=8 attn+mlp", 8, ["attn", "mlp"]),
    ("transformer", TRANSFORMER, "lm", "LoRA r=8 attn", 8, ["attn"]),
    ("transformer", TRANSFORMER, "classify", "full", 0, None),
    ("transformer", TRANSFORMER, "classify", "LoRA r=8 attn+mlp", 8, ["attn", "mlp"]),
    ("rnn (lstm)", RNN, "lm", "full", 0, None),
    ("rnn (lstm)", RNN, "lm", "LoRA r=8 rnn", 8, ["rnn"]),
    ("rnn (lstm)", RNN, "classify", "full", 0, None),
    ("rnn (lstm)", RNN, "classify", "LoRA r=8 rnn", 8, ["rnn"]),
]


def build(kwargs: dict, task: str, r: int, targets: list[str] | None, device: str):
    from turbolm.finetune.classifier import SequenceClassifier
    from turbolm.finetune.lora import add_lora, lora_config, resolve_targets
    from turbolm.finetune.train import _decay_groups

    torch.manual_seed(0)
    lm = build_model(dict(kwargs))
    model = SequenceClassifier(lm, 8, "mean") if task == "classify" else lm
    if r > 0:
        t = resolve_targets(lm, targets)
        cfg = lora_config(
            t,
            r,
            2 * r,
            0.0,
            prefix="lm." if task == "classify" else "",
            modules_to_save=["score"] if task == "classify" else None,
        )
        model = add_lora(model, cfg)
    model = model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(_decay_groups(params, 0.0), lr=1e-4)
    return model, params, opt


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def cpu_step_peak_mb(fn) -> float | None:
    """Resident memory at the peak of one ``fn()`` beyond the resident memory before it
    (Linux: the high-water mark is reset through /proc/self/clear_refs)."""
    try:
        gc.collect()
        before = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        fn()
        return (_status_kb("VmHWM") - before) / 1024
    except (OSError, KeyError):
        return None


def cpu_peak_in_child(args) -> float | None:
    """Run this case's step-peak measurement in a fresh process whose malloc returns every
    block >= 64 KiB to the OS on free (``MALLOC_MMAP_THRESHOLD_``), so freed tensors do not
    hide in malloc's cache. A separate process: that setting slows allocation and would
    distort the step times measured here."""
    cmd = [
        sys.executable,
        __file__,
        "--case",
        str(args.case),
        "--peak-only",
        "--batch-size",
        str(args.batch_size),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])["step_peak_MB"]
    except (IndexError, KeyError, json.JSONDecodeError):
        print(f"step-peak child failed: {done.stderr[-500:]}", file=sys.stderr)
        return None


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def run_case(name, kwargs, task, method, r, targets, args) -> dict:
    device = args.device
    model, params, opt = build(kwargs, task, r, targets, device)
    B, T = args.batch_size, kwargs["context"]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, kwargs["vocab_size"], (B, T), generator=g).to(device)
    y = torch.randint(0, 8, (B,), generator=g).to(device)
    lengths = torch.full((B,), T, dtype=torch.int64, device=device)

    def step():
        if task == "lm":
            _, loss = model(x, x)
        else:
            loss = F.cross_entropy(model(x, lengths), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        grad_bytes = tensor_bytes(p.grad for p in params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return grad_bytes

    grad_bytes = step()  # allocates the optimizer state
    if args.peak_only:
        return {"step_peak_MB": cpu_step_peak_mb(step)}
    opt_bytes = tensor_bytes(v for s in opt.state.values() for v in s.values())
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in params)
    peak = cpu_peak_in_child(args) if device == "cpu" else peak_memory_mb(step, device)
    med, best = time_stats_ms(step, device, reps=args.reps, warmup=2)
    return {
        "model": name,
        "task": task,
        "method": method,
        "trainable_params": trainable,
        "trainable_%": 100.0 * trainable / total,
        "optimizer_state_MB": opt_bytes / 2**20,
        "grads_MB": grad_bytes / 2**20,
        "step_peak_MB": peak if peak is not None else float("nan"),
        "step_ms": med,
        "step_ms_min": best,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    parser.add_argument("--out", default=None, help="results folder (default results/<device>)")
    parser.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--peak-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.peak_only:  # child of cpu_peak_in_child
        print(json.dumps(run_case(*CASES[args.case], args)))
        return 0
    rows = []
    for i, case in enumerate(CASES):
        args.case = i
        row = run_case(*case, args)
        rows.append(row)
        print(
            f"{row['model']:>12} {row['task']:>8} {row['method']:>18}: "
            f"{row['trainable_params']:>9,} trainable ({row['trainable_%']:.2f}%), "
            f"optimizer {row['optimizer_state_MB']:.2f} MB, grads {row['grads_MB']:.2f} MB, "
            f"step peak {row['step_peak_MB']:.1f} MB, step {row['step_ms']:.1f} ms",
            flush=True,
        )
    notes = [
        f"batch {args.batch_size} x context 128 tokens, fp32, AdamW; random weights and "
        "tokens (the measured quantities do not depend on them)",
        "transformer: the default `turbolm train` model (4 layers, d_model 192, 4 heads, "
        "vocab 4096, tied embeddings); rnn: 2-layer LSTM, 256 wide, vocab 4096, tied",
        "LoRA through peft; attn = every block's attn.qkv + attn.proj, mlp = mlp.fc + "
        "mlp.proj; rnn = the LSTM's weight_ih/weight_hh matrices (peft target_parameters); "
        "classify adds a trainable 8-way head (peft modules_to_save)",
        "step peak: memory at the peak of one training step beyond what was resident before "
        "it (CPU: resident-set high-water mark, in a child process whose malloc returns freed "
        "blocks to the OS; GPU: "
        "allocator peak): activations, gradients, optimizer temporaries; weights and the "
        "optimizer state are resident before the step and not included",
        f"step time: median and min of {args.reps} steps after warm-up; compare rows of one "
        "run (other processes on the machine move absolute numbers)",
    ]
    folder = write_results(
        rows, args.device, "finetune", "Fine-tuning: LoRA vs full", notes, args.out
    )
    print(f"results written to {folder}/finetune.md and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
