"""Shared helpers of the kernel benchmarks: timing, memory, bandwidth ceiling, input rotation,
and result files (CSV + Markdown, PNG when matplotlib is installed) under
``benchmarks/results/<device>/``.

Timing: on a GPU ``triton.testing.do_bench`` (median, CUDA events; CUDA events directly when
Triton is missing); on CPU a wall clock, median of repeated calls after warm-up.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep the CPU memory profiler quiet

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def device_tag(device: str) -> str:
    """Folder name of a device's results: ``cpu``, or the GPU's model (``h200``, ``a100``)."""
    if device == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device)).lower()
    name = name.replace("nvidia", "").replace("geforce", "")
    match = re.search(r"[a-z]+\d+[a-z]*", name)
    return match.group(0) if match else re.sub(r"\W+", "-", name.strip()) or "gpu"


def sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: str, reps: int = 30, warmup: int = 5) -> float:
    """Median time of ``fn()`` in milliseconds."""
    return time_stats_ms(fn, device, reps, warmup)[0]


def time_stats_ms(
    fn: Callable[[], object], device: str, reps: int = 30, warmup: int = 5
) -> tuple[float, float]:
    """(median, min) time of ``fn()`` in milliseconds (the min is less sensitive to other
    processes on a shared machine)."""
    if device != "cpu":
        try:
            from triton.testing import do_bench

            med = float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
            return med, float(do_bench(fn, warmup=5, rep=50, return_mode="min"))
        except ImportError:
            pass
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times), min(times)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def peak_memory_mb(fn: Callable[[], object], device: str) -> float | None:
    """Memory of one ``fn()`` call in MiB. GPU: the peak extra allocation (beyond what was
    live before), from the caching allocator's statistics. CPU, which keeps no peak
    statistics: the total allocated during the call (profiler per-op allocations, frees not
    subtracted), an upper bound of the peak. None when it cannot be measured."""
    if device != "cpu":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        from torch.profiler import ProfilerActivity, profile

        with (
            _quiet_stderr(),
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
        ):
            fn()
        total = sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())
        return total / 2**20
    except Exception:
        return None


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler logs from C++ there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def copy_bandwidth_gbs(device: str, nbytes: int = 256 * 2**20) -> float:
    """Measured ceiling: GB/s of a device-to-device copy (read + write) of ``nbytes``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps=10, warmup=2)
    return 2 * nbytes / (ms * 1e-3) / 1e9


class Rotator:
    """Cycles through several copies of a set of inputs so that consecutive calls do not find
    their data in cache (the copies together exceed ``min_bytes``)."""

    def __init__(self, make: Callable[[], tuple], min_bytes: int, max_copies: int = 8):
        first = make()
        size = sum(t.numel() * t.element_size() for t in first if isinstance(t, torch.Tensor))
        count = max(1, min(max_copies, -(-min_bytes // max(size, 1))))
        self.sets = [first] + [make() for _ in range(count - 1)]
        self.index = 0

    def next(self) -> tuple:
        self.index = (self.index + 1) % len(self.sets)
        return self.sets[self.index]


def environment(device: str) -> dict[str, str]:
    info = {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host cpu": platform.processor() or platform.machine(),
        "cpu threads": str(torch.get_num_threads()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    if device != "cpu":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = str(torch.version.cuda)
    return info


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that produced the results (``argv``, default ``sys.argv``), with the
    environment variables that matter."""
    env = [
        f"{k}={shlex.quote(v)}"
        for k, v in sorted(os.environ.items())
        if k.startswith("TURBOLM_") or k in ("MAX_JOBS", "OMP_NUM_THREADS", "TRITON_INTERPRET")
    ]
    argv = sys.argv if argv is None else argv
    return " ".join([*env, "python", *(shlex.quote(a) for a in argv)])


def write_results(
    rows: Sequence[dict],
    device: str,
    name: str,
    title: str,
    notes: Sequence[str] = (),
    out_dir: str | Path | None = None,
    plot: Callable[[Sequence[dict], Path], None] | None = None,
    argv: Sequence[str] | None = None,
) -> Path:
    """Write ``<name>.csv`` and ``<name>.md`` (and ``<name>.png`` via ``plot``) under
    ``out_dir`` (default ``benchmarks/results/<device tag>/``); returns the folder.
    ``argv``: the command line the Markdown records (default ``sys.argv``; a benchmark's
    ``main(argv)`` called as a function passes its own)."""
    folder = Path(out_dir) if out_dir else RESULTS / device_tag(device)
    folder.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0]) if rows else []
    with open(folder / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    env = environment(device)
    lines = [f"# {title}", "", f"Command: `{command_line(argv)}`", ""]
    lines += [" | ".join(f"{k}: {v}" for k, v in env.items()), ""]
    lines += [f"* {note}" for note in notes] + ([""] if notes else [])
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[c]) for c in columns) + " |")
    (folder / f"{name}.md").write_text("\n".join(lines) + "\n")
    if plot is not None:
        try:
            plot(rows, folder / f"{name}.png")
        except ImportError:
            pass
    return folder


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.3f}"
    return "-" if value is None else str(value)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"4096x768,1024x4096"`` -> [(4096, 768), (1024, 4096)]."""
    sizes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        rows, _, cols = part.lower().partition("x")
        sizes.append((int(rows), int(cols)))
    return sizes


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
