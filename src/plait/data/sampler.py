"""Token streams and deterministic batch sampling.

A corpus becomes one flat stream of token ids (documents separated by an
end-of-document id), cached as a raw ``.bin`` file and memory-mapped, so every
rank on a host shares the page cache instead of holding its own copy.

Sampling is stateless: the global batch for step ``k`` is a pure function of
``(seed, k)``.  Resuming from a checkpoint, changing the number of
data-parallel ranks, or switching parallel layouts therefore never changes
which tokens the model sees -- each rank simply takes its slice of the same
global batch.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from plait.data.corpus import DataError, TextCorpus, open_text_corpus
from plait.data.hf_tokenizer import PretrainedTokenizer
from plait.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    Tokenizer,
    atomic_output,
    build_tokenizer,
    default_cache_dir,
)

# Documents are handed to the tokenizer in chunks of roughly this many
# characters: large enough to keep all tokenizer threads busy, small enough
# to bound memory.
TOKENIZE_CHUNK_CHARS = 4_000_000
UINT32_BIN_SUFFIX = ".u32.bin"


@dataclass
class TokenData:
    """A tokenised corpus split into a training and a validation stream."""

    train: np.ndarray  # 1-D uint16/uint32, usually an np.memmap
    val: np.ndarray
    vocab_size: int  # every id in train/val is < vocab_size
    eos_id: int | None  # None for a pre-tokenised .bin (unknown)
    tokenizer: Tokenizer | None  # None for a pre-tokenised .bin


def load_token_data(
    spec: str,
    tokenizer_kind: str = "bpe",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    cache_dir: pathlib.Path | None = None,
    val_fraction: float = 0.01,
    bin_vocab_size: int | None = None,
    show_progress: bool = False,
) -> TokenData:
    """Load (tokenising and caching if needed) the token stream for ``spec``.

    ``spec`` is anything ``open_text_corpus`` accepts, or a pre-tokenised
    ``.bin`` file of raw little-endian token ids: uint16 by default, uint32
    when the name ends in ``.u32.bin``.  ``tokenizer_kind``: "bpe", "byte" or
    the path of a Hugging Face tokenizer (``build_tokenizer``).  For a ``.bin``,
    ``bin_vocab_size`` gives the model vocabulary (default: largest id + 1) and
    only a named model tokenizer is loaded (it travels with the run).

    The last ``val_fraction`` of the stream (at least one token) is held out
    for validation; taking the tail keeps the split deterministic and
    document-contiguous.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")

    if spec.endswith(".bin"):  # a model tokenizer, when named, still travels with the run (its export)
        tokens, vocab = load_token_file(pathlib.Path(spec).expanduser(), bin_vocab_size)
        train, val = split_train_val(tokens, val_fraction, source=spec)
        tokenizer = None if tokenizer_kind in ("bpe", "byte") else PretrainedTokenizer(tokenizer_kind)
        return TokenData(train=train, val=val, vocab_size=vocab, eos_id=tokenizer.eos_id if tokenizer else None,
                         tokenizer=tokenizer)

    corpus = open_text_corpus(spec)
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tokenizer = build_tokenizer(tokenizer_kind, corpus, vocab_size, cache_dir, show_progress=show_progress)
    dtype = token_dtype(tokenizer.vocab_size)
    suffix = UINT32_BIN_SUFFIX if dtype == np.uint32 else ".bin"
    cache_path = cache_dir / "tokens" / f"{tokenizer.kind}-{tokenizer_key(tokenizer, vocab_size)}-" \
                                        f"{corpus.fingerprint()}{suffix}"
    if not cache_path.is_file():
        write_token_stream(corpus, tokenizer, cache_path, dtype, show_progress)
    tokens = np.memmap(cache_path, dtype=dtype, mode="r")
    train, val = split_train_val(tokens, val_fraction, source=spec)
    return TokenData(
        train=train,
        val=val,
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        tokenizer=tokenizer,
    )


