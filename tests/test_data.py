"""turbolm.data: corpus discovery, tokenizer, prepare, loaders. CPU only, a few seconds."""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch

from turbolm.data import (
    EOT_TOKEN,
    Document,
    StreamDecoder,
    TokenData,
    Tokenizer,
    TrainBatches,
    assign_splits,
    collect_documents,
    default_corpus_documents,
    ensure_prepared,
    is_prepared,
    prepare,
    read_meta,
    token_dtype,
    unigram_entropy,
    val_batches,
)
from turbolm.errors import DataError, InputError

UNICODE_TEXT = "héllo wörld 🎉 中文テキスト ünïcödé\r\n\ttabs\x00nul  trailing  \n\n"
CODE_TEXT = 'def f(x):\n    """Doc."""\n    return {"a": [x ** 2, -1.5e3]}  # ok\n'


def write(path, text: str | bytes):
    """Write text (UTF-8, no newline translation) or bytes, creating parent folders."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def make_corpus(root, n: int = 24) -> str:
    """A folder of n small, varied text documents; returns its path."""
    for i in range(n):
        body = "".join(
            f"def func_{i}_{j}(value, other={j}):\n    return value * {i} + other  # ünï {j}\n"
            for j in range(1 + i % 5)
        )
        write(os.path.join(root, f"doc_{i:02d}.py"), body + f"\n# the end of document {i} ✓\n")
    return str(root)


@pytest.fixture(scope="module")
def default_docs():
    return default_corpus_documents()


@pytest.fixture(scope="module")
def small_texts():
    return [
        f"def function_{i}(argument):\n    return argument + {i}  # 中文 {i % 3}\n" * 3
        for i in range(40)
    ] + [UNICODE_TEXT, CODE_TEXT]


# =========================================================================== corpus


def test_default_corpus_contents(default_docs):
    names = [d.name for d in default_docs]
    assert len(names) > 300
    assert "json/__init__.py" in names and "asyncio/tasks.py" in names
    topics = [n for n in names if n.startswith("pydoc_data/topics/")]
    assert len(topics) > 30
    from pydoc_data.topics import topics as pydoc_topics

    by_name = {d.name: d for d in default_docs}
    key = sorted(pydoc_topics)[0]
    assert by_name[f"pydoc_data/topics/{key}"].text == pydoc_topics[key]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert not any(
        part in ("test", "tests", "site-packages") for n in names for part in n.split("/")
    )
    assert "pydoc_data/topics.py" not in names
    assert all(d.text for d in default_docs)


def test_default_corpus_is_deterministic(default_docs):
    again = default_corpus_documents()
    assert [(d.name, d.sha256) for d in again] == [(d.name, d.sha256) for d in default_docs]


def test_document_sha256():
    doc = Document("a", "héllo")
    assert doc.sha256 == hashlib.sha256("héllo".encode()).hexdigest()


def test_collect_single_file_keeps_text_exactly(tmp_path):
    path = write(tmp_path / "notes.md", UNICODE_TEXT)
    (doc,) = collect_documents([path])
    assert doc.text == UNICODE_TEXT  # \r\n and NUL untouched
    assert doc.name == os.path.normpath(path).replace(os.sep, "/")


def test_collect_folder_recursive_sorted_and_skips(tmp_path):
    root = tmp_path / "corpus"
    write(root / "b.txt", "bee")
    write(root / "a.py", "x = 1\n")
    write(root / "sub" / "c.md", "# see")
    write(root / "sub" / "empty.txt", "")
    write(root / ".hidden" / "h.txt", "hidden dir")
    write(root / ".dotfile", "hidden file")
    write(root / "image.bin", b"\x89PNG\x00\x01\x02")
    write(root / "latin1.txt", "caf\xe9".encode("latin-1"))
    docs = collect_documents([str(root)])
    base = str(root).replace(os.sep, "/")
    assert [d.name for d in docs] == [f"{base}/a.py", f"{base}/b.txt", f"{base}/sub/c.md"]
    assert [d.text for d in docs] == ["x = 1\n", "bee", "# see"]


def test_collect_include_globs(tmp_path):
    root = tmp_path / "c"
    write(root / "a.py", "a")
    write(root / "b.txt", "b")
    write(root / "sub" / "c.py", "c")
    write(root / "sub" / "d.txt", "d")
    assert [d.text for d in collect_documents([str(root)], include=["*.py"])] == ["a", "c"]
    assert [d.text for d in collect_documents([str(root)], include=["sub/*.txt"])] == ["d"]
    with pytest.raises(DataError, match=r"no non-empty files matching \['\*\.rs'\]"):
        collect_documents([str(root)], include=["*.rs"])


def test_collect_jsonl(tmp_path):
    lines = [
        json.dumps({"text": "first ✓"}),
        "",
        json.dumps({"text": "third", "id": 3}),
        json.dumps({"text": ""}),  # empty text: skipped
    ]
    path = write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    docs = collect_documents([path])
    name = path.replace(os.sep, "/")
    assert [(d.name, d.text) for d in docs] == [(f"{name}:1", "first ✓"), (f"{name}:3", "third")]
    path2 = write(tmp_path / "e.jsonl", json.dumps({"body": "b"}) + "\n")
    assert [d.text for d in collect_documents([path2], jsonl_field="body")] == ["b"]


def test_collect_jsonl_inside_folder_and_duplicates(tmp_path):
    root = tmp_path / "c"
    write(root / "r.jsonl", '{"text": "one"}\n{"text": "two"}\n')
    path = write(root / "z.txt", "zed")
    docs = collect_documents([str(root), path])  # z.txt listed twice: read once
    assert [d.text for d in docs] == ["one", "two", "zed"]


@pytest.mark.parametrize(
    "content, pattern",
    [
        ('{"text": "ok"}\n{"text": oops}\n', r"bad\.jsonl:2: invalid JSON"),
        ('{"text": "ok"}\n\n{"body": "x"}\n', r"bad\.jsonl:3: record has no field 'text'"),
        ('{"text": 5}\n', r"bad\.jsonl:1: field 'text' must be a string, got int"),
        ('["text"]\n', r"bad\.jsonl:1: record has no field 'text'"),
    ],
)
def test_collect_jsonl_errors(tmp_path, content, pattern):
    path = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(DataError, match=pattern):
        collect_documents([path])


def test_collect_path_errors(tmp_path):
    with pytest.raises(DataError, match="input path does not exist: .*nope"):
        collect_documents([str(tmp_path / "nope")])
    empty = write(tmp_path / "empty.txt", "  \n")
    with pytest.raises(DataError, match="input file is empty: .*empty.txt"):
        collect_documents([empty])
    os.makedirs(tmp_path / "hollow")
    with pytest.raises(DataError, match="input folder has no non-empty files.*hollow"):
        collect_documents([str(tmp_path / "hollow")])
    latin = write(tmp_path / "latin.txt", "caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8 text: .*latin.txt"):
        collect_documents([latin])
    with pytest.raises(DataError, match="no input paths"):
        collect_documents([])


# =========================================================================== tokenizer


@pytest.fixture(scope="module")
def bpe(small_texts):
    return Tokenizer.train(small_texts, vocab_size=400)


@pytest.mark.parametrize("mode", ["bpe", "bytes"])
@pytest.mark.parametrize("text", [UNICODE_TEXT, CODE_TEXT, "", " ", "🎉" * 3, "a<|endoftext|>b"])
def test_tokenizer_round_trip(small_texts, mode, text):
    tok = Tokenizer.train(small_texts, vocab_size=400, mode=mode)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eot_id not in ids  # a literal "<|endoftext|>" stays text


def test_bytes_mode_vocab():
    tok = Tokenizer.train([], vocab_size=4096, mode="bytes")  # vocab_size ignored
    assert (tok.vocab_size, tok.eot_id, tok.mode) == (257, 256, "bytes")
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.encode(UNICODE_TEXT) == list(UNICODE_TEXT.encode("utf-8"))
    assert tok.decode([104, 105, 256]) == "hi" + EOT_TOKEN


def test_bpe_vocab_layout_and_compression(bpe, small_texts):
    assert (bpe.vocab_size, bpe.eot_id, bpe.mode) == (400, 399, "bpe")
    assert [bpe.token_bytes(i) for i in range(256)] == [bytes([b]) for b in range(256)]
    assert all(len(bpe.token_bytes(i)) >= 2 for i in range(256, 399))
    text = small_texts[0]
    assert len(bpe.encode(text)) < len(text.encode("utf-8")) / 2  # merges learned
    assert bpe.encode_batch(small_texts[:5]) == [bpe.encode(t) for t in small_texts[:5]]


def test_bpe_is_deterministic(small_texts, tmp_path):
    a = Tokenizer.train(small_texts, vocab_size=350)
    b = Tokenizer.train(iter(small_texts), vocab_size=350)
    a.save(tmp_path / "a.json")
    b.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_tokenizer_save_load(bpe, tmp_path):
    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    loaded = Tokenizer.load(path)
    assert (loaded.vocab_size, loaded.eot_id) == (bpe.vocab_size, bpe.eot_id)
    assert loaded.encode(CODE_TEXT + UNICODE_TEXT) == bpe.encode(CODE_TEXT + UNICODE_TEXT)
    assert loaded.encode("<|endoftext|>") != [loaded.eot_id]


def test_tokenizer_errors(tmp_path, small_texts):
    with pytest.raises(DataError, match="tokenizer file not found"):
        Tokenizer.load(tmp_path / "missing.json")
    bad = write(tmp_path / "bad.json", "{not json")
    with pytest.raises(DataError, match="cannot read tokenizer file .*bad.json"):
        Tokenizer.load(bad)
    with pytest.raises(InputError, match="vocab_size must be an int >= 257"):
        Tokenizer.train(small_texts, vocab_size=256)
    with pytest.raises(InputError, match="mode must be one of"):
        Tokenizer.train(small_texts, vocab_size=300, mode="wordpiece")
    tok = Tokenizer.train([], 0, mode="bytes")
    with pytest.raises(InputError, match="out of range"):
        tok.decode([1, 257])
    with pytest.raises(InputError, match="out of range"):
        tok.decode([-1])


def test_tokenizer_without_eot_is_rejected(tmp_path):
    from tokenizers import Tokenizer as HF
    from tokenizers import models

    path = str(tmp_path / "foreign.json")
    HF(models.BPE(vocab={"a": 0}, merges=[])).save(path)
    with pytest.raises(DataError, match="no <\\|endoftext\\|> token"):
        Tokenizer.load(path)


def test_stream_decoder_holds_split_characters():
    tok = Tokenizer.train([], 0, mode="bytes")
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in tok.encode("aé🎉")]
    # a | é = C3 A9 | 🎉 = F0 9F 8E 89: text appears only when a character completes
    assert pieces == ["a", "", "é", "", "", "", "🎉"]
    assert dec.flush() == ""
    dec = tok.decode_stream()
    assert [dec.push(i) for i in [0xF0, 0x9F]] == ["", ""]
    assert dec.flush() == "\ufffd"  # an unfinished character at the end of the stream


def test_stream_decoder_matches_decode(bpe):
    text = UNICODE_TEXT * 3 + CODE_TEXT
    ids = bpe.encode(text) + [bpe.eot_id]
    dec = bpe.decode_stream()
    assert "".join(dec.push(i) for i in ids) + dec.flush() == text + EOT_TOKEN


# =========================================================================== prepare


def read_bin(path, dtype=np.uint16):
    return np.fromfile(path, dtype=dtype)


def test_prepare_writes_shards_and_meta(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    out = tmp_path / "prepared"
    meta = prepare(str(out), [corpus], vocab_size=300, val_fraction=0.2, progress=False)
    assert sorted(os.listdir(out)) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert json.loads((out / "meta.json").read_text()) == meta
    assert (meta["format_version"], meta["tokenizer"], meta["dtype"]) == (1, "bpe", "uint16")
    assert (meta["vocab_size"], meta["eot_id"]) == (300, 299)
    assert meta["settings"]["sources"] == [corpus] and meta["settings"]["seed"] == 1337

    docs = collect_documents([corpus])
    entries = meta["documents"]
    assert [e["name"] for e in entries] == [d.name for d in docs]
    assert [e["sha256"] for e in entries] == [d.sha256 for d in docs]
    train_docs = [d for d, e in zip(docs, entries) if e["split"] == "train"]
    val_docs = [d for d, e in zip(docs, entries) if e["split"] == "val"]
    assert train_docs and val_docs
    assert meta["splits"]["train"]["documents"] == len(train_docs)
    assert meta["splits"]["val"]["documents"] == len(val_docs)

    # The tokenizer is trained on train only; shards are each doc's ids + eot, in order.
    expected_tok = Tokenizer.train([d.text for d in train_docs], vocab_size=300)
    tok = Tokenizer.load(out / "tokenizer.json")
    assert [tok.token_bytes(i) for i in range(300)] == [
        expected_tok.token_bytes(i) for i in range(300)
    ]
    for split, split_docs in [("train", train_docs), ("val", val_docs)]:
        want = [i for d in split_docs for i in tok.encode(d.text) + [tok.eot_id]]
        got = read_bin(out / f"{split}.bin")
        assert got.tolist() == want
        assert meta["splits"][split]["tokens"] == len(want)
        assert meta["splits"][split]["unigram_entropy"] == pytest.approx(unigram_entropy(got, 300))
    assert sum(e["tokens"] for e in entries) == sum(
        meta["splits"][s]["tokens"] for s in ("train", "val")
    )


def test_prepare_bytes_mode(tmp_path):
    path = write(tmp_path / "a.txt", "héllo\n" * 50)
    path2 = write(tmp_path / "b.txt", "wörld\n" * 50)
    meta = prepare(str(tmp_path / "out"), [path, path2], tokenizer="bytes", progress=False)
    assert (meta["vocab_size"], meta["eot_id"], meta["tokenizer"]) == (257, 256, "bytes")
    both = np.concatenate([read_bin(tmp_path / "out" / f) for f in ("train.bin", "val.bin")])
    assert sorted(both.tolist()) == sorted(
        list(("héllo\n" * 50).encode()) + list(("wörld\n" * 50).encode()) + [256, 256]
    )


def test_token_dtype_choice():
    assert token_dtype(257) == np.uint16
    assert token_dtype(65536) == np.uint16  # largest id 65535 still fits
    assert token_dtype(65537) == np.uint32
    assert token_dtype(200_000) == np.uint32


def test_split_by_document_is_stable():
    docs = [Document(f"doc{i}.txt", "x") for i in range(200)]
    splits = dict((d.name, s) for d, s in assign_splits(docs, 0.1, seed=7))
    assert 5 <= sum(s == "val" for s in splits.values()) <= 40
    assert splits == dict((d.name, s) for d, s in assign_splits(docs, 0.1, seed=7))
    # Adding documents never moves existing ones.
    more = docs + [Document(f"new{i}.txt", "y") for i in range(50)]
    splits_more = dict((d.name, s) for d, s in assign_splits(more, 0.1, seed=7))
    assert all(splits_more[name] == s for name, s in splits.items())
    other_seed = dict((d.name, s) for d, s in assign_splits(docs, 0.1, seed=8))
    assert other_seed != splits


def test_split_keeps_both_sides_non_empty():
    two = [Document("a", "x"), Document("b", "y")]
    assert sorted(s for _, s in assign_splits(two, 1e-9, seed=0)) == ["train", "val"]
    assert sorted(s for _, s in assign_splits(two, 0.999999, seed=0)) == ["train", "val"]
    text = "".join(f"line {i}\n" for i in range(100))
    (train, s1), (val, s2) = assign_splits([Document("one.txt", text)], 0.1, seed=0)
    assert (s1, s2, train.name, val.name) == ("train", "val", "one.txt#train", "one.txt#val")
    assert train.text + val.text == text and val.text.startswith("line ")
    assert 0.05 < len(val.text) / len(text) < 0.15


def test_prepare_refuses_to_overwrite(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n=6)
    out = tmp_path / "out"
    first = prepare(str(out), [corpus], vocab_size=300, progress=False)
    with pytest.raises(DataError, match="not empty.*overwrite"):
        prepare(str(out), [corpus], vocab_size=300, progress=False)
    second = prepare(str(out), [corpus], vocab_size=290, overwrite=True, progress=False)
    assert (first["vocab_size"], second["vocab_size"]) == (300, 290)
    assert read_meta(out)["vocab_size"] == 290
    assert sorted(os.listdir(tmp_path)) == ["corpus", "out"]  # no temp folders left behind
    os.makedirs(tmp_path / "empty_dir")  # an existing empty folder is fine
    prepare(str(tmp_path / "empty_dir"), [corpus], vocab_size=300, progress=False)
    afile = write(tmp_path / "afile", "x")
    with pytest.raises(DataError, match="not a folder"):
        prepare(afile, [corpus], progress=False)


def test_prepare_argument_errors(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n=3)
    out = str(tmp_path / "out")
    with pytest.raises(InputError, match="val_fraction"):
        prepare(out, [corpus], val_fraction=0.0, progress=False)
    with pytest.raises(InputError, match="tokenizer must be one of"):
        prepare(out, [corpus], tokenizer="chars", progress=False)
    with pytest.raises(DataError, match="input path does not exist"):
        prepare(out, [str(tmp_path / "missing")], progress=False)
    assert not os.path.exists(out)


def test_is_prepared_and_ensure_prepared(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n=8)
    out = str(tmp_path / "out")
    assert not is_prepared(out)
    meta = ensure_prepared(out, sources=[corpus], vocab_size=300, progress=False)
    assert is_prepared(out)
    assert ensure_prepared(out, sources=[corpus], vocab_size=300, progress=False) == meta
    changed = ensure_prepared(out, sources=[corpus], vocab_size=310, progress=False)
    assert changed["vocab_size"] == 310 and changed["created"] >= meta["created"]
    write(os.path.join(corpus, "doc_00.py"), "# edited\n")  # content change: redo
    redone = ensure_prepared(out, sources=[corpus], vocab_size=310, progress=False)
    assert redone["corpus_sha256"] != changed["corpus_sha256"]
    # A folder that holds something else is not clobbered.
    other = tmp_path / "other"
    write(other / "precious.txt", "keep me")
    with pytest.raises(DataError, match="overwrite"):
        ensure_prepared(str(other), sources=[corpus], vocab_size=300, progress=False)
    # A truncated shard is detected.
    with open(os.path.join(out, "train.bin"), "r+b") as f:
        f.truncate(10)
    assert not is_prepared(out)
    with pytest.raises(DataError, match="truncated"):
        TokenData(out)


def test_prepare_default_corpus_sample(tmp_path, default_docs):
    meta = prepare(str(tmp_path / "d"), max_docs=40, vocab_size=512, progress=False)
    names = [e["name"] for e in meta["documents"]]
    assert len(names) == 40 and set(names) <= {d.name for d in default_docs}
    assert meta["settings"]["sources"] is None and meta["corpus"] == "default"
    assert meta["splits"]["val"]["documents"] >= 1
    again = prepare(str(tmp_path / "e"), max_docs=40, vocab_size=512, progress=False)
    assert [e["name"] for e in again["documents"]] == names  # same sample every time


def test_unigram_entropy_hand_computed():
    tokens = np.array([0, 0, 1, 2], dtype=np.uint16)
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # 1.0397 nats
    assert unigram_entropy(tokens, vocab_size=5) == pytest.approx(expected, rel=1e-12)
    assert unigram_entropy(np.arange(8) % 4, 4) == pytest.approx(math.log(4))
    assert unigram_entropy(np.zeros(10, dtype=np.int64), 3) == 0.0
    with pytest.raises(InputError, match="token ids must be in"):
        unigram_entropy(np.array([0, 5]), 5)
    with pytest.raises(InputError, match="at least one"):
        unigram_entropy(np.array([], dtype=np.int64), 5)


# =========================================================================== loaders


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    corpus = make_corpus(root / "corpus", n=30)
    out = str(root / "out")
    prepare(out, [corpus], vocab_size=300, val_fraction=0.2, progress=False)
    return out


def test_token_data(prepared):
    data = TokenData(prepared)
    assert isinstance(data.train, np.memmap) and data.train.dtype == np.uint16
    assert data.train.size == data.meta["splits"]["train"]["tokens"] > 0
    assert data.val.size == data.meta["splits"]["val"]["tokens"] > 0
    assert data.vocab_size == 300 and data.tokenizer.vocab_size == 300
    assert data.train[-1] == data.tokenizer.eot_id
    with pytest.raises(ValueError):  # read-only
        data.train[0] = 1


def test_token_data_errors(tmp_path):
    with pytest.raises(DataError, match="not a prepared data folder: .*run `turbolm prepare`"):
        TokenData(str(tmp_path))
    write(tmp_path / "meta.json", "{broken")
    with pytest.raises(DataError, match="not a prepared data folder: .*malformed"):
        TokenData(str(tmp_path))
    write(tmp_path / "meta.json", json.dumps({"format_version": 1}))
    with pytest.raises(DataError, match="malformed"):
        TokenData(str(tmp_path))


def arange_tokens(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.uint32)  # window rows become runs of consecutive ints


def test_train_batches_shapes_and_targets():
    tokens = arange_tokens(500)
    x, y = TrainBatches(tokens, batch_size=4, context=16, seed=0).next()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # y is x shifted by one within the token stream
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 15, dtype=torch.int64))
    assert int(x.min()) >= 0 and int(y.max()) <= 499


def test_train_batches_cover_the_last_window():
    tokens = arange_tokens(12)  # context 10: starts 0 and 1 only
    batches = TrainBatches(tokens, batch_size=64, context=10, seed=3)
    starts = {int(s) for _ in range(4) for s in batches.next()[0][:, 0]}
    assert starts == {0, 1}


def test_train_batches_reproducible_and_resumable():
    tokens = arange_tokens(10_000)
    full = TrainBatches(tokens, 8, 32, seed=42)
    reference = [full.next() for _ in range(10)]
    assert not torch.equal(reference[0][0], reference[1][0])  # a fresh batch every step
    again = TrainBatches(tokens, 8, 32, seed=42)
    assert all(
        torch.equal(a[0], b[0]) for a, b in zip(reference, (again.next() for _ in range(10)))
    )
    first = TrainBatches(tokens, 8, 32, seed=42)
    for _ in range(5):
        first.next()
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = TrainBatches(tokens, 8, 32, seed=0)
    resumed.load_state_dict(state)
    for x_ref, y_ref in reference[5:]:
        x, y = resumed.next()
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    other = TrainBatches(tokens, 8, 32, seed=43).next()[0]
    assert not torch.equal(other, reference[0][0])


def test_train_batches_ranks_draw_different_streams():
    tokens = arange_tokens(100_000)
    r0 = TrainBatches(tokens, 8, 16, seed=1, rank=0, world_size=2)
    r1 = TrainBatches(tokens, 8, 16, seed=1, rank=1, world_size=2)
    starts0 = [r0.next()[0][:, 0] for _ in range(20)]
    starts1 = [r1.next()[0][:, 0] for _ in range(20)]
    assert all(not torch.equal(a, b) for a, b in zip(starts0, starts1))
    with pytest.raises(InputError, match="rank"):
        TrainBatches(tokens, 8, 16, seed=1, rank=2, world_size=2)


def test_train_batches_too_short():
    with pytest.raises(DataError, match="train split has 16 tokens, fewer than context \\+ 1 = 17"):
        TrainBatches(arange_tokens(16), 2, 16, seed=0)
    TrainBatches(arange_tokens(17), 2, 16, seed=0).next()  # exactly enough


def test_val_batches_cover_val_in_order():
    T, B = 8, 4
    tokens = arange_tokens(10 * T + 1 + 3)  # 10 windows, 3 leftover ids
    batches = list(val_batches(tokens, B, T))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]  # last batch smaller, no padding
    xs = torch.cat([x for x, _ in batches]).reshape(-1)
    ys = torch.cat([y for _, y in batches]).reshape(-1)
    assert xs.tolist() == list(range(10 * T))
    assert ys.tolist() == list(range(1, 10 * T + 1))
    assert len(list(val_batches(tokens, B, T, max_batches=2))) == 2


def test_val_batches_ranks_are_disjoint_and_complete():
    tokens = arange_tokens(7 * 5 * 3 + 1)  # 15 windows of 7 -> 5 batches of 3
    per_rank = [
        [x[:, 0].tolist() for x, _ in val_batches(tokens, 3, 7, rank=r, world_size=2)]
        for r in range(2)
    ]
    assert [len(b) for b in per_rank] == [3, 2]
    seen = [s for batches in per_rank for b in batches for s in b]
    assert sorted(seen) == list(range(0, 15 * 7, 7))
    capped = [list(val_batches(tokens, 3, 7, max_batches=3, rank=r, world_size=2)) for r in (0, 1)]
    assert [len(c) for c in capped] == [2, 1]


def test_val_batches_too_short_fails_eagerly():
    with pytest.raises(DataError, match="val split has 5 tokens"):
        val_batches(arange_tokens(5), 2, 8)


def test_loaders_on_prepared_data(prepared):
    data = TokenData(prepared)
    x, y = TrainBatches(data.train, 2, 16, seed=0).next()
    assert int(x.max()) < data.vocab_size
    n = sum(x.shape[0] for x, _ in val_batches(data.val, 4, 16))
    assert n == (data.val.size - 1) // 16
