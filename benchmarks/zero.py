"""ZeRO: model-state memory per rank against the formulas, and step time against PyTorch.

    python benchmarks/zero.py                 # both parts (the recorded run)
    python benchmarks/zero.py --part memory   # zero 0..3 at dp=4, ~50M parameters, fp32
    python benchmarks/zero.py --part speed    # dp=2: plait zero 3 vs FSDP2, plait zero 0 vs DDP
    python benchmarks/zero.py --part hsdp     # dp=4 as 2 replicas x 2 shards: plait --dp-shard 2 vs FSDP2 HSDP

Memory: each level trains one step on dp=4 ranks, then runs the next step's backward; we report
this rank's parameter, gradient and optimizer-state bytes then (every storage that holds them:
their peak, the gradient shards existing from their reduction to the step) and the process's
peak resident memory during the first step, beside the formula of plait's implementation in
fp32 (P parameters, N ranks): zero 0: 16P; zero 1: 8P + 16P/N; zero 2: 4P + 16P/N; zero 3: 16P/N
(bytes). With bf16 parameters the full buffers take 2 bytes per element, and so does the
gradient shard where one reduction per step leaves it bf16 (``plait.planner.memory``).

Speed: the same model and batches, dp=2, steps alternating between the contestants within
one pair of processes (so machine drift hits all alike); median step time. PyTorch's side:
``fully_shard`` on every block and the root (FSDP2), ``DistributedDataParallel``; both with
fused AdamW and ``F.cross_entropy`` on the logits. plait's side: ``Trainer.train_step``
(which also clips gradients and reduces metrics).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from plait.data import TokenData
from plait.mesh import ParallelContext, ParallelDims
from plait.models import get_preset
from plait.testing import WorkerPool
from plait.train import TrainConfig, Trainer
from plait.train.metrics import reset_resident_peak, resident_peak_bytes

MEMORY_MODEL = get_preset("small").replace(hidden_size=512, intermediate_size=1536, num_hidden_layers=12,
                                           num_attention_heads=8, num_key_value_heads=8)


def synthetic_tokens(vocab: int, n_tokens: int = 400_000) -> TokenData:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (n_tokens,), generator=generator).to(torch.int32).numpy().astype("uint16")
    return TokenData(train=tokens[:-10_000], val=tokens[-10_000:], vocab_size=vocab, eos_id=None, tokenizer=None)


def memory_of_level(ctx: ParallelContext, zero: int, data: TokenData):
    import gc
    gc.collect()
    reset_resident_peak()
    base = resident_peak_bytes()  # this process before the trainer exists
    cfg = TrainConfig(model="small", steps=2, global_batch=8, micro_batch=1, seq_len=256, dtype="float32",
                      zero=zero, eval_every=0, progress=False, tensorboard=False, plot=False, peak_tflops=1.0,
                      out="unused")
    trainer = Trainer(cfg, ctx, data, MEMORY_MODEL)
    gc.collect()
    reset_resident_peak()  # leave out construction
    trainer.train_step(0)
    peak = resident_peak_bytes() - base
    trainer.compute_gradients(1)  # states at their peak: moments, and gradient shards before the step
    state = trainer.strategy.state_bytes()
    n_params = sum(p.numel() for p in trainer.model.parameters())
    del trainer
    gc.collect()
    return state, peak, n_params


def memory_part(args) -> None:
    import os
    # A fixed mmap threshold makes glibc return every large freed block to the OS at once, so
    # the peak resident size follows live memory instead of the heap's retained high-water mark.
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # inherited by the spawned workers only
    try:
        _memory_part()
    finally:  # the speed part must run with the default allocator behaviour
        if previous is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous


def _memory_part() -> None:
    dp = 4
    data = synthetic_tokens(MEMORY_MODEL.vocab_size)
    pool = WorkerPool(dp)
    rows = []
    try:
        for zero in (0, 1, 2, 3):
            results = pool.run(memory_of_level, ParallelDims(dp=dp), zero, data, timeout_s=900)
            state, peak, n_params = results[0]
            rows.append((zero, state, max(r[1] for r in results), n_params))
    finally:
        pool.shutdown()
    n_params = rows[0][3]
    formulas = {0: 16 * n_params, 1: 8 * n_params + 16 * n_params / dp, 2: 4 * n_params + 16 * n_params / dp,
                3: 16 * n_params / dp}
    names = {0: "16P", 1: "8P + 16P/N", 2: "4P + 16P/N", 3: "16P/N"}
    print(f"\nmodel: {n_params / 1e6:.1f}M parameters (P), fp32, dp = N = {dp}; MB = 1e6 bytes, per rank")
    print("| zero | params (MB) | grads (MB) | optimizer (MB) | model state (MB) | formula | formula (MB) "
          "| measured / formula | peak RSS in the step, above the process baseline (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for zero, state, peak, _ in rows:
        total = sum(state.values())
        print(f"| {zero} | {state['params'] / 1e6:.1f} | {state['grads'] / 1e6:.1f} | {state['optimizer'] / 1e6:.1f} "
              f"| {total / 1e6:.1f} | {names[zero]} | {formulas[zero] / 1e6:.1f} | {total / formulas[zero]:.3f} "
              f"| {peak / 1e6:.0f} |")


def torch_train_step(model, optimizer, inputs, targets, device: torch.device, dtype: str) -> None:
    """One step of a PyTorch-parallelised model, its products run as plait's trainer runs them
    (widened to fp32 where this CPU emulates bf16)."""
    from plait.runtime import gemm_context

    compute_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    with gemm_context(device, compute_dtype):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def speed_contestants(ctx: ParallelContext, data: TokenData, steps: int, dtype: str):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from plait.models import build_model

    base = dict(model="small", steps=steps + 1, global_batch=8, seq_len=256, dtype=dtype, eval_every=0,
                progress=False, tensorboard=False, plot=False, peak_tflops=1.0, out="unused", grad_clip=1.0)
    model_config = get_preset("small").replace(vocab_size=data.vocab_size)
    plait0 = Trainer(TrainConfig(**base, zero=0), ctx, data, model_config)
    plait3 = Trainer(TrainConfig(**base, zero=3), ctx, data, model_config)
    dp_group = ctx.comm("dp").group
    compute_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32

    ddp_model = DistributedDataParallel(build_model(model_config, seed=0), process_group=dp_group)
    ddp_optimizer = torch.optim.AdamW(ddp_model.parameters(), lr=1e-3, fused=True)
    fsdp_model = build_model(model_config, seed=0)
    from torch.distributed.fsdp import MixedPrecisionPolicy
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=compute_dtype)
    for layer in fsdp_model.model.layers:
        fully_shard(layer, mesh=ctx.mesh["dp"], mp_policy=policy)
    fully_shard(fsdp_model, mesh=ctx.mesh["dp"], mp_policy=policy)
    fsdp_optimizer = torch.optim.AdamW(fsdp_model.parameters(), lr=1e-3, fused=True)

    def torch_step(model, optimizer, step):
        inputs, targets = plait0.sampler.shard(step, ctx.dp_rank, ctx.dims.dp)
        torch_train_step(model, optimizer, inputs, targets, ctx.device, dtype)

    contestants = {
        "plait zero 0": lambda step: plait0.train_step(step),
        "DDP": lambda step: torch_step(ddp_model, ddp_optimizer, step),
        "plait zero 3": lambda step: plait3.train_step(step),
        "FSDP2": lambda step: torch_step(fsdp_model, fsdp_optimizer, step),
    }
    times = {name: [] for name in contestants}
    for step in range(steps + 1):
        for name, run in contestants.items():
            dist.barrier()
            start = time.perf_counter()
            run(step)
            dist.barrier()
            if step:  # the first step warms up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def hsdp_contestants(ctx: ParallelContext, data: TokenData, steps: int, dtype: str):
    """plait ZeRO-3 --dp-shard 2 against FSDP2 on a (replicate 2, shard 2) mesh, alternating."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from plait.models import build_model

    base = dict(model="small", steps=steps + 1, global_batch=8, seq_len=256, dtype=dtype, eval_every=0,
                progress=False, tensorboard=False, plot=False, peak_tflops=1.0, out="unused", grad_clip=1.0)
    model_config = get_preset("small").replace(vocab_size=data.vocab_size)
    plait = Trainer(TrainConfig(**base, zero=3, dp_shard=2), ctx, data, model_config)
    compute_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    # ranks [[0, 1], [2, 3]]: shard groups {0, 1} and {2, 3}, replicas {0, 2} and {1, 3}, as plait's
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    fsdp_model = build_model(model_config, seed=0)
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=compute_dtype)
    for layer in fsdp_model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(fsdp_model, mesh=mesh, mp_policy=policy)
    optimizer = torch.optim.AdamW(fsdp_model.parameters(), lr=1e-3, fused=True)

    def fsdp_step(step):
        inputs, targets = plait.sampler.shard(step, ctx.dp_rank, ctx.dims.dp)
        torch_train_step(fsdp_model, optimizer, inputs, targets, ctx.device, dtype)

    contestants = {"plait zero 3 --dp-shard 2": lambda step: plait.train_step(step), "FSDP2 HSDP (2 x 2)": fsdp_step}
    times = {name: [] for name in contestants}
    for step in range(steps + 1):
        for name, run in contestants.items():
            dist.barrier()
            start = time.perf_counter()
            run(step)
            dist.barrier()
            if step:
                times[name].append(time.perf_counter() - start)
    return times


