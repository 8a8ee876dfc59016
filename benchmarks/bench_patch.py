"""What ``apply_turbolm`` buys on a Hugging Face causal LM: the same model, unpatched (SDPA and
eager attention) and patched (turbolm's ops, under several backend choices).

The model is built from a config with random weights (nothing is downloaded): a Llama-style
decoder (RMSNorm, grouped-query attention; ``--family llama``) or GPT-2 (LayerNorm;
``--family gpt2``). Its norm weights get a random perturbation so a wrong norm formula cannot
hide behind ones. One model object serves every row: the unpatched rows switch its attention
implementation, the patched rows run it after ``apply_turbolm`` under a
``turbolm.use_backend`` spec, and it is reverted at the end.

Rows (a row whose backend cannot run here gets a "not run" note, the run goes on):

* ``hf_sdpa``: unpatched, ``attn_implementation="sdpa"`` (the baseline of the speed-ups);
* ``hf_eager``: unpatched, ``attn_implementation="eager"``;
* ``turbolm_auto``: patched, every op on ``auto``;
* CUDA: ``turbolm_triton`` (attention, rms_norm and layer_norm on ``triton``) and
  ``turbolm_cuda_norm`` (norms on ``cuda``, attention on ``auto``);
* CPU: ``turbolm_cpu`` (norms on ``cpu``, the C++ extension; attention on ``auto``);
* ``turbolm_fused_loss`` (CUDA: the fused linear cross-entropy on ``triton``) and
  ``turbolm_cpu_fused_loss`` (CPU: norms and the fused cross-entropy on ``cpu``): patched with
  ``apply_turbolm(model, loss=True)``, so the training step never forms the logits.

Per row: forward time (``torch.no_grad``, labels given so the loss is included), forward +
backward time (causal LM loss with labels, ``loss.backward()``, gradients set to None before
each step), tokens/s of forward + backward, peak memory of one forward + backward (CUDA only:
``torch.cuda.max_memory_allocated``), the max |logits - reference| over the non-padded
positions, and the speed-ups over ``hf_sdpa``. The reference is the unpatched model in fp64 on
the CPU (default for the small presets), or, for ``--preset gpu`` (too large for an fp64 CPU
pass in a time box), the unpatched fp32 model on the same device before its cast to ``--dtype``.
``--padding F`` left-pads the batch (F of the positions on average; rows get different
amounts) and passes the attention mask, which exercises the packed variable-length path of the
patched attention on backends that take no mask (triton).

    python benchmarks/bench_patch.py                      # GPU: --preset gpu bf16; CPU: small fp32
    python benchmarks/bench_patch.py --device cpu --threads 1 --batch 2 --seq 256 --steps 6
    python benchmarks/bench_patch.py --preset gpu --dtype bf16 --padding 0.25 --budget-s 45
    turbolm bench patch --family gpt2 --name patch_gpt2

Writes ``patch.csv`` / ``patch.md`` (and ``patch.png`` with matplotlib) under
``benchmarks/results/<device>/`` (``--out`` / ``--name`` to change).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common` when run as a script
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # turbolm from a source checkout

import torch  # noqa: E402
from common import set_threads, write_results  # noqa: E402

import turbolm  # noqa: E402
from turbolm.errors import BackendError  # noqa: E402
from turbolm.ops import registry  # noqa: E402

PRESETS = {
    # ~56M parameters (vocab 32000): fp64 CPU reference in seconds.
    "small": dict(
        hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1408, vocab=32000, batch=2, seq=256
    ),
    # ~0.9B parameters, for one H200 (bf16).
    "gpu": dict(
        hidden=2048,
        layers=16,
        heads=16,
        kv_heads=8,
        intermediate=5632,
        vocab=32000,
        batch=4,
        seq=2048,
    ),
}
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
# name -> (attention implementation of the unpatched model, patched?, use_backend spec, devices)
CONFIGS = {
    "hf_sdpa": ("sdpa", False, None, ("cpu", "cuda")),
    "hf_eager": ("eager", False, None, ("cpu", "cuda")),
    "turbolm_auto": ("sdpa", True, None, ("cpu", "cuda")),
    # Before turbolm_triton: that row's first calls compile and autotune the Triton kernels,
    # which a time-boxed run (--budget-s) must not let crowd this one out.
    "turbolm_cuda_norm": ("sdpa", True, "rms_norm=cuda,layer_norm=cuda", ("cuda",)),
    "turbolm_triton": (
        "sdpa",
        True,
        "attention=triton,rms_norm=triton,layer_norm=triton",
        ("cuda",),
    ),
    "turbolm_cpu": ("sdpa", True, "rms_norm=cpu,layer_norm=cpu", ("cpu",)),
    # apply_turbolm(model, loss=True): head + loss through the fused linear cross-entropy
    # (no (batch, seq, vocab) logits in the training step; the error column comes from the
    # no-grad forward, which keeps the logits).
    "turbolm_fused_loss": ("sdpa", True, "linear_cross_entropy=triton", ("cuda",)),
    "turbolm_cpu_fused_loss": (
        "sdpa",
        True,
        "rms_norm=cpu,layer_norm=cpu,linear_cross_entropy=cpu",
        ("cpu",),
    ),
}
# Configurations patched with loss=True.
FUSED_LOSS = frozenset({"turbolm_fused_loss", "turbolm_cpu_fused_loss"})
BASELINE = "hf_sdpa"
COLUMNS = (
    "family",
    "params_M",
    "dtype",
    "batch",
    "seq",
    "padding",
    "config",
    "backends_used",
    "steps",
    "fwd_ms",
    "fwd_bwd_ms",
    "fwd_bwd_min_ms",
    "tokens_per_s",
    "peak_mem_MB",
    "loss",
    "max_logit_err",
    "err_reference",
    "speedup_fwd",
    "speedup_fwd_bwd",
    "note",
)


# ---- model and inputs ---------------------------------------------------------------------------


def model_dims(args) -> dict:
    dims = dict(PRESETS[args.preset])
    for key in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "batch", "seq"):
        value = getattr(args, key)
        if value is not None:
            dims[key] = value
    return dims


def build_model(family: str, dims: dict, device: str, seed: int) -> torch.nn.Module:
    """A randomly initialised causal LM (eval mode: no dropout) on ``device``, fp32, SDPA."""
    import transformers

    positions = max(2048, dims["seq"])
    if family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=dims["vocab"],
            hidden_size=dims["hidden"],
            intermediate_size=dims["intermediate"],
            num_hidden_layers=dims["layers"],
            num_attention_heads=dims["heads"],
            num_key_value_heads=dims["kv_heads"],
            max_position_embeddings=positions,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        cls = transformers.LlamaForCausalLM
    elif family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=dims["vocab"],
            n_embd=dims["hidden"],
            n_layer=dims["layers"],
            n_head=dims["heads"],
            n_inner=dims["intermediate"],
            n_positions=positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        cls = transformers.GPT2LMHeadModel
    else:
        raise ValueError(f"unknown family {family!r}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.set_attn_implementation("sdpa")
    return model.eval()


def left_pads(batch: int, seq: int, fraction: float) -> list[int]:
    """Left-padding length of each row: ``fraction`` of the positions on average, spread from
    none (first row) to twice the average (last row), each row keeping at least one token."""
    if fraction <= 0:
        return [0] * batch
    if batch == 1:
        return [min(seq - 1, round(fraction * seq))]
    return [min(seq - 1, round(2 * fraction * seq * b / (batch - 1))) for b in range(batch)]


def make_inputs(batch: int, seq: int, vocab: int, padding: float, seed: int) -> dict:
    """CPU tensors: input_ids, labels (-100 at padding) and, with padding, attention_mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    inputs = {"input_ids": ids, "labels": ids.clone()}
    pads = left_pads(batch, seq, padding)
    if any(pads):
        mask = torch.ones(batch, seq, dtype=torch.long)
        for b, pad in enumerate(pads):
            mask[b, :pad] = 0
        ids.masked_fill_(mask == 0, 0)  # the pad token
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
        inputs["attention_mask"] = mask
    return inputs


