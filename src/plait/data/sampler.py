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

from plait.data.corpus import TextCorpus, combine_corpora, open_text_corpus
from plait.data.errors import DataError
from plait.data.hf_tokenizer import PretrainedTokenizer
from plait.data.mixture import TokenChain, parse_data_spec
from plait.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    Tokenizer,
    build_tokenizer,
    default_cache_dir,
)
from plait.files import atomic_output

# Documents are handed to the tokenizer in chunks of roughly this many
# characters: large enough to keep all tokenizer threads busy, small enough
# to bound memory.
TOKENIZE_CHUNK_CHARS = 4_000_000
UINT32_BIN_SUFFIX = ".u32.bin"


@dataclass
class TokenData:
    """A tokenised corpus: training streams (one per source of a mixture) and a validation stream."""

    train: tuple[np.ndarray, ...]  # 1-D uint16/uint32 streams, usually np.memmap; a bare array is one source
    val: np.ndarray | TokenChain  # every source's held-out tail, in spec order
    vocab_size: int  # every id in train/val is < vocab_size
    eos_id: int | None  # None for a pre-tokenised .bin (unknown)
    tokenizer: Tokenizer | None  # None for a pre-tokenised .bin
    weights: tuple[float, ...] = (1.0,)  # sampling weight of each training stream

    def __post_init__(self) -> None:
        if not isinstance(self.train, (tuple, list)):
            self.train = (self.train,)
        self.train, self.weights = tuple(self.train), tuple(self.weights)
        if len(self.weights) != len(self.train):
            raise ValueError(f"{len(self.train)} training streams but {len(self.weights)} weights")

    @property
    def train_tokens(self) -> int:
        return sum(len(stream) for stream in self.train)


def load_token_data(
    spec: str,
    tokenizer_kind: str = "bpe",
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    cache_dir: pathlib.Path | None = None,
    val_fraction: float = 0.01,
    bin_vocab_size: int | None = None,
    show_progress: bool = False,
    field: str = "text",
) -> TokenData:
    """Load (tokenising and caching if needed) the token streams of ``spec``.

    ``spec`` names one source or a weighted mixture (``plait.data.mixture``). A source is anything
    ``open_text_corpus`` accepts (``field``: the text of .jsonl records / .parquet rows), or a
    pre-tokenised ``.bin`` file of raw little-endian token ids: uint16 by default, uint32 when the
    name ends in ``.u32.bin``.  ``tokenizer_kind``: "bpe", "byte" or the path of a Hugging Face
    tokenizer (``build_tokenizer``); a BPE for several text sources is trained on all of them.
    For a ``.bin``, ``bin_vocab_size`` gives the model vocabulary (default: largest id + 1) and
    only a named model tokenizer is loaded (it travels with the run).  Text and ``.bin`` sources
    mix only under a named tokenizer: the ids of both must mean the same tokens.

    The last ``val_fraction`` of each source's stream (at least one token) is held out for
    validation; taking the tail keeps the split deterministic and document-contiguous.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    sources = parse_data_spec(spec)
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    corpora = {source.spec: open_text_corpus(source.spec, field) for source in sources if not source.is_token_file}
    named_tokenizer = tokenizer_kind not in ("bpe", "byte")
    if corpora and len(corpora) < len(sources) and not named_tokenizer:
        raise DataError(f"--data {spec!r} mixes .bin token files with text, which a fresh {tokenizer_kind} "
                        "tokenizer would give other ids: pass --tokenizer PATH (the one the .bin was made with)")
    tokenizer, trained_on = None, None
    if corpora:
        trained_on = next(iter(corpora.values())) if len(corpora) == 1 else combine_corpora(list(corpora.values()))
        tokenizer = build_tokenizer(tokenizer_kind, trained_on, vocab_size, cache_dir, show_progress=show_progress)
    elif named_tokenizer:  # a model tokenizer, when named, still travels with the run (its export)
        tokenizer = PretrainedTokenizer(tokenizer_kind)

    streams, vocabs = [], []
    for source in sources:
        if source.is_token_file:
            bin_vocab = bin_vocab_size if bin_vocab_size is not None or not corpora else tokenizer.vocab_size
            tokens, vocab = load_token_file(pathlib.Path(source.spec).expanduser(), bin_vocab)
        else:
            corpus = corpora[source.spec]
            key = tokenizer_key(tokenizer, vocab_size)
            if trained_on is not corpus and tokenizer.kind == "bpe":  # trained on the mixture's text
                key += f"-{trained_on.fingerprint()}"
            tokens, vocab = text_token_stream(corpus, tokenizer, key, cache_dir, show_progress), tokenizer.vocab_size
        streams.append(split_train_val(tokens, val_fraction, source=source.spec))
        vocabs.append(vocab)
    vals = [val for _, val in streams]
    return TokenData(
        train=tuple(train for train, _ in streams),
        val=vals[0] if len(vals) == 1 else TokenChain(vals),
        vocab_size=max(vocabs),
        eos_id=tokenizer.eos_id if tokenizer is not None else None,
        tokenizer=tokenizer,
        weights=tuple(source.weight for source in sources),
    )


def text_token_stream(corpus: TextCorpus, tokenizer: Tokenizer, key: str, cache_dir: pathlib.Path,
                      show_progress: bool) -> np.ndarray:
    """The memory-mapped token stream of ``corpus`` under ``tokenizer``, written once into the cache."""
    dtype = token_dtype(tokenizer.vocab_size)
    suffix = UINT32_BIN_SUFFIX if dtype == np.uint32 else ".bin"
    cache_path = cache_dir / "tokens" / f"{tokenizer.kind}-{key}-{corpus.fingerprint()}{suffix}"
    if not cache_path.is_file():
        write_token_stream(corpus, tokenizer, cache_path, dtype, show_progress)
    return np.memmap(cache_path, dtype=dtype, mode="r")


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
    sources: Sequence[np.ndarray], offsets: Sequence[int], seq_len: int, streams: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack row i's window ``sources[streams[i]][o_i : o_i+seq_len+1]`` (``streams`` None: all from
    ``sources[0]``) and split them into (inputs, targets) int64 tensors of shape [rows, seq_len]."""
    windows = np.empty((len(offsets), seq_len + 1), dtype=np.int64)
    for row, offset in enumerate(offsets):
        tokens = sources[0 if streams is None else streams[row]]
        windows[row] = tokens[offset : offset + seq_len + 1]
    windows_tensor = torch.from_numpy(windows)
    inputs = windows_tensor[:, :-1].contiguous()
    targets = windows_tensor[:, 1:].contiguous()
    return inputs, targets


