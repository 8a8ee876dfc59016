"""Where the time of the fused RNN layers goes: a torch.profiler breakdown per configuration.

For each (cell, B x T x H, dtype, implementation) of a one-layer, unidirectional LSTM / GRU with
input size H, this runs a few warm-up forward+backward iterations, times ``--iters`` more with
the wall clock (no profiler), then profiles ``--iters`` iterations (CPU + CUDA activities) and
prints:

* wall time per iteration (unprofiled) against the GPU's busy time per iteration (the summed
  durations of its kernels, copies and fills): a busy share far below 100% means the host
  (Python, dispatcher, launch latency) is the bottleneck, not the kernels;
* the device activities (kernels, memcpy / memset) and the host-side launch calls
  (``cudaLaunchKernel`` / ``cuLaunchKernel*``) per iteration: launch-bound loops show ~2-3 per
  time step and direction;
* the top ``--top`` (15) CUDA kernels by total time, with calls per iteration and mean time.

Implementations: ``torch.nn`` (cuDNN on GPU), ``cuda`` and ``triton`` (``turbolm.nn.LSTM`` /
``GRU`` on that kernel backend); those that cannot run here are listed as skipped with the
reason. On ``--device cpu`` (a smoke test: ``--sizes 4x8x16``) the ``cpu`` backend replaces
``cuda`` / ``triton`` and the table lists the top CPU ops by self time instead of kernels.

    python benchmarks/profile_rnn.py --out /tmp/prof                   # the standard grid (GPU)
    python benchmarks/profile_rnn.py --out /tmp/prof --sizes 256x128x1024 --cells lstm \\
        --dtypes bfloat16 --backends cuda
    python benchmarks/profile_rnn.py --out /tmp/prof --sizes 32x128x256 --cells lstm \
        --backends torch.nn,cuda,cuda:graph,cuda:persistent
    python benchmarks/profile_rnn.py --device cpu --sizes 4x8x16 --out /tmp/prof

``--out DIR`` receives ``profile_rnn.txt`` (everything printed). fp32 GEMMs follow torch's
default (``torch.backends.cuda.matmul.allow_tf32``, False) unless ``--tf32``; cuDNN uses TF32 by
default (``torch.backends.cudnn.allow_tf32``), which favours ``torch.nn`` in fp32 comparisons.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # turbolm from a checkout

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GPU_SIZES = "32x128x256,32x128x1024,256x128x256,256x128x1024"
CPU_SIZES = "4x8x16"
LAUNCH_NAMES = (
    "cudaLaunchKernel",
    "cuLaunchKernel",
    "cudaLaunchCooperativeKernel",
    "cudaGraphLaunch",
)


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    sizes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        b, t, h = (int(v) for v in part.lower().split("x"))
        sizes.append((b, t, h))
    return sizes


class Tee:
    """print() to stdout and to the report file (line by line: a run cut short keeps its
    results so far)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w")

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.file.write(text + "\n")
        self.file.flush()


def make_impl(cell: str, backend: str, hidden: int, device: str, dtype):
    """(fn(x) -> y, parameters) or (None, reason) when the backend cannot run here.
    ``cuda:<variant>`` runs the cuda backend with that time-loop variant (``graph``,
    ``persistent``, ``persistent,graph``; rnn_kernels.cuda_variant)."""
    from turbolm.nn.rnn import GRU, LSTM
    from turbolm.ops import registry, rnn_kernels, use_backend

    backend, _, variant = backend.partition(":")

    torch_cls, ours_cls = (torch.nn.LSTM, LSTM) if cell == "lstm" else (torch.nn.GRU, GRU)
    torch.manual_seed(0)
    ref = torch_cls(hidden, hidden).to(device, dtype)
    if backend == "torch.nn":
        return (lambda x: ref(x)[0]), list(ref.parameters())
    ours = ours_cls(hidden, hidden).to(device, dtype)
    ours.load_state_dict(ref.state_dict())
    registered = registry.registered(cell).get(backend)
    if registered is None:
        return None, "not registered"
    probe = torch.zeros(2, 1, hidden, device=device, dtype=dtype)
    reason = registered.why_not(input=probe, weights=list(ours._flat_weights), auto=False)
    if reason is not None:
        return None, reason

    def run(x):
        if variant:  # set per call: the backward of the same fwd+bwd uses it too
            rnn_kernels.set_cuda_variant(variant)
        elif backend == "cuda":
            rnn_kernels.set_cuda_variant("loop")
        with use_backend(backend):
            return ours(x)[0]

    return run, list(ours.parameters())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def is_launch(name: str) -> bool:
    return name.startswith(LAUNCH_NAMES)


