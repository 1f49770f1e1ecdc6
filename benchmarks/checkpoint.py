"""Checkpoint save and load: time and size for the `small` and `llama-125m` presets.

    python benchmarks/checkpoint.py

One process (fp32, AdamW state after one step) and dp=2 with ZeRO-1 (each rank writes its
shard in parallel); loading reads every piece and assembles full tensors, then slices them
for the layout. Median of 3 saves / loads into a temporary directory on this disk.
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from plait.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from plait.data import TokenData
from plait.mesh import ParallelContext, ParallelDims
from plait.models import get_preset
from plait.testing import WorkerPool
from plait.train import TrainConfig, Trainer


def data_for(vocab: int) -> TokenData:
    tokens = torch.randint(0, vocab, (50_000,), generator=torch.Generator().manual_seed(0)).numpy().astype("uint16")
    return TokenData(train=tokens[:-5000], val=tokens[-5000:], vocab_size=vocab, eos_id=None, tokenizer=None)


def measure(ctx: ParallelContext, preset: str, zero: int, directory: str):
    config = get_preset(preset)
    cfg = TrainConfig(model=preset, steps=1, global_batch=2 * ctx.dims.dp, seq_len=64, dtype="float32", zero=zero,
                      eval_every=0, progress=False, tensorboard=False, plot=False, peak_tflops=1.0, out=directory)
    trainer = Trainer(cfg, ctx, data_for(config.vocab_size), config)
    trainer.train_step(0)
    saves, loads = [], []
    for attempt in range(3):
        run = Path(directory) / f"attempt-{attempt}"
        start = time.perf_counter()
        save_checkpoint(trainer, run, 1)
        saves.append(time.perf_counter() - start)
        start = time.perf_counter()
        load_checkpoint(trainer, latest_checkpoint(run))
        loads.append(time.perf_counter() - start)
    size = sum(p.stat().st_size for p in latest_checkpoint(Path(directory) / "attempt-0").iterdir())
    return statistics.median(saves), statistics.median(loads), size, config.num_parameters()


def main() -> None:
    rows = []
    pool = WorkerPool(2)
    try:
        for preset in ("small", "llama-125m"):
            directory = tempfile.mkdtemp(prefix="plait-ckpt-")
            try:
                rows.append((preset, "1 process", *measure(ParallelContext.single(), preset, 0, directory)))
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            directory = tempfile.mkdtemp(prefix="plait-ckpt-")
            try:
                result = pool.run(measure, ParallelDims(dp=2), preset, 1, directory, timeout_s=900)[0]
                rows.append((preset, "dp=2, ZeRO-1", *result))
            finally:
                shutil.rmtree(directory, ignore_errors=True)
    finally:
        pool.shutdown()
    print("| model | layout | parameters | checkpoint size (MB) | save (s) | load (s) |")
    print("|---|---|---|---|---|---|")
    for preset, layout, save, load, size, params in rows:
        print(f"| {preset} | {layout} | {params / 1e6:.1f}M | {size / 1e6:.0f} | {save:.2f} | {load:.2f} |")


if __name__ == "__main__":
    main()
