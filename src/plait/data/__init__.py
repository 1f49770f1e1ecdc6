"""Data pipeline: text corpora -> tokenizer -> cached token stream -> batches.

Typical use::

    data = load_token_data("stdlib", tokenizer_kind="bpe", vocab_size=8192)
    sampler = BatchSampler(data.train, seq_len=256, global_batch=64, seed=0)
    inputs, targets = sampler.shard(step, dp_rank, dp_size)
    val = validation_windows(data.val, seq_len=256, max_windows=512)   # val.rows([0, 1]): inputs, targets
"""

from plait.data.corpus import TextCorpus, open_text_corpus, stdlib_root
from plait.data.errors import DataError
from plait.data.sampler import BatchSampler, TokenData, ValidationWindows, load_token_data, validation_windows
from plait.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, build_tokenizer, default_cache_dir

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
