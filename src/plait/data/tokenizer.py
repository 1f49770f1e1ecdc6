"""Tokenizers: a plain byte tokenizer, a locally trained byte-level BPE, and a model's own
(``plait.data.hf_tokenizer``: a Hugging Face tokenizer directory or ``tokenizer.json``).

Both are lossless on any UTF-8 text: the byte tokenizer trivially, the BPE
because its alphabet is all 256 bytes (GPT-2 style byte-level mapping), so no
input can fall outside the vocabulary.  The BPE is trained on the corpus
itself and cached on disk, keyed by the corpus fingerprint, so a training run
never needs the network. All three write themselves in Hugging Face's format
(``save_pretrained``), so a run's export loads with ``transformers.AutoTokenizer``.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from plait.data.corpus import TextCorpus
from plait.data.errors import DataError
from plait.data.hf_tokenizer import PretrainedTokenizer, byte_backend, save_backend_pretrained
from plait.files import atomic_write_bytes

EOS_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 8192
# 256 byte symbols + the eos token leave too few merges below this to be useful.
MIN_BPE_VOCAB_SIZE = 300


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of plait needs from a tokenizer."""

    vocab_size: int
    eos_id: int
    kind: str

    def encode(self, text: str) -> list[int]: ...

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids as the token stream holds it: with its separator (EOS) at the end."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def save_pretrained(self, out_dir: str | os.PathLike[str]) -> pathlib.Path:
        """Write the tokenizer as a Hugging Face tokenizer directory."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0..255) plus one end-of-document id, 256.

    Needs no training and no cache; useful for tests and tiny experiments.
    """

    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) + [self.eos_id] for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        # Generated samples may cut a multi-byte character in half, hence
        # errors="replace" rather than an exception.
        data = bytes(int(token) for token in ids if int(token) != self.eos_id)
        return data.decode("utf-8", errors="replace")

    def save_pretrained(self, out_dir: str | os.PathLike[str]) -> pathlib.Path:
        return save_backend_pretrained(byte_backend(EOS_TOKEN), EOS_TOKEN, out_dir)


class BPETokenizer:
    """Byte-level BPE backed by a Hugging Face ``tokenizers.Tokenizer``."""

    kind = "bpe"

    def __init__(self, backend: HFTokenizer, source: str = "<memory>") -> None:
        eos_id = backend.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise DataError(f"tokenizer {source} has no {EOS_TOKEN} token")
        # A literal "<|endoftext|>" inside a document must stay ordinary text;
        # only the data pipeline inserts real end-of-document ids.
        backend.encode_special_tokens = True
        self.backend = backend
        self.eos_id: int = eos_id
        self.vocab_size: int = backend.get_vocab_size()

    @classmethod
    def train(cls, documents: Iterable[str], vocab_size: int, show_progress: bool = False) -> BPETokenizer:
        """Train a new byte-level BPE on ``documents``.

        The resulting vocabulary can be smaller than ``vocab_size`` when the
        corpus is too small to support that many merges.
        """
        if vocab_size < MIN_BPE_VOCAB_SIZE:
            raise DataError(f"bpe vocab_size must be at least {MIN_BPE_VOCAB_SIZE}, got {vocab_size}")
        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        backend.train_from_iterator(documents, trainer=trainer)
        return cls(backend)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        path = pathlib.Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as error:  # tokenizers raises a bare Exception
            reason = " ".join(str(error).split())
            raise DataError(f"tokenizer file {path} could not be loaded ({reason})") from None
        return cls(backend, source=str(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer JSON atomically (never a half-written file)."""
        atomic_write_bytes(pathlib.Path(path), self.backend.to_str().encode("utf-8"))

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once; ``tokenizers`` spreads them over threads.

        ``encode_batch_fast`` skips computing character offsets, which we
        never use.
        """
        encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        return [ids + [self.eos_id] for ids in self.encode_batch(texts)]

    def save_pretrained(self, out_dir: str | os.PathLike[str]) -> pathlib.Path:
        return save_backend_pretrained(self.backend, EOS_TOKEN, out_dir)

    def decode(self, ids: Sequence[int]) -> str:
        # skip_special_tokens drops eos ids, matching ByteTokenizer.decode.
        return self.backend.decode([int(token) for token in ids], skip_special_tokens=True)


def default_cache_dir() -> pathlib.Path:
    """``$PLAIT_CACHE`` if set, else ``~/.cache/plait``."""
    configured = os.environ.get("PLAIT_CACHE")
    if configured:
        return pathlib.Path(configured).expanduser()
    return pathlib.Path.home() / ".cache" / "plait"


def bpe_cache_path(cache_dir: pathlib.Path, vocab_size: int, corpus: TextCorpus) -> pathlib.Path:
    return cache_dir / "tokenizers" / f"bpe-{vocab_size}-{corpus.fingerprint()}.json"


def build_tokenizer(
    kind: str,
    corpus: TextCorpus | None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    cache_dir: pathlib.Path | None = None,
    show_progress: bool = False,
) -> Tokenizer:
    """Return the tokenizer ``kind`` names for ``corpus``: "byte", "bpe", or the path of a
    Hugging Face tokenizer (its directory or ``tokenizer.json``).

    A BPE is trained once per (corpus fingerprint, vocab_size) and cached
    under ``cache_dir/tokenizers/``; later calls load the cached file.
    """
    if kind == "byte":
        return ByteTokenizer()
    if kind != "bpe":
        return PretrainedTokenizer(kind)
    if vocab_size < MIN_BPE_VOCAB_SIZE:
        raise DataError(f"bpe vocab_size must be at least {MIN_BPE_VOCAB_SIZE}, got {vocab_size}")
    if corpus is None:
        raise DataError("a bpe tokenizer needs a text corpus to train on")

    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_path = bpe_cache_path(cache_dir, vocab_size, corpus)
    if cache_path.is_file():
        return BPETokenizer.load(cache_path)
    tokenizer = BPETokenizer.train(corpus.documents(), vocab_size, show_progress=show_progress)
    tokenizer.save(cache_path)
    return tokenizer


