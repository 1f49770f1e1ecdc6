"""The planner's commands: ``plait plan``, ``plait simulate``, ``plait calibrate``."""
from __future__ import annotations

import argparse
import json
import sys

from plait.errors import PlaitError
from plait.planner.hardware import PROFILES, load_profile
from plait.planner.simulator import Prediction, predict
from plait.planner.workload import ARCHS, RECOMPUTE, SCHEDULES, Layout, ModelShape

GPU_HELP = f"hardware profile: {', '.join(PROFILES)}, cpu (this machine, after `plait calibrate`) or a profile JSON"


class PlannerInputError(PlaitError):
    """Bad planner input; one line."""


def _add_model_flags(parser: argparse.ArgumentParser, shape_flags: bool) -> None:
    parser.add_argument("--model", help="a model preset (see `plait train --help`) or a Hugging Face "
                                         "config.json / model directory" + (
                                             "; or give the shape flags below" if shape_flags else ""))
    parser.add_argument("--seq-len", type=int, required=True, help="tokens per sequence")
    parser.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    parser.add_argument("--gpu", default="h100-80gb", help=f"{GPU_HELP} (default: h100-80gb)")
    parser.add_argument("--gpus-per-node", type=int, default=None,
                        help="devices per node: tp groups stay inside one (default: the profile's, 8 for GPUs)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="compute dtype (default: bfloat16); float16 prices the papers' fp16 runs, "
                             "plait itself trains bfloat16 or float32 (IEEE fp32 on GPUs, not TF32)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    if shape_flags:
        shape = parser.add_argument_group("model shape (instead of --model)")
        shape.add_argument("--arch", choices=ARCHS, default="llama",
                           help="llama: SwiGLU, RoPE, GQA, flash attention (plait's model); gpt: 4h GELU MLP, "
                                "learned positions, no GQA, materialised attention (Megatron-LM 2021)")
        shape.add_argument("--hidden", type=int, help="hidden size")
        shape.add_argument("--layers", type=int, help="transformer layers")
        shape.add_argument("--heads", type=int, help="attention heads")
        shape.add_argument("--kv-heads", type=int, help="key/value heads (llama; default: --heads)")
        shape.add_argument("--ffn-hidden", type=int, help="MLP width (default: 4h for gpt, Llama's 8h/3 rounded up "
                                                          "to 256 for llama)")
        shape.add_argument("--vocab", type=int, help="vocabulary size")
        shape.add_argument("--tied", action="store_true", help="llama: tie the head to the embedding")


def model_shape(args: argparse.Namespace) -> ModelShape:
    if args.seq_len < 1 or args.global_batch < 1:
        raise PlannerInputError("--seq-len and --global-batch must be >= 1")
    if getattr(args, "model", None):
        from plait.checkpoint.hf_config import is_hf_directory, load_hf_config
        from plait.models import PRESETS, get_preset

        path = args.model
        if path.endswith("config.json"):
            path = path[: -len("config.json")] or "."
        if args.model in PRESETS:
            config = get_preset(args.model)
        elif is_hf_directory(path) or _has_config(path):
            config = load_hf_config(path)
        else:
            raise PlannerInputError(f"--model {args.model!r} is neither a preset ({', '.join(PRESETS)}) "
                                    "nor a Hugging Face config")
        return ModelShape.from_llama_config(config, args.seq_len)
    missing = [flag for flag in ("hidden", "layers", "heads", "vocab") if getattr(args, flag, None) is None]
    if missing:
        raise PlannerInputError("give --model, or the shape: missing " + ", ".join(f"--{m}" for m in missing))
    if args.arch == "gpt":
        if args.kv_heads not in (None, args.heads):
            raise PlannerInputError("--arch gpt has no grouped-query attention: drop --kv-heads")
        shape = ModelShape.gpt(args.hidden, args.layers, args.heads, args.vocab, args.seq_len)
        return shape if args.ffn_hidden is None else ModelShape(**{**shape.__dict__, "ffn_hidden": args.ffn_hidden})
    ffn = args.ffn_hidden or 256 * -(-int(8 * args.hidden / 3) // 256)
    return ModelShape("llama", args.hidden, args.layers, args.heads, args.kv_heads or args.heads, ffn, args.vocab,
                      args.seq_len, args.tied)


def _has_config(path: str) -> bool:
    import os
    return os.path.isfile(os.path.join(path, "config.json"))


def add_commands(commands) -> None:
    plan = commands.add_parser(
        "plan", help="search layouts for a job and predict memory, step time and MFU",
        description="Search dp x pp x cp x tp (and cp's mode), ZeRO level, sequence parallelism, micro-batch size and count, pipeline "
                    "schedule and activation recomputation for a model on N devices; print the fastest layouts "
                    "that fit in memory, and why the others were rejected. Predictions come from plait's cost "
                    "model (docs/planner.md); nothing runs on a device.")
    _add_model_flags(plan, shape_flags=True)
    plan.add_argument("--gpus", type=int, required=True, help="devices in the job")
    plan.add_argument("--top", type=int, default=5, help="layouts to show (default: 5)")
    plan.add_argument("--workers", type=int, default=None,
                      help="processes that price the layouts (the answer does not depend on it; default: this "
                           "machine's usable cores, at most 16)")

    simulate = commands.add_parser(
        "simulate", help="predict one layout's memory, step time, throughput and MFU",
        description="Predict one layout, every knob explicit: memory per device, step time, tokens/s and TFLOP/s "
                    "per device, MFU. tflops_per_gpu counts executed FLOPs as Megatron-LM reports them "
                    "(recomputation included; for --arch gpt exactly Narayanan et al.'s Eq. 3); mfu uses model "
                    "FLOPs without recomputation.")
    _add_model_flags(simulate, shape_flags=True)
    simulate.add_argument("--dp", type=int, default=1, help="data-parallel size (default: 1)")
    simulate.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default: 1)")
    simulate.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default: 1)")
    simulate.add_argument("--cp", type=int, default=1, help="context-parallel size (default: 1)")
    simulate.add_argument("--dp-shard", type=int, default=None,
                          help="with --zero: hybrid sharding over groups of N dp ranks (default: all dp ranks)")
    simulate.add_argument("--cp-mode", default="ring", choices=("ring", "alltoall"),
                          help="context parallelism: ring or alltoall (default: ring)")
    simulate.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (default: 1)")
    simulate.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3), help="ZeRO level (default: 0)")
    simulate.add_argument("--schedule", default="1f1b", choices=SCHEDULES, help="pipeline schedule (default: 1f1b)")
    simulate.add_argument("--virtual-stages", type=int, default=1, help="chunks per pipeline rank (interleaved)")
    simulate.add_argument("--recompute", default="none", choices=RECOMPUTE,
                          help="activation recomputation of every block: none, selective (keep the matmul "
                               "outputs) or full (keep the block's input) (default: none)")
    simulate.add_argument("--sequence-parallel", action="store_true", help="with --tp: norms on sequence shards")
    simulate.add_argument("--loss-parallel", action=argparse.BooleanOptionalAction, default=True,
                          help="with --tp: vocabulary-sharded cross-entropy (default: on)")

    calibrate = commands.add_parser(
        "calibrate", help="measure this machine into the 'cpu' hardware profile",
        description="Measure matmul and attention rates per dtype (one thread), memory bandwidth, the cost of "
                    "one eager op, and plait's gloo collectives on two processes; write the profile that "
                    "`--gpu cpu` reads. About half a minute.")
    calibrate.add_argument("--output", help="profile file (default: $PLAIT_CACHE/hardware/cpu.json, "
                                            "~/.cache/plait/hardware/cpu.json)")
    calibrate.add_argument("--seconds", type=float, default=1.0, help="seconds per compute measurement (default: 1)")


