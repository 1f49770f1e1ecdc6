"""Package attributes that load on first use, so that the command line starts without torch.

A package ``__init__`` imports its plain-data modules (configurations, schedules, errors) at once
and names the rest in ``on_first_use``: ``plait --help``, ``plait plan`` and argument errors then
answer in a fraction of a second instead of the 1.5 s that importing torch costs.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


def on_first_use(package: str, sources: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for ``package``: attribute ``name`` is imported from
    module ``sources[name]`` when first asked for."""
    def __getattr__(name: str) -> Any:
        if name in sources:
            return getattr(importlib.import_module(sources[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
