"""The user error of plait's data: one line, naming the offending path or value."""
from __future__ import annotations

from plait.errors import PlaitError


class DataError(PlaitError):
    """Any problem with user-supplied data: missing paths, empty corpora,
    undecodable text, token ids outside the vocabulary.

    The message is always a single line naming the offending path or value,
    so a CLI can print it as-is instead of a traceback.
    """
