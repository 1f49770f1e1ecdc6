"""Whether a checkpoint's files are still what its save wrote.

A save records every rank file's size and SHA-256 in ``meta.json`` (``"files"``); each rank hashes
its own two files, in parallel, before the commit. Whatever reads a checkpoint (resume,
``plait export``, ``plait generate``, ``plait eval``) verifies it first (``store.verify_checkpoint``),
so a truncated tensor file, a garbled index or a file gone missing is named in one line instead
of surfacing as a safetensors or JSON traceback, or worse, as wrong weights. Resume goes back
from the newest complete checkpoint to the first intact one (``store.newest_intact_checkpoint``).

A checkpoint written before sizes and checksums were recorded has no ``"files"``: only its
marker and ``meta.json`` are checked.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

CHUNK = 1 << 22


def file_record(path: Path) -> dict:
    """Size and SHA-256 of one file, as ``meta.json`` records it."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def recorded_files(path: Path) -> tuple[dict[str, dict], str | None]:
    """``meta.json``'s record of the rank files, or why it cannot be read."""
    meta_file = path / "meta.json"
    try:
        files = json.loads(meta_file.read_text()).get("files", {})
        if not isinstance(files, dict) or not all(isinstance(r, dict) and {"bytes", "sha256"} <= r.keys()
                                                  for r in files.values()):
            raise ValueError("its 'files' record is malformed")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as error:  # JSONDecodeError is a ValueError
        return {}, f"{meta_file} cannot be read ({type(error).__name__}: {error})"
    return files, None


def damage(path: Path, names: list[str] | None = None) -> str | None:
    """Why checkpoint ``path`` (or its files ``names``) cannot be trusted, in a few words; None if intact."""
    if not (path / "COMPLETE").exists():
        return "no COMPLETE marker"
    files, problem = recorded_files(path)
    if problem:
        return problem
    for name in sorted(files) if names is None else names:
        expected, file = files[name], path / name
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != expected["bytes"]:
            return f"{file} has {size} bytes where its save wrote {expected['bytes']}"
        if file_record(file)["sha256"] != expected["sha256"]:
            return f"{file} does not match its SHA-256"
    return None
