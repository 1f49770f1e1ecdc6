"""Single-rank training step: plait's Llama vs transformers.LlamaForCausalLM, side by side.

Same dims, same weights (copied by name), same batch, same AdamW, same thread count, same
loss code; fp32 and bf16 autocast. Prints step times, their ratio, and MFU: model FLOPs
(6N + attention, see LlamaConfig.flops_per_token) per second over the measured matmul peak
of this machine for that dtype.

    python benchmarks/single_rank.py                      # llama-125m, seq 512 (the recorded run)
    python benchmarks/single_rank.py --compile --dtypes bfloat16   # + both compiled, four alternating
    python benchmarks/single_rank.py --model tiny --steps 2   # a smoke run

``--compile`` adds each model compiled the same way (``plait.train.compiled.compile_blocks``:
every decoder layer's forward through ``torch.compile``) as two more contestants in the same
alternation; their first step compiles and is not timed. ``--device cuda`` runs it on a GPU
(``benchmarks/gpu_check.py`` does).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from plait.models import build_model, get_preset
from plait.train.compiled import compile_blocks
from plait.train.metrics import measure_matmul_peak
from plait.runtime import gemm_context, tune_cpu_allocator
from plait.loss import linear_cross_entropy_sum
from plait.train.optim import build_adamw


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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CONTESTANTS = ("plait", "transformers", "plait compiled", "transformers compiled")


def contestants(config, device: torch.device, names: tuple[str, ...]) -> dict:
    """name -> (loss function, model) for each of ``names`` (of ``CONTESTANTS``): plait and
    transformers with the same weights, "compiled" ones with every decoder layer compiled."""
    runs, state = {}, None
    for name in names:
        if name.startswith("plait"):
            model, loss_fn = build_model(config, seed=0), plait_loss
            state = model.state_dict() if state is None else state  # taken on the CPU, before .to()
        else:
            state = build_model(config, seed=0).state_dict() if state is None else state
            model, loss_fn = hf_model(config, state), transformers_loss
        model = model.to(device)
        if name.endswith("compiled"):
            compile_blocks(model.model.layers)
        runs[name] = (loss_fn, model)
    return runs


def alternation_groups(names: tuple[str, ...], config, batch: int, seq_len: int,
                       free_bytes: float | None) -> list[tuple[str, ...]]:
    """The contestants that alternate together: all of them when their resident states (fp32
    weights and AdamW moments, 12 bytes a parameter each) and one step's fp32 gradients, bf16
    weight copies and activations fit in ``free_bytes`` (None: no limit, the CPU); else eager
    and compiled apart, in two alternations (by this count ``llama-1b``'s four need 90 GB at
    batch 8 x 2048, the GPU check's: they fit an H200, not an H100, where two need 69 GB).

    Activations: the planner's count for plait (bf16 autocast) plus what transformers keeps
    beyond it: a bf16 cast of each norm's output per matmul (q, k, v; gate, up: 3 more a layer
    than plait's shared ones) and fp32 copies of the logits (the logits in fp32, their
    log-softmax and its gradient); a quarter more for what neither counts (allocator rounding,
    cuBLAS workspaces)."""
    if free_bytes is None:
        return [names]
    from plait.planner.memory import layer_activation_bytes
    from plait.planner.workload import Layout, ModelShape

    params = config.num_parameters()
    shape = ModelShape.from_llama_config(config, seq_len)
    tokens = batch * seq_len
    activations = (config.num_hidden_layers * layer_activation_bytes(shape, Layout(micro_batch=batch, dtype="bfloat16"))
                   + config.num_hidden_layers * 3 * 2 * tokens * config.hidden_size
                   + 3 * 4 * tokens * config.vocab_size)

    def fits(group: tuple[str, ...]) -> bool:
        return len(group) * 12 * params + (4 + 2) * params + 1.25 * activations <= free_bytes

    if fits(names):
        return [names]
    groups = [tuple(n for n in names if not n.endswith("compiled")), tuple(n for n in names if n.endswith("compiled"))]
    return [group for group in groups if group]


def time_interleaved(runs: dict, inputs, targets, dtype, steps, device: torch.device = torch.device("cpu")
                     ) -> dict[str, tuple[float, float]]:
    """Median step time of each (loss function, model), steps alternating between the models.

    Alternating spreads the machine's drift (other load, heap warm-up) evenly over both. Step 0
    warms caches and allocators up (and compiles the compiled contestants) and is not timed.
    """
    optimizers = {name: optimizer_for(model) for name, (_, model) in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    losses: dict[str, float] = {}
    for step in range(steps + 1):
        for name, (loss_fn, model) in runs.items():
            sync(device)
            start = time.perf_counter()
            loss = training_step(loss_fn, model, optimizers[name], inputs, targets, dtype, device)
            sync(device)
            if step:
                times[name].append(time.perf_counter() - start)
            losses[name] = float(loss)
    return {name: (statistics.median(times[name]), losses[name]) for name in runs}


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    return build_adamw(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)


def training_step(loss_fn, model, optimizer, inputs, targets, dtype: torch.dtype, device: torch.device
                  ) -> torch.Tensor:
    """One step of a contestant: forward and loss (bf16 autocast when ``dtype`` is bf16),
    backward, AdamW; returns the loss, detached (not synchronised)."""
    with gemm_context(device, dtype):  # both models: plait's trainer's products
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = loss_fn(model, inputs, targets)
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


RATIOS = [("plait", "transformers"), ("plait compiled", "plait"), ("plait compiled", "transformers compiled"),
          ("transformers compiled", "transformers")]


def compare(config, device: torch.device, dtype: torch.dtype, batch: int, seq_len: int, steps: int,
            compiled: bool, peak: float) -> list[dict]:
    """One row per contestant (step time, tokens/s, MFU over ``peak``) and one per ratio. A ratio
    of two contestants that could not alternate together (``alternation_groups``, or a group
    that ran out of memory and was halved) says so."""
    tokens = batch * seq_len
    flops = config.flops_per_token(seq_len) * tokens
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1), generator=generator).to(device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    names = CONTESTANTS if compiled else CONTESTANTS[:2]
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    pending = alternation_groups(names, config, batch, seq_len, free)
    groups: list[tuple[str, ...]] = []  # as timed
    results: dict[str, tuple[float, float]] = {}
    while pending:
        group = pending.pop(0)
        try:
            results.update(time_interleaved(contestants(config, device, group), inputs, targets, dtype, steps, device))
            groups.append(group)
        except torch.OutOfMemoryError:
            # the count above was short: halve the group rather than lose the model's rows (the
            # exception is let go first, so that the models its frames hold are freed)
            if len(group) == 1:
                raise
            pending[:0] = [group[:len(group) // 2], group[len(group) // 2:]]
        if device.type == "cuda":
            torch.cuda.empty_cache()
    group_of = {name: index for index, group in enumerate(groups) for name in group}
    rows = [{"implementation": name, "step_s": seconds, "tokens_per_s": tokens / seconds,
             "mfu": flops / seconds / peak, "loss": loss} for name, (seconds, loss) in results.items()]
    for numerator, denominator in RATIOS:
        if numerator in results and denominator in results:
            row = {"implementation": f"ratio {numerator} / {denominator}",
                   "ratio": results[numerator][0] / results[denominator][0]}
            if group_of[numerator] != group_of[denominator]:
                row["alternated"] = False  # timed in separate alternations (memory): drift not evened out
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-125m")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--compile", action="store_true", help="add both models compiled block by block")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # plait's trainer tunes glibc malloc at start; apply it process-wide so both models get it.
    allocator = tune_cpu_allocator() if device.type == "cpu" else False
    config = get_preset(args.model)
    print(f"model {args.model} ({config.num_parameters() / 1e6:.1f}M), batch {args.batch} x seq {args.seq_len}, "
          f"{args.threads} threads, torch {torch.__version__}, malloc tuned: {allocator}, device {device}")
    print("\n| dtype | implementation | step time (s) | tokens/s | MFU | matmul peak (GFLOP/s) |")
    print("|---|---|---|---|---|---|")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        with gemm_context(device, dtype):  # the products the models run (widened where bf16 is emulated)
            peak = measure_matmul_peak(dtype, device, seconds=2.0, size=2048 if device.type == "cpu" else 8192)
        for row in compare(config, device, dtype, args.batch, args.seq_len, args.steps, args.compile, peak):
            if "ratio" in row:
                print(f"| {dtype_name} | **{row['implementation']}** | **{row['ratio']:.3f}** | | | |")
            else:
                print(f"| {dtype_name} | {row['implementation']} | {row['step_s']:.3f} | {row['tokens_per_s']:.0f} | "
                      f"{100 * row['mfu']:.1f}% | {peak / 1e9:.0f} |")


if __name__ == "__main__":
    main()