def _format_prediction(p: Prediction) -> str:
    b = p.memory_breakdown
    lines = [
        f"layout          {p.layout.describe()}  ({p.layout.world_size} devices)",
        f"memory per GPU  {p.memory_bytes_per_gpu / 1e9:.2f} GB ({'fits' if p.fits else 'DOES NOT FIT'}): "
        + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in b.items() if k != "total"),
        f"construction    {p.construction_bytes_per_gpu / 1e9:.2f} GB per GPU (own pieces + one full parameter)",
        f"step time       {p.step_time_s:.4g} s (pipeline bubble {100 * p.bubble_fraction:.1f}%)",
        f"tokens/s/GPU    {p.tokens_per_s_per_gpu:,.1f}",
        f"TFLOP/s/GPU     {p.tflops_per_gpu:.4g} executed (recompute counted), {p.model_tflops_per_gpu:.4g} model",
        f"MFU             {100 * p.mfu:.1f}%",
    ]
    return "\n".join(lines)


def _table(predictions: list[Prediction]) -> str:
    header = f"{'#':>2}  {'layout':<48} {'mem GB':>7} {'step s':>9} {'tok/s/GPU':>10} {'TFLOP/s':>8} {'MFU':>6}"
    rows = [header, "-" * len(header)]
    for i, p in enumerate(predictions, 1):
        rows.append(f"{i:>2}  {p.layout.describe():<48} {p.memory_bytes_per_gpu / 1e9:>7.1f} {p.step_time_s:>9.4g} "
                    f"{p.tokens_per_s_per_gpu:>10,.0f} {p.tflops_per_gpu:>8.1f} {100 * p.mfu:>5.1f}%")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    try:
        if args.command == "calibrate":
            return _calibrate(args)
        shape = model_shape(args)
        hw = load_profile(args.gpu)
        if args.gpus_per_node:
            import dataclasses
            if args.gpus_per_node < 1:
                raise PlannerInputError("--gpus-per-node must be >= 1")
            hw = dataclasses.replace(hw, devices_per_node=args.gpus_per_node)
        if args.command == "simulate":
            return _simulate(args, shape, hw)
        return _plan(args, shape, hw)
    except PlaitError as error:
        print(f"plait: error: {error}", file=sys.stderr)
        return 2


