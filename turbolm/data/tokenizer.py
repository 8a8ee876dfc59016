"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), plus a streaming decoder.

Id layout, the same in both modes (we rebuild the trained vocab into it, so it never
depends on how the HF trainer happens to order things):

    0 .. 255            the 256 single bytes, id == byte value
    256 .. V-2          merged tokens, in merge order (none in "bytes" mode)
    V-1                 <|endoftext|>  (eot_id), put between documents by `prepare`

Text is never normalised: the ByteLevel pre-tokenizer maps every UTF-8 byte to a
printable stand-in character (GPT-2's table), so any Python string round-trips exactly.
A literal "<|endoftext|>" inside a document is encoded as ordinary bytes
(`encode_special_tokens`), so only `prepare` can put an eot token into the stream.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from turbolm.errors import DataError, InputError

EOT_TOKEN = "<|endoftext|>"
MODES = ("bpe", "bytes")
BYTES_VOCAB_SIZE = 257  # 256 bytes + eot


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the one HF ByteLevel uses).

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space,
    soft hyphen, ...) map to chr(256 + k) in byte order, so no stand-in is whitespace.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


class Tokenizer:
    """A byte-level BPE tokenizer with one special token, `<|endoftext|>`.

    Build one with `Tokenizer.train(...)` or `Tokenizer.load(path)`.
    """

    def __init__(self, hf: HFTokenizer):
        self._hf = hf
        # Document text containing "<|endoftext|>" must not turn into the eot id.
        self._hf.encode_special_tokens = True
        eot = hf.token_to_id(EOT_TOKEN)
        if eot is None:
            raise DataError(f"tokenizer has no {EOT_TOKEN} token")
        self._eot_id = eot
        self._token_bytes = _token_bytes_table(hf)

    # ----------------------------------------------------------------- construction

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, mode: str = "bpe", *, progress: bool = False
    ) -> Tokenizer:
        """Train on `texts` (one string per document).

        mode "bpe": ByteLevel BPE over the full 256-byte alphabet, up to `vocab_size` ids in
        total (eot included; fewer if the corpus runs out of pairs to merge). Needs
        vocab_size >= 257. mode "bytes": no merges, always 257 ids; `vocab_size` is ignored
        and `texts` is not read. Deterministic: same texts and vocab_size, same vocab.
        """
        if mode not in MODES:
            raise InputError(f"tokenizer mode must be one of {MODES}, got {mode!r}")
        if mode == "bytes":
            return cls(_build_hf(_byte_vocab(), []))
        if not isinstance(vocab_size, int) or vocab_size < BYTES_VOCAB_SIZE:
            raise InputError(
                f"vocab_size must be an int >= {BYTES_VOCAB_SIZE} for bpe "
                f"(256 bytes + {EOT_TOKEN}), got {vocab_size!r}"
            )
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = _pre_tokenizer()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=progress,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        merges = _merges_of(json.loads(hf.to_str()))
        return cls(_build_hf(*_canonical_vocab(merges)))

    @classmethod
    def load(cls, path: str) -> Tokenizer:
        """Load a `tokenizer.json` written by `save`. Raises `DataError` if missing/corrupt."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DataError(f"tokenizer file not found: {path}")
        try:
            hf = HFTokenizer.from_file(path)
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise DataError(f"cannot read tokenizer file {path}: {e}") from None
        try:
            return cls(hf)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None

    def save(self, path: str) -> None:
        """Write the HF `tokenizer.json` (readable by any `tokenizers` install)."""
        self._hf.save(os.fspath(path))

    # ----------------------------------------------------------------- properties

    @property
    def vocab_size(self) -> int:
        """Number of ids, eot included (ids are 0 .. vocab_size-1)."""
        return len(self._token_bytes)

    @property
    def eot_id(self) -> int:
        return self._eot_id

    @property
    def mode(self) -> str:
        """ "bytes" when there are no merges, else "bpe"."""
        return "bytes" if self.vocab_size == BYTES_VOCAB_SIZE else "bpe"

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (the eot token gives b"<|endoftext|>")."""
        return self._token_bytes[token_id]

    # ----------------------------------------------------------------- encode / decode

    def encode(self, text: str) -> list[int]:
        """Ids of `text` (no eot added)."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, encoded in parallel by the Rust side."""
        texts = list(texts)
        # encode_batch_fast (tokenizers >= 0.21) skips offset tracking we do not need.
        fn = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
        return [enc.ids for enc in fn(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`. Exact inverse of `encode` for any str; byte sequences that are not
        valid UTF-8 (only possible for id lists `encode` did not produce) become U+FFFD."""
        return self._bytes_of(ids).decode("utf-8", errors="replace")

    def decode_stream(self) -> StreamDecoder:
        """A fresh `StreamDecoder` over this tokenizer (for token-by-token generation)."""
        return StreamDecoder(self)

    def _bytes_of(self, ids: Iterable[int]) -> bytes:
        table = self._token_bytes
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        try:
            if any(i < 0 for i in ids):
                raise IndexError  # negative indices would silently wrap around
            return b"".join([table[i] for i in ids])
        except IndexError:
            bad = [i for i in ids if not 0 <= i < len(table)]
            raise InputError(
                f"token ids {bad[:5]} out of range for vocab_size {len(table)}"
            ) from None

    def __repr__(self) -> str:
        return f"Tokenizer(mode={self.mode!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


class StreamDecoder:
    """Turns ids into text one at a time, emitting only complete UTF-8 characters.

    A byte-level token can end in the middle of a multi-byte character (an emoji is 4
    bytes and may span tokens); those bytes are held until the character completes.

        dec = tokenizer.decode_stream()
        for i in ids: print(dec.push(i), end="")
        print(dec.flush())
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one id; return the text completed by it (possibly "")."""
        return self._utf8.decode(self._tokenizer._bytes_of([token_id]))

    def flush(self) -> str:
        """End of stream: return held bytes of an unfinished character as U+FFFD."""
        return self._utf8.decode(b"", final=True)


# --------------------------------------------------------------------------- helpers


def _pre_tokenizer():
    # add_prefix_space=False: a prefix space would break exact round-trips.
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _byte_vocab() -> dict[str, int]:
    return {BYTE_TO_CHAR[b]: b for b in range(256)}


def _merges_of(tokenizer_json: dict) -> list[tuple[str, str]]:
    """Merges of a trained BPE model; older `tokenizers` store "a b" strings, newer pairs."""
    merges = tokenizer_json["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def _canonical_vocab(
    merges: list[tuple[str, str]],
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Bytes at 0..255 by byte value, then each merge's product in merge order."""
    vocab = _byte_vocab()
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab, merges


def _build_hf(vocab: dict[str, int], merges: list[tuple[str, str]]) -> HFTokenizer:
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = _pre_tokenizer()
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([EOT_TOKEN])  # gets id len(vocab): the last id
    return hf


def _token_bytes_table(hf: HFTokenizer) -> list[bytes]:
    """id -> raw bytes for every id. Raises DataError if this is not a byte-level vocab."""
    vocab = hf.get_vocab(with_added_tokens=True)
    table: list[bytes | None] = [None] * len(vocab)
    for token, i in vocab.items():
        if not 0 <= i < len(vocab):
            raise DataError(f"token ids are not contiguous (id {i}, {len(vocab)} tokens)")
        if token == EOT_TOKEN:
            table[i] = EOT_TOKEN.encode("utf-8")
            continue
        try:
            table[i] = bytes(CHAR_TO_BYTE[c] for c in token)
        except KeyError:
            raise DataError(
                f"not a byte-level BPE tokenizer (token {token!r} is not byte-level)"
            ) from None
    return table  # type: ignore[return-value]
