"""Pipeline parallel, pp = 2, 8 micro-batches: plait's 1F1B and zero-bubble ZB-H1 (zb1p) vs
torch.distributed.pipelining's Schedule1F1B and ScheduleInterleavedZeroBubble.

    python benchmarks/pipeline.py

Same model (plait's Llama 'small' preset, blocks split 4 + 4, embedding on stage 0, final norm
and head on stage 1), same batches, fp32, one thread per rank; steps alternate between the four
contestants inside the same pair of processes; median step time. PyTorch's side:
``PipelineStage`` + the schedule with ``F.cross_entropy`` on the last stage's logits and fused
AdamW (``ScheduleInterleavedZeroBubble`` with one stage per rank: its ZB-H1-like order with a
split backward); plait's side: ``Trainer.train_step`` (which also clips and reduces metrics).
Also prints plait's measured idle fraction per schedule (from its executor's per-action
timestamps) beside the analytic bubble.
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
from plait.pipeline import analytic_bubble
from plait.pipeline.schedules import Slot, bubble_fraction
from plait.testing import WorkerPool
from plait.train import TrainConfig, Trainer


class FirstStage(nn.Module):
    def __init__(self, model: nn.Module, layers: list[int], seq_len: int) -> None:
        super().__init__()
        self.embed_tokens = model.model.embed_tokens
        self.layers = nn.ModuleList(model.model.layers[i] for i in layers)
        self.decoder = [model.model]  # not registered: only for the RoPE tables
        self.seq_len = seq_len

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        cos, sin = self.decoder[0].position_tables(self.seq_len, x)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return x


class LastStage(nn.Module):
    def __init__(self, model: nn.Module, layers: list[int], seq_len: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(model.model.layers[i] for i in layers)
        self.norm, self.lm_head = model.model.norm, model.lm_head
        self.decoder = [model.model]
        self.seq_len = seq_len

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.decoder[0].position_tables(self.seq_len, x)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def torch_pipeline(ctx: ParallelContext, config, seq_len: int, microbatches: int, zero_bubble: bool):
    """A torch.distributed.pipelining stage of the same model and its step function."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleavedZeroBubble

    model = build_model(config, seed=0)
    half = config.num_hidden_layers // 2
    rank = ctx.pp_rank
    if rank == 0:
        module = FirstStage(model, list(range(half)), seq_len)
    else:
        module = LastStage(model, list(range(half, config.num_hidden_layers)), seq_len)
    del model
    stage = PipelineStage(module, rank, 2, torch.device("cpu"), group=ctx.comm("pp").group)

    def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    if zero_bubble:
        schedule = ScheduleInterleavedZeroBubble([stage], microbatches, loss_fn=loss_fn)
    else:
        schedule = Schedule1F1B(stage, microbatches, loss_fn=loss_fn)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, fused=True)

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if rank == 0:
            schedule.step(inputs)
        else:
            schedule.step(target=targets, losses=[])
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)  # this stage's part; plait clips globally
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


CONTESTANTS = ("plait 1f1b", "plait zb1p", "torch Schedule1F1B", "torch ScheduleInterleavedZeroBubble")


def contest(ctx: ParallelContext, data: TokenData, steps: int, microbatches: int, seq_len: int, batch: int):
    config = get_preset("small").replace(vocab_size=data.vocab_size)
    trainers = {}
    for schedule in ("1f1b", "zb1p"):
        cfg = TrainConfig(model="small", steps=steps + 1, global_batch=batch, microbatches=microbatches,
                          seq_len=seq_len, dtype="float32", schedule=schedule, eval_every=0, progress=False,
                          tensorboard=False, plot=False, peak_tflops=1.0, out="unused")
        trainers[schedule] = Trainer(cfg, ctx, data, config)
    sampler = trainers["1f1b"].sampler
    torch_steps = {zero_bubble: torch_pipeline(ctx, config, seq_len, microbatches, zero_bubble)
                   for zero_bubble in (False, True)}
    runs = {"plait 1f1b": trainers["1f1b"].train_step, "plait zb1p": trainers["zb1p"].train_step,
            "torch Schedule1F1B": lambda step: torch_steps[False](*sampler.shard(step, 0, 1)),
            "torch ScheduleInterleavedZeroBubble": lambda step: torch_steps[True](*sampler.shard(step, 0, 1))}
    times = {name: [] for name in CONTESTANTS}
    idle = {"1f1b": [], "zb1p": []}
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
    return ({name: statistics.median(values) for name, values in times.items()},
            {schedule: statistics.median(values) for schedule, values in idle.items()})


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
        times, idle = pool.run(contest, ParallelDims(pp=2), data, args.steps, args.microbatches, args.seq_len,
                               args.batch, timeout_s=1800)[0]
    finally:
        pool.shutdown()
    m = args.microbatches
    print(f"'small' (18.9M), pp=2, m={m} micro-batches of {args.batch // m} x {args.seq_len}, fp32, "
          f"1 thread per rank, median of {args.steps} steps, the four alternating")
    print("| implementation | step time (s) | vs plait 1f1b | vs torch's same schedule |")
    print("|---|---|---|---|")
    peers = {"plait 1f1b": "torch Schedule1F1B", "plait zb1p": "torch ScheduleInterleavedZeroBubble"}
    for name in CONTESTANTS:
        versus = f"**{times[name] / times[peers[name]]:.2f}x**" if name in peers else ""
        print(f"| {name} | {times[name]:.3f} | {times[name] / times['plait 1f1b']:.2f}x | {versus} |")
    for schedule in ("1f1b", "zb1p"):
        print(f"plait {schedule}: measured idle fraction {100 * idle[schedule]:.1f}% vs analytic bubble "
              f"{100 * analytic_bubble(schedule, 2, m):.1f}%")


if __name__ == "__main__":
    main()
