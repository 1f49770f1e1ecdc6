"""Measured step time and peak memory of training layouts, for checking the planner's cost model.

    python benchmarks/planner_measure.py                       # the default layouts (about 6 min)
    python benchmarks/planner_measure.py --layouts dp2,tp2,pp2 # a subset, by name
    python benchmarks/planner_measure.py --repeat dp2          # measure one layout twice more

For each layout of one small Llama model (``MODEL``, ``SEQ_LEN``, ``GLOBAL_BATCH``), spawned
gloo workers (one torch thread each, 2-4 ranks time-sharing this machine's cores) build plait's
own ``Trainer`` and run real optimizer steps:

* warm-up steps (at least one: AdamW's moments are created lazily on the first step), then
  timed steps. Before each timed step every rank waits at a barrier on the world group; the
  step's time is the slowest rank's ``time.perf_counter()`` around ``train_step``, and the
  layout's step time is the median of those over the timed steps.
* memory: the rank's resident set right before the trainer is built is its baseline. After
  the warm-up, the peak resident size (``VmHWM``) is reset to the current resident size (which
  holds the persistent parameters, gradients and optimizer state), the timed steps run, and
  ``VmHWM - baseline`` is the rank's peak; the layout's peak is the largest over ranks.

All ranks of a layout run on the first ``world_size`` workers of one pool (each worker first
runs one throwaway step, so one-time costs miss every baseline); the trainer is
deleted and freed memory handed back to the OS (``gc.collect`` + glibc ``malloc_trim``) before
each baseline and before the reset, so one layout's retained heap does not hide the next
one's growth. The allocator is left at its defaults so that step times are those of a normal
run; freed memory glibc keeps mapped inside the timed steps is part of the measured peak
(``--live-memory`` fixes glibc's mmap threshold instead, so the peak follows live tensors, at
the price of slower steps).

The CPU time other processes use during the timed steps is recorded (``other_cpu_load``, a
share of all cores); a layout measured on a busy machine is measured again (``--retries``).

``measure_layouts`` is the API (one dict per layout); ``main`` prints a table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from plait.data import TokenData
from plait.mesh import ParallelContext, ParallelDims
from plait.models import LlamaConfig, get_preset
from plait.testing import WorkerPool
from plait.layout import check_run
from plait.train import TrainConfig, Trainer
from plait.train.metrics import release_free_memory, reset_resident_peak, resident_bytes, resident_peak_bytes

# ~35.7M parameters (fp32 model state 16P = 571 MB unsharded); tp 2 and 4 divide heads and FFN.
MODEL = get_preset("small").replace(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                    num_attention_heads=8, num_key_value_heads=8, vocab_size=8192)
SEQ_LEN = 256
GLOBAL_BATCH = 8
TIMEOUT_S = 900.0  # per layout


@dataclass(frozen=True)
class MeasuredLayout:
    name: str
    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0
    sequence_parallel: bool = False
    loss_parallel: bool = False
    schedule: str = "1f1b"
    micro_batch: int = 1          # sequences per forward/backward
    activation_checkpointing: bool = False
    dtype: str = "float32"
    virtual_stages: int = 1       # pipeline chunks per rank (schedule "interleaved")

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims(dp=self.dp, pp=self.pp, tp=self.tp)

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp


DEFAULT_LAYOUTS: list[MeasuredLayout] = [
    MeasuredLayout("dp2", dp=2),
    MeasuredLayout("dp2-zero1", dp=2, zero=1),
    MeasuredLayout("dp2-zero3", dp=2, zero=3),
    MeasuredLayout("tp2", tp=2),
    MeasuredLayout("tp2-sp-lp", tp=2, sequence_parallel=True, loss_parallel=True),
    MeasuredLayout("pp2-1f1b", pp=2),                       # 8 micro-batches of 1
    MeasuredLayout("pp2-gpipe", pp=2, schedule="gpipe"),
    MeasuredLayout("dp2-tp2", dp=2, tp=2),
    MeasuredLayout("tp2-pp2", tp=2, pp=2),                  # 8 micro-batches of 1
    MeasuredLayout("dp4-zero2", dp=4, zero=2),
    MeasuredLayout("dp2-bf16", dp=2, dtype="bfloat16"),
    MeasuredLayout("dp2-ckpt", dp=2, activation_checkpointing=True),
    MeasuredLayout("dp2-mb4", dp=2, micro_batch=4),         # the whole per-rank batch at once
]


def process_cpu_seconds() -> float:
    """CPU time (user + system, all threads) of this process."""
    times = os.times()
    return times.user + times.system


def machine_busy_seconds() -> float:
    """CPU time every process on the machine has used since boot (/proc/stat, all cores)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except OSError:
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def synthetic_tokens(vocab: int, n_tokens: int = 400_000) -> TokenData:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (n_tokens,), generator=generator).to(torch.int32).numpy()
    tokens = tokens.astype("uint16" if vocab <= 2 ** 16 else "uint32")
    return TokenData(train=tokens[:-10_000], val=tokens[-10_000:], vocab_size=vocab, eos_id=None, tokenizer=None)


