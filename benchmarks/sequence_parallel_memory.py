"""Activation memory per rank: tensor parallel with and without sequence parallel.

Counts the bytes autograd keeps for backward during one forward + loss (``saved_tensors_hooks``;
each storage once, parameters excluded), per rank, for tp = 1, tp = N, and tp = N with SP
(which keeps sequence shards of the linears' gathered inputs and re-gathers them in backward,
as the trainer does). [batch, seq, hidden] tensors are the residual stream: norm inputs and
outputs and the inputs of the q/k/v, gate/up and head matmuls. Each kept tensor is attributed
to the innermost module running when it was saved. SP should divide the norms' and the
column-parallel matmuls' inputs by tp, which plain TP keeps whole on every rank.

    python benchmarks/sequence_parallel_memory.py                 # llama-125m, batch 1 x 1024, tp 2
    python benchmarks/sequence_parallel_memory.py --tp 4 --model small
"""
from __future__ import annotations

import argparse

import torch

from plait.mesh import ParallelContext, ParallelDims
from plait.models import build_model, get_preset
from plait.tensor_parallel import llama_plan, parallelize
from plait.tensor_parallel.sequence import SequenceShardRegistry
from plait.testing import WorkerPool
from plait.train.trainer import token_loss_sum


def saved_activation_bytes(ctx: ParallelContext, model_name: str, batch: int, seq_len: int, sp: bool):
    torch.manual_seed(0)
    config = get_preset(model_name)
    model = build_model(config, seed=0)
    if ctx.comm("tp").size > 1:
        parallelize(model, ctx.comm("tp"), llama_plan(sequence_parallel=sp, loss_parallel=True))
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    comm = ctx.comm("tp")
    # Under SP, the trainer's hook keeps shards instead of gathered activations; run the same
    # registry here and count what it actually keeps.
    registry = SequenceShardRegistry(comm) if sp and comm.size > 1 else None
    comm.sequence_shards = registry

    # Attribute each kept tensor to the innermost module running when it was saved.
    running: list[str] = []
    for module in model.modules():
        category = CATEGORIES.get(type(module).__name__)
        if category is not None:
            module.register_forward_pre_hook(lambda _m, _a, c=category: running.append(c))
            module.register_forward_hook(lambda _m, _a, _o: running.pop() and None)
    kept_bytes: dict[int, tuple[int, str]] = {}

    def count(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in parameter_storages and pointer not in kept_bytes:
            kept_bytes[pointer] = (storage.nbytes(), running[-1] if running else "head + loss")

    def pack(tensor: torch.Tensor):
        kept = registry.pack(tensor) if registry is not None else tensor
        count(kept if isinstance(kept, torch.Tensor) else kept.record.shard)
        return kept

    def unpack(kept):
        return registry.unpack(kept) if registry is not None else kept

    ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = token_loss_sum(model, ids[:, :-1], ids[:, 1:])
    loss.backward()  # the re-gathers run, so the benchmark exercises them too
    comm.sequence_shards = None
    totals = {category: 0 for category in COLUMNS}
    for size, category in kept_bytes.values():
        totals[category] += size
    return totals


CATEGORIES = {"RMSNorm": "norms", "Linear": "matmul inputs", "ColumnParallelLinear": "matmul inputs",
              "RowParallelLinear": "matmul inputs", "LlamaAttention": "attention core", "LlamaMLP": "SwiGLU"}
COLUMNS = ("norms", "matmul inputs", "attention core", "SwiGLU", "head + loss")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-125m")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args()
    config = get_preset(args.model)
    print(f"model {args.model}: hidden {config.hidden_size}, {config.num_hidden_layers} layers; "
          f"batch {args.batch} x seq {args.seq_len}; fp32; bytes saved for backward per rank")
    rows = [("tp=1", saved_activation_bytes(ParallelContext.single(), args.model, args.batch, args.seq_len, False))]
    pool = WorkerPool(args.tp)
    try:
        for label, sp in ((f"tp={args.tp}", False), (f"tp={args.tp} + SP", True)):
            results = pool.run(saved_activation_bytes, ParallelDims(tp=args.tp), args.model, args.batch,
                               args.seq_len, sp, timeout_s=600)
            rows.append((label, max(results, key=lambda totals: sum(totals.values()))))
    finally:
        pool.shutdown()
    base = rows[0][1]
    print("\n| layout | " + " | ".join(f"{c} (MB)" for c in COLUMNS) + " | total (MB) |")
    print("|---|" + "---|" * (len(COLUMNS) + 1))
    for label, totals in rows:
        cells = [f"{totals[c] / 1e6:.1f} ({totals[c] / base[c]:.2f}x)" for c in COLUMNS]
        total = sum(totals.values())
        print(f"| {label} | " + " | ".join(cells) + f" | {total / 1e6:.1f} ({total / sum(base.values()):.2f}x) |")


if __name__ == "__main__":
    main()
