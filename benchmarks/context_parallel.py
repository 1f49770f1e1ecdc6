"""Context parallelism on this CPU: activation memory against sequence length, step time of ring
vs all-to-all vs cp = 1, the causal load balance, and how much of the ring's traffic is hidden.

    python benchmarks/context_parallel.py                        # all parts (the recorded run)
    python benchmarks/context_parallel.py --part memory --memory-seqs 2048,4096
    python benchmarks/context_parallel.py --part speed --seq-len 4096 --steps 5

Memory: one forward + loss of `small` (fp32, batch 1) per rank, counting the bytes autograd keeps
for backward (``saved_tensors_hooks``; each storage once, parameters excluded) inside the decoder
blocks, for cp = 1, 2, 4 in both modes, beside the planner's formula
(``plait.planner.memory.layer_activation_bytes`` x layers, which divides every token term by cp
and, for the ring, keeps k and v with the kv heads only).

Speed, on 2 ranks alternating step by step in one pair of processes: cp = 1 is dp = 2 (each rank
one of the two sequences), ring and all-to-all are cp = 2 (each rank half of both sequences):
the same job, the same tokens and attention work per rank, so the difference is what cp costs.
Two more steps of the ring's trainer (after the timed ones, which are not instrumented) record,
per rank, the time in its attention kernels (the load balance:
each rank's share against the mean) and the time spent waiting for its key/value and dK/dV
exchanges, against the same exchanges timed alone afterwards (hidden = 1 - waited / alone); for
this the cp ranks meet at a barrier (not timed) before each ring, so that a wait measures the
transfer left uncovered, not a peer that started late.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from plait.data import TokenData
from plait.layout import Layout, ModelFacts, layout_problem
from plait.mesh import ParallelContext, ParallelDims
from plait.models import get_preset
from plait.testing import WorkerPool

MODEL = "small"


def synthetic_tokens(vocab: int, n_tokens: int = 400_000) -> TokenData:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (n_tokens,), generator=generator).numpy().astype("uint16")
    return TokenData(train=tokens[:-40_000], val=tokens[-40_000:], vocab_size=vocab, eos_id=None, tokenizer=None)


def kept_block_bytes(ctx: ParallelContext, seq_len: int, mode: str) -> int:
    """Bytes this rank's decoder blocks keep for backward after one forward + loss."""
    from plait.context_parallel import apply_context_parallel, context_slice
    from plait.models import build_model
    from plait.models.llama import LlamaDecoderLayer
    from plait.train.trainer import token_loss_sum

    config = get_preset(MODEL)
    model = build_model(config, seed=0)
    apply_context_parallel(model, ctx.comm("cp"), mode)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    inside = []
    for module in model.modules():
        if isinstance(module, LlamaDecoderLayer):
            module.register_forward_pre_hook(lambda *_: inside.append(True))
            module.register_forward_hook(lambda *_: inside.pop() and None)
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if inside and storage.data_ptr() not in parameters:
            kept.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    ids = torch.randint(0, config.vocab_size, (1, seq_len + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = (context_slice(t, ctx.cp_rank, ctx.dims.cp) for t in (ids[:, :-1], ids[:, 1:]))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_loss_sum(model, inputs, targets)
    return sum(kept.values())


def formula_bytes(seq_len: int, cp: int, mode: str) -> float:
    from plait.planner.memory import layer_activation_bytes
    from plait.planner.workload import Layout, ModelShape

    shape = ModelShape.from_llama_config(get_preset(MODEL), seq_len)
    return shape.layers * layer_activation_bytes(shape, Layout(cp=cp, cp_mode=mode, dtype="float32"))


class _TimedWait:
    def __init__(self, handle, waited: list[float]) -> None:
        self.handle, self.waited = handle, waited

    def wait(self) -> None:
        start = time.perf_counter()
        self.handle.wait()
        self.waited.append(time.perf_counter() - start)


def contest(ctx: ParallelContext, data: TokenData, seq_len: int, steps: int):
    """Step times of dp2 / ring cp2 / all-to-all cp2 alternating; the ring's kernel and wait times."""
    import torch.distributed as dist

    from plait.context_parallel import ring
    from plait.mesh import build_context
    from plait.train import TrainConfig, Trainer

    cp_ctx = build_context(ParallelDims(cp=2), ctx.device, ctx.backend)
    common = dict(model=MODEL, steps=steps + 3, global_batch=2, seq_len=seq_len, dtype="float32", eval_every=0,
                  progress=False, tensorboard=False, plot=False, peak_tflops=1.0, out="unused")
    trainers = {"cp=1 (dp2)": Trainer(TrainConfig(**common), ctx, data),
                "ring cp2": Trainer(TrainConfig(cp=2, cp_mode="ring", **common), cp_ctx, data),
                "alltoall cp2": Trainer(TrainConfig(cp=2, cp_mode="alltoall", **common), cp_ctx, data)}
    kernel_s, waited, exchanged = [0.0], [], []
    timing = {"on": False}

    def timed(kernel):
        def run(*args):
            if not timing["on"]:
                return kernel(*args)
            start = time.perf_counter()
            result = kernel(*args)
            kernel_s[0] += time.perf_counter() - start
            return result
        return run

    def aligned(function):  # ranks start each ring together, so waits measure transfers, not skew
        def run(*args):
            if timing["on"]:
                args[-1].barrier()
            return function(*args)
        return run

    ring.ring_forward = aligned(ring.ring_forward)
    ring.ring_backward = aligned(ring.ring_backward)
    ring.block_attention = timed(ring.block_attention)
    ring.block_attention_backward = timed(ring.block_attention_backward)
    comm = cp_ctx.comm("cp")
    plain_exchange = comm.ring_exchange

    def exchange(outgoing, incoming, tag, what):
        handle = plain_exchange(outgoing, incoming, tag, what)
        if not timing["on"]:
            return handle
        exchanged.append((outgoing.shape, outgoing.dtype, tag))
        return _TimedWait(handle, waited)

    comm.ring_exchange = exchange
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for step in range(steps + 1):  # step 0 warms up
        for name, trainer in trainers.items():
            dist.barrier()
            start = time.perf_counter()
            trainer.train_step(step)
            if step > 0:
                times[name].append(time.perf_counter() - start)
    # then two more ring steps, instrumented (the timed steps above are not)
    timing["on"] = True
    for step in range(steps + 1, steps + 3):
        trainers["ring cp2"].train_step(step)
    timing["on"] = False
    # the same exchanges alone, nothing to hide behind
    dist.barrier()
    start = time.perf_counter()
    for shape, dtype, tag in exchanged:
        outgoing, incoming = torch.zeros(shape, dtype=dtype), torch.empty(shape, dtype=dtype)
        plain_exchange(outgoing, incoming, tag, "benchmark").wait()
    alone = time.perf_counter() - start
    return times, kernel_s[0], sum(waited), alone


def memory_part(seqs: list[int], cps: list[int]) -> None:
    print(f"\n'{MODEL}', fp32, batch 1: bytes the decoder blocks keep for backward per rank (max over ranks), "
          "against the planner's formula")
    print("| seq | layout | measured (MB) | formula (MB) | measured / formula | vs cp=1 |")
    print("|---|---|---|---|---|---|")
    for seq in seqs:
        pool = WorkerPool(max(cps))  # fresh workers per length: what a long one freed stays mapped
        try:
            memory_rows(pool, seq, cps)
        finally:
            pool.shutdown()


def memory_rows(pool: WorkerPool, seq: int, cps: list[int]) -> None:
    base = None
    for cp in cps:
        for mode in (("ring",) if cp == 1 else ("ring", "alltoall")):
            label = "cp=1" if cp == 1 else f"cp={cp} {mode}"
            problem = layout_problem(ModelFacts.of_llama(get_preset(MODEL), seq), Layout(cp=cp, cp_mode=mode))
            if problem:
                print(f"| {seq} | {label} | refused: {problem} | | | |")
                continue
            measured = max(pool.run(kept_block_bytes, ParallelDims(cp=cp), seq, mode, timeout_s=1800))
            base = base or measured
            expected = formula_bytes(seq, cp, mode)
            print(f"| {seq} | {label} | {measured / 1e6:.1f} | {expected / 1e6:.1f} | {measured / expected:.3f} | "
                  f"{measured / base:.3f}x |", flush=True)


def speed_part(pool: WorkerPool, seq_len: int, steps: int) -> None:
    data = synthetic_tokens(get_preset(MODEL).vocab_size)
    results = pool.run(contest, ParallelDims(dp=2), data, seq_len, steps, timeout_s=3600)
    times = results[0][0]
    base = times["cp=1 (dp2)"]
    print(f"\n'{MODEL}', fp32, global batch 2 x {seq_len}, 2 ranks x 1 thread, median of {steps} steps, alternating")
    print("| layout | step time (s) | vs cp=1 (dp2) |")
    print("|---|---|---|")
    for name, values in times.items():
        ratios = [a / b for a, b in zip(values, base)]
        print(f"| {name} | {statistics.median(values):.3f} | {statistics.median(ratios):.3f}x "
              f"({min(ratios):.3f}-{max(ratios):.3f}) |")
    kernels = [kernel for _, kernel, _, _ in results]
    mean = sum(kernels) / len(kernels)
    print("ring cp2 (2 instrumented steps), time in attention kernels per rank: "
          + ", ".join(f"rank {r} {k:.2f} s ({k / mean:.3f} of the mean)" for r, k in enumerate(kernels)))
    for rank, (_, _, waited, alone) in enumerate(results):
        print(f"ring cp2, rank {rank}: waited {waited:.3f} s for the exchanges, {alone:.3f} s alone: "
              f"{100 * (1 - waited / alone):.0f}% hidden behind compute")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "memory", "speed"), default="all")
    parser.add_argument("--memory-seqs", default="2048,4096,8192,16384")
    parser.add_argument("--cp-sizes", default="1,2,4")
    parser.add_argument("--seq-len", type=int, default=4096, help="sequence length of the speed part")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    cps = [int(c) for c in args.cp_sizes.split(",")]
    if args.part in ("all", "memory"):
        memory_part([int(s) for s in args.memory_seqs.split(",")], cps)
    if args.part in ("all", "speed"):
        pool = WorkerPool(2)
        try:
            speed_part(pool, args.seq_len, args.steps)
        finally:
            pool.shutdown()


if __name__ == "__main__":
    main()
