"""An offline, real classification task from the embedded corpus: which top-level standard
library package does a chunk of source code come from?

Every machine has the data (the running Python's standard library; test folders excluded as
in the default corpus). Each chosen package's ``.py`` files are cut into chunks of whole
lines of about ``chunk_chars`` characters; the label is the package name. The split is by
**file**, per package (files ordered by a hash of their path: the first ~20% are test, the
next ~10% val, the rest train), so no file contributes to two splits and near-duplicate
neighbouring chunks cannot leak from train into test. Chunks per package and split are capped
(a hash-ordered, deterministic sample), which keeps runs small; the caps leave the classes
unbalanced (``json`` is much smaller than ``asyncio``), so macro-F1 and the majority-class
baseline mean something.

    python -m turbolm.finetune.demo --out data_cache/stdlib_packages
    -> train.jsonl  val.jsonl  test.jsonl  ({"text", "label", "source"} per line), task.json

A base model pretrained on the embedded corpus has seen these files as unlabelled text (as a
web-pretrained model has seen much of its fine-tuning data); the labels are never seen.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter

from turbolm.errors import DataError

DEFAULT_PACKAGES = (
    "asyncio",
    "email",
    "http",
    "importlib",
    "json",
    "multiprocessing",
    "unittest",
    "xml",
)
SPLITS = ("train", "val", "test")
DEFAULT_CAPS = {"train": 200, "val": 40, "test": 60}


def _hash(*parts: object) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()


def chunk_lines(text: str, chunk_chars: int, min_chars: int) -> list[str]:
    """Consecutive whole lines, each chunk at least ``chunk_chars`` long (the last may be
    shorter); chunks with fewer than ``min_chars`` non-blank characters are dropped."""
    chunks, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= chunk_chars:
            chunks.append("".join(current))
            current, size = [], 0
    if current:
        chunks.append("".join(current))
    return [c for c in chunks if len("".join(c.split())) >= min_chars]


def package_sources(packages: tuple[str, ...] | list[str]) -> dict[str, list[tuple[str, str]]]:
    """``{package: [(relative path, text), ...]}`` from the embedded corpus."""
    from turbolm.data import default_corpus_documents

    wanted = set(packages)
    found: dict[str, list[tuple[str, str]]] = {p: [] for p in packages}
    for doc in default_corpus_documents():
        top = doc.name.split("/", 1)[0]
        if "/" in doc.name and top in wanted:
            found[top].append((doc.name, doc.text))
    for pkg, files in found.items():
        if len(files) < 3:
            raise DataError(
                f"standard-library package {pkg!r} has {len(files)} source file(s) here; a "
                "split by file needs at least 3 (choose other --packages)"
            )
    return found


def split_files(files: list[str], seed: int) -> dict[str, str]:
    """``{path: split}``: ~20% of a package's files test, ~10% val (each at least one)."""
    order = sorted(files, key=lambda f: _hash("file", seed, f))
    n = len(order)
    n_test = max(1, round(0.2 * n))
    n_val = max(1, round(0.1 * n))
    return {
        f: "test" if i < n_test else "val" if i < n_test + n_val else "train"
        for i, f in enumerate(order)
    }


def make_stdlib_task(
    out_dir: str,
    packages: tuple[str, ...] | list[str] = DEFAULT_PACKAGES,
    *,
    chunk_chars: int = 600,
    min_chars: int = 120,
    caps: dict[str, int] | None = None,
    seed: int = 0,
) -> dict:
    """Write ``train/val/test.jsonl`` and ``task.json`` into ``out_dir``; returns the summary."""
    caps = {**DEFAULT_CAPS, **(caps or {})}
    sources = package_sources(packages)
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for pkg in packages:
        files = dict(sources[pkg])
        assignment = split_files(list(files), seed)
        per_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
        for path in sorted(files):
            for i, chunk in enumerate(chunk_lines(files[path], chunk_chars, min_chars)):
                per_split[assignment[path]].append(
                    {"text": chunk, "label": pkg, "source": path, "_key": _hash(seed, path, i)}
                )
        for split, items in per_split.items():
            items.sort(key=lambda r: r["_key"])
            rows[split].extend(items[: caps[split]])
    os.makedirs(out_dir, exist_ok=True)
    summary = {"packages": list(packages), "chunk_chars": chunk_chars, "seed": seed, "splits": {}}
    for split, items in rows.items():
        items.sort(key=lambda r: r["_key"])  # interleave packages
        with open(os.path.join(out_dir, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for r in items:
                f.write(json.dumps({k: v for k, v in r.items() if k != "_key"}) + "\n")
        counts = Counter(r["label"] for r in items)
        summary["splits"][split] = {
            "examples": len(items),
            "files": len({r["source"] for r in items}),
            "per_label": {p: counts.get(p, 0) for p in packages},
        }
    with open(os.path.join(out_dir, "task.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m turbolm.finetune.demo",
        description="Write the stdlib-package classification task (train/val/test JSONL).",
    )
    parser.add_argument("--out", default="data_cache/stdlib_packages")
    parser.add_argument("--packages", nargs="+", default=list(DEFAULT_PACKAGES))
    parser.add_argument("--chunk-chars", type=int, default=600)
    parser.add_argument("--max-train", type=int, default=DEFAULT_CAPS["train"])
    parser.add_argument("--max-val", type=int, default=DEFAULT_CAPS["val"])
    parser.add_argument("--max-test", type=int, default=DEFAULT_CAPS["test"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        summary = make_stdlib_task(
            args.out,
            args.packages,
            chunk_chars=args.chunk_chars,
            caps={"train": args.max_train, "val": args.max_val, "test": args.max_test},
            seed=args.seed,
        )
    except DataError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    for split, info in summary["splits"].items():
        print(f"{split}: {info['examples']} chunks from {info['files']} files {info['per_label']}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
