"""A model no rank can hold replicated, and what recomputation buys.

    python benchmarks/large_model.py                   # both parts (the recorded run)
    python benchmarks/large_model.py --part train      # `medium` on 8 ranks, ZeRO-3 + full recompute
    python benchmarks/large_model.py --part recompute  # none vs selective vs full, one process

Part train runs the command of issue 11 as a user would,

    plait train --model medium --nproc 8 --zero 3 --activation-checkpointing full --dtype bfloat16 \\
        --steps 2 --global-batch 8 --micro-batch 1 --seq-len 256

and measures from outside the workers: every 0.2 s it reads each worker's peak resident set
(VmHWM in /proc) and reports their sum, the memory of the job (target: at most 14 GB here, where
replicated training would need 8 x 16P, about 68 GB). Each rank also records its own peaks while
constructing and while training (``<out>/memory.json``); both are set against the formulas of
plait's ZeRO-3 (P parameters, N = 8 ranks): construction = own pieces (fp32 master shards,
4P/N) + one full fp32 parameter; training = 14P/N (fp32 master and moments, the bf16 gradient
shards of one micro-batch) + the gathered units and their gradients (``plait.planner.memory.rank_memory``), each above the rank's memory before the
trainer existed (Python, torch, the data).

Part recompute trains the same model three ways in one process, steps alternating between
them (so machine drift hits all alike): activations kept for backward by one micro-batch
(the process's live memory after the forward, minus before, with freed pages handed back to the
OS) and step time, against plait's per-layer formulas (``plait.planner.memory``: none, selective,
full) and Korthikanti et al.'s for GPT (s b h (34 + 5 a s / h), 34 s b h, 2 s b h in half precision).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ISSUE_COMMAND = ["--model", "medium", "--nproc", "8", "--zero", "3", "--activation-checkpointing", "full",
                 "--dtype", "bfloat16", "--steps", "2", "--global-batch", "8", "--micro-batch", "1", "--seq-len", "256"]


# ---------------------------------------------------------------- part train
def _children(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _peak_rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            words = cmdline.read().split(b"\0")
    except OSError:
        return False
    return b"plait" in words and b"train" in words


def train_part(out: Path, extra: list[str]) -> dict:
    args = [*ISSUE_COMMAND, *extra, "--out", str(out)]  # later flags win: --train-args overrides
    command = [sys.executable, "-m", "plait", "train", *args]
    print("$ plait train " + " ".join(args), flush=True)
    started = time.perf_counter()
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, int] = {}
    while launcher.poll() is None:
        for pid in _children(launcher.pid):
            if _is_worker(pid):
                peak = _peak_rss(pid)
                if peak is not None:
                    peaks[pid] = max(peaks.get(pid, 0), peak)
        time.sleep(0.2)
    output = launcher.stdout.read()
    elapsed = time.perf_counter() - started
    if launcher.returncode != 0:
        print(output)
        raise SystemExit(f"the run failed with exit code {launcher.returncode}")
    print("\n".join(line for line in output.splitlines() if line.startswith("plait:")))
    report = json.loads((out / "memory.json").read_text())["bytes"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"worker_peaks": sorted(peaks.values()), "ranks": report, "steps": records, "wall_s": elapsed}


def formulas(world: int) -> dict[str, float]:
    from plait.layout import Layout
    from plait.models import get_preset
    from plait.planner.memory import construction_bytes, model_state_bytes, rank_memory
    from plait.planner.workload import ModelShape

    config = get_preset("medium")
    shape = ModelShape.from_llama_config(config, 256)
    layout = Layout(dp=world, zero=3, micro_batch=1, global_batch=8, recompute="full", dtype="bfloat16")
    params = config.num_parameters()
    largest = config.vocab_size * config.hidden_size
    training = rank_memory(shape, layout, config.num_hidden_layers, True, True, 1, 0.0)
    return {"params": params, "construction": construction_bytes(params, largest, layout),
            "states": sum(model_state_bytes(params, layout).values()),
            "training": training["total"]}


def print_train(result: dict) -> None:
    world = len(result["ranks"])
    expected = formulas(world)
    gb = 1e9
    total = sum(result["worker_peaks"])
    print(f"\n`medium`: {expected['params'] / 1e6:.1f}M parameters, {world} ranks, ZeRO-3, full recomputation, bf16")
    print(f"sum of the workers' peak resident memory (from outside): **{total / gb:.2f} GB** "
          f"(target <= 14 GB; replicated 16P x {world} = {16 * expected['params'] * world / gb:.1f} GB)")
    print("\n| rank | before (GB) | constructing: peak - before (GB) | formula 4P/N + 4 max (GB) | "
          "training: peak - before (GB) | formula 14P/N + units (GB) |")
    print("|---|---|---|---|---|---|")
    for rank in result["ranks"]:
        base = rank["base"]
        print(f"| {rank['rank']} | {base / gb:.2f} | {(rank['construction'] - base) / gb:.2f} | "
              f"{expected['construction'] / gb:.2f} | {(rank['training'] - base) / gb:.2f} | "
              f"{expected['training'] / gb:.2f} |")
    times = [record["step_time_s"] for record in result["steps"]]
    print(f"\nstep times (s): {', '.join(f'{t:.1f}' for t in times)}; whole command {result['wall_s']:.0f} s "
          f"(start-up, tokenizer cache, construction, 2 steps, a checkpoint-free exit)")


# ---------------------------------------------------------------- part recompute
def kept_bytes(trainer, inputs: torch.Tensor, targets: torch.Tensor) -> int:
    """Live bytes one forward leaves for its backward."""
    from plait.runtime import gemm_context
    from plait.train.metrics import release_free_memory, resident_bytes
    from plait.train.trainer import token_loss_sum

    release_free_memory()
    before = resident_bytes()
    with gemm_context(torch.device("cpu"), torch.bfloat16):  # as the trainer runs its products
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = token_loss_sum(trainer.model, inputs, targets)
        release_free_memory()
        kept = resident_bytes() - before
        loss.backward()
    trainer.strategy.zero_grad()
    return kept


def recompute_part(model: str, seq_len: int, micro_batch: int, rounds: int) -> list[dict]:
    from plait.data import TokenData
    from plait.layout import Layout, Recompute
    from plait.mesh import ParallelContext
    from plait.models import get_preset
    from plait.planner.memory import kept_per_layer
    from plait.planner.workload import ModelShape
    from plait.train import TrainConfig, Trainer

    config = get_preset(model)
    tokens = torch.randint(0, config.vocab_size, (200_000,), generator=torch.Generator().manual_seed(0))
    data = TokenData(train=tokens[:-10_000].numpy().astype("uint16"), val=tokens[-10_000:].numpy().astype("uint16"),
                     vocab_size=config.vocab_size, eos_id=None, tokenizer=None)
    trainers = {}
    for mode in Recompute:
        cfg = TrainConfig(model=model, steps=1000, global_batch=micro_batch, seq_len=seq_len, dtype="bfloat16",
                          activation_checkpointing=mode.value, eval_every=0, progress=False, tensorboard=False,
                          plot=False, peak_tflops=1.0, out="unused", warmup_steps=1)
        trainers[mode] = Trainer(cfg, ParallelContext.single(), data, config)
    inputs, targets = trainers[Recompute.NONE].sampler.shard(0, 0, 1)
    times: dict[Recompute, list[float]] = {mode: [] for mode in Recompute}
    kept: dict[Recompute, list[int]] = {mode: [] for mode in Recompute}
    for step in range(rounds + 1):
        for mode, trainer in trainers.items():
            record = trainer.train_step(step)
            if step:  # the first round warms every path up
                times[mode].append(record["step_time_s"])
                kept[mode].append(kept_bytes(trainer, inputs, targets))
    shape = ModelShape.from_llama_config(config, seq_len)
    s, b, h, a = seq_len, micro_batch, config.hidden_size, config.num_attention_heads
    korthikanti = {Recompute.NONE: s * b * h * (34 + 5 * a * s / h), Recompute.SELECTIVE: 34 * s * b * h,
                   Recompute.FULL: 2 * s * b * h}
    rows = []
    for mode in Recompute:
        layout = Layout(micro_batch=micro_batch, global_batch=micro_batch, recompute=mode, dtype="bfloat16")
        per_layer = kept_per_layer(shape, layout)
        if mode is Recompute.NONE:  # autocast's bf16 weight copies are kept for backward too
            per_layer += 2 * shape.layer_parameters()
        rows.append({"mode": mode.value, "kept_mb": statistics.median(kept[mode]) / 1e6,
                     "plait_formula_mb": per_layer * config.num_hidden_layers / 1e6,
                     "korthikanti_mb": korthikanti[mode] * config.num_hidden_layers / 1e6,
                     "step_s": statistics.median(times[mode])})
    return rows


def print_recompute(rows: list[dict], model: str, seq_len: int, micro_batch: int) -> None:
    base = rows[0]
    print(f"\n`{model}`, one process (2 threads), bf16, micro-batch {micro_batch} x {seq_len}; activations kept "
          f"by the blocks' forward (MB), median over the rounds")
    # The blocks' formulas leave out what all three keep alike outside the blocks (the fused
    # head's logits buffer): the savings against none compare the blocks alone.
    print("| recompute | kept (MB) | plait's formula, blocks (MB) | saved vs none: measured / formula (MB) | "
          "Korthikanti, GPT, blocks (MB) | step (s) | step vs none |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        saved = base["kept_mb"] - row["kept_mb"]
        saved_formula = base["plait_formula_mb"] - row["plait_formula_mb"]
        print(f"| {row['mode']} | {row['kept_mb']:.0f} | {row['plait_formula_mb']:.0f} | "
              f"{saved:.0f} / {saved_formula:.0f} | {row['korthikanti_mb']:.0f} | {row['step_s']:.3f} | "
              f"{row['step_s'] / base['step_s']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("train", "recompute", "both"), default="both")
    parser.add_argument("--out", help="run directory of part train (default: a temporary one)")
    parser.add_argument("--train-args", default="", help="flags appended to the command of part train, for "
                        "example \"--seq-len 16 --steps 1\" (a quick memory probe: activations are small anyway)")
    parser.add_argument("--model", default="llama-125m", help="model of part recompute")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.part in ("train", "both"):
        with tempfile.TemporaryDirectory() as scratch:
            print_train(train_part(Path(args.out) if args.out else Path(scratch) / "medium", args.train_args.split()))
    if args.part in ("recompute", "both"):
        print_recompute(recompute_part(args.model, args.seq_len, args.micro_batch, args.rounds), args.model,
                        args.seq_len, args.micro_batch)


if __name__ == "__main__":
    main()