def valid_positions(inputs: dict) -> torch.Tensor:
    """(B, T) bool on CPU: the positions whose logits are compared."""
    mask = inputs.get("attention_mask")
    return torch.ones_like(inputs["input_ids"], dtype=torch.bool) if mask is None else mask.bool()


# ---- measurement ----------------------------------------------------------------------------


@contextlib.contextmanager
def record_selections():
    """Collect the (op, backend) pairs turbolm's registry selects while the block runs."""
    used: dict[str, set[str]] = {}
    select = registry.select

    def spy(op, *args, **kwargs):
        chosen = select(op, *args, **kwargs)
        used.setdefault(op, set()).add(chosen.name)
        return chosen

    registry.select = spy
    try:
        yield used
    finally:
        registry.select = select


def timed_ms(fn, device: str) -> float:
    """Wall time of one ``fn()`` in ms: CUDA events (synchronized) on a GPU, else perf_counter."""
    if device != "cpu":
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def empty_row(config: str, base: dict) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(base, config=config, note="")
    return row


def max_error(logits: torch.Tensor, reference: torch.Tensor, keep: torch.Tensor) -> float:
    """max |logits - reference| over the ``keep`` positions, one batch row at a time on the
    logits' device (``reference``: fp32 on the CPU; a whole copy would cost a GiB on a GPU)."""
    err = 0.0
    for b in range(logits.shape[0]):
        rows = keep[b].to(logits.device)
        got = logits[b][rows].float()
        ref = reference[b].to(logits.device)[rows]
        err = max(err, float((got - ref).abs().max()))
    return err


