"""Fine-tuning (issue #7): LoRA through peft on TransformerLM and RNNLM, causal-LM and
classification tasks, merge, plain-peft interoperability, metrics, and bad input.

Everything runs on CPU with tiny models. Bases are random-weight checkpoints written directly
(no pretraining) except in ``test_lora_beats_majority_baseline_on_stdlib_packages``, which
pretrains a small Transformer and is the one quality test."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

import turbolm.finetune  # noqa: F401  (sets HF_HUB_OFFLINE before anything imports peft)
from turbolm.cli import main
from turbolm.data import Tokenizer
from turbolm.errors import ConfigError
from turbolm.models import build_model
from turbolm.train.checkpoint import save_checkpoint

FAST = [
    "train.max_steps=4",
    "train.warmup_steps=1",
    "train.batch_size=4",
    "train.eval_every=2",
    "train.log_every=1",
    "train.lr=1e-2",
    "train.threads=1",
    "train.device=cpu",  # the logits comparisons below run on CPU (gpu test: further down)
]
TRANSFORMER = {
    "arch": "transformer",
    "vocab_size": 257,
    "n_layer": 2,
    "d_model": 32,
    "n_head": 2,
    "context": 32,
}
RNN = {"arch": "rnn", "vocab_size": 257, "n_layer": 2, "d_embed": 24, "d_hidden": 24, "context": 32}


def _write_base(root: Path, kwargs: dict, seed: int = 0) -> Path:
    """A random-weight turbolm checkpoint with a byte tokenizer; returns the run folder."""
    torch.manual_seed(seed)
    model = build_model(dict(kwargs))
    root.mkdir(parents=True)
    tok = root / "tok.json"
    Tokenizer.train([], 0, mode="bytes").save(str(tok))
    save_checkpoint(
        root,
        0,
        model.state_dict(),
        {"run": {}, "model": dict(kwargs)},
        {"step": 0},
        tokenizer_path=tok,
    )
    return root


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {
        "transformer": _write_base(root / "transformer", TRANSFORMER),
        "rnn": _write_base(root / "rnn", RNN),
        "gru": _write_base(root / "gru", {**RNN, "cell": "gru", "n_layer": 1}),
        "wide": _write_base(root / "wide", {**TRANSFORMER, "d_model": 48}),
    }


def _labelled(path: Path, n: int = 48, seed: int = 0) -> Path:
    """Three separable classes of short code-like lines."""
    rng = random.Random(seed)
    words = {
        "alpha": "import socket; sock.recv",
        "beta": "msg = email.message",
        "gamma": "json.dumps(obj)",
    }
    with open(path, "w") as f:
        for i in range(n):
            label = list(words)[i % 3]
            text = f"{words[label]} # {rng.randint(0, 999)} " * rng.randint(1, 3)
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("labelled")
    return {
        "train": _labelled(root / "train.jsonl", 48, 0),
        "val": _labelled(root / "val.jsonl", 15, 1),
    }


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    import json as json_pkg

    root = tmp_path_factory.mktemp("text")
    for f in sorted(Path(json_pkg.__file__).parent.glob("*.py")):
        (root / f.name).write_text(f.read_text(encoding="utf-8"))
    return root


def _fails(capsys, argv, *needles) -> str:
    capsys.readouterr()  # drop what earlier steps printed
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return out[0] if isinstance(out, tuple) else out


# ----------------------------------------------------------------------------- config, targets


def test_config_keys_and_errors():
    from turbolm.errors import ConfigError
    from turbolm.finetune.config import load_finetune_config

    cfg = load_finetune_config(
        None, ["task=classify", "r=4", "alpha=8", "target=attn", "lr=3e-3", "pool=last"]
    )
    assert (cfg.finetune.task, cfg.lora.r, cfg.lora.alpha, cfg.lora.target) == (
        "classify",
        4,
        8.0,
        ["attn"],
    )
    assert cfg.train.lr == 3e-3 and cfg.finetune.pool == "last"
    with pytest.raises(ConfigError, match="did you mean 'lora.r'"):
        load_finetune_config(None, ["lora.rr=3"])
    with pytest.raises(ConfigError, match="lora.r"):
        load_finetune_config(None, ["lora.r=-1"])
    with pytest.raises(ConfigError, match="'train.fused_cross_entropy'.*not supported"):
        load_finetune_config(None, ["train.fused_cross_entropy=true"])


def test_lora_targets_per_architecture():
    from turbolm.errors import ConfigError
    from turbolm.finetune.lora import resolve_targets

    tf = build_model(dict(TRANSFORMER))
    t = resolve_targets(tf, ["auto"])
    assert t.modules == [
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.1.attn.qkv",
        "blocks.1.attn.proj",
        "blocks.0.mlp.fc",
        "blocks.0.mlp.proj",
        "blocks.1.mlp.fc",
        "blocks.1.mlp.proj",
    ]
    assert resolve_targets(tf, ["blocks.1.attn.qkv", "head"]).modules == [
        "blocks.1.attn.qkv",
        "lm_head",
    ]
    with pytest.raises(ConfigError, match="names no module"):
        resolve_targets(tf, ["attention"])
    with pytest.raises(ConfigError, match="LoRA adapts Linear and Embedding"):
        resolve_targets(tf, ["norm1"])

    rnn = build_model(dict(RNN))
    t = resolve_targets(rnn, ["auto"])  # no proj in this RNN: auto = the recurrent weights
    assert t.modules == [] and t.parameters == [
        "rnn.weight_ih_l0",
        "rnn.weight_hh_l0",
        "rnn.weight_ih_l1",
        "rnn.weight_hh_l1",
    ]
    with pytest.raises(ConfigError, match="names no module"):
        resolve_targets(rnn, ["attn"])
    projected = build_model({**RNN, "d_hidden": 40})  # tied head behind proj: cannot untie
    assert resolve_targets(projected, ["auto"]).modules == ["proj"]
    with pytest.raises(ConfigError, match="d_embed"):
        resolve_targets(projected, ["head"])


def test_hidden_states_feed_the_lm_head():
    x = torch.randint(0, 257, (2, 7))
    for kwargs in (TRANSFORMER, RNN, {**RNN, "d_hidden": 40}):
        model = build_model(dict(kwargs)).eval()
        head = getattr(model, "lm_head", None) or model.head
        torch.testing.assert_close(head(model.hidden_states(x)), _logits(model, x))


# ------------------------------------------------------------------- LoRA: train, merge, peft


def _finetune_api(base: Path, out: Path, overrides: list[str]):
    from turbolm.finetune.config import load_finetune_config
    from turbolm.finetune.train import Finetuner

    cfg = load_finetune_config(None, [f"train.out_dir={out}", *FAST, *overrides])
    ft = Finetuner(cfg, base, progress=False, log=lambda m: None)
    return ft, ft.run()


@pytest.mark.parametrize(
    "arch,target",
    [("transformer", "attn,mlp,head"), ("rnn", "rnn,embed,head"), ("gru", "rnn")],
)
def test_lm_lora_merge_and_plain_peft(arch, target, bases, text_dir, tmp_path, capsys):
    """LM task: only adapter weights train; the merged checkpoint and the adapter loaded with
    plain peft give the logits of the fine-tuned model (tied embeddings: untied on merge)."""
    from peft import PeftModel

    from turbolm.train.loading import load_trained

    base = bases[arch]
    ft, result = _finetune_api(
        base,
        tmp_path / "ft",
        [
            f"finetune.data=[{text_dir}]",
            "task=lm",
            "lora.r=4",
            f"lora.target={target}",
            "lora.dropout=0",
            "finetune.max_len=16",
        ],
    )
    adapter = Path(result.output)
    assert {"adapter_config.json", "adapter_model.safetensors", "turbolm_adapter.json"} <= {
        p.name for p in adapter.iterdir()
    }
    trainable = {n for n, p in ft.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    n_opt = sum(p.numel() for g in ft.optimizer.param_groups for p in g["params"])
    assert n_opt == result.trainable_params < result.total_params

    x = torch.randint(0, 257, (2, 12))
    tuned = _logits(ft.model.eval(), x)
    base_only = load_trained(base).model
    assert (tuned - _logits(base_only, x)).abs().max() > 1e-4  # the adapter does something

    # plain peft onto a freshly loaded base
    plain = PeftModel.from_pretrained(load_trained(base).model, str(adapter)).eval()
    torch.testing.assert_close(_logits(plain, x), tuned, atol=1e-6, rtol=0)

    # merged checkpoint (an ordinary LM checkpoint) == base + adapter
    assert (
        main(
            [
                "merge",
                "--checkpoint",
                str(base),
                "--adapter",
                str(tmp_path / "ft"),
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    merged = load_trained(tmp_path / "merged")
    # head/embed adapted: the merged model is untied; otherwise it stays tied
    assert merged.config["model"]["tie_embeddings"] is ("head" not in target)
    assert (_logits(merged.model, x) - tuned).abs().max().item() < 1e-5
    in_memory = load_trained(base, adapter=adapter)  # what eval/generate --adapter use
    assert (_logits(in_memory.model, x) - tuned).abs().max().item() < 1e-5

    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(base),
                "--adapter",
                str(adapter),
                "--data",
                str(text_dir / "decoder.py"),
                "--json",
                "--context",
                "16",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["tokens"] > 0
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(base),
                "--adapter",
                str(adapter),
                "--prompt",
                "def ",
                "--max-new-tokens",
                "5",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("def ")


@pytest.mark.parametrize("arch", ["transformer", "rnn"])
def test_classification_lora_merge_eval_and_plain_peft(arch, bases, labelled, tmp_path, capsys):
    from peft import PeftModel

    from turbolm.finetune.classifier import SequenceClassifier
    from turbolm.finetune.loading import load_classifier
    from turbolm.train.loading import load_trained

    base, out = bases[arch], tmp_path / "clf"
    ft, result = _finetune_api(
        base,
        out,
        [
            f"finetune.data=[{labelled['train']}]",
            f"finetune.val_data=[{labelled['val']}]",
            "task=classify",
            "lora.r=4",
            "lora.dropout=0",
        ],
    )
    assert result.baseline is not None and 0 <= result.val["macro_f1"] <= 1
    adapter = Path(result.output)
    meta = json.loads((adapter / "turbolm_adapter.json").read_text())
    assert meta["task"]["labels"] == ["alpha", "beta", "gamma"]
    assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    trainable = {n for n, p in ft.model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or ".score." in n for n in trainable), trainable
    assert any(".score." in n for n in trainable)

    x = torch.randint(0, 257, (3, 10))
    lengths = torch.tensor([10, 4, 7])
    with torch.no_grad():
        want = ft.model.eval()(x, lengths)  # the fine-tuned model, in memory
        # the saved adapter, loaded with plain peft onto a fresh base + classifier wrapper
        clf = SequenceClassifier(load_trained(base).model, 3, meta["task"]["pool"])
        plain = PeftModel.from_pretrained(clf, str(adapter)).eval()
        torch.testing.assert_close(plain(x, lengths), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(
            load_classifier(base, adapter).model(x, lengths), want, atol=1e-6, rtol=0
        )

    assert (
        main(
            [
                "merge",
                "--checkpoint",
                str(base),
                "--adapter",
                str(adapter),
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    merged = load_classifier(tmp_path / "merged").model
    with torch.no_grad():
        assert (merged(x, lengths) - want).abs().max().item() < 1e-5

    capsys.readouterr()
    for ckpt in ([str(base), "--adapter", str(adapter)], [str(tmp_path / "merged")]):
        assert main(["eval", "--checkpoint", *ckpt, "--data", str(labelled["val"]), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert set(report["per_class"]) == {"alpha", "beta", "gamma"}
        assert len(report["confusion_matrix"]["matrix"]) == 3
        assert sum(map(sum, report["confusion_matrix"]["matrix"])) == report["examples"] == 15
        assert {
            "accuracy",
            "macro_precision",
            "macro_recall",
            "macro_f1",
            "majority_baseline",
        } <= set(report)
    _fails(capsys, ["generate", "--checkpoint", str(tmp_path / "merged")], "classification")


def test_full_finetuning_trains_everything(bases, labelled, text_dir, tmp_path, capsys):
    _, result = _finetune_api(
        bases["transformer"],
        tmp_path / "full",
        [f"finetune.data=[{labelled['train']}]", "task=classify", "lora.r=0"],
    )
    assert result.trainable_params == result.total_params
    assert "checkpoints" in result.output
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(tmp_path / "full"),
                "--data",
                str(labelled["val"]),
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["examples"] == 15
    # LM task: an ordinary checkpoint that eval and generate load as is
    _, result = _finetune_api(
        bases["rnn"], tmp_path / "full-lm", [f"finetune.data=[{text_dir}]", "lora.r=0"]
    )
    assert result.trainable_params == result.total_params
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(tmp_path / "full-lm"),
                "--prompt",
                "def ",
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("def ")


# ------------------------------------------------------------------------------- bad input


def test_bad_labels_are_refused_and_nothing_is_overwritten(bases, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    base = str(bases["transformer"])
    cases = {
        '{"text": "a"}\n': "has no 'label' field",
        '{"text": "a", "label": 1.5}\n': "must be a string or an integer",
        '{"text": "a", "label": true}\n': "must be a string or an integer",
        '{"text": "a", "label": null}\n': "must be a string or an integer",
        '{"text": "a", "label": ["x"]}\n': "must be a string or an integer",
        '{"text": "a", "label": 1}\n': "mix strings and integers",
        '{"label": "x"}\n': "has no 'text' field",
        "not json\n": "invalid JSON",
    }
    for bad_line, needle in cases.items():
        data = tmp_path / "bad.jsonl"
        data.write_text('{"text": "ok", "label": "x"}\n' + bad_line)
        _fails(
            capsys,
            [
                "finetune",
                "--checkpoint",
                base,
                "--data",
                str(data),
                "task=classify",
                f"train.out_dir={out}",
                "--overwrite",
                *FAST,
            ],
            needle,
            "bad.jsonl:2",
        )
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')
    _fails(
        capsys,
        [
            "finetune",
            "--checkpoint",
            base,
            "--data",
            str(one),
            "task=classify",
            f"train.out_dir={out}",
            "--overwrite",
            *FAST,
        ],
        "at least 2 distinct labels",
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # the output folder must not hold the base (--overwrite would delete it)
    _fails(
        capsys,
        [
            "finetune",
            "--checkpoint",
            base,
            "--data",
            str(one),
            "task=lm",
            f"train.out_dir={base}",
            "--overwrite",
            *FAST,
        ],
        "holds the base checkpoint",
    )
    assert (Path(base) / "checkpoints").is_dir()


def test_bad_target_and_foreign_adapter(bases, labelled, tmp_path, capsys):
    base, wide = str(bases["transformer"]), str(bases["wide"])
    out = tmp_path / "out"
    args = [
        "finetune",
        "--checkpoint",
        base,
        "--data",
        str(labelled["train"]),
        "task=classify",
        f"train.out_dir={out}",
        *FAST,
    ]
    _fails(capsys, [*args, "lora.target=attn,nope"], "'nope' names no module", "attn, embed")
    _fails(capsys, [*args, "lora.target=norm"], "LoRA adapts Linear")
    assert not out.exists()

    assert main([*args, "--no-progress", "lora.target=attn"]) == 0
    capsys.readouterr()
    adapter = out / "adapter"
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "keep.txt").write_text("precious")
    # an adapter for another base: refused by eval and merge, nothing written
    _fails(
        capsys,
        ["eval", "--checkpoint", wide, "--adapter", str(adapter), "--data", str(labelled["val"])],
        "different base model",
        "d_model=32",
    )
    _fails(
        capsys,
        [
            "merge",
            "--checkpoint",
            wide,
            "--adapter",
            str(adapter),
            "--out",
            str(merged),
            "--overwrite",
        ],
        "different base model",
    )
    assert [p.name for p in merged.iterdir()] == ["keep.txt"]
    # the same adapter without turbolm's metadata (a plain peft adapter): the shapes decide
    (adapter / "turbolm_adapter.json").unlink()
    lm_dir = tmp_path / "lm"
    _finetune_api(
        bases["transformer"],
        lm_dir,
        ["finetune.data=[" + str(labelled["train"]) + "]", "lora.target=attn"],
    )
    (lm_dir / "adapter" / "turbolm_adapter.json").unlink()
    capsys.readouterr()
    _fails(
        capsys,
        ["generate", "--checkpoint", wide, "--adapter", str(lm_dir / "adapter")],
        "does not fit this base model",
        "shape",
    )
    _fails(
        capsys,
        ["merge", "--checkpoint", base, "--adapter", str(merged), "--out", str(tmp_path / "m2")],
        "not an adapter folder",
    )
    assert not (tmp_path / "m2").exists()


def test_eval_label_not_in_the_label_set(bases, labelled, tmp_path, capsys):
    out = tmp_path / "clf"
    _finetune_api(
        bases["transformer"],
        out,
        [f"finetune.data=[{labelled['train']}]", "task=classify", "lora.target=attn"],
    )
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "x", "label": "delta"}\n')
    _fails(
        capsys,
        [
            "eval",
            "--checkpoint",
            str(bases["transformer"]),
            "--adapter",
            str(out),
            "--data",
            str(other),
        ],
        '"delta" is not one of the 3 labels',
    )


# ----------------------------------------------------------------------------------- quality


def test_lora_beats_majority_baseline_on_stdlib_packages(tmp_path, capsys):
    """Pretrain a small Transformer on the task's own training text (no labels), LoRA-tune it
    to classify stdlib chunks by package, evaluate on held-out *files*: macro-F1 clearly above
    the majority-class baseline with < 5% of the parameters trainable."""
    from turbolm.finetune.demo import make_stdlib_task

    task = tmp_path / "task"
    summary = make_stdlib_task(
        str(task),
        ("asyncio", "email", "json", "unittest", "xml"),
        chunk_chars=300,
        caps={"train": 120, "val": 30, "test": 40},
    )
    assert all(s["examples"] > 0 for s in summary["splits"].values())
    assert (
        main(
            [
                "prepare",
                str(task / "train.jsonl"),
                "--out",
                str(tmp_path / "prep"),
                "--vocab-size",
                "512",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--no-progress",
                f"data.dir={tmp_path / 'prep'}",
                f"train.out_dir={tmp_path / 'base'}",
                "model.n_layer=2",
                "model.d_model=64",
                "model.n_head=4",
                "model.context=64",
                "train.batch_size=16",
                "train.max_steps=200",
                "train.warmup_steps=10",
                "train.lr=3e-3",
                "train.eval_every=200",
                "train.eval_batches=2",
                "train.sample_tokens=0",
                "train.tensorboard=false",
                "train.threads=1",
                "train.device=cpu",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "finetune",
                "--checkpoint",
                str(tmp_path / "base"),
                "--data",
                str(task / "train.jsonl"),
                "--val-data",
                str(task / "val.jsonl"),
                "task=classify",
                "lora.r=4",
                "lora.alpha=8",
                "lora.target=attn",
                "train.max_steps=200",
                "train.lr=5e-3",
                "train.eval_every=1000",
                f"train.out_dir={tmp_path / 'lora'}",
                "train.threads=1",
                "train.device=cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "macro avg" in out and "majority-class baseline" in out and "confusion" in out
    pct = float(out.split("trainable parameters")[1].split("(")[1].split("%")[0])
    assert pct < 5.0, out
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(tmp_path / "base"),
                "--adapter",
                str(tmp_path / "lora"),
                "--data",
                str(task / "test.jsonl"),
                "--json",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    f1, base_f1 = report["macro_f1"], report["majority_baseline"]["macro_f1"]
    print(f"macro-F1 {f1:.3f} vs majority baseline {base_f1:.3f}; {pct:.2f}% trainable")
    assert f1 > base_f1 + 0.15 and f1 > 3 * base_f1, report


# ----------------------------------------------------------------------------------------- gpu


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ["transformer", "rnn"])
def test_gpu_bf16_finetune_then_merge(arch, bases, labelled, text_dir, tmp_path):
    """On a GPU: bf16 autocast + fused AdamW fine-tuning (LM and classification); the merged
    model matches base + adapter in fp32 on the GPU."""
    from turbolm.finetune.loading import load_classifier
    from turbolm.train.loading import load_trained

    gpu = ["train.device=cuda", "train.precision=bf16", "train.max_steps=20"]
    x = torch.randint(0, 257, (4, 16), device="cuda")
    lengths = torch.tensor([16, 3, 9, 12], device="cuda")
    _, lm = _finetune_api(
        bases[arch], tmp_path / "lm", [f"finetune.data=[{text_dir}]", "lora.dropout=0", *gpu]
    )
    assert math.isfinite(lm.val["loss"]) and lm.val["loss"] < 5.6  # ln(257) = 5.55
    merged_dir = tmp_path / "lm-merged"
    assert (
        main(
            [
                "merge",
                "--checkpoint",
                str(bases[arch]),
                "--adapter",
                lm.output,
                "--out",
                str(merged_dir),
            ]
        )
        == 0
    )
    want = _logits(load_trained(bases[arch], "cuda", adapter=lm.output).model, x)
    got = _logits(load_trained(merged_dir, "cuda").model, x)
    assert (got - want).abs().max().item() < 1e-4
    _, clf = _finetune_api(
        bases[arch],
        tmp_path / "clf",
        [f"finetune.data=[{labelled['train']}]", "task=classify", "lora.dropout=0", *gpu],
    )
    assert math.isfinite(clf.val["loss"]) and 0 <= clf.val["macro_f1"] <= 1
    assert (
        main(
            [
                "merge",
                "--checkpoint",
                str(bases[arch]),
                "--adapter",
                clf.output,
                "--out",
                str(tmp_path / "clf-merged"),
            ]
        )
        == 0
    )
    with torch.no_grad():
        want = load_classifier(bases[arch], clf.output, "cuda").model(x, lengths)
        got = load_classifier(tmp_path / "clf-merged", device="cuda").model(x, lengths)
    assert (got - want).abs().max().item() < 1e-4


def test_integer_labels_and_split_from_data(bases, labelled, tmp_path, capsys):
    """Integer labels work (sorted numerically, kept as ints); without --val-data the val set
    is split from --data."""
    ints = tmp_path / "ints.jsonl"
    mapping = {"alpha": 10, "beta": 2, "gamma": 7}
    with open(ints, "w") as f:
        for line in labelled["train"].read_text().splitlines():
            record = json.loads(line)
            f.write(json.dumps({"text": record["text"], "label": mapping[record["label"]]}) + "\n")
    _, result = _finetune_api(
        bases["transformer"], tmp_path / "ints", [f"finetune.data=[{ints}]", "task=classify"]
    )
    assert result.labels == [2, 7, 10]
    assert 0 < result.val["examples"] < 48  # held out of the 48 records
    meta = json.loads((Path(result.output) / "turbolm_adapter.json").read_text())
    assert meta["task"]["labels"] == [2, 7, 10]
    _fails(
        capsys,
        [
            "eval",
            "--checkpoint",
            str(bases["transformer"]),
            "--adapter",
            result.output,
            "--data",
            str(labelled["val"]),
        ],
        '"alpha" is not one of the 3 labels',
    )


@pytest.mark.parametrize("task", ["lm", "classify"])
def test_activation_checkpointing_with_lora_trains_identically(
    task, bases, labelled, text_dir, tmp_path
):
    """LoRA on frozen blocks with recomputation: the same losses as without (non-reentrant
    checkpointing needs no grad-requiring block input, unlike the reentrant variant)."""
    data = (
        [f"finetune.data=[{text_dir}]", "finetune.max_len=16"]
        if task == "lm"
        else [f"finetune.data=[{labelled['train']}]", f"finetune.val_data=[{labelled['val']}]"]
    )
    losses = {}
    for flag in ("false", "true"):
        out = tmp_path / flag
        ft, _ = _finetune_api(
            bases["transformer"],
            out,
            [*data, f"task={task}", "lora.r=4", "lora.dropout=0.1",
             f"train.activation_checkpointing={flag}"],
        )  # fmt: skip
        assert ft.lm.activation_checkpointing is (flag == "true")
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[flag] = [r["loss"] for r in records if "lr" in r]
    assert len(losses["true"]) == 4 and losses["true"] == losses["false"]


def test_activation_checkpointing_refused_for_rnn_bases(bases, text_dir, tmp_path):
    with pytest.raises(ConfigError, match="activation_checkpointing.*Transformer"):
        _finetune_api(
            bases["rnn"],
            tmp_path / "ft",
            [f"finetune.data=[{text_dir}]", "task=lm", "train.activation_checkpointing=true"],
        )
    assert not (tmp_path / "ft").exists()