# ---------------------------------------------------------------- configuration
def train_config(layout: MeasuredLayout, seq_len: int, global_batch: int, steps: int) -> TrainConfig:
    return TrainConfig(model="small", dp=layout.dp, tp=layout.tp, pp=layout.pp, zero=layout.zero,
                       schedule=layout.schedule, micro_batch=layout.micro_batch,
                       virtual_stages=layout.virtual_stages, sequence_parallel=layout.sequence_parallel,
                       loss_parallel=layout.loss_parallel, activation_checkpointing=layout.activation_checkpointing,
                       dtype=layout.dtype, global_batch=global_batch, seq_len=seq_len, steps=max(steps, 1),
                       eval_every=0, progress=False, tensorboard=False, plot=False, peak_tflops=1.0,
                       out="unused")


def check_layout(model: LlamaConfig, layout: MeasuredLayout, seq_len: int, global_batch: int) -> None:
    """Raise the trainer's own one-line error for a layout that cannot run (without processes)."""
    check_run(train_config(layout, seq_len, global_batch, 1), layout.dims, model)


# ---------------------------------------------------------------- one layout, on every rank
def _measure_rank(ctx: ParallelContext, model: LlamaConfig, layout: MeasuredLayout, seq_len: int,
                  global_batch: int, warmup_steps: int, timed_steps: int) -> dict[str, Any]:
    torch.set_num_threads(1)  # one thread per rank (the pool sets it too)
    data = synthetic_tokens(model.vocab_size)
    cfg = train_config(layout, seq_len, global_batch, warmup_steps + timed_steps)
    release_free_memory()
    reset_resident_peak()
    baseline = resident_bytes()  # this process before the trainer exists
    trainer = Trainer(cfg, ctx, data, model)
    try:
        for step in range(warmup_steps):
            trainer.train_step(step)
        release_free_memory()
        reset_resident_peak()
        persistent = resident_bytes() - baseline  # parameters, gradients, optimizer state, buffers
        times = []
        dist.barrier()
        machine_busy, own_cpu, wall = machine_busy_seconds(), process_cpu_seconds(), time.perf_counter()
        for step in range(warmup_steps, warmup_steps + timed_steps):
            dist.barrier()
            start = time.perf_counter()
            trainer.train_step(step)
            times.append(time.perf_counter() - start)
        peak = resident_peak_bytes() - baseline
        dist.barrier()
        machine_busy = machine_busy_seconds() - machine_busy
        own_cpu, wall = process_cpu_seconds() - own_cpu, time.perf_counter() - wall
    finally:
        del trainer
        release_free_memory()
    return {"times": times, "peak": peak, "persistent": persistent, "threads": torch.get_num_threads(),
            "machine_busy": machine_busy, "own_cpu": own_cpu, "wall": wall}


def _prime_rank(ctx: ParallelContext, model: LlamaConfig, seq_len: int, global_batch: int,
                plait_allocator: bool = False) -> None:
    """One throwaway step, so each worker's one-time costs (library code paged in, lazily
    initialised kernels and thread pools) fall before any layout's baseline. With
    ``plait_allocator`` the worker first takes glibc settings of `plait train` (runtime.py)."""
    if plait_allocator:
        from plait.runtime import tune_cpu_allocator
        tune_cpu_allocator()
    for layout in (MeasuredLayout("prime", dp=ctx.dims.dp), MeasuredLayout("prime-bf16", dp=ctx.dims.dp,
                                                                            dtype="bfloat16")):
        trainer = Trainer(train_config(layout, seq_len, global_batch, 1), ctx, synthetic_tokens(model.vocab_size),
                          model)
        trainer.train_step(0)
        del trainer
    release_free_memory()


