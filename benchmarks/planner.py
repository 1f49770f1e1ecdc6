"""The planner against reality: published results and this machine.

    python benchmarks/planner.py                  # both parts (the recorded run)
    python benchmarks/planner.py --part paper     # Narayanan et al. 2021, Table 1 (no processes)
    python benchmarks/planner.py --part machine   # predictions vs measured runs here (~6 min)

paper: `plait simulate`'s prediction of each row of Table 1 of "Efficient Large-Scale Language
Model Training on GPU Clusters Using Megatron-LM" (GPT, A100-80GB, full recomputation,
TFLOP/s per GPU on the paper's Eq. 3 basis) beside the published figure.

machine: runs `plait calibrate` (unless --profile names an existing one), then for each layout
of a small Llama model predicts step time and per-rank peak memory with the ``cpu`` profile
and measures both with plait's Trainer on spawned gloo workers
(``benchmarks/planner_measure.py``), and prints predicted / measured. Step time is measured as
`plait train` runs (its glibc settings); peak memory as live tensors above the process's
baseline (a second pass with a 128 KiB mmap threshold, so freed tensors leave at once).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from plait.planner import Layout, ModelShape, load_profile, predict  # noqa: E402

TABLE_1 = [  # billions, heads, hidden, layers, tp, pp, GPUs, batch, achieved TFLOP/s per GPU
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137), (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142), (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138), (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148), (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163), (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
]


def megatron_layout(layers: int, tp: int, pp: int, gpus: int, batch: int) -> Layout:
    """The paper's setup: full recomputation, fp16, micro-batch 1, interleaved pipelines with the
    fewest chunks (>= 2) dividing each stage's layers (the tests use the same rule)."""
    chunks = 1
    if pp > 1:
        per_stage = layers // pp
        chunks = next((v for v in range(2, per_stage + 1) if per_stage % v == 0), 1)
    return Layout(dp=gpus // (tp * pp), tp=tp, pp=pp, micro_batch=1, global_batch=batch, recompute="full",
                  schedule="interleaved" if chunks > 1 else "1f1b", virtual_stages=chunks, dtype="float16")


def paper_part() -> None:
    hw = load_profile("a100-80gb")
    print("Narayanan et al. 2021, Table 1, A100-80GB; TFLOP/s per GPU on Eq. 3's basis\n")
    print("| model | tp | pp | GPUs | batch | schedule | predicted | published | ratio | memory GB | bubble |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for billions, heads, hidden, layers, tp, pp, gpus, batch, achieved in TABLE_1:
        layout = megatron_layout(layers, tp, pp, gpus, batch)
        p = predict(ModelShape.gpt(hidden, layers, heads, 51200, 2048), layout, hw)
        ratio = p.tflops_per_gpu / achieved
        worst = max(worst, abs(ratio - 1))
        schedule = f"interleaved v={layout.virtual_stages}" if layout.virtual_stages > 1 else "-"
        print(f"| {billions}B | {tp} | {pp} | {gpus} | {batch} | {schedule} | {p.tflops_per_gpu:.1f} | {achieved} | "
              f"{ratio:.3f} | {p.memory_bytes_per_gpu / 1e9:.1f} | {100 * p.bubble_fraction:.1f}% |")
    print(f"\nlargest deviation: {100 * worst:.1f}% (target: 15%)")


def machine_part(profile_path: str | None) -> None:
    from planner_measure import DEFAULT_LAYOUTS, GLOBAL_BATCH, MODEL, SEQ_LEN, measure_layouts

    if profile_path is None:
        from plait.planner.calibrate import calibrate, write_profile
        profile_path = str(write_profile(calibrate()))
        print(f"calibrated: {profile_path}")
    hw = load_profile(profile_path)
    shape = ModelShape.from_llama_config(MODEL, SEQ_LEN)
    # time as `plait train` runs (its allocator settings); memory as live tensors (every large
    # tensor its own mapping, returned at once), the CPU analogue of max_memory_allocated
    timing = measure_layouts(MODEL, DEFAULT_LAYOUTS, seq_len=SEQ_LEN, global_batch=GLOBAL_BATCH, allocator="plait")
    memory = measure_layouts(MODEL, DEFAULT_LAYOUTS, seq_len=SEQ_LEN, global_batch=GLOBAL_BATCH, allocator="live",
                             warmup_steps=1, timed_steps=2)
    print(f"\nmodel: {shape.parameters() / 1e6:.1f}M parameters, seq {SEQ_LEN}, global batch {GLOBAL_BATCH}, fp32 "
          f"unless noted; profile: {hw.source}\n")
    print("| layout | ranks | predicted step s | measured step s | time ratio | predicted peak MB | "
          "measured peak MB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    worst_time = worst_memory = 0.0
    for spec, timed, sized in zip(DEFAULT_LAYOUTS, timing, memory):
        layout = Layout(dp=spec.dp, tp=spec.tp, pp=spec.pp, micro_batch=spec.micro_batch, global_batch=GLOBAL_BATCH,
                        zero=spec.zero, sequence_parallel=spec.sequence_parallel,
                        loss_parallel=spec.loss_parallel, recompute="full" if spec.activation_checkpointing else "none",
                        schedule=spec.schedule, virtual_stages=spec.virtual_stages, dtype=spec.dtype)
        if timed["error"] or sized["error"]:
            print(f"| {spec.name} | {layout.world_size} | failed: {timed['error'] or sized['error']} |")
            continue
        p = predict(shape, layout, hw)
        time_ratio = p.step_time_s / timed["step_time_s"]
        memory_ratio = p.memory_bytes_per_gpu / sized["peak_memory_bytes"]
        worst_time = max(worst_time, abs(time_ratio - 1))
        worst_memory = max(worst_memory, abs(memory_ratio - 1))
        print(f"| {spec.name} | {layout.world_size} | {p.step_time_s:.3f} | {timed['step_time_s']:.3f} | "
              f"{time_ratio:.2f} | {p.memory_bytes_per_gpu / 1e6:.0f} | {sized['peak_memory_bytes'] / 1e6:.0f} | "
              f"{memory_ratio:.2f} |")
    print(f"\nlargest deviation: time {100 * worst_time:.1f}% (target 25%), memory {100 * worst_memory:.1f}% "
          "(target 15%); MB = 1e6 bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("paper", "machine", "all"), default="all")
    parser.add_argument("--profile", help="an existing cpu profile JSON (default: calibrate now)")
    args = parser.parse_args()
    if args.part in ("paper", "all"):
        paper_part()
    if args.part in ("machine", "all"):
        machine_part(args.profile)


if __name__ == "__main__":
    main()
