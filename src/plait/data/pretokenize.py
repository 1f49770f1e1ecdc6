"""``plait tokenize``: a corpus to a ``.bin`` of token ids, on every core, in bounded memory.

    plait tokenize --data corpus/ --tokenizer hf-llama/ -o corpus.bin           # uint16 ids
    plait tokenize --data web.jsonl --field body --tokenizer tok.json -o web.u32.bin

The corpus (text files, directories, ``.jsonl``, ``.parquet``: ``plait.data.formats``) is read in
order and cut into chunks of about ``CHUNK_CHARS`` characters; ``workers`` spawned processes
each encode whole chunks (``encode_documents``: every document's ids, then EOS) and the parent
writes the results in chunk order, so the file equals what one process writes (the token
stream ``plait train`` builds from the same text). At most ``2 x workers`` chunks are in flight:
memory stays bounded whatever the corpus size. The output appears atomically (a temporary file
renamed at the end); ids are uint16 when the vocabulary fits, else the name must end in
``.u32.bin``.
"""
from __future__ import annotations

import collections
import multiprocessing
import os
import pathlib
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from plait.data.corpus import TextCorpus
from plait.data.errors import DataError
from plait.data.sampler import UINT32_BIN_SUFFIX, document_chunks, token_dtype
from plait.data.tokenizer import Tokenizer, build_tokenizer
from plait.files import atomic_output

CHUNK_CHARS = 1_000_000

_worker_tokenizer: Tokenizer | None = None


@dataclass(frozen=True)
class TokenizeResult:
    tokens: int
    text_bytes: int
    seconds: float
    dtype: str


def _start_worker(spec: str, corpus: TextCorpus, vocab_size: int, cache_dir: str | None) -> None:
    global _worker_tokenizer
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the processes are the parallelism
    _worker_tokenizer = build_tokenizer(spec, corpus, vocab_size, pathlib.Path(cache_dir) if cache_dir else None)


def _encode_chunk(texts: list[str]) -> bytes:
    ids = _worker_tokenizer.encode_documents(texts)
    return np.fromiter((token for document in ids for token in document), dtype=np.uint32).tobytes()


def tokenize_corpus(corpus: TextCorpus, tokenizer_spec: str, out: pathlib.Path, workers: int,
                    vocab_size: int = 8192, cache_dir: pathlib.Path | None = None,
                    show_progress: bool = False) -> TokenizeResult:
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    tokenizer = build_tokenizer(tokenizer_spec, corpus, vocab_size, cache_dir, show_progress=show_progress)
    dtype = token_dtype(tokenizer.vocab_size)
    if not out.name.endswith(".bin"):
        raise DataError(f"-o {out}: the output must be a .bin (uint16 ids) or .u32.bin (uint32 ids)")
    if dtype == np.uint32 and not out.name.endswith(UINT32_BIN_SUFFIX):
        raise DataError(f"the vocabulary ({tokenizer.vocab_size}) needs uint32 ids: name the output *.u32.bin")
    if out.name.endswith(UINT32_BIN_SUFFIX):
        dtype = np.uint32
    start, tokens = time.perf_counter(), 0
    progress = tqdm(total=corpus.total_bytes(), unit="B", unit_scale=True, desc="tokenizing", disable=not show_progress)
    context = multiprocessing.get_context("spawn")  # never fork a process that may hold torch state
    pool = context.Pool(workers, _start_worker, (tokenizer_spec, corpus, vocab_size,
                                                 str(cache_dir) if cache_dir else None)) if workers > 1 else None
    try:
        with progress, atomic_output(out) as handle:
            in_flight: collections.deque = collections.deque()

            def write_oldest() -> None:
                nonlocal tokens
                result, size = in_flight.popleft()
                ids = np.frombuffer(result.get() if pool is not None else result, dtype=np.uint32)
                handle.write(ids.astype(dtype, copy=False).tobytes())
                tokens += len(ids)
                progress.update(size)

            for texts, size in document_chunks(corpus.documents_with_sizes(), CHUNK_CHARS):
                if pool is None:
                    encoded = tokenizer.encode_documents(texts)
                    in_flight.append((np.fromiter((t for d in encoded for t in d), dtype=np.uint32).tobytes(), size))
                else:
                    in_flight.append((pool.apply_async(_encode_chunk, (texts,)), size))
                while len(in_flight) > (2 * workers if pool is not None else 0):
                    write_oldest()
            while in_flight:
                write_oldest()
            if tokens == 0:
                raise DataError(f"corpus {corpus.name} is empty (no documents)")
    finally:
        if pool is not None:
            pool.terminate()
    return TokenizeResult(tokens, corpus.total_bytes(), time.perf_counter() - start, np.dtype(dtype).name)
