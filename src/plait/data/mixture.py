"""Data specs that name several sources with weights, and streams read as one.

    --data corpus/                          one source (any spec open_text_corpus or a .bin takes)
    --data "web.bin:0.7,code.jsonl:0.3"     a mixture: each sequence of a batch comes from source i
                                            with probability w_i / sum(w)

In TOML the same string, or a table from source to weight::

    [train.data]
    "web.bin" = 0.7
    "code.jsonl" = 0.3

A spec that is itself an existing path is always one source, so a file whose name holds a comma or
a colon still works.  Weights are relative (they need not sum to 1) and must be positive numbers.
"""
from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from plait.data.corpus import STDLIB_SPEC
from plait.data.errors import DataError


@dataclass(frozen=True)
class DataSource:
    spec: str          # what open_text_corpus or a .bin path takes
    weight: float      # relative sampling weight (1.0 for a lone source)

    @property
    def is_token_file(self) -> bool:
        return self.spec.endswith(".bin")


def check_sources_exist(spec: str) -> None:
    """A one-line ``DataError`` for a ``--data`` source that is not there, before any worker starts."""
    for source in parse_data_spec(spec):
        if source.spec != STDLIB_SPEC and not pathlib.Path(source.spec).expanduser().exists():
            raise DataError(f"data path {source.spec} does not exist")


def parse_data_spec(spec: str) -> list[DataSource]:
    """The sources a ``--data`` spec names, in order; a ``DataError`` says why one does not parse."""
    if not spec.strip():
        raise DataError("--data is empty")
    if spec == STDLIB_SPEC or pathlib.Path(spec).expanduser().exists() or ("," not in spec and ":" not in spec):
        return [DataSource(spec, 1.0)]
    parts = [part.strip() for part in spec.split(",")]
    sources = []
    for part in parts:
        path, colon, weight_text = part.rpartition(":")
        if not colon or not path:
            raise DataError(f"--data {spec!r}: {part!r} has no weight; a mixture names each source as "
                            "PATH:WEIGHT, for example 'a.bin:0.7,b.jsonl:0.3'")
        try:
            weight = float(weight_text)
        except ValueError:
            raise DataError(f"--data {spec!r}: the weight of {path!r} is {weight_text!r}, not a number "
                            "(a mixture is PATH:WEIGHT,PATH:WEIGHT)") from None
        if not math.isfinite(weight) or weight <= 0:
            raise DataError(f"--data {spec!r}: the weight of {path!r} must be a positive number, got {weight_text}")
        sources.append(DataSource(path, weight))
    names = [source.spec for source in sources]
    if len(set(names)) != len(names):
        raise DataError(f"--data {spec!r} names a source twice")
    return sources


def format_data_spec(weights: dict[str, float]) -> str:
    """The ``--data`` string of a TOML table {source: weight} (``parse_data_spec`` reads it back)."""
    for source, weight in weights.items():
        if "," in source:
            raise DataError(f"data source {source!r}: a source of a mixture cannot hold a comma")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise DataError(f"data source {source!r}: its weight {weight!r} is not a number")
    if not weights:
        raise DataError("the data table is empty")
    return ",".join(f"{source}:{weight}" for source, weight in weights.items())


def has_text_source(spec: str) -> bool:
    """Does ``spec`` name any text source (one a tokenizer must encode)?"""
    return any(not source.is_token_file for source in parse_data_spec(spec))


class TokenChain:
    """Several 1-D token streams read as one, without copying (memory maps stay memory maps).

    Supports what sampling and evaluation use: ``len`` and contiguous slices.
    """

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = [part for part in parts if len(part)]
        self.starts = np.cumsum([0] + [len(part) for part in self.parts])
        self.dtype = np.result_type(*[part.dtype for part in self.parts]) if self.parts else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("TokenChain supports contiguous slices only")
        start, stop, _ = index.indices(len(self))
        pieces = []
        for part, first in zip(self.parts, self.starts[:-1]):
            low, high = max(start - first, 0), min(stop - first, len(part))
            if low < high:
                pieces.append(np.asarray(part[low:high]))
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)
