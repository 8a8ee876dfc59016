"""`prepare`: documents -> trained tokenizer + token shards, written to one folder.

Folder layout (format_version 1), nanoGPT style:

    train.bin       raw token ids, little-endian uint16 (all ids <= 65535) or uint32
    val.bin         same dtype; each document's ids are followed by one eot id
    tokenizer.json  the Hugging Face tokenizer (see `tokenizer.py` for the id layout)
    meta.json       settings, counts per split, dtype, and every document's name, sha256,
                    split and token count

Split by document, never inside one (except a one-document corpus, see `assign_splits`):
a document goes to val when a hash of (seed, name) falls below `val_fraction`, so adding
or removing documents never moves the others. The tokenizer is trained on train only,
so val measures generalisation of the whole pipeline.

The folder is written into a temporary sibling and renamed into place, so a crash never
leaves a half-written preparation that `is_prepared` would accept.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
import uuid
from datetime import datetime, timezone

import numpy as np
from tqdm.auto import tqdm

from turbolm.data.corpus import Document, collect_documents, default_corpus_documents
from turbolm.data.tokenizer import MODES, Tokenizer
from turbolm.errors import DataError, InputError

FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
SPLIT_FILES = {"train": "train.bin", "val": "val.bin"}

# Documents per encode_batch call: big enough for the Rust side to use every core,
# small enough for a responsive progress bar.
_ENCODE_CHUNK = 128


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (0 .. vocab_size-1) fits in 16 bits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# --------------------------------------------------------------------------- public API


def prepare(
    out_dir: str,
    sources: list[str] | None = None,
    *,
    vocab_size: int = 4096,
    tokenizer: str = "bpe",
    val_fraction: float = 0.05,
    seed: int = 1337,
    include: list[str] | None = None,
    jsonl_field: str = "text",
    max_docs: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenize a corpus into `out_dir`; return the meta dict also written to meta.json.

    sources: files/folders/JSONL for `collect_documents`, or None for the default corpus.
    tokenizer: "bpe" (trained to `vocab_size`) or "bytes" (257 ids, vocab_size ignored).
    max_docs: keep this many documents, picked by a hash of (seed, name) so the sample is
    spread over the whole corpus and the same on every run.
    overwrite: replace an existing non-empty `out_dir` (refused otherwise).
    """
    settings = _settings(
        sources, vocab_size, tokenizer, val_fraction, seed, include, jsonl_field, max_docs
    )
    _check_out_dir(out_dir, overwrite)
    return _prepare_documents(out_dir, _load_documents(settings), settings, progress)


def ensure_prepared(out_dir: str, **kwargs) -> dict:
    """Return the meta of `out_dir` if it already holds a preparation with the same settings
    and the same documents (names and sha256); otherwise (re)prepare it.

    Takes `prepare`'s keyword arguments (`sources=` included). A folder holding a stale
    preparation is replaced; any other non-empty folder still needs `overwrite=True`.
    """
    overwrite = kwargs.pop("overwrite", False)
    progress = kwargs.pop("progress", True)
    unknown = set(kwargs) - set(_SETTING_NAMES)
    if unknown:
        raise InputError(f"ensure_prepared got unknown arguments: {sorted(unknown)}")
    settings = _settings(**{name: kwargs.get(name, default) for name, default in _DEFAULTS})
    docs = _load_documents(settings)
    if is_prepared(out_dir):
        meta = read_meta(out_dir)
        if meta.get("settings") == settings and meta.get("corpus_sha256") == _fingerprint(docs):
            return meta
        overwrite = True  # our own stale output: safe to replace
    _check_out_dir(out_dir, overwrite)
    return _prepare_documents(out_dir, docs, settings, progress)


def is_prepared(out_dir: str) -> bool:
    """True if `out_dir` holds a complete, readable preparation of this format."""
    try:
        read_meta(out_dir)
    except DataError:
        return False
    return True


