"""Data pipeline: text corpora -> tokenizer -> cached token stream -> batches.

Typical use::

    data = load_token_data("stdlib", tokenizer_kind="bpe", vocab_size=8192)
    sampler = BatchSampler(data.train, seq_len=256, global_batch=64, seed=0)
    inputs, targets = sampler.shard(step, dp_rank, dp_size)
    val = validation_windows(data.val, seq_len=256, max_windows=512)   # val.rows([0, 1]): inputs, targets

The corpus and its errors load with the package; the sampler (torch) and the tokenizers
(``tokenizers``) on first use, so that the command line starts without them.
"""
from plait.data.corpus import TextCorpus, open_text_corpus, stdlib_root
from plait.data.errors import DataError
from plait.lazy import on_first_use

__getattr__ = on_first_use(__name__, {
    **{name: "plait.data.sampler" for name in ("BatchSampler", "TokenData", "ValidationWindows", "load_token_data",
                                              "validation_windows")},
    **{name: "plait.data.tokenizer" for name in ("BPETokenizer", "ByteTokenizer", "Tokenizer", "build_tokenizer",
                                                 "default_cache_dir")}})

__all__ = [
    "BPETokenizer",
    "BatchSampler",
    "ByteTokenizer",
    "DataError",
    "TextCorpus",
    "TokenData",
    "ValidationWindows",
    "Tokenizer",
    "build_tokenizer",
    "default_cache_dir",
    "load_token_data",
    "open_text_corpus",
    "stdlib_root",
    "validation_windows",
]
