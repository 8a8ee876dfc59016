"""Fine-tuning data: labelled JSONL for classification, plain text for causal-LM adaptation.

Classification input is JSONL, one ``{"text": str, "label": str | int}`` object per line (the
field names are ``finetune.text_field`` / ``finetune.label_field``). Labels must all be
strings or all be integers (``true``, ``1.5``, ``null``, lists are errors); the label set is
the sorted set of labels in the training data, stored with the fine-tuned model, and a label
at evaluation time that is not in it is an error. Every problem names ``file:line``.

Examples are encoded with the base checkpoint's tokenizer, cut to ``max_len - 1`` tokens (the
start of the text is kept) and closed with the end-of-text id, so the last position, which a
causal model reads the whole example from, is always the same token. Batches are right-padded
(a causal model's hidden states at real positions do not depend on what follows).

LM input is any text ``collect_documents`` reads (files, folders, ``.jsonl``), encoded with
the base tokenizer, each document followed by the end-of-text id as in ``turbolm prepare``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from turbolm.data import Tokenizer, collect_documents
from turbolm.data.corpus import Document
from turbolm.errors import DataError

__all__ = [
    "Example",
    "ClassificationData",
    "read_labelled_jsonl",
    "label_set",
    "split_examples",
    "encode_examples",
    "ClassBatches",
    "pad_batch",
    "lm_token_splits",
]


@dataclass(frozen=True)
class Example:
    text: str
    label: str | int
    where: str  # "file:line"


def _label_kind(value) -> str | None:
    if isinstance(value, str):
        return "str"
    if isinstance(value, int) and not isinstance(value, bool):
        return "int"
    return None


def read_labelled_jsonl(
    paths: list[str], text_field: str = "text", label_field: str = "label"
) -> list[Example]:
    """Read ``{"text", "label"}`` records from JSONL files (folders: their ``*.jsonl``)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DataError("no classification data given (--data FILE.jsonl)")
    files: list[str] = []
    for p in map(os.fspath, paths):
        if os.path.isdir(p):
            found = sorted(
                os.path.join(d, f)
                for d, _, fs in os.walk(p)
                for f in fs
                if f.endswith(".jsonl") and not f.startswith(".")
            )
            if not found:
                raise DataError(f"classification data folder has no .jsonl files: {p}")
            files.extend(found)
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise DataError(f"classification data path does not exist: {p}")
    examples: list[Example] = []
    kinds: dict[str, str] = {}  # kind -> first place seen
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except UnicodeDecodeError:
            raise DataError(f"classification data is not UTF-8 text: {path}") from None
        except OSError as e:
            raise DataError(f"cannot read classification data {path}: {e.strerror}") from None
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{where}: each line must be a JSON object with "
                    f"'{text_field}' and '{label_field}'"
                )
            if text_field not in record:
                raise DataError(f"{where}: record has no '{text_field}' field")
            text = record[text_field]
            if not isinstance(text, str) or not text.strip():
                raise DataError(
                    f"{where}: '{text_field}' must be a non-empty string, got "
                    f"{type(text).__name__} {text!r:.40}"
                )
            if label_field not in record:
                raise DataError(
                    f"{where}: record has no '{label_field}' field (classification needs a "
                    "label on every record)"
                )
            label = record[label_field]
            kind = _label_kind(label)
            if kind is None:
                raise DataError(
                    f"{where}: '{label_field}' must be a string or an integer, got "
                    f"{type(label).__name__} {json.dumps(label)}"
                )
            kinds.setdefault(kind, where)
            if len(kinds) > 1:
                raise DataError(
                    f"{where}: labels mix strings and integers (strings first at "
                    f"{kinds['str']}, integers at {kinds['int']}); use one type"
                )
            examples.append(Example(text, label, where))
    if not examples:
        raise DataError(f"no records in {', '.join(files)}")
    return examples


def label_set(examples: list[Example]) -> list[str | int]:
    """The sorted labels; classification needs at least two."""
    labels = sorted({e.label for e in examples})
    if len(labels) < 2:
        raise DataError(
            f"classification needs at least 2 distinct labels in the training data, "
            f"found {labels!r}"
        )
    return labels


def check_labels(examples: list[Example], labels: list[str | int], what: str) -> None:
    """Every example's label is one of ``labels`` (the set the model was trained on)."""
    known = set(labels)
    for e in examples:
        if e.label not in known:
            shown = ", ".join(json.dumps(lab) for lab in labels[:10])
            raise DataError(
                f"{e.where}: label {json.dumps(e.label)} is not one of the {len(labels)} "
                f"labels the model knows ({shown}{', ...' if len(labels) > 10 else ''}) "
                f"[{what}]"
            )