def read_meta(data_dir: str) -> dict:
    """meta.json of a prepared folder, after checking the shards exist with the right size.

    Raises `DataError` ("not a prepared data folder ...") otherwise.
    """
    data_dir = os.fspath(data_dir)
    hint = f"not a prepared data folder: {data_dir} (run `turbolm prepare`)"
    path = os.path.join(data_dir, META_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        version = meta["format_version"]
        itemsize = np.dtype(meta["dtype"]).itemsize
        counts = {split: int(meta["splits"][split]["tokens"]) for split in SPLIT_FILES}
        int(meta["vocab_size"])
    except FileNotFoundError:
        raise DataError(f"{hint}: no {META_FILE}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{hint}: {META_FILE} is malformed ({type(e).__name__}: {e})") from None
    if version != FORMAT_VERSION:
        raise DataError(
            f"{hint}: format_version {version}, this turbolm reads {FORMAT_VERSION}; "
            "prepare it again"
        )
    for split, fname in [*SPLIT_FILES.items(), (None, TOKENIZER_FILE)]:
        fpath = os.path.join(data_dir, fname)
        if not os.path.isfile(fpath):
            raise DataError(f"{hint}: {fname} is missing")
        if split is not None and os.path.getsize(fpath) != counts[split] * itemsize:
            raise DataError(
                f"{fpath} has {os.path.getsize(fpath)} bytes, meta.json says "
                f"{counts[split]} tokens x {itemsize} bytes: truncated or replaced; "
                "prepare it again"
            )
    return meta


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy in nats/token of the empirical unigram distribution of `tokens` (any shape,
    integer ids < vocab_size). A model that ignores context entirely can reach this loss,
    so it is the baseline a trained model's val loss must beat."""
    tokens = np.asarray(tokens).reshape(-1)
    if tokens.size == 0:
        raise InputError("unigram_entropy needs at least one token")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise InputError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    counts = np.zeros(vocab_size, dtype=np.int64)
    step = 1 << 24  # bincount casts to intp: chunk to bound memory on big memmaps
    for start in range(0, tokens.size, step):
        chunk = tokens[start : start + step]
        if chunk.min() < 0 or chunk.max() >= vocab_size:
            raise InputError(
                f"token ids must be in [0, {vocab_size}), got range [{chunk.min()}, {chunk.max()}]"
            )
        counts += np.bincount(chunk, minlength=vocab_size)
    p = counts[counts > 0] / tokens.size
    return float(-(p * np.log(p)).sum())


def assign_splits(
    docs: list[Document], val_fraction: float, seed: int
) -> list[tuple[Document, str]]:
    """Pair each document with "train" or "val".

    A document is val when `_unit_hash("split", seed, name) < val_fraction`. With >= 2
    documents both splits are made non-empty (the lowest-hash document is forced into val,
    or the highest into train). A single document is cut at a line break so the last
    ~val_fraction of its text is val (names get "#train" / "#val"): one big text file is
    still a usable corpus.
    """
    if len(docs) == 1:
        return _split_single_document(docs[0], val_fraction)
    keys = [_unit_hash("split", seed, d.name) for d in docs]
    is_val = [k < val_fraction for k in keys]
    if docs and not any(is_val):
        is_val[keys.index(min(keys))] = True
    if docs and all(is_val):
        is_val[keys.index(max(keys))] = False
    return [(d, "val" if v else "train") for d, v in zip(docs, is_val)]


# --------------------------------------------------------------------------- settings

_DEFAULTS = [
    ("sources", None),
    ("vocab_size", 4096),
    ("tokenizer", "bpe"),
    ("val_fraction", 0.05),
    ("seed", 1337),
    ("include", None),
    ("jsonl_field", "text"),
    ("max_docs", None),
]
_SETTING_NAMES = [name for name, _ in _DEFAULTS]


def _settings(
    sources, vocab_size, tokenizer, val_fraction, seed, include, jsonl_field, max_docs
) -> dict:
    """Validated settings as a JSON-plain dict (stored in meta.json, compared on reuse)."""
    if tokenizer not in MODES:
        raise InputError(f"tokenizer must be one of {MODES}, got {tokenizer!r}")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 257:
        raise InputError(f"vocab_size must be an int >= 257, got {vocab_size!r}")
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise InputError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InputError(f"seed must be an int, got {seed!r}")
    if max_docs is not None and (not isinstance(max_docs, int) or max_docs < 1):
        raise InputError(f"max_docs must be a positive int or None, got {max_docs!r}")
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if isinstance(include, str):
        include = [include]
    return {
        "sources": None if sources is None else [os.fspath(s) for s in sources],
        "vocab_size": vocab_size,
        "tokenizer": tokenizer,
        "val_fraction": float(val_fraction),
        "seed": seed,
        "include": None if include is None else list(include),
        "jsonl_field": jsonl_field,
        "max_docs": max_docs,
    }


def _load_documents(settings: dict) -> list[Document]:
    if settings["sources"] is None:
        docs = default_corpus_documents()
    else:
        docs = collect_documents(settings["sources"], settings["include"], settings["jsonl_field"])
    if settings["max_docs"] is not None and len(docs) > settings["max_docs"]:
        # A different hash salt than the split: the lowest split-hashes would all be val.
        seed = settings["seed"]
        ranked = sorted(docs, key=lambda d: _unit_hash("select", seed, d.name))
        keep = {id(d) for d in ranked[: settings["max_docs"]]}
        docs = [d for d in docs if id(d) in keep]  # keep corpus order
    return docs


def _unit_hash(salt: str, seed: int, name: str) -> float:
    """A deterministic uniform number in [0, 1) from (salt, seed, name)."""
    digest = hashlib.sha256(f"{salt}\0{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _fingerprint(docs: list[Document]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(f"{d.name}\0{d.sha256}\n".encode())
    return h.hexdigest()


def _split_single_document(doc: Document, val_fraction: float) -> list[tuple[Document, str]]:
    text = doc.text
    target = int(len(text) * (1 - val_fraction))
    cut = text.rfind("\n", 0, target) + 1  # start val at a line start when possible
    if cut <= 0:
        cut = target
    cut = min(max(cut, 1), len(text) - 1) if len(text) >= 2 else len(text)
    parts = [(Document(f"{doc.name}#train", text[:cut]), "train")]
    if cut < len(text):
        parts.append((Document(f"{doc.name}#val", text[cut:]), "val"))
    return parts


# --------------------------------------------------------------------------- writing


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"output path exists and is not a folder: {out_dir}")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise DataError(
            f"output folder is not empty: {out_dir} (pass overwrite=True / --overwrite "
            "to replace it)"
        )


def _prepare_documents(out_dir: str, docs: list[Document], settings: dict, progress: bool):
    t0 = time.perf_counter()
    pairs = assign_splits(docs, settings["val_fraction"], settings["seed"])
    train_texts = (d.text for d, split in pairs if split == "train")
    tok = Tokenizer.train(
        train_texts, settings["vocab_size"], settings["tokenizer"], progress=progress
    )
    dtype = token_dtype(tok.vocab_size)

    def write(tmp_dir: str) -> dict:
        entries = _write_shards(tmp_dir, pairs, tok, dtype, progress)
        tok.save(os.path.join(tmp_dir, TOKENIZER_FILE))
        meta = _build_meta(tmp_dir, entries, tok, dtype, settings, docs)
        meta["prepare_seconds"] = round(time.perf_counter() - t0, 3)
        with open(os.path.join(tmp_dir, META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        return meta

    return _write_atomically(os.fspath(out_dir), write)


def _write_shards(tmp_dir, pairs, tok: Tokenizer, dtype, progress) -> list[dict]:
    """Encode every document (batched), append eot, stream ids into train.bin / val.bin.
    Returns one meta entry per document."""
    files = {s: open(os.path.join(tmp_dir, f), "wb") for s, f in SPLIT_FILES.items()}
    entries = []
    eot = np.array([tok.eot_id], dtype=dtype)
    try:
        with tqdm(total=len(pairs), unit="doc", desc="encode", disable=not progress) as bar:
            for start in range(0, len(pairs), _ENCODE_CHUNK):
                chunk = pairs[start : start + _ENCODE_CHUNK]
                encoded = tok.encode_batch([d.text for d, _ in chunk])
                out: dict[str, list[np.ndarray]] = {s: [] for s in SPLIT_FILES}
                for (doc, split), ids in zip(chunk, encoded):
                    out[split] += [np.asarray(ids, dtype=dtype), eot]
                    entry = {"name": doc.name, "sha256": doc.sha256, "split": split}
                    entries.append({**entry, "tokens": len(ids) + 1})
                for split, arrays in out.items():
                    if arrays:
                        np.concatenate(arrays).tofile(files[split])
                bar.update(len(chunk))
    finally:
        for f in files.values():
            f.close()
    return entries


def _build_meta(tmp_dir, entries, tok: Tokenizer, dtype, settings, docs) -> dict:
    splits = {}
    for split, fname in SPLIT_FILES.items():
        tokens = np.fromfile(os.path.join(tmp_dir, fname), dtype=dtype)
        splits[split] = {
            "documents": sum(e["split"] == split for e in entries),
            "tokens": int(tokens.size),
            "unigram_entropy": unigram_entropy(tokens, tok.vocab_size) if tokens.size else None,
        }
    return {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tokenizer": tok.mode,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": dtype.name,
        "seed": settings["seed"],
        "val_fraction": settings["val_fraction"],
        "splits": splits,
        "files": {**SPLIT_FILES, "tokenizer": TOKENIZER_FILE},
        "corpus": "default" if settings["sources"] is None else "user",
        "python": platform.python_version(),  # the default corpus depends on it
        "settings": settings,
        "corpus_sha256": _fingerprint(docs),
        "documents": entries,
    }


def _write_atomically(out_dir: str, write_fn):
    """Run write_fn(tmp_dir) in a fresh sibling folder, then move it to out_dir."""
    out_dir = os.path.abspath(out_dir)
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.mkdir(tmp_dir)  # plain mkdir: normal permissions, unlike tempfile.mkdtemp's 0700
    try:
        result = write_fn(tmp_dir)
        if os.path.isdir(out_dir):
            # Move the old folder aside first: os.rename cannot replace a non-empty folder.
            old = f"{tmp_dir}.old"
            os.rename(out_dir, old)
            os.rename(tmp_dir, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return result
