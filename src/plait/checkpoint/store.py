"""Checkpoint directories: every rank writes its pieces in parallel, committed atomically.

Layout of ``<run>/checkpoints/``::

    step-00000040/              a complete checkpoint (committed)
        meta.json               step, model config, layout, format version, and the size and
                                SHA-256 of every rank file (verified before any read)
        rank-00003.safetensors  the pieces rank 3 wrote (1-D fp32 tensors)
        rank-00003.json         what each of them is (``Piece``: name, kind, slice)
        hf_source/              a run started from a Hugging Face directory: its config.json,
                                tokenizer, generation config and chat template (for the export)
        tokenizer/              the tokenizer the run encoded its text with, in Hugging Face's
                                format (plait's BPE too); the export's tokenizer
        COMPLETE                written last, after every rank finished
    step-00000050.tmp/          a checkpoint being written (or abandoned by a crash): ignored

Why safetensors + JSON rather than ``torch.distributed.checkpoint``: loading never unpickles
anything, the files are readable without plait (one flat tensor per piece, its meaning in plain
JSON), and resharding needs no planner: a piece says which part of which full tensor it is.

Commit protocol (directories named by the step, zero-padded to 8 digits): all ranks write into
``step-00000040.tmp``; a barrier; rank 0 writes ``meta.json`` and ``COMPLETE`` inside, then renames
the directory to ``step-00000040`` (atomic on one filesystem) and deletes all but the newest
``keep`` complete checkpoints. Each rank file is written under a temporary name and renamed with
the usual permissions (``plait.files``). A crash at any point leaves the previous
complete checkpoint untouched and loadable.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from plait.checkpoint.hf_config import SOURCE_DIR, copy_source_files
from plait.checkpoint.integrity import damage, file_record, recorded_files
from plait.checkpoint.errors import CheckpointError
from plait.checkpoint.pieces import Piece, assemble
from plait.checkpoint.sources import CheckpointSource
from plait.files import atomic_path

FORMAT_VERSION = 1
TOKENIZER_DIR = "tokenizer"  # in a run directory and in each checkpoint


def _barrier(ctx) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir()
             if path.is_dir() and path.name.startswith("step-") and not path.name.endswith(".tmp")
             and (path / "COMPLETE").exists()]
    return sorted(found, key=lambda path: int(path.name.split("-")[1]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(trainer, run_dir: str | Path, step: int, keep: int = 2) -> Path:
    """Write the state after ``step`` optimizer steps (collective: every rank calls it)."""
    ctx = trainer.ctx
    root = checkpoint_root(run_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if ctx.is_logging_rank:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(ctx)
    pieces = trainer.strategy.state_pieces()
    tensors = {piece.key: data.contiguous() for piece, data in pieces}
    name = f"rank-{ctx.rank:05d}"
    with atomic_path(tmp / f"{name}.safetensors") as temp:  # safetensors writes owner-only files
        save_file(tensors, str(temp))
    (tmp / f"{name}.json").write_text(json.dumps([piece.to_json() for piece, _ in pieces]))
    records = {file: file_record(tmp / file) for file in (f"{name}.safetensors", f"{name}.json")}
    every = [records]
    if ctx.world_size > 1:  # also the barrier: every rank's files are on disk before the commit
        every = [None] * ctx.world_size
        dist.all_gather_object(every, records)
    if ctx.is_logging_rank:
        meta = {"format": FORMAT_VERSION, "step": step, "skipped_steps": trainer.skipped_steps,
                "model": trainer.model_config.to_dict(),
                "layout": {"dp": ctx.dims.dp, "pp": ctx.dims.pp, "tp": ctx.dims.tp, "cp": ctx.dims.cp,
                           "dp_shard": ctx.dims.dp_shard,
                           "zero": trainer.cfg.zero, "sequence_parallel": trainer.cfg.sequence_parallel},
                "world_size": ctx.world_size,
                "files": {file: record for rank_records in every for file, record in rank_records.items()}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if trainer.hf_source is not None:
            copy_source_files(trainer.hf_source, tmp / SOURCE_DIR)
        if trainer.tokenizer is not None:
            trainer.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        (tmp / "COMPLETE").write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(ctx)
    return final


def read_meta(path: str | Path) -> dict:
    """The checkpoint's ``meta.json``, once its files verify (see ``integrity``)."""
    verify_checkpoint(path)
    return json.loads((Path(path) / "meta.json").read_text())


