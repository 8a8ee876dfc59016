"""Activation checkpointing (``train.activation_checkpointing``): memory saved and time paid.

For each Transformer size, one training step's forward + backward (random tokens, fp32 on
CPU, bf16 autocast on GPU) with and without recomputing the blocks in backward:

* ``saved_MB``: bytes the autograd graph keeps for backward, parameters excluded (counted
  exactly with ``torch.autograd.graph.saved_tensors_hooks``; same on every device);
* ``peak_MB``: GPU only, the allocator's peak extra allocation of the step (activations,
  gradients, temporaries); "-" on CPU, which keeps no peak statistics;
* ``step_ms``: median (and min) wall time of forward + backward after warm-up.

    python benchmarks/bench_checkpointing.py                   # CPU -> results/cpu/
    python benchmarks/bench_checkpointing.py --device cuda     # results/<gpu>/
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from common import peak_memory_mb, set_threads, time_stats_ms, write_results  # noqa: E402

from turbolm.models import build_model  # noqa: E402

# name -> (model kwargs, batch size); context = sequence length of the step
SIZES = {
    "tiny": (dict(n_layer=2, n_head=2, d_model=32, context=32), 2),  # tests
    "default": (dict(n_layer=4, n_head=4, d_model=192, context=128), 16),  # `turbolm train`
    "small": (dict(n_layer=8, n_head=8, d_model=512, context=512), 4),
    "gpt2": (dict(n_layer=12, n_head=12, d_model=768, context=1024), 8),  # GPU preset
}
PRESETS = {"cpu": ["default", "small"], "gpu": ["default", "small", "gpt2"]}


def saved_activation_mb(model: torch.nn.Module, step) -> float:
    """MiB of tensors one forward saves for backward, parameters excluded."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total / 2**20


def measure(name: str, device: str, reps: int) -> list[dict]:
    kwargs, batch = SIZES[name]
    torch.manual_seed(0)
    model = build_model({"arch": "transformer", "vocab_size": 4096, **kwargs}).to(device)
    idx = torch.randint(0, 4096, (batch, kwargs["context"]), device=device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device != "cpu"
        else contextlib.nullcontext()
    )

    def step():
        with autocast:
            _, loss = model(idx, idx)
        loss.backward()
        model.zero_grad(set_to_none=True)

    rows = []
    for flag in (False, True):
        model.activation_checkpointing = flag
        med, low = time_stats_ms(step, device, reps=reps, warmup=2)
        peak = peak_memory_mb(step, device) if device != "cpu" else None
        rows.append(
            {
                "model": name,
                "layers": kwargs["n_layer"],
                "d_model": kwargs["d_model"],
                "batch": batch,
                "seq": kwargs["context"],
                "checkpointing": flag,
                "saved_MB": saved_activation_mb(model, step),
                "peak_MB": peak,
                "step_ms": med,
                "step_min_ms": low,
            }
        )
    off = rows[0]
    for row in rows:
        row["saved_vs_off"] = row["saved_MB"] / off["saved_MB"]
        row["time_vs_off"] = row["step_min_ms"] / off["step_min_ms"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default=None, help=f"comma list of {sorted(SIZES)}")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="results folder (default results/<device>)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    names = (
        args.sizes.split(",") if args.sizes else PRESETS["cpu" if args.device == "cpu" else "gpu"]
    )
    unknown = [n for n in names if n not in SIZES]
    if unknown:
        parser.error(f"unknown size {unknown[0]!r} (known: {', '.join(sorted(SIZES))})")
    rows = [row for name in names for row in measure(name, args.device, args.reps)]
    notes = [
        "One forward + backward of TransformerLM (random tokens, loss on the inputs); fp32 on "
        "CPU, bf16 autocast on GPU.",
        "saved_MB: tensors kept for backward, parameters excluded (saved_tensors_hooks); "
        "peak_MB: GPU allocator peak of the step.",
        "time_vs_off: min step time with recomputation / without.",
    ]
    folder = write_results(
        rows,
        args.device,
        "checkpointing",
        "Activation checkpointing: memory and time",
        notes,
        args.out,
        argv=None if argv is None else ["benchmarks/bench_checkpointing.py", *argv],
    )
    print((folder / "checkpointing.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