def profile_one(fwd_bwd, device: str, iters: int, top: int, out: Tee) -> dict:
    """Wall clock, then the profiled iterations; prints the breakdown and returns the summary."""
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fwd_bwd()
    sync(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / iters

    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(iters):
            fwd_bwd()
        sync(device)

    per_name: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    device_events = kernels = launches = 0
    busy_us = 0.0
    for evt in prof.events():
        if evt.device_type == DeviceType.CUDA:
            dur = evt.time_range.elapsed_us()
            busy_us += dur
            device_events += 1
            if not evt.name.lower().startswith(("memcpy", "memset")):
                kernels += 1
            entry = per_name[evt.name]
            entry[0] += 1
            entry[1] += dur
        elif is_launch(evt.name):
            launches += 1
    summary = {
        "wall_ms": wall_ms,
        "busy_ms": busy_us / 1e3 / iters,
        "kernels": kernels / iters,
        "device_events": device_events / iters,
        "launches": launches / iters,
    }
    if device == "cuda":
        busy = summary["busy_ms"]
        out(
            f"   wall {wall_ms:.3f} ms/iter | CUDA busy {busy:.3f} ms/iter "
            f"({100 * busy / wall_ms if wall_ms else 0:.0f}% of wall) | "
            f"{summary['kernels']:.0f} kernels + "
            f"{summary['device_events'] - summary['kernels']:.0f} memcpy/memset per iter | "
            f"{summary['launches']:.0f} host launch calls per iter"
        )
        out(f"   {'CUDA kernel':<70} {'calls/it':>9} {'ms/it':>9} {'avg us':>9} {'%':>6}")
        ranked = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]
        for name, (count, total) in ranked:
            short = name if len(name) <= 70 else name[:67] + "..."
            out(
                f"   {short:<70} {count / iters:>9.1f} {total / 1e3 / iters:>9.3f} "
                f"{total / count:>9.2f} {100 * total / busy_us if busy_us else 0:>6.1f}"
            )
    else:
        out(f"   wall {wall_ms:.3f} ms/iter (CPU)")
        out(f"   {'CPU op':<70} {'calls/it':>9} {'self ms/it':>11}")
        averages = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
        for evt in averages:
            short = evt.key if len(evt.key) <= 70 else evt.key[:67] + "..."
            out(
                f"   {short:<70} {evt.count / iters:>9.1f} {evt.self_cpu_time_total / 1e3 / iters:>11.3f}"
            )
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for profile_rnn.txt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--sizes", default=None, help="BxTxH list (GPU default: the 4 of the issue)"
    )
    parser.add_argument("--cells", default="lstm,gru")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument(
        "--backends",
        default=None,
        help="default: torch.nn,cuda,triton (cpu: torch.nn,cpu); cuda:<variant> for a CUDA "
        "time-loop variant, e.g. cuda:graph, cuda:persistent, 'cuda:persistent+graph'",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--tf32", action="store_true", help="allow TF32 in fp32 cuBLAS GEMMs")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args(argv)

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    sizes = parse_sizes(args.sizes or (GPU_SIZES if device == "cuda" else CPU_SIZES))
    backends = (
        args.backends or ("torch.nn,cuda,triton" if device == "cuda" else "torch.nn,cpu")
    ).split(",")
    out = Tee(Path(args.out) / "profile_rnn.txt")
    env = f"torch {torch.__version__}"
    if device == "cuda":
        env += (
            f", {torch.cuda.get_device_name()}, matmul.allow_tf32="
            f"{torch.backends.cuda.matmul.allow_tf32}, cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}"
        )
    try:
        import triton

        env += f", triton {triton.__version__}"
    except ImportError:
        pass
    out(
        f"# profile_rnn: {env}; {args.warmup} warm-up + {args.iters} timed + {args.iters} profiled fwd+bwd iterations"
    )
    rows = []
    started = time.perf_counter()
    for cell, (batch, steps, hidden), dname in itertools.product(
        args.cells.split(","), sizes, args.dtypes.split(",")
    ):
        dtype = DTYPES[dname]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(steps, batch, hidden, generator=gen).to(device, dtype).requires_grad_(True)
        dy = torch.randn(steps, batch, hidden, generator=gen).to(device, dtype)
        for backend in backends:
            label = f"{cell} B{batch} T{steps} H{hidden} {dname} {backend}"
            try:
                fn, params = make_impl(cell, backend, hidden, device, dtype)
            except Exception as exc:  # noqa: BLE001 - report and go on
                fn, params = None, f"{type(exc).__name__}: {exc}"
            if fn is None:
                out(f"== {label}: skipped ({params})")
                continue

            def fwd_bwd(fn=fn, params=params, x=x, dy=dy):
                torch.autograd.grad(fn(x), [x, *params], dy)

            out(f"== {label}")
            try:
                for _ in range(args.warmup):
                    fwd_bwd()
                summary = profile_one(fwd_bwd, device, args.iters, args.top, out)
            except Exception as exc:  # noqa: BLE001 - one failing backend must not hide the rest
                out(f"   FAILED: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            rows.append((label, summary))
    out()
    out("# summary (per fwd+bwd iteration)")
    out(
        f"{'config':<44} {'wall ms':>9} {'busy ms':>9} {'busy %':>7} {'kernels':>8} {'launches':>9}"
    )
    for label, s in rows:
        busy_pct = 100 * s["busy_ms"] / s["wall_ms"] if s["wall_ms"] else 0.0
        out(
            f"{label:<44} {s['wall_ms']:>9.3f} {s['busy_ms']:>9.3f} {busy_pct:>7.0f} "
            f"{s['kernels']:>8.0f} {s['launches']:>9.0f}"
        )
    out(f"# total {time.perf_counter() - started:.1f} s")
    out.file.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