def hsdp_part(args) -> None:
    data = synthetic_tokens(8192)
    pool = WorkerPool(4)
    try:
        for dtype in args.dtypes.split(","):
            times = pool.run(hsdp_contestants, ParallelDims(dp=4, dp_shard=2), data, args.steps, dtype,
                             timeout_s=1800)[0]
            ours, theirs = times.values()
            ratios = sorted(a / b for a, b in zip(ours, theirs))
            print(f"\n'small' (18.9M), dp=4 = 2 replicas x 2 shards, 1 thread per rank (4 ranks on this VM's cores), "
                  f"batch 2 x 256 per rank, {dtype}, median of {args.steps} steps, alternating")
            print("| contestant | step time (s) | ratio (median of per-step ratios, range) |")
            print("|---|---|---|")
            names = list(times)
            print(f"| {names[0]} | {statistics.median(ours):.3f} | **{statistics.median(ratios):.2f}x** "
                  f"({ratios[0]:.2f}-{ratios[-1]:.2f}) {names[1]} |")
            print(f"| {names[1]} | {statistics.median(theirs):.3f} | |")
    finally:
        pool.shutdown()


def speed_part(args) -> None:
    data = synthetic_tokens(8192)
    pool = WorkerPool(2)
    try:
        for dtype in args.dtypes.split(","):
            results = pool.run(speed_contestants, ParallelDims(dp=2), data, args.steps, dtype, timeout_s=1800)[0]
            print(f"\n'small' (18.9M), dp=2, 1 thread per rank, batch 4 x 256 per rank, {dtype}, "
                  f"median of {args.steps} steps")
            print("| contestant | step time (s) | ratio |")
            print("|---|---|---|")
            for ours, theirs in (("plait zero 0", "DDP"), ("plait zero 3", "FSDP2")):
                print(f"| {ours} | {results[ours]:.3f} | **{results[ours] / results[theirs]:.2f}x** {theirs} |")
                print(f"| {theirs} | {results[theirs]:.3f} | |")
    finally:
        pool.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("memory", "speed", "hsdp", "both"), default="both")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    if args.part in ("memory", "both"):
        memory_part(args)
    if args.part in ("speed", "both"):
        speed_part(args)
    if args.part in ("hsdp", "both"):
        hsdp_part(args)


if __name__ == "__main__":
    main()