def measure(model, config, inputs, reference, device, steps, warmup, deadline) -> dict:
    """Error, times and memory of one configuration of the (already set up) model. Steps stop
    early (after at least one) once ``time.monotonic()`` passes ``deadline`` (None: no limit)."""
    _, _, spec, _ = CONFIGS[config]
    keep = valid_positions(inputs)
    dev_inputs = {k: v.to(device) for k, v in inputs.items()}
    result = {}
    context = turbolm.use_backend(spec) if spec else contextlib.nullcontext()
    with context:
        with record_selections() as used, torch.no_grad():
            out = model(**dev_inputs)
        result["backends_used"] = (
            " ".join(f"{op}:{'/'.join(sorted(names))}" for op, names in sorted(used.items()))
            or "none (torch / transformers only)"
        )
        result["max_logit_err"] = max_error(out.logits.detach(), reference, keep)
        result["loss"] = float(out.loss)
        del out

        def fwd():
            with torch.no_grad():
                model(**dev_inputs)

        def fwd_bwd():
            model(**dev_inputs).loss.backward()

        for _ in range(warmup):
            fwd()
            model.zero_grad(set_to_none=True)
            fwd_bwd()
        fwd_times, fwd_bwd_times = [], []
        for _ in range(steps):
            fwd_times.append(timed_ms(fwd, device))
            model.zero_grad(set_to_none=True)
            fwd_bwd_times.append(timed_ms(fwd_bwd, device))
            if deadline is not None and time.monotonic() > deadline:
                break
        model.zero_grad(set_to_none=True)
        if device != "cpu":
            gc.collect()
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            fwd_bwd()
            torch.cuda.synchronize(device)
            result["peak_mem_MB"] = torch.cuda.max_memory_allocated(device) / 2**20
            model.zero_grad(set_to_none=True)
    tokens = inputs["input_ids"].numel()
    result["steps"] = len(fwd_times)
    result["fwd_ms"] = statistics.median(fwd_times)
    result["fwd_bwd_ms"] = statistics.median(fwd_bwd_times)
    result["fwd_bwd_min_ms"] = min(fwd_bwd_times)
    result["tokens_per_s"] = tokens / (result["fwd_bwd_ms"] * 1e-3)
    return result


