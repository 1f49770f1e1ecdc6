"""The run directory (``--out``): its default name, one name for every rank, and a fresh start.

- Default: ``runs/<model>-<YYYYmmdd-HHMMSS>``, where ``<model>`` is the preset's name or the
  last component of ``--model DIR`` (never a path: the run lands under ``runs/``, not inside or
  beside the model).
- Every rank must write into the same directory. ``plait train --nproc N`` names it in the
  parent before launching; under ``torchrun`` the ranks agree on it: the rendezvous id when the
  launcher was given one (the same on every host and across restarts, so a restarted job resumes),
  else rank 0's clock, broadcast.
- ``--no-resume`` starts afresh: a previous run in the directory (its checkpoints, metrics,
  config) is moved into ``<out>/previous-<time>/``, so nothing is lost and nothing of it is
  resumed, pruned or exported by mistake. A worker group restarted after a failure
  (``--max-restarts``) resumes the run it started instead of setting it aside again.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from plait.errors import PlaitError

PREVIOUS_PREFIX = "previous-"


class RunDirError(PlaitError):
    """A run directory that cannot be used; the message is one line."""


def default_run_dir(model: str, stamp: str | None = None) -> str:
    """``runs/<model name>-<time>`` for a preset or a model directory."""
    name = Path(model.rstrip("/\\")).name or "model"
    return os.path.join("runs", f"{name}-{stamp or time.strftime('%Y%m%d-%H%M%S')}")


def restart_count() -> int:
    """How often the launcher has restarted this worker group (0: the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def agreed_run_dir(model: str, rank: int, world_size: int) -> str:
    """The default run directory, the same on every rank of a launched job (see the module doc)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id and run_id != "none":
        return default_run_dir(model, run_id)
    stamp = [time.strftime("%Y%m%d-%H%M%S") if rank == 0 else None]
    if world_size > 1:
        import torch.distributed as dist
        dist.broadcast_object_list(stamp, src=0)
    return default_run_dir(model, stamp[0])


def make_run_dir(out: str | Path) -> Path:
    """Create the run directory (and its parents), or say in one line why it cannot be."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".plait-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise RunDirError(f"--out {out}: cannot create or write the run directory "
                          f"({error.strerror or error})") from None
    return path


def is_run_directory(path: str | Path) -> bool:
    """Does ``path`` hold a plait run: its metrics, checkpoints, or a config.json with the run's
    options (a Hugging Face model directory has a config.json too, without them)?"""
    path = Path(path)
    if (path / "metrics.jsonl").is_file() or (path / "checkpoints").is_dir():
        return True
    try:
        return "train" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def set_aside_previous_run(out: str | Path) -> Path | None:
    """Move a previous run in ``out`` (everything but earlier set-aside runs) into
    ``out/previous-<time>/``; returns that folder, or None when there was no run."""
    path = Path(out)
    if not path.is_dir() or not is_run_directory(path):
        return None
    aside = path / f"{PREVIOUS_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while aside.exists():
        aside = path / f"{PREVIOUS_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
        suffix += 1
    aside.mkdir()
    for entry in sorted(path.iterdir()):
        if entry != aside and not entry.name.startswith(PREVIOUS_PREFIX):
            entry.rename(aside / entry.name)
    return aside