# ---------------------------------------------------------------- the API
def measure_layouts(model: LlamaConfig, layouts: list[MeasuredLayout], *, seq_len: int, global_batch: int,
                    warmup_steps: int = 2, timed_steps: int = 4, pool: WorkerPool | None = None,
                    timeout_s: float = TIMEOUT_S, max_other_load: float = 0.05, retries: int = 2,
                    verbose: bool = False, allocator: str = "default") -> list[dict]:
    """Measure each layout with real ``Trainer`` steps on spawned gloo workers.

    Per layout, in the given order: {"name", "world_size", "step_time_s" (median over the
    timed steps of the slowest rank's time per step), "peak_memory_bytes" (max over ranks of
    the peak resident memory during the timed steps above the rank's pre-trainer baseline),
    "per_rank_peak_bytes" (by global rank), "per_rank_persistent_bytes" (resident memory
    after the warm-up above the baseline, by rank), "step_times_s" (the slowest rank's time of
    every timed step), "other_cpu_load" (CPU time used by other processes of the machine during
    the timed steps, as a fraction of all cores; above ~0.05 the step time is disturbed),
    "attempts" (how many times the layout was measured, see below), "layout" (the
    MeasuredLayout as a dict), "error" (None, or the reason the layout could not be measured,
    in which case the measured values are None)}.

    A layout measured while other processes used more than ``max_other_load`` of the machine
    is measured again, up to ``retries`` more times; the attempt with the least other load is
    kept (check ``other_cpu_load`` when joining with predictions).

    Before the first layout every pool worker runs one throwaway step (fp32 and bf16), so
    one-time costs do not land in the first layout's memory.

    ``pool``: reuse these workers (it needs ``size >= world_size`` of every layout); by default
    a pool of the largest world size is spawned and shut down again.

    ``allocator``: "default" (glibc as it comes), "plait" (the settings `plait train` applies:
    freed memory stays in the heap, so steps do not page-fault; the peak then includes the
    heap's fragmentation), or "live" (a fixed 128 KiB mmap threshold: every large tensor is
    its own mapping, returned at once, so the peak follows live tensors -- the CPU analogue of
    ``torch.cuda.max_memory_allocated``; steps are slower). "live" needs its own pool.
    """
    if warmup_steps < 1 or timed_steps < 1:
        raise ValueError("warmup_steps and timed_steps must be >= 1 (AdamW state is created on the first step)")
    if allocator not in ("default", "plait", "live"):
        raise ValueError(f"allocator must be default, plait or live, not {allocator!r}")
    own_pool = pool is None
    if allocator == "live" and not own_pool:
        raise ValueError("allocator='live' is set when workers start: let measure_layouts spawn its pool")
    if own_pool:
        saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        if allocator == "live":
            os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # read by the spawned workers' glibc at start
        pool = WorkerPool(max((layout.world_size for layout in layouts), default=1))
    results = []
    try:
        pool.run(_prime_rank, ParallelDims(dp=pool.size), model, seq_len, pool.size, allocator == "plait",
                 timeout_s=timeout_s)
        if own_pool:  # the workers have started: the parent's environment is its own again
            if saved is None:
                os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
            else:
                os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
        for layout in layouts:
            row = None
            for attempt in range(1 + max(0, retries)):
                started = time.perf_counter()
                candidate = _measure_layout(pool, model, layout, seq_len, global_batch, warmup_steps, timed_steps,
                                            timeout_s)
                if verbose:
                    status = candidate["error"] or (
                        f"{candidate['step_time_s']:.3f} s, {candidate['peak_memory_bytes'] / 1e6:.0f} MB, "
                        f"other load {candidate['other_cpu_load']:.2f}")
                    print(f"  {layout.name}{f' (retry {attempt})' if attempt else ''}: {status} "
                          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
                if row is None or (candidate["other_cpu_load"] is not None
                                   and (row["other_cpu_load"] is None
                                        or candidate["other_cpu_load"] < row["other_cpu_load"])):
                    row = candidate
                if row["other_cpu_load"] is None or row["other_cpu_load"] <= max_other_load:
                    break  # failed (a retry would fail alike) or measured on a quiet enough machine
            row["attempts"] = attempt + 1
            results.append(row)
    finally:
        if own_pool:
            pool.shutdown()
    return results


def _measure_layout(pool: WorkerPool, model: LlamaConfig, layout: MeasuredLayout, seq_len: int, global_batch: int,
                    warmup_steps: int, timed_steps: int, timeout_s: float) -> dict[str, Any]:
    row: dict[str, Any] = {"name": layout.name, "world_size": layout.world_size, "step_time_s": None,
                           "peak_memory_bytes": None, "per_rank_peak_bytes": None, "per_rank_persistent_bytes": None,
                           "step_times_s": None, "other_cpu_load": None, "attempts": 1, "layout": asdict(layout),
                           "error": None}
    try:
        check_layout(model, layout, seq_len, global_batch)
        ranks = pool.run(_measure_rank, layout.dims, model, layout, seq_len, global_batch, warmup_steps,
                         timed_steps, timeout_s=timeout_s)
    except Exception as error:  # noqa: BLE001 - recorded per layout, the others still run
        row["error"] = f"{type(error).__name__}: {error}"
        return row
    per_step = [max(rank["times"][i] for rank in ranks) for i in range(timed_steps)]
    per_rank_peak = [rank["peak"] for rank in ranks]
    row.update(step_time_s=statistics.median(per_step), step_times_s=per_step, peak_memory_bytes=max(per_rank_peak),
               per_rank_peak_bytes=per_rank_peak, per_rank_persistent_bytes=[rank["persistent"] for rank in ranks])
    # CPU time the rest of the machine used while the timed steps ran, as a fraction of all
    # cores: other people's work competing with the ranks for the cores slows the steps.
    wall = max(rank["wall"] for rank in ranks)
    other = ranks[0]["machine_busy"] - sum(rank["own_cpu"] for rank in ranks)
    row["other_cpu_load"] = max(0.0, other / (wall * (os.cpu_count() or 1)))
    if any(rank["threads"] != 1 for rank in ranks):
        row["error"] = f"ranks used {[rank['threads'] for rank in ranks]} torch threads, not 1"
    return row


# ---------------------------------------------------------------- CLI
def format_table(rows: list[dict]) -> str:
    lines = [("| layout | processes | step time (s) | peak MB (max over ranks) | peak MB per rank "
              "| persistent MB per rank | other load | attempts |"), "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["error"] is not None and row["step_time_s"] is None:
            lines.append(f"| {row['name']} | {row['world_size']} | failed: {row['error'].splitlines()[0]} | | | | | |")
            continue
        per_rank = ", ".join(f"{b / 1e6:.0f}" for b in row["per_rank_peak_bytes"])
        persistent = ", ".join(f"{b / 1e6:.0f}" for b in row["per_rank_persistent_bytes"])
        lines.append(f"| {row['name']} | {row['world_size']} | {row['step_time_s']:.3f} "
                     f"| {row['peak_memory_bytes'] / 1e6:.0f} | {per_rank} | {persistent} "
                     f"| {row['other_cpu_load']:.2f} | {row['attempts']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [layout.name for layout in DEFAULT_LAYOUTS]
    parser.add_argument("--layouts", default=None, help=f"comma-separated subset of: {', '.join(names)}")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--timed-steps", type=int, default=4)
    parser.add_argument("--repeat", default=None,
                        help="comma-separated layouts to measure once more at the end (repeatability)")
    parser.add_argument("--max-other-load", type=float, default=0.05,
                        help="re-measure a layout when other processes used more than this share of the cores")
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--live-memory", action="store_true",
                        help="workers use a fixed 128 KiB mmap threshold (MALLOC_MMAP_THRESHOLD_), so freed "
                             "blocks go back to the OS at once and the peak follows live tensors; steps get "
                             "slower (page faults), so step times are not those of a normal run")
    args = parser.parse_args(argv)
    by_name = {layout.name: layout for layout in DEFAULT_LAYOUTS}
    selected = args.layouts.split(",") if args.layouts else names
    repeat = args.repeat.split(",") if args.repeat else []
    unknown = [name for name in selected + repeat if name not in by_name]
    if unknown:
        parser.error(f"unknown layout(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    layouts = [by_name[name] for name in selected] + [by_name[name] for name in repeat]

    n_params = MODEL.num_parameters()
    print(f"model: hidden {MODEL.hidden_size}, FFN {MODEL.intermediate_size}, {MODEL.num_hidden_layers} layers, "
          f"{MODEL.num_attention_heads} heads, vocab {MODEL.vocab_size}: {n_params / 1e6:.1f}M parameters; "
          f"seq_len {SEQ_LEN}, global batch {GLOBAL_BATCH}; {args.warmup_steps} warm-up + {args.timed_steps} "
          f"timed steps; 1 torch thread per rank on {os.cpu_count()} cores; MB = 1e6 bytes",
          flush=True)
    if args.live_memory:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # read by the spawned workers' glibc at start
    started = time.perf_counter()
    pool = WorkerPool(max(layout.world_size for layout in layouts))
    try:
        rows = measure_layouts(MODEL, layouts, seq_len=SEQ_LEN, global_batch=GLOBAL_BATCH,
                               warmup_steps=args.warmup_steps, timed_steps=args.timed_steps, pool=pool,
                               max_other_load=args.max_other_load, retries=args.retries, verbose=True)
    finally:
        pool.shutdown()
    for row in rows[len(selected):]:
        row["name"] += " (again)"
    print(format_table(rows))
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
