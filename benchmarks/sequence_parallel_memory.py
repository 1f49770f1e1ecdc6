"""Activation memory per rank: tensor parallel with and without sequence parallel.

Counts the bytes autograd saves for backward during one forward + loss (``saved_tensors_hooks``;
each storage once, parameters excluded), per rank, for tp = 1, tp = N, and tp = N with SP.
Tensors whose last dimension is the hidden size are the residual stream and norm inputs /
outputs: SP should divide them by tp, while plain TP keeps them whole on every rank.

    python benchmarks/sequence_parallel_memory.py                 # llama-125m, batch 1 x 1024, tp 2
    python benchmarks/sequence_parallel_memory.py --tp 4 --model small
"""
from __future__ import annotations

import argparse

import torch

from plait.mesh import ParallelContext, ParallelDims
from plait.models import build_model, get_preset
from plait.tensor_parallel import llama_plan, parallelize
from plait.testing import WorkerPool
from plait.train.trainer import token_loss_sum


def saved_activation_bytes(ctx: ParallelContext, model_name: str, batch: int, seq_len: int, sp: bool):
    torch.manual_seed(0)
    config = get_preset(model_name)
    model = build_model(config, seed=0)
    if ctx.comm("tp").size > 1:
        parallelize(model, ctx.comm("tp"), llama_plan(sequence_parallel=sp, loss_parallel=True))
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, bool]] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in parameter_storages and pointer not in seen:
            seen[pointer] = (storage.nbytes(), tensor.shape[-1] == config.hidden_size if tensor.dim() else False)
        return tensor

    ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = token_loss_sum(model, ids[:, :-1], ids[:, 1:])
    del loss
    hidden = sum(size for size, is_hidden in seen.values() if is_hidden)
    other = sum(size for size, is_hidden in seen.values() if not is_hidden)
    return hidden, other


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
    rows = [("tp=1", *saved_activation_bytes(ParallelContext.single(), args.model, args.batch, args.seq_len, False))]
    pool = WorkerPool(args.tp)
    try:
        for label, sp in ((f"tp={args.tp}", False), (f"tp={args.tp} + SP", True)):
            results = pool.run(saved_activation_bytes, ParallelDims(tp=args.tp), args.model, args.batch,
                               args.seq_len, sp, timeout_s=600)
            rows.append((label, *max(results, key=lambda r: r[0] + r[1])))
    finally:
        pool.shutdown()
    base_hidden, base_other = rows[0][1], rows[0][2]
    print("\n| layout | residual/norm activations (MB) | other activations (MB) | total (MB) | total vs tp=1 |")
    print("|---|---|---|---|---|")
    for label, hidden, other in rows:
        print(f"| {label} | {hidden / 1e6:.1f} ({hidden / base_hidden:.2f}x) | {other / 1e6:.1f} "
              f"({other / base_other:.2f}x) | {(hidden + other) / 1e6:.1f} | "
              f"{(hidden + other) / (base_hidden + base_other):.2f}x |")


if __name__ == "__main__":
    main()
