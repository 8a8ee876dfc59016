"""Data: corpus discovery, byte-level BPE tokenizer, `prepare` (token shards), loaders.

docs = collect_documents(["notes/", "extra.jsonl"])   # or default_corpus_documents()
meta = prepare("data/stdlib")                         # train.bin val.bin tokenizer.json meta.json
data = TokenData("data/stdlib")                       # .train / .val memmaps, .tokenizer
batches = TrainBatches(data.train, batch_size=16, context=256, seed=0)
x, y = batches.next()                                 # (16, 256) int64 each
"""

from turbolm.data.corpus import Document, collect_documents, default_corpus_documents
from turbolm.data.loader import TokenData, TrainBatches, val_batches
from turbolm.data.prepare import (
    FORMAT_VERSION,
    assign_splits,
    ensure_prepared,
    is_prepared,
    prepare,
    read_meta,
    token_dtype,
    unigram_entropy,
)
from turbolm.data.tokenizer import EOT_TOKEN, StreamDecoder, Tokenizer

__all__ = [
    "EOT_TOKEN",
    "FORMAT_VERSION",
    "Document",
    "StreamDecoder",
    "TokenData",
    "Tokenizer",
    "TrainBatches",
    "assign_splits",
    "collect_documents",
    "default_corpus_documents",
    "ensure_prepared",
    "is_prepared",
    "prepare",
    "read_meta",
    "token_dtype",
    "unigram_entropy",
    "val_batches",
]
