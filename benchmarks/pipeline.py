"""Pipeline parallel, pp = 2, 8 micro-batches: plait's 1F1B and zero-bubble ZB-H1 (zb1p) and ZB-V
(zbv) vs torch.distributed.pipelining's Schedule1F1B, ScheduleInterleavedZeroBubble and
ScheduleZBVZeroBubble.

    python benchmarks/pipeline.py

Same model (plait's Llama 'small' preset), same blocks per chunk on both sides (plait's FLOP-
balanced split: 5 + 3 for one chunk per rank; 2 + 2 + 3 + 1 for ZB-V's four chunks, placed
0 and 3 on rank 0, 1 and 2 on rank 1), embedding with the first chunk, final norm and head
with the last, same batches, fp32, one thread per rank; steps alternate between the six
contestants inside the same pair of processes; median step time. PyTorch's side:
``PipelineStage`` per chunk + the schedule with ``F.cross_entropy`` on the last chunk's logits
and fused AdamW (``ScheduleInterleavedZeroBubble`` with one stage per rank: its ZB-H1-like
order with a split backward; ``ScheduleZBVZeroBubble`` with two); plait's side:
``Trainer.train_step`` (which also clips and reduces metrics). Also prints plait's measured idle
fraction per schedule (from its executor's per-action timestamps) beside the analytic bubble.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from plait.data import TokenData
from plait.mesh import ParallelContext, ParallelDims
from plait.models import build_model, get_preset
from plait.pipeline import analytic_bubble, plan_chunks
from plait.pipeline.schedules import Schedule, Slot, bubble_fraction
from plait.testing import WorkerPool
from plait.train import TrainConfig, Trainer

PLAIT_SCHEDULES = {"1f1b": 1, "zb1p": 1, "zbv": 2}  # schedule -> chunks per rank
TORCH_SCHEDULES = {"Schedule1F1B": "1f1b", "ScheduleInterleavedZeroBubble": "zb1p", "ScheduleZBVZeroBubble": "zbv"}
CONTESTANTS = tuple(f"plait {s}" for s in PLAIT_SCHEDULES) + tuple(f"torch {s}" for s in TORCH_SCHEDULES)


class Chunk(nn.Module):
    """Consecutive blocks of the model, with the embedding (first chunk) or norm and head (last)."""

    def __init__(self, model: nn.Module, layers: tuple[int, ...], seq_len: int, first: bool, last: bool) -> None:
        super().__init__()
        self.embed_tokens = model.model.embed_tokens if first else None
        self.layers = nn.ModuleList(model.model.layers[i] for i in layers)
        self.norm, self.lm_head = (model.model.norm, model.lm_head) if last else (None, None)
        self.decoder = [model.model]  # not registered: only for the RoPE tables
        self.seq_len = seq_len

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)
        cos, sin = self.decoder[0].position_tables(self.seq_len, x)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x)) if self.lm_head is not None else x


def torch_pipeline(ctx: ParallelContext, config, seq_len: int, microbatches: int, name: str):
    """torch.distributed.pipelining stages of the same model and chunks, and the step function."""
    from torch.distributed import pipelining

    ours = TORCH_SCHEDULES[name]
    v = PLAIT_SCHEDULES[ours]
    chunks = plan_chunks(config, 2, v, seq_len)
    placement = Schedule(ours).placement
    model = build_model(config, seed=0)
    rank = ctx.pp_rank
    stages, modules = [], []
    for index in placement.chunks_of(rank, 2, v):
        chunk = chunks[index]
        module = Chunk(model, chunk.layers, seq_len, chunk.is_first, chunk.is_last)
        modules.append(module)
        stages.append(pipelining.PipelineStage(module, index, len(chunks), torch.device("cpu"),
                                               group=ctx.comm("pp").group))
    del model

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    kind = getattr(pipelining, name)
    schedule = kind(stages[0], microbatches, loss_fn=loss_fn) if name == "Schedule1F1B" else \
        kind(stages, microbatches, loss_fn=loss_fn)
    parameters = [p for module in modules for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, fused=True)
    holds_first = any(chunks[i].is_first for i in placement.chunks_of(rank, 2, v))
    holds_last = any(chunks[i].is_last for i in placement.chunks_of(rank, 2, v))

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        args = (inputs,) if holds_first else ()
        kwargs = dict(target=targets, losses=[]) if holds_last else {}
        schedule.step(*args, **kwargs)
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)  # this rank's part; plait clips globally
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def contest(ctx: ParallelContext, data: TokenData, steps: int, microbatches: int, seq_len: int, batch: int):
    config = get_preset("small").replace(vocab_size=data.vocab_size)
    trainers = {}
    for schedule, v in PLAIT_SCHEDULES.items():
        cfg = TrainConfig(model="small", steps=steps + 1, global_batch=batch, microbatches=microbatches,
                          seq_len=seq_len, dtype="float32", schedule=schedule, virtual_stages=v, eval_every=0,
                          progress=False, tensorboard=False, plot=False, peak_tflops=1.0, out="unused")
        trainers[schedule] = Trainer(cfg, ctx, data, config)
    sampler = trainers["1f1b"].sampler
    runs = {f"plait {schedule}": trainer.train_step for schedule, trainer in trainers.items()}
    for name in TORCH_SCHEDULES:
        torch_step = torch_pipeline(ctx, config, seq_len, microbatches, name)
        runs[f"torch {name}"] = lambda step, torch_step=torch_step: torch_step(*sampler.shard(step, 0, 1))
    times = {name: [] for name in CONTESTANTS}
    idle = {schedule: [] for schedule in PLAIT_SCHEDULES}
    for step in range(steps + 1):
        for name in CONTESTANTS:
            dist.barrier()
            start = time.perf_counter()
            runs[name](step)
            dist.barrier()
            if step:
                times[name].append(time.perf_counter() - start)
        if step:
            for schedule, trainer in trainers.items():
                events = [None, None]
                dist.all_gather_object(events, trainer.pipeline.events)
                slots = [Slot(r, kind, mb, chunk, s, e) for r, ev in enumerate(events) for kind, mb, chunk, s, e in ev]
                idle[schedule].append(bubble_fraction(slots, 2))
    return times, {schedule: statistics.median(values) for schedule, values in idle.items()}


def paired(times: dict[str, list[float]], name: str, base: str) -> str:
    """Median of the per-step ratios name / base (steps of one round run back to back, so the
    VM's drift between rounds cancels), with their range."""
    ratios = sorted(a / b for a, b in zip(times[name], times[base]))
    return f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 8192, (400_000,), generator=generator).numpy().astype("uint16")
    data = TokenData(train=tokens[:-10_000], val=tokens[-10_000:], vocab_size=8192, eos_id=None, tokenizer=None)
    pool = WorkerPool(2)
    try:
        step_times, idle = pool.run(contest, ParallelDims(pp=2), data, args.steps, args.microbatches, args.seq_len,
                               args.batch, timeout_s=1800)[0]
    finally:
        pool.shutdown()
    m = args.microbatches
    print(f"'small' (18.9M), pp=2, m={m} micro-batches of {args.batch // m} x {args.seq_len}, fp32, "
          f"1 thread per rank, median of {args.steps} steps, the six alternating; ratios: median of the "
          f"per-step ratios (range)")
    print("| implementation | step time (s) | vs plait 1f1b | vs torch's same schedule |")
    print("|---|---|---|---|")
    peers = {f"plait {ours}": f"torch {name}" for name, ours in TORCH_SCHEDULES.items()}
    for name in CONTESTANTS:
        versus = f"**{paired(step_times, name, peers[name])}**" if name in peers else ""
        print(f"| {name} | {statistics.median(step_times[name]):.3f} | {paired(step_times, name, 'plait 1f1b')} "
              f"| {versus} |")
    for schedule, v in PLAIT_SCHEDULES.items():
        print(f"plait {schedule}: measured idle fraction {100 * idle[schedule]:.1f}% vs analytic bubble "
              f"{100 * analytic_bubble(schedule, 2, m, v):.1f}%")


if __name__ == "__main__":
    main()
