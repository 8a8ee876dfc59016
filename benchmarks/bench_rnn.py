"""Fused RNN layer benchmark: turbolm's kernel backends against torch.nn and an unfused cell loop.

For each (cell, B x T x H, implementation) of a one-layer, unidirectional LSTM / GRU with
input size H: forward time (training mode: grad enabled, activations saved), forward+backward
time, tokens/s of forward+backward, peak memory of one forward+backward, and the max error of
the output against the fp64 reference on the same inputs. Implementations:

* ``torch.nn``: ``torch.nn.LSTM`` / ``GRU`` (cuDNN on GPU; oneDNN for the CPU LSTM, ATen's
  native loop for the CPU GRU);
* ``cell-loop``: ``torch.nn.LSTMCell`` / ``GRUCell`` called once per step from Python (unfused);
* ``turbolm-layernorm``: ``turbolm.nn.LSTM`` / ``GRU`` with ``layer_norm=True`` (the
  LayerNorm-LSTM / -GRU of Ba et al. 2016: other math, so its error is against the same module
  in fp64; a Python time loop, LayerNorms through turbolm's norm op, ``auto`` backend);
  ``--no-layernorm`` leaves it out. The LayerNorm-LSTM with unit gains is a sensitive
  recurrence: its fp32 error grows along time (to ~1e-3 at T=128) for a plain fp32
  implementation too (tests/test_layernorm_rnn.py holds it to the harness bound);
* ``turbolm-cpu`` / ``turbolm-cuda`` / ``turbolm-triton``: ``turbolm.nn.LSTM`` / ``GRU`` on that
  backend (those that can run on the device).

On CPU the table also gives the process CPU time of forward+backward (min over repeats): the
wall clock of a busy shared machine swings by 2x, the CPU time much less.

    python benchmarks/bench_rnn.py                      # GPU if present, else CPU; standard sizes
    python benchmarks/bench_rnn.py --device cpu --threads 2 --sizes 32x128x256
    python benchmarks/bench_rnn.py --sizes 32x128x128,256x1024x1024 --cells lstm
    python benchmarks/bench_rnn.py --sizes 32x128x256 --no-layernorm \
        --cuda-variants loop,graph,persistent,persistent+graph --impls turbolm-cuda

Writes ``rnn.csv`` / ``rnn.md`` (and ``rnn.png`` with matplotlib) under
``benchmarks/results/<device>/`` (``--out`` to change). Sizes are ``BxTxH``; the issue's full
grid is B in {32, 256}, T in {128, 1024}, H in {128, 256, 512, 1024} (``--sizes full``).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when run as a script

import torch  # noqa: E402
from common import peak_memory_mb, set_threads, sync, time_stats_ms, write_results  # noqa: E402

from turbolm.ops import registry, rnn_kernels, use_backend  # noqa: E402
from turbolm.ops.rnn import rnn_layer_reference  # noqa: E402

# Standard sizes: the GPU set fits gpu_check.sh's 150 s per benchmark; --sizes full for all.
GPU_SIZES = "32x128x256,32x128x1024,256x128x256,256x128x1024,32x1024x256"
CPU_SIZES = "32x128x256"
FULL = ",".join(
    f"{b}x{t}x{h}" for b, t, h in itertools.product((32, 256), (128, 1024), (128, 256, 512, 1024))
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KERNEL_BACKENDS = ("cpu", "cuda", "triton")


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    if text == "full":
        text = FULL
    sizes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        b, t, h = (int(v) for v in part.lower().split("x"))
        sizes.append((b, t, h))
    return sizes


def make_modules(cell: str, hidden: int, device, dtype):
    """(torch.nn module, turbolm module, cell module) sharing one set of weights."""
    from turbolm.nn.rnn import GRU, LSTM

    torch_cls, ours_cls, cell_cls = (
        (torch.nn.LSTM, LSTM, torch.nn.LSTMCell)
        if cell == "lstm"
        else (torch.nn.GRU, GRU, torch.nn.GRUCell)
    )
    ref = torch_cls(hidden, hidden).to(device, dtype)
    ours = ours_cls(hidden, hidden).to(device, dtype)
    ours.load_state_dict(ref.state_dict())
    loop = cell_cls(hidden, hidden).to(device, dtype)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(loop, name).copy_(getattr(ref, f"{name}_l0"))
    return ref, ours, loop


def cell_loop(cell: str, module, x):
    """The unfused baseline: one cell call per step from Python."""
    h = x.new_zeros(x.shape[1], module.hidden_size)
    c = h.clone()
    outs = []
    for t in range(x.shape[0]):
        if cell == "lstm":
            h, c = module(x[t], (h, c))
        else:
            h = module(x[t], h)
        outs.append(h)
    return torch.stack(outs)


def layernorm_module(cell: str, ref, device, dtype):
    """The layer_norm=True twin of ``ref`` (same torch.nn weights; LayerNorm gains 1, shifts 0)."""
    from turbolm.nn.rnn import GRU, LSTM

    cls = LSTM if cell == "lstm" else GRU
    module = cls(ref.input_size, ref.hidden_size, layer_norm=True).to(device, dtype)
    module.load_state_dict(ref.state_dict(), strict=False)
    return module


def implementations(
    cell: str,
    device: str,
    hidden: int,
    dtype,
    layernorm: bool = True,
    cuda_variants: list[str] | None = None,
):
    """name -> (forward fn(x) -> y, parameters, fp64 reference fn or None), for what can run here
    (None: the plain cell's fp64 reference). ``cuda_variants``: one ``turbolm-cuda`` entry per
    CUDA time-loop variant (``turbolm-cuda-<variant>``; ``loop`` keeps the plain name); each
    call sets the variant, which the backward of the same fwd+bwd then also uses."""
    ref, ours, loop = make_modules(cell, hidden, device, dtype)
    impls = {"torch.nn": (lambda x: ref(x)[0], list(ref.parameters()), None)}
    probe = torch.zeros(2, 1, hidden, device=device, dtype=dtype)
    for name in KERNEL_BACKENDS:
        backend = registry.registered(cell).get(name)
        if backend is None:
            continue
        reason = backend.why_not(input=probe, weights=list(ours._flat_weights), auto=False)
        if reason is None and name == "cuda" and cuda_variants:
            for variant in cuda_variants:

                def run(x, name=name, variant=variant):
                    rnn_kernels.set_cuda_variant(variant)
                    with use_backend(name):
                        return ours(x)[0]

                label = "turbolm-cuda" if variant == "loop" else f"turbolm-cuda-{variant}"
                impls[label] = (run, list(ours.parameters()), None)
        elif reason is None:

            def run(x, name=name):
                with use_backend(name):
                    return ours(x)[0]

            impls[f"turbolm-{name}"] = (run, list(ours.parameters()), None)
        else:
            print(f"  skip turbolm-{name}: {reason}", file=sys.stderr)
    impls["cell-loop"] = (lambda x: cell_loop(cell, loop, x), list(loop.parameters()), None)
    if layernorm:
        ln = layernorm_module(cell, ref, device, dtype)
        ln64 = layernorm_module(cell, ref, device, torch.float64)
        ln64.load_state_dict(ln.state_dict())
        impls["turbolm-layernorm"] = (
            lambda x: ln(x)[0],
            list(ln.parameters()),
            lambda x: ln64(x.double())[0],
        )
    return impls, ref


def cpu_time_ms(fn, reps: int) -> float:
    """Min process CPU time of ``fn()`` over ``reps`` calls (all threads of this process)."""
    times = []
    for _ in range(reps):
        start = time.process_time()
        fn()
        times.append((time.process_time() - start) * 1e3)
    return min(times)


def max_error(fn, ref_module, x, ref_fn=None) -> float:
    """max |y - y_fp64| of one forward, the reference computed in fp64 from the same weights
    (``ref_fn(x)`` when given, else the plain cell's reference from ``ref_module``'s weights)."""
    with torch.no_grad():
        y = fn(x).double()
        if ref_fn is not None:
            return (y - ref_fn(x)).abs().max().item()
        weights = [w.double() for w in ref_module._flat_weights]
        h0 = x.new_zeros(1, x.shape[1], ref_module.hidden_size, dtype=torch.float64)
        mode = "lstm" if isinstance(ref_module, torch.nn.LSTM) else "gru"
        c0 = h0.clone() if mode == "lstm" else None
        y64 = rnn_layer_reference(x.double(), h0, c0, None, *weights, mode=mode)[0]
    return (y - y64).abs().max().item()


def bench(args) -> list[dict]:
    device, dtype = args.device, DTYPES[args.dtype]
    rows = []
    variant_before = rnn_kernels.get_cuda_variant()
    for cell, (batch, steps, hidden) in itertools.product(args.cells, parse_sizes(args.sizes)):
        print(f"{cell} B{batch} T{steps} H{hidden}", file=sys.stderr)
        impls, ref_module = implementations(
            cell, device, hidden, dtype, not args.no_layernorm, args.cuda_variants
        )
        if args.impls:
            impls = {
                k: v
                for k, v in impls.items()
                if k == "torch.nn" or any(k == p or k.startswith(p + "-") for p in args.impls)
            }
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(steps, batch, hidden, generator=gen).to(device, dtype)
        x.requires_grad_(True)
        dy = torch.randn(steps, batch, hidden, generator=gen).to(device, dtype)
        results = {}
        for name, (fn, params, ref_fn) in impls.items():
            if name == "cell-loop" and steps * hidden > args.max_loop:
                continue  # minutes per call on CPU; --max-loop to include

            def fwd(fn=fn, x=x):
                return fn(x)

            def fwd_bwd(fn=fn, params=params, x=x, dy=dy):
                torch.autograd.grad(fn(x), [x, *params], dy)

            reps = args.reps
            counted = args.cuda_variants and name.startswith("turbolm-cuda")
            stats_before = rnn_kernels.cuda_stats() if counted else None
            fwd_med, fwd_min = time_stats_ms(fwd, device, reps=reps, warmup=args.warmup)
            fb_med, fb_min = time_stats_ms(fwd_bwd, device, reps=reps, warmup=args.warmup)
            row = {
                "cell": cell,
                "B": batch,
                "T": steps,
                "H": hidden,
                "dtype": args.dtype,
                "impl": name,
                "fwd_ms": fwd_med,
                "fwd_min_ms": fwd_min,
                "fwd_bwd_ms": fb_med,
                "fwd_bwd_min_ms": fb_min,
            }
            if device == "cpu":
                row["fwd_bwd_cpu_ms"] = cpu_time_ms(fwd_bwd, reps)
            row["ktok_per_s"] = batch * steps / fb_med
            sync(device)
            row["peak_mem_mb"] = peak_memory_mb(fwd_bwd, device) if not args.no_memory else None
            row["max_err_vs_fp64"] = (
                max_error(fn, ref_module, x, ref_fn) if not args.no_error else float("nan")
            )
            if stats_before is not None:  # what the CUDA variant did over all these calls
                after = rnn_kernels.cuda_stats()
                row["cuda_paths"] = " ".join(
                    f"{k}={after[k] - stats_before[k]}"
                    for k in after
                    if after[k] != stats_before[k]
                )
            elif args.cuda_variants:
                row["cuda_paths"] = ""
            results[name] = row
            rows.append(row)
        if args.cuda_variants:
            rnn_kernels.set_cuda_variant(variant_before)
        base = results.get("torch.nn")
        for row in results.values():
            key = "fwd_bwd_cpu_ms" if device == "cpu" else "fwd_bwd_ms"
            row["speedup_vs_torch.nn"] = base[key] / row[key] if base else float("nan")
    return rows


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({f"{r['cell']} B{r['B']} T{r['T']} H{r['H']}" for r in rows})
    impls = sorted({r["impl"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(labels)), 4))
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        values = []
        for label in labels:
            match = [
                r["ktok_per_s"]
                for r in rows
                if r["impl"] == impl and f"{r['cell']} B{r['B']} T{r['T']} H{r['H']}" == label
            ]
            values.append(match[0] if match else 0)
        ax.bar([i + k * width for i in range(len(labels))], values, width, label=impl)
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=30, ha="right"
    )
    ax.set_ylabel("k tokens / s (forward + backward)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", help="BxTxH,... or 'full' (default: the device's standard set)")
    parser.add_argument("--cells", default="lstm,gru", type=lambda s: s.split(","))
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, help="torch intra-op threads (CPU)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--max-loop",
        type=int,
        default=1024 * 512,
        help="skip the cell loop above this T*H (it is slow)",
    )
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-error", action="store_true")
    parser.add_argument("--no-layernorm", action="store_true", help="leave out layer_norm=True")
    parser.add_argument(
        "--cuda-variants",
        type=lambda s: [v.strip() for v in s.split(",") if v.strip()],
        help="CUDA time-loop variants to compare, e.g. loop,graph,persistent,persistent+graph "
        "(default: the current variant only)",
    )
    parser.add_argument(
        "--impls",
        type=lambda s: s.split(","),
        help="only these implementations (table names or their prefix before '-', e.g. "
        "turbolm-cuda for every CUDA variant; torch.nn is always kept)",
    )
    parser.add_argument("--out", help="results folder (default benchmarks/results/<device>)")
    parser.add_argument("--name", default="rnn", help="result file name (<name>.csv / .md)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    args.sizes = args.sizes or (CPU_SIZES if args.device == "cpu" else GPU_SIZES)
    args.reps = args.reps or (7 if args.device == "cpu" else 30)
    load = (
        " ".join(open("/proc/loadavg").read().split()[:3])
        if Path("/proc/loadavg").exists()
        else "?"
    )
    rows = bench(args)
    notes = [
        "One layer, unidirectional, input size = H, zero initial states; fwd = training-mode "
        "forward (grad enabled), fwd_bwd = forward + gradients of input and weights.",
        "Times: median and min (ms) over the repeats; ktok_per_s from the fwd_bwd median.",
        f"Load average when the run started: {load} (1, 5, 15 min).",
        "turbolm-layernorm is a different model (LayerNorm-LSTM/GRU, Python time loop): its "
        "speedup is the price of the LayerNorms against plain torch.nn, its error is against "
        "itself in fp64.",
    ]
    if args.device == "cpu":
        notes.append(
            "fwd_bwd_cpu_ms: min process CPU time (all threads); speedup_vs_torch.nn uses it, "
            "since the wall clock of a shared machine is noisy."
        )
    else:
        notes.append("speedup_vs_torch.nn: torch.nn fwd_bwd median / this fwd_bwd median.")
    folder = write_results(
        rows, args.device, args.name, "RNN layers (LSTM / GRU)", notes, args.out, plot
    )
    print(f"wrote {folder}/{args.name}.csv and {args.name}.md", file=sys.stderr)
    for row in rows:
        print(
            f"{row['cell']:4s} B{row['B']:<4d} T{row['T']:<5d} H{row['H']:<5d} "
            f"{row['impl']:15s} fwd {row['fwd_ms']:9.2f} ms  fwd+bwd {row['fwd_bwd_ms']:9.2f} ms"
            f"  x{row['speedup_vs_torch.nn']:.2f} vs torch.nn"
            + (f"  [{row['cuda_paths']}]" if row.get("cuda_paths") else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