def configure(model, config: str) -> None:
    """Put the shared model in ``config``'s state (attention implementation, patched or not)."""
    from turbolm.patching import apply_turbolm, revert_turbolm

    attn, patched, _, _ = CONFIGS[config]
    want_loss = config in FUSED_LOSS
    is_patched = model.config._attn_implementation == "turbolm"
    if is_patched and (not patched or ("forward" in model.__dict__) != want_loss):
        revert_turbolm(model)
        is_patched = False
    if not patched:
        model.set_attn_implementation(attn)
        return
    if not is_patched:
        model.set_attn_implementation(attn)
        report = apply_turbolm(model, loss=want_loss)
        print(str(report).splitlines()[0], flush=True)
        for name, reason in report.skipped:
            print(f"  skipped {name}: {reason}", flush=True)


def cast_parameters(model: torch.nn.Module, device: str, dtype: torch.dtype) -> None:
    """Move ``model`` to ``device`` and its floating-point parameters (not its buffers) to
    ``dtype``, as loading a checkpoint in that dtype does: the rotary ``inv_freq`` buffer stays
    fp32 (rounded to bf16 it would shift every position's angle)."""
    model.to(device)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.to(dtype)


def why_not(name: str, dev_type: str) -> str | None:
    """None if configuration ``name`` can be attempted here, else why not."""
    devices = CONFIGS[name][3]
    if dev_type not in devices:
        return f"{name} is for {'/'.join(devices)} only"
    spec = CONFIGS[name][2] or ""
    if any(part.split("=")[-1] in ("cpu", "cuda") for part in spec.split(",")):
        from turbolm import ext

        if not ext.is_built():
            return (
                "the C++ extension is not built (`python -m turbolm.ext`); naming its backend "
                "would compile it inside the timed run"
            )
    return None


def reference_logits(model, inputs: dict, kind: str, device: str) -> torch.Tensor:
    """Logits (fp32, CPU) of the unpatched fp32 ``model``: an fp64 copy on the CPU
    (``fp64``) or the model itself on its device (``fp32``)."""
    with torch.no_grad():
        if kind == "fp64":
            ref = copy.deepcopy(model).to("cpu", torch.float64)
            logits = ref(**inputs).logits
            del ref
            return logits.float()
        return model(**{k: v.to(device) for k, v in inputs.items()}).logits.float().cpu()


# ---- results ------------------------------------------------------------------------------


