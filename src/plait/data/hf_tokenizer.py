"""Tokenizers in Hugging Face's format: read a model's own, write every tokenizer plait has.

A Hugging Face tokenizer is a directory: ``tokenizer.json`` (the ``tokenizers`` pipeline:
normaliser, pre-tokeniser, model, post-processor, decoder, added tokens) and
``tokenizer_config.json`` / ``special_tokens_map.json`` (which added tokens are BOS and EOS).

How plait turns a document into ids with such a tokenizer (``PretrainedTokenizer``):

    ids = tokenizer.json's pipeline with add_special_tokens=True    # what AutoTokenizer(text) gives
    ids = ids + [eos]            # the separator between documents, unless the pipeline ended with it

The post-processor adds what the model was trained to see in front of a text (Llama 2's
``<s>``, Llama 3's ``<|begin_of_text|>``), exactly as ``transformers.AutoTokenizer`` does, so
the ids of a document equal ``tokenizers.Tokenizer.encode(text).ids`` and AutoTokenizer's
``input_ids`` followed by EOS. Text that spells a special token (a literal ``</s>`` in a
source file) stays text: only the data pipeline inserts control ids. There, and only there, the
ids differ from AutoTokenizer's default, which would give the control id; they equal
``AutoTokenizer(text, split_special_tokens=True)`` (``tokenizers``: ``encode_special_tokens``).

``save_pretrained`` writes plait's own tokenizers (its byte-level BPE, the byte tokenizer) in
the same format, so every run's export is a complete Hugging Face model.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from plait.data.errors import DataError

TOKENIZER_JSON = "tokenizer.json"
# Files of a tokenizer directory that travel with it (into a run, its checkpoints, an export).
TOKENIZER_FILES = (TOKENIZER_JSON, "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


def has_tokenizer(directory: str | pathlib.Path) -> bool:
    return (pathlib.Path(directory) / TOKENIZER_JSON).is_file()


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"tokenizer file {path} cannot be read ({' '.join(str(error).split())})") from None
    if not isinstance(value, dict):
        raise DataError(f"tokenizer file {path} is not a JSON object")
    return value


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer configs write it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_backend(path: pathlib.Path) -> HFTokenizer:
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception
        raise DataError(f"tokenizer file {path} could not be loaded ({' '.join(str(error).split())})") from None


class PretrainedTokenizer:
    """A Hugging Face tokenizer directory (or a bare ``tokenizer.json``), encoded as the module
    docstring says."""

    kind = "pretrained"

    def __init__(self, path: str | pathlib.Path) -> None:
        path = pathlib.Path(path).expanduser()
        if path.is_dir():
            directory, file = path, path / TOKENIZER_JSON
            if not file.is_file():
                raise DataError(f"tokenizer directory {path} has no {TOKENIZER_JSON}")
        elif path.is_file():
            directory, file = None, path
        else:
            raise DataError(f"tokenizer {path} does not exist (expected 'bpe', 'byte', a tokenizer.json "
                            "or a directory holding one)")
        self.source, self.directory, self.file = path, directory, file
        self.backend = load_backend(file)
        settings: dict[str, Any] = {}
        if directory is not None:  # tokenizer_config.json wins over special_tokens_map.json
            settings = {**_read_json(directory / "special_tokens_map.json"),
                        **_read_json(directory / "tokenizer_config.json")}
        self.eos_token = _token_text(settings.get("eos_token"))
        self.bos_token = _token_text(settings.get("bos_token"))
        if self.eos_token is None:
            raise DataError(f"tokenizer {path} names no eos_token (tokenizer_config.json or "
                            "special_tokens_map.json): plait separates documents with it")
        eos_id = self.backend.token_to_id(self.eos_token)
        if eos_id is None:
            raise DataError(f"tokenizer {path}: its eos_token {self.eos_token!r} is not in its vocabulary")
        self.eos_id: int = eos_id
        self.bos_id: int | None = self.backend.token_to_id(self.bos_token) if self.bos_token else None
        self.backend.encode_special_tokens = True  # a literal "</s>" in a document stays text
        self.vocab_size: int = self.backend.get_vocab_size(with_added_tokens=True)

    def fingerprint(self) -> str:
        """Names the token stream a corpus makes with this tokenizer (a cache key)."""
        digest = hashlib.sha256(self.file.read_bytes())
        digest.update(f"\0eos={self.eos_token}".encode())
        return digest.hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=True).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch_fast(texts, add_special_tokens=True)]

    def encode_documents(self, texts: list[str]) -> list[list[int]]:
        documents = self.encode_batch(texts)
        for ids in documents:
            if not ids or ids[-1] != self.eos_id:
                ids.append(self.eos_id)
        return documents

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode([int(token) for token in ids], skip_special_tokens=True)

    def save_pretrained(self, out_dir: str | pathlib.Path) -> pathlib.Path:
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.directory is None:  # a bare tokenizer.json: its special tokens come from plait's reading
            shutil.copyfile(self.file, out / TOKENIZER_JSON)
            _write_config(out, self.eos_token, self.bos_token)
            return out
        for name in TOKENIZER_FILES:
            if (self.directory / name).is_file():
                shutil.copyfile(self.directory / name, out / name)
        return out


def _write_config(out: pathlib.Path, eos_token: str, bos_token: str | None) -> None:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token, "bos_token": bos_token,
              "clean_up_tokenization_spaces": False, "model_max_length": 1_000_000_000}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_backend_pretrained(backend: HFTokenizer, eos_token: str, out_dir: str | pathlib.Path) -> pathlib.Path:
    """``backend`` as a Hugging Face tokenizer directory whose EOS is ``eos_token`` (no BOS:
    plait's own tokenizers separate documents with EOS only)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / TOKENIZER_JSON).write_text(backend.to_str(), encoding="utf-8")
    _write_config(out, eos_token, None)
    return out


def byte_backend(eos_token: str) -> HFTokenizer:
    """plait's byte tokenizer (id = UTF-8 byte value, 256 = EOS) as a ``tokenizers`` pipeline: a
    byte-level BPE with the 256 byte symbols as its vocabulary and no merges."""
    symbols = pre_tokenizers.ByteLevel.alphabet()
    by_byte = {byte: symbol for symbol, byte in _byte_symbols(symbols).items()}
    vocab = {by_byte[byte]: byte for byte in range(256)}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([eos_token])
    return backend


def _byte_symbols(symbols: list[str]) -> dict[str, int]:
    """GPT-2's byte -> printable character map, inverted (the ByteLevel alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    mapping = {chr(char): byte for byte, char in zip(printable, chars)}
    if set(mapping) != set(symbols):
        raise AssertionError("tokenizers' ByteLevel alphabet is not GPT-2's byte map")
    return mapping