class BatchSampler:
    """Random fixed-length windows whose global batch depends only on (seed, step).

    Window start offsets for step ``k`` come from ``np.random.default_rng([seed, k])``, so there
    is no iterator state to checkpoint and any rank can compute any step's batch independently.
    With several streams (a mixture), the same generator first draws each row's stream, stream i
    with probability w_i / sum(w), then an offset in it: the mixture is as deterministic and as
    layout-invariant as one stream, and each source holds its share in expectation at every step.
    """

    def __init__(self, tokens: np.ndarray | list[np.ndarray] | tuple[np.ndarray, ...], seq_len: int, global_batch: int, seed: int,
                 weights: Sequence[float] | None = None) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if global_batch < 1:
            raise ValueError(f"global_batch must be positive, got {global_batch}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.streams = list(tokens) if isinstance(tokens, (tuple, list)) else [tokens]
        weights = [1.0] * len(self.streams) if weights is None else list(weights)
        if len(weights) != len(self.streams) or min(weights) <= 0:
            raise ValueError(f"need one positive weight per stream, got {weights} for {len(self.streams)}")
        for index, stream in enumerate(self.streams):
            if len(stream) < seq_len + 1:
                which = "corpus" if len(self.streams) == 1 else f"source {index + 1} of the mixture"
                raise DataError(f"{which} has {len(stream)} training tokens, fewer than seq_len+1 = {seq_len + 1}")
        self.probabilities = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.seq_len = seq_len
        self.global_batch_size = global_batch
        self.seed = seed
        # Largest start offset whose window (seq_len+1 tokens) still fits, per stream.
        self.max_offsets = np.asarray([len(stream) - seq_len - 1 for stream in self.streams], dtype=np.int64)

    def rows(self, step: int) -> tuple[np.ndarray | None, np.ndarray]:
        """(stream of each row or None for a single stream, start offset of each row) of ``step``."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        rng = np.random.default_rng([self.seed, step])
        if len(self.streams) == 1:
            return None, rng.integers(0, self.max_offsets[0], size=self.global_batch_size, endpoint=True)
        streams = rng.choice(len(self.streams), size=self.global_batch_size, p=self.probabilities)
        return streams, rng.integers(0, self.max_offsets[streams], endpoint=True)

    def _windows(self, streams: np.ndarray | None, offsets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return _gather_windows(self.streams, offsets, self.seq_len, streams)

    def global_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each int64 [global_batch, seq_len]."""
        return self._windows(*self.rows(step))

    def shard(self, step: int, dp_rank: int, dp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This data-parallel rank's contiguous block of rows of ``global_batch(step)``.

        Only the rank's own rows are read from the token streams.
        """
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside data-parallel size {dp_size}")
        if self.global_batch_size % dp_size != 0:
            raise DataError(
                f"global batch {self.global_batch_size} is not divisible by data-parallel size {dp_size}"
            )
        rows_per_rank = self.global_batch_size // dp_size
        mine = slice(dp_rank * rows_per_rank, (dp_rank + 1) * rows_per_rank)
        streams, offsets = self.rows(step)
        return self._windows(None if streams is None else streams[mine], offsets[mine])


@dataclass(frozen=True, eq=False)
class ValidationWindows:
    """The fixed validation set: ``count`` windows of ``seq_len + 1`` tokens, window ``i`` starting
    at ``i * seq_len`` of ``tokens``. Consecutive windows share only their boundary token (the last
    target of one is the first input of the next), so the predicted positions never overlap and no
    token is skipped. Windows are read on demand (``rows``): a rank reads only its share of a large
    corpus. The set depends on the tokens, ``seq_len`` and the count only, never on a layout;
    how it is cut into micro-batches and shared over ranks is ``evaluation_share``'s business."""

    tokens: np.ndarray
    seq_len: int
    count: int

    def __len__(self) -> int:
        return self.count

    def rows(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) [len(indices), seq_len] of the windows ``indices``."""
        return _gather_windows([self.tokens], [index * self.seq_len for index in indices], self.seq_len)


def validation_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> ValidationWindows:
    """The first ``min(max_windows, available)`` windows of ``tokens`` (see ``ValidationWindows``)."""
    if seq_len < 1 or max_windows < 1:
        raise ValueError(f"seq_len and max_windows must be positive, got {seq_len}, {max_windows}")
    if len(tokens) < seq_len + 1:
        raise DataError(f"validation split has {len(tokens)} tokens, fewer than seq_len+1 = {seq_len + 1}")
    return ValidationWindows(tokens, seq_len, min(max_windows, (len(tokens) - 1) // seq_len))