def tokenizer_key(tokenizer: Tokenizer, requested_vocab: int) -> str:
    """What, besides its kind, names a tokenizer's token streams: the requested BPE size (the
    tokenizer cache's key too), the byte tokenizer's fixed size, a model tokenizer's file hash."""
    if isinstance(tokenizer, PretrainedTokenizer):
        return tokenizer.fingerprint()
    return str(requested_vocab if tokenizer.kind == "bpe" else tokenizer.vocab_size)


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """Smallest dtype holding ids ``0 .. vocab_size-1``."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_token_stream(
    corpus: TextCorpus,
    tokenizer: Tokenizer,
    path: pathlib.Path,
    dtype: type[np.unsignedinteger],
    show_progress: bool = False,
) -> int:
    """Tokenise every document (``encode_documents``: its ids, then the eos
    separator), and write the ids to ``path`` atomically.  Returns the number
    of tokens written."""
    total_tokens = 0
    progress = tqdm(total=corpus.total_bytes(), unit="B", unit_scale=True, desc="tokenizing",
                    disable=not show_progress)
    with progress, atomic_output(path) as handle:
        for chunk, size in document_chunks(corpus.documents_with_sizes(), TOKENIZE_CHUNK_CHARS):
            for ids in tokenizer.encode_documents(chunk):
                handle.write(np.asarray(ids, dtype=dtype).tobytes())
                total_tokens += len(ids)
            progress.update(size)
        # Skipped (undecodable) files were never yielded; finish the bar.
        progress.update(progress.total - progress.n)
        if total_tokens == 0:
            raise DataError(f"corpus {corpus.name} is empty (no decodable documents)")
    return total_tokens


def document_chunks(documents: Iterator[tuple[str, int]], max_chars: int) -> Iterator[tuple[list[str], int]]:
    """Documents grouped into chunks of about ``max_chars`` characters, with their bytes."""
    chunk: list[str] = []
    chunk_chars = chunk_bytes = 0
    for document, size in documents:
        chunk.append(document)
        chunk_chars += len(document)
        chunk_bytes += size
        if chunk_chars >= max_chars:
            yield chunk, chunk_bytes
            chunk, chunk_chars, chunk_bytes = [], 0, 0
    if chunk:
        yield chunk, chunk_bytes


def load_token_file(path: pathlib.Path, vocab_size: int | None) -> tuple[np.ndarray, int]:
    """Memory-map a pre-tokenised ``.bin`` and check its ids against the vocabulary."""
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if not path.is_file():
        raise DataError(f"token file {path} is not a regular file")
    dtype = np.dtype(np.uint32 if path.name.endswith(UINT32_BIN_SUFFIX) else np.uint16)
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"token file {path} is empty")
    if size % dtype.itemsize != 0:
        raise DataError(
            f"token file {path} has {size} bytes, not a multiple of the "
            f"{dtype.itemsize}-byte {dtype.name} token size"
        )
    if vocab_size is not None and vocab_size < 1:
        raise DataError(f"bin_vocab_size must be positive, got {vocab_size}")

    tokens = np.memmap(path, dtype=dtype, mode="r")
    largest_position = int(np.argmax(tokens))
    largest_id = int(tokens[largest_position])
    if vocab_size is None:
        return tokens, largest_id + 1
    if largest_id >= vocab_size:
        raise DataError(
            f"token id {largest_id} in {path} exceeds the vocabulary size {vocab_size} "
            f"(at position {largest_position})"
        )
    return tokens, vocab_size


def split_train_val(tokens: np.ndarray, val_fraction: float, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Split off the last ``val_fraction`` of ``tokens`` (at least one token).

    Returns views, so memory-mapped streams stay memory-mapped.
    """
    val_count = max(1, int(len(tokens) * val_fraction))
    train_count = len(tokens) - val_count
    if train_count < 1:
        raise DataError(f"{source} has only {len(tokens)} tokens, too few to split into train and validation")
    return tokens[:train_count], tokens[train_count:]


def _gather_windows(
    tokens: np.ndarray, offsets: Sequence[int], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the windows ``tokens[o : o+seq_len+1]`` and split them into
    (inputs, targets) int64 tensors of shape [len(offsets), seq_len]."""
    windows = np.empty((len(offsets), seq_len + 1), dtype=np.int64)
    for row, offset in enumerate(offsets):
        windows[row] = tokens[offset : offset + seq_len + 1]
    windows_tensor = torch.from_numpy(windows)
    inputs = windows_tensor[:, :-1].contiguous()
    targets = windows_tensor[:, 1:].contiguous()
    return inputs, targets


class BatchSampler:
    """Random fixed-length windows whose global batch depends only on (seed, step).

    Window start offsets for step ``k`` come from
    ``np.random.default_rng([seed, k])``, so there is no iterator state to
    checkpoint and any rank can compute any step's batch independently.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if global_batch < 1:
            raise ValueError(f"global_batch must be positive, got {global_batch}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if len(tokens) < seq_len + 1:
            raise DataError(f"corpus has {len(tokens)} tokens, fewer than seq_len+1 = {seq_len + 1}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.global_batch_size = global_batch
        self.seed = seed
        # Largest start offset whose window (seq_len+1 tokens) still fits.
        self.max_offset = len(tokens) - seq_len - 1

    def offsets(self, step: int) -> np.ndarray:
        """Start offsets of all ``global_batch`` windows of ``step``."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, self.max_offset, size=self.global_batch_size, endpoint=True)

    def global_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each int64 [global_batch, seq_len]."""
        return _gather_windows(self.tokens, self.offsets(step), self.seq_len)

    def shard(self, step: int, dp_rank: int, dp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This data-parallel rank's contiguous block of rows of ``global_batch(step)``.

        Only the rank's own rows are read from the token stream.
        """
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside data-parallel size {dp_size}")
        if self.global_batch_size % dp_size != 0:
            raise DataError(
                f"global batch {self.global_batch_size} is not divisible by data-parallel size {dp_size}"
            )
        rows_per_rank = self.global_batch_size // dp_size
        first_row = dp_rank * rows_per_rank
        offsets = self.offsets(step)[first_row : first_row + rows_per_rank]
        return _gather_windows(self.tokens, offsets, self.seq_len)


def validation_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation batches read from the start of ``tokens``.

    Window ``i`` starts at ``i * seq_len``: consecutive windows share only
    their boundary token (the last target of one is the first input of the
    next), so the predicted positions never overlap and no token is skipped.
    Returns as many full batches as fit, up to ``max_batches``; if not even
    one full batch fits, a single smaller batch of every window there is.
    """
    if seq_len < 1 or batch_size < 1 or max_batches < 1:
        raise ValueError(
            "seq_len, batch_size and max_batches must be positive, "
            f"got {seq_len}, {batch_size}, {max_batches}"
        )
    if len(tokens) < seq_len + 1:
        raise DataError(f"validation split has {len(tokens)} tokens, fewer than seq_len+1 = {seq_len + 1}")

    window_count = (len(tokens) - 1) // seq_len
    if window_count < batch_size:
        batch_sizes = [window_count]
    else:
        batch_sizes = [batch_size] * min(max_batches, window_count // batch_size)

    batches = []
    first_window = 0
    for size in batch_sizes:
        offsets = [(first_window + i) * seq_len for i in range(size)]
        batches.append(_gather_windows(tokens, offsets, seq_len))
        first_window += size
    return batches
