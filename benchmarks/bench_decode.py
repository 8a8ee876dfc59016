"""Benchmark of attention decoding: one new token (or a few) against a KV cache.

For every cache length it times one decode step of each provider, reports the achieved
bandwidth (bytes of the k/v cache read + q and out, over the time), the fraction of the
measured copy bandwidth, and the max error against an fp64 reference:

* ``turbolm_cuda`` / ``turbolm_cpu``: the decode kernels (``csrc/attention``), through
  ``turbolm.ops.attention(..., backend=...)``;
* ``sdpa`` (``torch.nn.functional.scaled_dot_product_attention``, whatever backend it picks;
  GQA via ``enable_gqa``), ``sdpa_math`` on CPU;
* ``turbolm_triton``: the training kernel (``kernels/attention.py``) on the same shapes (GPU).

Writes ``decode.csv`` / ``decode.md`` under ``benchmarks/results/<device>/``. Examples::

    python benchmarks/bench_decode.py                       # GPU: bf16, B 1/8/32, Hq 32, Hkv 8, D 128
    python benchmarks/bench_decode.py --device cpu --threads 2 --dtype fp32
    python benchmarks/bench_decode.py --dry-run --out /tmp/x   # tiny CPU run (CI)
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    Rotator,
    copy_bandwidth_gbs,
    set_threads,
    time_stats_ms,
    write_results,
)
from turbolm.ops import attention  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _turbolm(backend: str):
    def run(q, k, v):
        return attention(q, k, v, causal=True, backend=backend)

    return run


def _sdpa(math_only: bool):
    def run(q, k, v):
        group = q.shape[1] // k.shape[1]
        if math_only:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=group > 1)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=group > 1)

    return run


def providers(device: str, names: list[str] | None) -> dict:
    table = {
        "turbolm_cuda": (_turbolm("cuda"), device != "cpu"),
        "turbolm_cpu": (_turbolm("cpu"), device == "cpu"),
        "turbolm_triton": (_turbolm("triton"), device != "cpu"),
        "sdpa": (_sdpa(False), True),
        "sdpa_math": (_sdpa(True), device == "cpu"),
    }
    if names:
        unknown = sorted(set(names) - set(table))
        if unknown:
            raise SystemExit(f"bench_decode: unknown providers {unknown}; known: {sorted(table)}")
        return {n: table[n][0] for n in names}
    return {n: fn for n, (fn, default) in table.items() if default}


def reference(q, k, v) -> torch.Tensor:
    """fp64 attention of the new token(s) (causal, bottom-right) on (batch 0, all heads)."""
    q, k, v = (t[:1].double().cpu() for t in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (1, Hq, Tq, Tk)
    tq, tk = q.shape[2], k.shape[2]
    visible = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


def measure(name, fn, shape, dtype, device, reps, ceiling) -> dict:
    batch, hq, hkv, tq, tk, d = shape

    def make():
        q = torch.randn(batch, hq, tq, d, dtype=dtype, device=device)
        k = torch.randn(batch, hkv, tk, d, dtype=dtype, device=device)
        return q, k, torch.randn_like(k)

    row = {"provider": name, "batch": batch, "q_heads": hq, "kv_heads": hkv, "q_len": tq,
           "cache_len": tk, "head_dim": d}  # fmt: skip
    item = torch.empty((), dtype=dtype).element_size()
    nbytes = (2 * batch * hkv * tk * d + 2 * batch * hq * tq * d) * item
    try:
        rot = Rotator(make, min_bytes=(64 << 20) if device != "cpu" else 0, max_copies=4)
        with torch.no_grad():
            q, k, v = rot.sets[0]
            err = (fn(q, k, v)[:1].double().cpu() - reference(q, k, v)).abs().max().item()
            med, best = time_stats_ms(lambda: fn(*rot.next()), device, reps=reps, warmup=3)
        gbs = nbytes / (med * 1e-3) / 1e9
        row.update(time_us=med * 1e3, min_us=best * 1e3, gb_s=gbs,
                   pct_copy_bw=100 * gbs / ceiling if ceiling else float("nan"),
                   max_err=err, status="ok")  # fmt: skip
    except Exception as exc:  # a provider that cannot run a shape is a row, not a crash
        row.update(time_us=float("nan"), min_us=float("nan"), gb_s=float("nan"),
                   pct_copy_bw=float("nan"), max_err=float("nan"),
                   status=f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}")  # fmt: skip
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="bf16 GPU / fp32 CPU")
    p.add_argument("--batches", default=None, help="comma list (GPU 1,8,32; CPU 1,8)")
    p.add_argument("--cache-lens", default=None, help="comma list of cache lengths")
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--q-len", type=int, default=1, help="new tokens per step")
    p.add_argument("--providers", default=None, help="comma list (default: all for the device)")
    p.add_argument("--reps", type=int, default=30, help="timed calls on CPU")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch)")
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--dry-run", action="store_true", help="tiny CPU run of every code path")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    set_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device != "cpu"
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    batches = [int(b) for b in (args.batches or ("1,8,32" if gpu else "1,8")).split(",")]
    default_lens = "1,33,512,2048,4096,8192,16384,32768" if gpu else "1,33,512,4096"
    lens = [int(n) for n in (args.cache_lens or default_lens).split(",")]
    hq, hkv, d = args.q_heads, args.kv_heads, args.head_dim
    if args.dry_run:
        device, gpu, dtype, batches, lens, hq, hkv, d = (
            "cpu",
            False,
            torch.float32,
            [2],
            [1, 33],
            4,
            2,
            16,
        )
        args.reps = 2
    chosen = providers(device, args.providers.split(",") if args.providers else None)
    ceiling = copy_bandwidth_gbs(device, nbytes=(256 << 20) if gpu else (64 << 20))
    rows = []
    for batch in batches:
        for tk in lens:
            for name, fn in chosen.items():
                shape = (batch, hq, hkv, args.q_len, tk, d)
                row = measure(name, fn, shape, dtype, device, args.reps, ceiling)
                rows.append(row)
                print(
                    f"B={batch:<3d} cache={tk:<6d} {name:15s} {row['time_us']:10.1f} us "
                    f"{row['gb_s']:8.1f} GB/s err {row['max_err']:.2e} {row['status']}",
                    flush=True,
                )
    notes = [
        f"{str(dtype).replace('torch.', '')}, causal, q_len {args.q_len}; gb_s = bytes of the "
        "k/v cache + q + out over the median time; pct_copy_bw against a measured "
        f"device-to-device copy ({ceiling:.0f} GB/s); max_err vs fp64 on batch 0.",
        "Inputs rotate through several copies (64 MiB+ on GPU) so the cache is not L2-resident.",
    ]
    if args.dry_run:
        notes.append("DRY RUN: tiny CPU shapes, the numbers mean nothing.")
    out = write_results(rows, device, "decode", "Attention decode benchmark", notes, args.out)
    print(f"wrote {out / 'decode.csv'} and {out / 'decode.md'}", flush=True)
    return rows


if __name__ == "__main__":
    main()