def _simulate(args, shape: ModelShape, hw) -> int:
    layout = Layout(dp=args.dp, tp=args.tp, pp=args.pp, micro_batch=args.micro_batch, global_batch=args.global_batch,
                    zero=args.zero, sequence_parallel=args.sequence_parallel,
                    loss_parallel=args.loss_parallel and args.tp > 1, recompute=args.recompute,
                    schedule=args.schedule, virtual_stages=args.virtual_stages, dtype=args.dtype, cp=args.cp,
                    cp_mode=args.cp_mode, dp_shard=args.dp_shard)
    prediction = predict(shape, layout, hw)
    if args.json:
        print(json.dumps({"model": shape.__dict__, "hardware": hw.name, **prediction.to_dict()}, indent=2))
    else:
        print(f"model           {shape.arch}, {shape.parameters() / 1e9:.2f}B parameters, seq {shape.seq_len}, "
              f"global batch {args.global_batch} on {hw.name}")
        print(_format_prediction(prediction))
    return 0


def _plan(args, shape: ModelShape, hw) -> int:
    from plait.planner.search import default_workers, plan

    if args.gpus < 1:
        raise PlannerInputError("--gpus must be >= 1")
    if args.workers is not None and args.workers < 1:
        raise PlannerInputError(f"--workers must be >= 1, got {args.workers}")
    result = plan(shape, hw, args.gpus, args.global_batch, hw.devices_per_node, args.dtype, args.top,
                  progress=not args.json and sys.stderr.isatty(), workers=args.workers or default_workers())
    if args.json:
        print(json.dumps({"model": shape.__dict__, "hardware": hw.name, "gpus": args.gpus,
                          "considered": result.considered,
                          "best": [p.to_dict() for p in result.best],
                          "rejected": [{"kind": r, "count": c, "example": result.examples[r]}
                                       for r, c in result.rejections.most_common()]}, indent=2))
        return 0 if result.best else 1
    print(f"{shape.arch} model, {shape.parameters() / 1e9:.2f}B parameters, seq {shape.seq_len}, global batch "
          f"{args.global_batch}, on {args.gpus} x {hw.name} ({hw.devices_per_node} per node); "
          f"{result.considered} layouts considered")
    if result.best:
        print(_table(result.best))
    else:
        print("no layout fits: every candidate was rejected")
    print("\nrejected:")
    for reason, count in result.rejections.most_common():
        print(f"  {count:>6} x {result.examples[reason]}")
    return 0 if result.best else 1


def _calibrate(args) -> int:
    from plait.planner.calibrate import calibrate, write_profile

    profile = calibrate(seconds=args.seconds)
    path = write_profile(profile, args.output)
    print(f"plait: wrote {path}")
    for dtype, rate in profile.measured_flops.items():
        print(f"  matmul {dtype}: {rate / 1e9:.1f} GFLOP/s per core; attention {profile.measured_attention[dtype] / 1e9:.1f}")
    print("  kernel-mix efficiency (a real block vs isolated kernels): "
          + ", ".join(f"{dtype} {value:.2f}" for dtype, value in profile.kernel_mix_efficiency.items()))
    print(f"  memory bandwidth {profile.memory_bandwidth / 1e9:.1f} GB/s per core; "
          f"one eager op {profile.kernel_latency_s * 1e6:.1f} us; {profile.cores} cores")
    for op, fit in profile.collectives.items():
        print(f"  gloo {op}: latency {fit.latency_s * 1e6:.0f} us, bandwidth {fit.bandwidth / 1e9:.2f} GB/s")
    return 0