def plot(rows, path):
    """Forward and forward + backward times per configuration, and the speed-ups over
    hf_sdpa. Needs matplotlib (ImportError otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["fwd_bwd_ms"] is not None]
    if not rows:
        return
    names = [r["config"] for r in rows]
    xs = range(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.4
    left.bar([x - width / 2 for x in xs], [r["fwd_ms"] for r in rows], width, label="forward")
    left.bar([x + width / 2 for x in xs], [r["fwd_bwd_ms"] for r in rows], width, label="fwd+bwd")
    left.set_xticks(list(xs), names, rotation=25, ha="right")
    left.set_ylabel("ms (median)")
    first = rows[0]
    left.set_title(
        f"{first['family']} {first['params_M']:.0f}M {first['dtype']} "
        f"B={first['batch']} T={first['seq']} pad={first['padding']}"
    )
    left.set_ylim(0, 1.25 * max(r["fwd_bwd_ms"] for r in rows))  # room for the legend
    left.legend(fontsize="small", loc="upper right", ncol=2)
    speed = [r["speedup_fwd_bwd"] if r["speedup_fwd_bwd"] is not None else 0.0 for r in rows]
    right.bar(list(xs), speed, color=["tab:gray" if s < 1 else "tab:green" for s in speed])
    right.axhline(1.0, color="black", linestyle="--", linewidth=1)
    right.set_xticks(list(xs), names, rotation=25, ha="right")
    right.set_ylabel(f"fwd+bwd speed-up over {BASELINE}")
    right.set_title("higher is faster")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_notes(rows) -> list[str]:
    by_name = {r["config"]: r for r in rows if r["fwd_bwd_ms"] is not None}
    base = by_name.get(BASELINE)
    if base is None:
        return [f"{BASELINE} was not measured: no speed-ups."]
    notes = []
    for name, r in by_name.items():
        if name == BASELINE:
            continue
        ratio = r["speedup_fwd_bwd"]
        ratio_min = base["fwd_bwd_min_ms"] / r["fwd_bwd_min_ms"]
        # A verdict only when the median and the minimum agree by more than 3%.
        if min(ratio, ratio_min) > 1.03:
            verdict = "faster"
        elif max(ratio, ratio_min) < 0.97:
            verdict = "slower"
        else:
            verdict = "no clear difference (within 3% or median and min disagree)"
        notes.append(
            f"{name} vs {BASELINE}: fwd+bwd {r['fwd_bwd_ms']:.1f} ms vs {base['fwd_bwd_ms']:.1f} "
            f"ms: x{ratio:.2f} (min times x{ratio_min:.2f}), {verdict}; forward "
            f"x{r['speedup_fwd']:.2f}."
        )
    if any(
        "attention:torch" in (r["backends_used"] or "")
        for n, r in by_name.items()
        if n.startswith("turbolm_")
    ):
        notes.append(
            "attention:torch is turbolm's torch backend, torch.nn.functional."
            "scaled_dot_product_attention (the kernel hf_sdpa runs): where a turbolm row shows "
            "it, the patch changed only the norms there."
        )
    return notes


def parse_args(argv=None):
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=["llama", "gpt2"], default="llama")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="model and batch sizes; default gpu on CUDA, small on CPU (the options below "
        "override single fields)",
    )
    for name in ("hidden", "layers", "heads", "kv-heads", "intermediate", "vocab"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA")
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=None, help="default 3 on CUDA, 2 on CPU")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="time box of the whole run (model build included): configurations share what is "
        "left, their steps are trimmed (at least one each), and configurations not started "
        "when it runs out get a note (default: 45 on CUDA, none on CPU; 0 = no limit)",
    )
    p.add_argument(
        "--padding",
        type=float,
        default=0.0,
        help="fraction of left-padding positions (0 = no attention mask)",
    )
    p.add_argument(
        "--configs",
        default=None,
        help=f"comma list out of {', '.join(CONFIGS)} (default: those for the device)",
    )
    p.add_argument(
        "--reference",
        choices=["auto", "fp64", "fp32"],
        default="auto",
        help="fp64: unpatched fp64 copy on the CPU; fp32: the unpatched fp32 model on the "
        "device; auto: fp32 for --preset gpu, else fp64",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument(
        "--out", default=None, help="output folder (default benchmarks/results/<device>)"
    )
    p.add_argument("--name", default="patch")
    args = p.parse_args(argv)
    args.preset = args.preset or ("gpu" if args.device != "cpu" else "small")
    args.dtype = args.dtype or ("bf16" if args.device != "cpu" else "fp32")
    if args.warmup is None:
        args.warmup = 3 if args.device != "cpu" else 2
    if args.budget_s is None:
        args.budget_s = 45.0 if args.device != "cpu" else 0.0
    if not 0.0 <= args.padding < 1.0:
        p.error("--padding must be in [0, 1)")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def write(rows, args, notes, argv) -> Path:
    folder = write_results(
        rows,
        args.device,
        args.name,
        "apply_turbolm on a Hugging Face causal LM",
        notes,
        args.out,
        plot,
        argv=None if argv is None else ["benchmarks/bench_patch.py", *argv],
    )
    png = folder / f"{args.name}.png"
    print(
        f"wrote {folder}/{args.name}.csv and .md"
        + (" and .png" if png.exists() else " (no .png: matplotlib missing or nothing measured)")
    )
    return folder


def main(argv=None) -> list[dict]:
    start = time.monotonic()
    args = parse_args(argv)
    set_threads(args.threads)
    device = args.device
    dev_type = torch.device(device).type
    dtype = DTYPES[args.dtype]
    dims = model_dims(args)
    names = (
        args.configs.split(",")
        if args.configs
        else [n for n, c in CONFIGS.items() if dev_type in c[3]]
    )
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; known: {', '.join(CONFIGS)}")
    base = {
        "family": args.family,
        "dtype": str(dtype).replace("torch.", ""),
        "batch": dims["batch"],
        "seq": dims["seq"],
        "padding": args.padding,
    }
    try:
        import transformers
    except ImportError as exc:
        reason = f"transformers is not installed ({exc})"
        rows = [dict(empty_row(n, base), note=f"not run: {reason}") for n in names]
        write(rows, args, [f"Not run: {reason}."], argv)
        print(f"not run: {reason}")
        return rows

    kind = (
        args.reference if args.reference != "auto" else "fp32" if args.preset == "gpu" else "fp64"
    )
    inputs = make_inputs(dims["batch"], dims["seq"], dims["vocab"], args.padding, args.seed)
    model = build_model(args.family, dims, "cpu" if kind == "fp64" else device, args.seed)
    params = sum(p.numel() for p in model.parameters())
    base["params_M"] = params / 1e6
    print(
        f"{args.family}: {params / 1e6:.1f}M parameters, {dims}, {base['dtype']} on {device}; "
        f"reference: {kind}",
        flush=True,
    )
    reference = reference_logits(model, inputs, kind, device)
    cast_parameters(model, device, dtype)
    if kind == "fp64":
        err_reference = "unpatched fp64 (CPU)"
    else:
        err_reference = f"unpatched fp32 ({dev_type}, sdpa)"
    base["err_reference"] = err_reference

    rows, cut = [], []
    budget = args.budget_s
    for index, name in enumerate(names):
        row = empty_row(name, base)
        rows.append(row)
        reason = why_not(name, dev_type)
        if reason is not None:
            row["note"] = f"not run: {reason}"
            print(f"{name:18s} {row['note']}", flush=True)
            continue
        deadline = None
        if budget:
            left = budget - (time.monotonic() - start)
            if left <= 0:
                row["note"] = f"not run: time budget ({budget:.0f} s, --budget-s) used up"
                cut.append(name)
                print(f"{name:18s} {row['note']}", flush=True)
                continue
            deadline = time.monotonic() + left / (len(names) - index)
        try:
            configure(model, name)
            row.update(
                measure(model, name, inputs, reference, device, args.steps, args.warmup, deadline)
            )
        except BackendError as exc:
            row["note"] = f"not run: {exc}"
        except KeyboardInterrupt:  # a time box's SIGINT (gpu_check.sh): keep what was measured
            row["note"] = "not run: interrupted"
            for later in names[index + 1 :]:
                rows.append(dict(empty_row(later, base), note="not run: interrupted"))
            print(f"{name:18s} interrupted: writing what was measured", flush=True)
            break
        except Exception as exc:  # noqa: BLE001 - one failing configuration must not end the run
            message = " ".join(str(exc).split())[:300]
            row["note"] = f"failed: {type(exc).__name__}: {message}"
        model.zero_grad(set_to_none=True)
        if dev_type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
        if row["fwd_bwd_ms"] is None:
            print(f"{name:18s} {row['note']}", flush=True)
            continue
        if row["steps"] < args.steps:
            row["note"] = f"steps trimmed to {row['steps']} by --budget-s"
        peak = f"  peak {row['peak_mem_MB']:.0f} MiB" if row["peak_mem_MB"] is not None else ""
        print(
            f"{name:18s} fwd {row['fwd_ms']:9.2f} ms  fwd+bwd {row['fwd_bwd_ms']:9.2f} ms  "
            f"{row['tokens_per_s']:10.0f} tok/s{peak}  err {row['max_logit_err']:.2g}  "
            f"[{row['backends_used']}]",
            flush=True,
        )
    from turbolm.patching import revert_turbolm

    revert_turbolm(model)

    baseline = next((r for r in rows if r["config"] == BASELINE and r["fwd_ms"]), None)
    for r in rows:
        if baseline is not None and r["fwd_bwd_ms"] is not None:
            r["speedup_fwd"] = baseline["fwd_ms"] / r["fwd_ms"]
            r["speedup_fwd_bwd"] = baseline["fwd_bwd_ms"] / r["fwd_bwd_ms"]

    shape = (
        f"hidden {dims['hidden']}, {dims['layers']} layers, {dims['heads']} heads"
        + (f" / {dims['kv_heads']} kv heads" if args.family == "llama" else "")
        + f", intermediate {dims['intermediate']}, vocab {dims['vocab']}"
    )
    pads = left_pads(dims["batch"], dims["seq"], args.padding)
    notes = [
        f"Model: transformers {transformers.__version__} {args.family} ({shape}; "
        f"{params / 1e6:.1f}M parameters), random init (seed {args.seed}), eval mode, nothing "
        f"downloaded; preset {args.preset}.",
        f"Inputs: batch {dims['batch']} x {dims['seq']} random token ids, labels = ids "
        + (
            f"(-100 at padding); left padding per row {pads} with the attention mask."
            if any(pads)
            else "(no padding, no attention mask)."
        ),
        "Rows: hf_* = unpatched model with that attn_implementation; turbolm_* = after "
        "apply_turbolm (turbolm_triton: attention, rms_norm and layer_norm on triton; "
        "turbolm_cuda_norm / turbolm_cpu: the norms on that backend, attention on auto; "
        "*_fused_loss: also loss=True, the fused linear cross-entropy in the training step). "
        "backends_used: what turbolm's registry selected in one forward.",
        f"Times: median of the timed steps after {args.warmup} warm-up step(s) "
        + (
            "(CUDA events, synchronized)"
            if dev_type == "cuda"
            else "(time.perf_counter); CPU numbers on a shared machine are noisy, compare "
            "fwd_bwd_min_ms too"
        )
        + ". fwd: forward with labels under torch.no_grad; fwd_bwd: forward + loss.backward() "
        "(gradients set to None before each step, outside the timing). tokens_per_s: batch x "
        "seq (padding included) per fwd+bwd.",
        "peak_mem_MB: torch.cuda.max_memory_allocated over one fwd+bwd (weights, gradients and "
        "activations)."
        if dev_type == "cuda"
        else "peak_mem_MB: blank on CPU (the CPU allocator keeps no peak statistics).",
        f"max_logit_err: max |logits - reference| over the non-padded positions; reference = "
        f"{err_reference} on the same weights and inputs"
        + (
            " (the gpu preset is too large for an fp64 CPU pass; hf_sdpa's error is then the "
            f"cost of {base['dtype']} itself)."
            if kind == "fp32"
            else "."
        ),
        f"speedup_*: {BASELINE}'s median time over the row's (> 1: faster than {BASELINE}).",
    ]
    notes += summary_notes(rows)
    notes += [f"{r['config']}: {r['note']}" for r in rows if r["note"]]
    if cut:
        notes.append(f"Time budget ({budget:.0f} s, --budget-s) reached; not run: {', '.join(cut)}")
    write([{c: r[c] for c in COLUMNS} for r in rows], args, notes, argv)
    for note in summary_notes(rows):
        print(note)
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
