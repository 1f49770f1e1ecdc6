"""Text corpora: ordered lists of UTF-8 documents on disk.

A corpus is only a *list of files*; nothing is read until ``documents()`` is
iterated.  That keeps opening a corpus cheap (the default stdlib corpus is
~30 MB) and lets ``fingerprint()`` -- which only stats files -- serve as the
cache key for tokenizers and token streams built from it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import pathlib
import sysconfig
from collections.abc import Iterator

from plait.data.errors import DataError
from plait.data.formats import read_documents

STDLIB_SPEC = "stdlib"

# Third-party code lives inside the stdlib directory on most installs; it is
# not part of the standard library and differs from machine to machine.
_THIRD_PARTY_DIRS = ("site-packages", "dist-packages")


def stdlib_root() -> pathlib.Path:
    """Directory holding the running interpreter's pure-Python stdlib."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


class TextCorpus:
    """An ordered, deterministic list of text files.

    ``files`` is sorted by path relative to ``root`` so every machine and every
    run sees documents in the same order (the token stream, and hence every
    training batch, depends on it).

    When ``skip_undecodable`` is true (used for the stdlib, which ships a few
    deliberately mis-encoded test files) files that are not UTF-8 are skipped
    while iterating and counted in ``skipped``; otherwise they raise
    ``DataError``.  ``skipped`` is therefore only final after a full pass over
    ``documents()``.
    """

    def __init__(
        self,
        name: str,
        root: pathlib.Path,
        files: list[pathlib.Path],
        skip_undecodable: bool = False,
        field: str = "text",
    ) -> None:
        self.name = name
        self.root = root
        self.files = files
        self.skip_undecodable = skip_undecodable
        self.field = field  # the text of a .jsonl record / .parquet row (plait.data.formats)
        self.skipped = 0

    def __repr__(self) -> str:
        return f"TextCorpus(name={self.name!r}, files={len(self.files)})"

    def __len__(self) -> int:
        return len(self.files)

    def fingerprint(self) -> str:
        """Short hex hash of the corpus name and each file's (relative path,
        size, mtime_ns).

        Stat-only, so it is cheap even for large corpora, yet any edit to a
        file (which changes its size or mtime) invalidates caches keyed on it.
        """
        digest = hashlib.sha256()
        digest.update(self.name.encode("utf-8"))
        if self.field != "text":
            digest.update(f"\0field={self.field}".encode("utf-8"))
        for path in self.files:
            stat = path.stat()
            relative = path.relative_to(self.root).as_posix()
            digest.update(f"\0{relative}\0{stat.st_size}\0{stat.st_mtime_ns}".encode("utf-8"))
        return digest.hexdigest()[:16]

    def documents(self) -> Iterator[str]:
        """Yield every document, in ``files`` order (a text file is one; see ``plait.data.formats``)."""
        for text, _ in self.documents_with_sizes():
            yield text

    def documents_with_sizes(self) -> Iterator[tuple[str, int]]:
        """(document, bytes of its file it took): what a progress bar over ``total_bytes`` counts."""
        self.skipped = 0
        for path in self.files:
            found = False
            for text, size in read_documents(path, self.field, skip_undecodable=self.skip_undecodable):
                found = True
                yield text, size
            if not found:
                self.skipped += 1

    def total_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)


def open_text_corpus(spec: str, field: str = "text") -> TextCorpus:
    """Open a corpus from a spec string.

    - ``"stdlib"``: every ``*.py`` file of the running Python's standard
      library, excluding ``site-packages``/``dist-packages``.  Non-UTF-8 files
      are skipped (see ``TextCorpus.skipped``).  The literal name wins over a
      file or directory called ``stdlib`` in the working directory.
    - a file: that single text file.
    - a directory: every regular file below it, recursively, skipping hidden
      files and directories (names starting with ``.``).

    Empty files are left out (they would contribute nothing but an
    end-of-document token); a corpus with no non-empty file is an error.
    """
    if spec == STDLIB_SPEC:
        return _open_stdlib()

    path = pathlib.Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_dir():
        files = _list_directory(path, pattern="*")
        root = path
    elif path.is_file():
        files = [path] if path.stat().st_size > 0 else []
        root = path.parent
    else:
        raise DataError(f"data path {path} is neither a regular file nor a directory")

    if not files:
        raise DataError(f"data path {path} is empty (no non-empty text files)")
    return TextCorpus(name=str(path.resolve()), root=root, files=files, field=field)


def combine_corpora(corpora: list[TextCorpus]) -> TextCorpus:
    """Every file of ``corpora``, in order, as one corpus (what a BPE for a mixture trains on)."""
    files = [path.absolute() for corpus in corpora for path in corpus.files]
    return TextCorpus(name="+".join(corpus.name for corpus in corpora), root=pathlib.Path("/"), files=files,
                      skip_undecodable=any(corpus.skip_undecodable for corpus in corpora), field=corpora[0].field)


def _open_stdlib() -> TextCorpus:
    root = stdlib_root()
    if not root.is_dir():
        raise DataError(f"standard library directory {root} does not exist")
    files = _list_directory(root, pattern="*.py", excluded_dirs=_THIRD_PARTY_DIRS)
    if not files:
        raise DataError(f"standard library corpus at {root} is empty (no .py files found)")
    return TextCorpus(name=STDLIB_SPEC, root=root, files=files, skip_undecodable=True)


def _list_directory(
    root: pathlib.Path, pattern: str, excluded_dirs: tuple[str, ...] = ()
) -> list[pathlib.Path]:
    """Non-empty regular files under ``root`` matching ``pattern``, sorted by
    relative POSIX path (independent of filesystem listing order).

    Hidden files and directories are always skipped (``.git``, editor swap
    files, ...), as are directories named in ``excluded_dirs``.
    """
    found: list[tuple[str, pathlib.Path]] = []
    for directory, subdirs, filenames in os.walk(root):
        # Prune in place so os.walk never descends into skipped directories.
        kept_subdirs = []
        for subdir in subdirs:
            if subdir.startswith(".") or subdir in excluded_dirs:
                continue
            kept_subdirs.append(subdir)
        subdirs[:] = kept_subdirs

        for filename in filenames:
            if filename.startswith("."):
                continue
            path = pathlib.Path(directory, filename)
            if not fnmatch.fnmatchcase(filename, pattern) or not path.is_file():
                continue
            if path.stat().st_size == 0:
                continue
            found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]