def _complete(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "COMPLETE").exists():
        raise CheckpointError(f"{path} is not a complete checkpoint (no COMPLETE marker)")
    return path


def verify_checkpoint(path: str | Path) -> None:
    """Raise a one-line CheckpointError unless ``path`` is a complete checkpoint whose files are
    as its save wrote them."""
    path = _complete(path)
    reason = damage(path)
    if reason is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {reason}")


def newest_intact_checkpoint(run_dir: str | Path, ctx=None, warn: Callable[[str], None] = print) -> Path | None:
    """The newest complete checkpoint of ``run_dir`` whose files verify; ``warn`` gets one line
    for each damaged one passed over, from rank 0. Collective under ``ctx`` with several ranks: each verifies
    every world_size-th file and all take the first problem found. None if there is no checkpoint;
    a one-line CheckpointError if every one is damaged."""
    rank, world_size = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    found = complete_checkpoints(run_dir)
    for path in reversed(found):
        files, problem = recorded_files(path)
        reason = problem or damage(path, sorted(files)[rank::world_size])
        if world_size > 1:
            reasons: list[str | None] = [None] * world_size
            dist.all_gather_object(reasons, reason)
            reason = next((r for r in reasons if r is not None), None)
        if reason is None:
            return path
        if rank == 0:
            warn(f"plait: warning: checkpoint {path} is damaged ({reason}); trying the one before it")
    if found:
        raise CheckpointError(f"every checkpoint in {checkpoint_root(run_dir)} is damaged (see the warnings above); "
                              "pass --no-resume or another --out to start afresh")
    return None


def check_model_config(meta: dict, config) -> None:
    saved, current = meta["model"], config.to_dict()
    for field in current:
        if saved.get(field) != current[field]:
            raise CheckpointError(f"checkpoint model config differs in {field}: checkpoint "
                                  f"{saved.get(field)!r}, this run {current[field]!r}")


def read_full_state(path: str | Path, names: set[str] | None = None) -> dict[tuple[str, str], torch.Tensor]:
    """The checkpoint's pieces assembled into full tensors (safetensors + JSON only); with
    ``names``, only the pieces of those parameters are read (a pipeline stage's own)."""
    path = Path(path)
    pieces = []
    for index_file in sorted(path.glob("rank-*.json")):
        wanted = [Piece.from_json(entry) for entry in json.loads(index_file.read_text())]
        wanted = [piece for piece in wanted if names is None or piece.name in names]
        if not wanted:
            continue
        with safe_open(str(index_file.with_suffix(".safetensors")), framework="pt") as handle:
            pieces += [(piece, handle.get_tensor(piece.key)) for piece in wanted]
    return assemble(pieces)


def load_checkpoint(trainer, path: str | Path) -> int:
    """Load a checkpoint written under any layout into ``trainer``; returns its step. Each rank
    reads only the ranges of the pieces that overlap what it holds. The files' checksums are
    not verified here: resume finds ``path`` with ``newest_intact_checkpoint``, which did (the
    ranks sharing the work); other callers use ``verify_checkpoint`` first."""
    meta = json.loads((_complete(path) / "meta.json").read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} is not {FORMAT_VERSION}")
    check_model_config(meta, trainer.model_config)
    source = CheckpointSource(path)
    try:
        trainer.strategy.load_state(source, int(meta["step"]))
    finally:
        source.close()
    trainer.skipped_steps = int(meta.get("skipped_steps", 0))  # non-finite steps skipped before it
    return int(meta["step"])
