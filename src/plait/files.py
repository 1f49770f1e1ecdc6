"""Atomic file writes with the permissions any other file gets (``0o666 & ~umask``).

A file written through a temporary name and ``os.replace`` appears complete or not at all, and
concurrent writers (several ranks on one host) each use their own temporary name. But
``tempfile.mkstemp`` creates its file owner-only (0600), and so does safetensors' ``save_file``
(0.8), which made checkpoints, exports and tokenized data unreadable to the rest of a group;
every atomic write goes through :func:`atomic_path`, which gives the file the mode ``open()``
would have given it before renaming it into place.

    with atomic_path(out / "model.safetensors") as temp:   # a writer that takes a path
        save_file(weights, str(temp))
    with atomic_output(path) as handle:                   # a binary file object
        handle.write(data)
    atomic_write_text(path, text)
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere: set and restore (a restrictive value in between)
        old = os.umask(0o077)
        os.umask(old)
    return old


def default_file_mode() -> int:
    """What ``open(path, "w")`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; when the ``with`` block finishes it gets the
    default file mode and replaces ``path``. On an exception (or a crash) ``path`` is untouched
    and the temporary file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(descriptor)
    temp = Path(temp_name)
    try:
        yield temp
        os.chmod(temp, default_file_mode())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path`` only if the ``with`` block finishes."""
    with atomic_path(path) as temp, open(temp, "wb") as handle:
        yield handle


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_output(path) as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
