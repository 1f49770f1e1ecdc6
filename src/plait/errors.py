"""The one base class of plait's user errors.

Every error that a user's input, files or run can cause (a bad flag, an unreadable corpus, a
damaged checkpoint, a step whose loss is not finite) derives from :class:`PlaitError`, and its
message is one line that says what to change. The commands print it as ``plait: error: <message>``
with exit code 2, never as a traceback; anything else that escapes is a bug in plait.
"""
from __future__ import annotations


class PlaitError(ValueError):
    """A user error; the message is one line. (A ``ValueError`` too, for callers that catch that.)"""
