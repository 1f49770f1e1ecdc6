"""Single-rank training step: plait's Llama vs transformers.LlamaForCausalLM, side by side.

Same dims, same weights (copied by name), same batch, same AdamW, same thread count, same
loss code; fp32 and bf16 autocast. Prints step times, their ratio, and MFU: model FLOPs
(6N + attention, see LlamaConfig.flops_per_token) per second over the measured matmul peak
of this machine for that dtype.

    python benchmarks/single_rank.py                      # llama-125m, seq 512 (the recorded run)
    python benchmarks/single_rank.py --model tiny --steps 2   # a smoke run
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from plait.models import build_model, get_preset
from plait.runtime import gemm_context, tune_cpu_allocator
from plait.loss import linear_cross_entropy_sum
from plait.train.optim import build_adamw


def matmul_peak(dtype: torch.dtype, size: int, seconds: float = 2.0) -> float:
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size ** 3 / (time.perf_counter() - start))
    return best


def hf_model(config, state_dict):
    import transformers
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta, tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=False, mlp_bias=False, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf_config)
    model.load_state_dict(state_dict)
    model.train()
    return model


def plait_loss(model, inputs, targets):
    """plait's training loss: the head's matmul fused with a chunked cross-entropy."""
    hidden = model.model(inputs)
    return linear_cross_entropy_sum(hidden, model.lm_head.weight, targets) / targets.numel()


def transformers_loss(model, inputs, targets):
    """transformers' own training path: labels in, loss out. It shifts the labels itself, so
    labels = inputs scores the same next tokens (all but the last position's)."""
    return model(input_ids=inputs, labels=inputs).loss


def time_interleaved(runs: dict, inputs, targets, dtype, steps) -> dict[str, tuple[float, float]]:
    """Median step time of each (loss function, model), steps alternating between the models.

    Alternating spreads the machine's drift (other load, heap warm-up) evenly over both.
    """
    optimizers = {name: build_adamw(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
                  for name, (_, model) in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    losses: dict[str, float] = {}
    for step in range(steps + 1):  # step 0 warms caches and allocators up
        for name, (loss_fn, model) in runs.items():
            start = time.perf_counter()
            with gemm_context(torch.device("cpu"), dtype):  # both models: plait's trainer's products
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    loss = loss_fn(model, inputs, targets)
                loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step:
                times[name].append(time.perf_counter() - start)
            losses[name] = float(loss.detach())
    return {name: (statistics.median(times[name]), losses[name]) for name in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-125m")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # plait's trainer tunes glibc malloc at start; apply it process-wide so both models get it.
    allocator = tune_cpu_allocator()
    config = get_preset(args.model)
    tokens = args.batch * args.seq_len
    flops = config.flops_per_token(args.seq_len) * tokens
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), generator=generator)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    print(f"model {args.model} ({config.num_parameters() / 1e6:.1f}M), batch {args.batch} x seq {args.seq_len}, "
          f"{args.threads} threads, torch {torch.__version__}, malloc tuned: {allocator}")
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        peak = matmul_peak(dtype, 2048)
        plait_model = build_model(config, seed=0)
        reference = hf_model(config, plait_model.state_dict())
        results = time_interleaved({"plait": (plait_loss, plait_model),
                                     "transformers": (transformers_loss, reference)},
                                    inputs, targets, dtype, args.steps)
        del plait_model, reference
        (plait_time, plait_final), (hf_time, hf_final) = results["plait"], results["transformers"]
        for name, seconds, loss in (("plait", plait_time, plait_final), ("transformers", hf_time, hf_final)):
            rows.append((dtype_name, name, seconds, tokens / seconds, flops / seconds / peak, peak, loss))
        rows.append((dtype_name, "ratio plait/transformers", plait_time / hf_time, None, None, None, None))
    print("\n| dtype | implementation | step time (s) | tokens/s | MFU | matmul peak (GFLOP/s) |")
    print("|---|---|---|---|---|---|")
    for dtype_name, name, seconds, tps, mfu, peak, _ in rows:
        if tps is None:
            print(f"| {dtype_name} | **{name}** | **{seconds:.3f}** | | | |")
        else:
            print(f"| {dtype_name} | {name} | {seconds:.3f} | {tps:.0f} | {100 * mfu:.1f}% | {peak / 1e9:.0f} |")


if __name__ == "__main__":
    main()