def _unit_hash(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"finetune-split\0{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_examples(
    examples: list[Example], val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Deterministic train/val split by a hash of each record's text (duplicates stay
    together). Both parts are non-empty when there are >= 2 distinct texts."""
    keys = [_unit_hash(seed, e.text) for e in examples]
    is_val = [k < val_fraction for k in keys]
    if not any(is_val):
        is_val = [k == min(keys) for k in keys]
    if all(is_val):
        is_val = [k != max(keys) for k in keys]
    train = [e for e, v in zip(examples, is_val) if not v]
    val = [e for e, v in zip(examples, is_val) if v]
    if not train or not val:
        raise DataError("cannot split the data into train and val: give --val-data")
    return train, val


def encode_examples(
    examples: list[Example], tokenizer: Tokenizer, labels: list, max_len: int
) -> tuple[list[list[int]], list[int]]:
    """Token ids (``<= max_len``, ending in eot) and label indices of ``examples``."""
    index = {lab: i for i, lab in enumerate(labels)}
    ids = [
        enc[: max_len - 1] + [tokenizer.eot_id]
        for enc in tokenizer.encode_batch([e.text for e in examples])
    ]
    return ids, [index[e.label] for e in examples]


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: ids (B, T) int64 and lengths (B,) int64."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    out = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.int64)
    return out, lengths


@dataclass
class ClassificationData:
    """Encoded train/val examples and the label set."""

    labels: list
    train_ids: list[list[int]]
    train_y: list[int]
    val_ids: list[list[int]]
    val_y: list[int]
    pad_id: int

    def label_counts(self) -> dict[str, int]:
        counts = Counter(self.train_y)
        return {str(lab): counts.get(i, 0) for i, lab in enumerate(self.labels)}


class ClassBatches:
    """Shuffled epochs of training examples, reproducible from ``seed``."""

    def __init__(self, ids: list[list[int]], y: list[int], batch_size: int, seed: int, pad_id: int):
        self.ids, self.y, self.batch_size, self.pad_id = ids, y, batch_size, pad_id
        self.rng = np.random.default_rng(seed)
        self.order: list[int] = []

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids (B, T), lengths (B,), labels (B,)."""
        picked: list[int] = []
        while len(picked) < self.batch_size:
            if not self.order:
                self.order = self.rng.permutation(len(self.ids)).tolist()
            picked.append(self.order.pop())
        x, lengths = pad_batch([self.ids[i] for i in picked], self.pad_id)
        return x, lengths, torch.tensor([self.y[i] for i in picked], dtype=torch.int64)


def iter_eval_batches(ids: list[list[int]], batch_size: int, pad_id: int):
    """Batches (ids, lengths) over every example in input order (predictions line up with
    the examples)."""
    for start in range(0, len(ids), batch_size):
        yield pad_batch(ids[start : start + batch_size], pad_id)


# --------------------------------------------------------------------------------- LM data


def _encode_docs(docs: list[Document], tokenizer: Tokenizer) -> np.ndarray:
    ids: list[int] = []
    for enc in tokenizer.encode_batch([d.text for d in docs]):
        ids.extend(enc)
        ids.append(tokenizer.eot_id)
    return np.asarray(ids, dtype=np.int64)


def lm_token_splits(
    data: list[str],
    val_data: list[str],
    tokenizer: Tokenizer,
    *,
    val_fraction: float,
    seed: int,
    jsonl_field: str = "text",
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Train and val token arrays for causal-LM fine-tuning, plus a summary dict.

    Without ``val_data`` documents are split by a hash of their names (a single document is
    cut at a line break), like ``turbolm prepare`` does.
    """
    from turbolm.data import assign_splits

    if not data:
        raise DataError("no fine-tuning text given (--data FILES/FOLDERS)")
    docs = collect_documents(data, jsonl_field=jsonl_field)
    if val_data:
        train_docs, val_docs = docs, collect_documents(val_data, jsonl_field=jsonl_field)
    else:
        pairs = assign_splits(docs, val_fraction, seed)
        train_docs = [d for d, s in pairs if s == "train"]
        val_docs = [d for d, s in pairs if s == "val"]
    train, val = _encode_docs(train_docs, tokenizer), _encode_docs(val_docs, tokenizer)
    info = {
        "train_documents": len(train_docs),
        "val_documents": len(val_docs),
        "train_tokens": int(train.size),
        "val_tokens": int(val.size),
    }
    return train, val, info
