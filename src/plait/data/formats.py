"""Documents inside a corpus file, by the file's kind (its suffix).

    .jsonl     one JSON object per line; the document is its ``field`` (default "text")
    .parquet   one row per document; the document is its ``field`` column (read with pyarrow,
               one row group at a time, so memory stays bounded)
    otherwise  the whole file is one document (UTF-8 text)

Each reader yields ``(text, nbytes)``: the document and how many bytes of the file it used, so a
progress bar can count bytes across kinds. Every problem is a ``DataError`` naming the file (and
the line, for jsonl).
"""
from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

from plait.data.errors import DataError

DEFAULT_FIELD = "text"


def read_text_file(path: pathlib.Path, skip_undecodable: bool = False) -> str | None:
    """Read ``path`` as strict UTF-8.

    Returns ``None`` for undecodable files when ``skip_undecodable``; otherwise
    raises ``DataError`` pointing at the first bad byte so the user can find it.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        if skip_undecodable:
            return None
        bad_byte = data[error.start]
        raise DataError(
            f"data file {path} is not UTF-8 text "
            f"(invalid byte 0x{bad_byte:02x} at offset {error.start})"
        ) from None


def file_kind(path: pathlib.Path) -> str:
    suffix = path.suffix.lower()
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(suffix, "text")


def read_documents(path: pathlib.Path, field: str = DEFAULT_FIELD,
                   skip_undecodable: bool = False) -> Iterator[tuple[str, int]]:
    kind = file_kind(path)
    if kind == "jsonl":
        yield from _jsonl(path, field)
    elif kind == "parquet":
        yield from _parquet(path, field)
    else:
        text = read_text_file(path, skip_undecodable=skip_undecodable)
        if text is not None:
            yield text, path.stat().st_size


def _jsonl(path: pathlib.Path, field: str) -> Iterator[tuple[str, int]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise DataError(f"{path}:{number}: not a JSON line ({' '.join(str(error).split())})") from None
            if not isinstance(record, dict) or field not in record:
                raise DataError(f"{path}:{number}: no field {field!r} (choose one with --field)")
            text = record[field]
            if not isinstance(text, str):
                raise DataError(f"{path}:{number}: field {field!r} is {type(text).__name__}, not text")
            yield text, len(raw)


def _parquet(path: pathlib.Path, field: str) -> Iterator[tuple[str, int]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"{path} is not a readable parquet file ({' '.join(str(error).split())})") from None
    if field not in parquet.schema_arrow.names:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(parquet.schema_arrow.names)}; "
                        "choose one with --field)")
    size, rows = path.stat().st_size, max(parquet.metadata.num_rows, 1)
    for group in range(parquet.num_row_groups):
        try:
            column = parquet.read_row_group(group, columns=[field]).column(field)
        except Exception as error:
            raise DataError(f"{path}: row group {group} cannot be read ({' '.join(str(error).split())})") from None
        for text in column.to_pylist():
            if not isinstance(text, str):
                raise DataError(f"{path}: column {field!r} holds {type(text).__name__}, not text")
            yield text, size // rows
