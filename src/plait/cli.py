"""The ``plait`` command line.

``plait train`` runs in one of three ways:
- one process (``--nproc 1``, the default);
- ``--nproc N``: plait launches N local workers itself through PyTorch's elastic launcher
  (the same rendezvous as ``torchrun --standalone``), each re-running this command;
- under ``torchrun`` (any number of hosts): the launcher's environment says who is who and
  ``--nproc`` is ignored.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from plait.device import DeviceRequest
from plait.errors import PlaitError
from plait.launch import launch_local_workers, under_launcher
from plait.layout import CP_MODES, Recompute
from plait.mesh import ParallelDims
from plait.models import PRESETS, get_preset
from plait.pipeline.schedules import SCHEDULES
from plait.train.config import DTYPES, OnNonFinite, TrainConfig, TrainConfigError, load_toml
from plait.run_dir import agreed_run_dir, default_run_dir, make_run_dir


# (flag, TrainConfig field, type, help). Defaults come from TrainConfig and are shown in --help.
TRAIN_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--model", "model", str, f"model preset ({', '.join(PRESETS)}) or a Hugging Face Llama directory "
                              "(config.json + safetensors) to start from"),
    ("--data", "data", str, "'stdlib' (this Python's standard library sources), a text, .jsonl or .parquet file, "
                            "a directory of them, a .bin of uint16 token ids (.u32.bin: uint32; see plait "
                            "tokenize), or a weighted mixture of these, e.g. 'web.bin:0.7,code.jsonl:0.3' (each "
                            "sequence drawn from a source in proportion to its weight)"),
    ("--field", "field", str, "the text field of .jsonl records and the text column of .parquet files"),
    ("--tokenizer", "tokenizer", str, "how text data becomes token ids: 'bpe' (a byte-level BPE trained on the "
                                      "corpus and cached), 'byte', or a Hugging Face tokenizer (a tokenizer.json "
                                      "or a directory holding one; default: --model DIR's own, else bpe)"),
    ("--vocab-size", "vocab_size", int, "BPE vocabulary size"),
    ("--nproc", "nproc", int, "local worker processes to launch (ignored under torchrun)"),
    ("--device", "device", str, "where ranks run: auto (CUDA when a GPU is visible, else the CPU), cuda (NCCL, "
                                "cuda:LOCAL_RANK, one GPU per local rank) or cpu (gloo, also on a GPU host)"),
    ("--dp", "dp", int, "data-parallel size (default: world size / (pp x cp x tp))"),
    ("--tp", "tp", int, "tensor-parallel size"),
    ("--cp", "cp", int, "context-parallel size: each sequence sharded over cp ranks through the whole block "
                        "(two load-balanced chunks per rank; --seq-len divisible by 2 x cp)"),
    ("--cp-mode", "cp_mode", str, "ring: keys and values passed around the cp ranks, overlapped with attention; "
                                  "alltoall: sequence shard traded for a head shard around attention (DeepSpeed-"
                                  "Ulysses; heads per tp rank divisible by cp)"),
    ("--pp", "pp", int, "pipeline-parallel size"),
    ("--zero", "zero", int, "ZeRO level over the data-parallel ranks: 0 replicated, 1 optimizer state "
                            "sharded, 2 + gradients, 3 + parameters (FSDP-style, per block)"),
    ("--dp-shard", "dp_shard", int, "with --zero: hybrid sharding (HSDP), ZeRO within groups of N consecutive "
                                    "data-parallel ranks (e.g. one host) and an all-reduce of the shards across "
                                    "the dp / N groups (default: all dp ranks, one group)"),
    ("--schedule", "schedule", str, "pipeline schedule: gpipe, 1f1b, interleaved (needs --virtual-stages >= 2), "
                                    "zb1p (zero-bubble ZB-H1: backward split into input and weight gradients, "
                                    "the weight half deferred into the bubbles), zbv (ZB-V: the "
                                    "same split over two chunks per rank in a V; --virtual-stages 2)"),
    ("--microbatches", "microbatches", int, "micro-batches per step and data-parallel rank (instead of "
                                            "--micro-batch); a pipeline needs at least --pp"),
    ("--virtual-stages", "virtual_stages", int, "model chunks per pipeline rank (interleaved; 2 for zbv)"),
    ("--pipeline-split", "pipeline_split", str, "blocks per pipeline chunk, e.g. 3,5 (default: balanced by FLOPs)"),
    ("--label-smoothing", "label_smoothing", float, "label smoothing of the cross-entropy"),
    ("--steps", "steps", int, "optimizer steps"),
    ("--global-batch", "global_batch", int, "sequences per optimizer step, summed over data-parallel ranks"),
    ("--micro-batch", "micro_batch", int, "sequences per forward/backward (default: the whole per-rank batch); "
                                          "smaller values accumulate gradients"),
    ("--seq-len", "seq_len", int, "tokens per sequence"),
    ("--lr", "lr", float, "peak learning rate"),
    ("--min-lr-ratio", "min_lr_ratio", float, "final learning rate as a fraction of --lr (cosine decay)"),
    ("--warmup-steps", "warmup_steps", int, "linear warmup steps"),
    ("--weight-decay", "weight_decay", float, "AdamW weight decay (matrices only)"),
    ("--grad-clip", "grad_clip", float, "clip the global gradient norm to this (0: off)"),
    ("--on-nonfinite", "on_nonfinite", str, "a step whose loss or gradient norm is NaN or infinite never updates "
                                            "the weights; stop: exit non-zero naming it (the last good checkpoint "
                                            "stays newest), skip: drop its update, count it, go on"),
    ("--seed", "seed", int, "seed of initialisation and data order"),
    ("--dtype", "dtype", str, "compute dtype: float32, or bfloat16 autocast with fp32 master weights"),
    ("--eval-every", "eval_every", int, "validation loss every N steps (0: off)"),
    ("--eval-batches", "eval_batches", int, "validation set size in global batches: the first N x "
                                            "--global-batch windows of the held-out split, the same set "
                                            "under every layout"),
    ("--out", "out", str, "run directory (default: runs/<model>-<time>); re-running with the same --out "
                          "resumes from its newest complete checkpoint"),
    ("--checkpoint-every", "checkpoint_every", int, "write a sharded checkpoint every N steps and at the end (0: never)"),
    ("--keep-checkpoints", "keep_checkpoints", int, "complete checkpoints to keep"),
    ("--max-restarts", "max_restarts", int, "with --nproc: when a worker dies, restart all workers up to this "
                                            "many times; they resume from the newest checkpoint (torchrun: "
                                            "--max-restarts)"),
    ("--sample", "sample", str, "at the end, print the trained model's greedy continuation of this prompt "
                                "(48 tokens; one process; else use plait generate --model OUT)"),
    ("--peak-tflops", "peak_tflops", float, "per-rank peak TFLOP/s for MFU (default: measured matmul rate)"),
    ("--bucket-mb", "bucket_mb", float, "data-parallel gradient bucket size in MiB"),
    ("--timeout", "timeout_s", float, "seconds a collective may wait before the run fails"),
    ("--hang-timeout", "hang_timeout_s", float, "seconds a rank may wait in a collective with no progress before "
                                                "the job ends with a summary of where each rank is (at most 0.9 x --timeout; 0: off)"),
    ("--threads", "threads", int, "torch threads per rank (default: cores / local ranks)"),
]
TRAIN_SWITCHES: list[tuple[str, str, str]] = [
    ("sequence-parallel", "sequence_parallel", "with --tp: norms and residuals on sequence shards (activation memory / tp)"),
    ("loss-parallel", "loss_parallel", "with --tp: cross-entropy on vocabulary-sharded logits, never gathered"),
    ("timeline", "timeline", "with --pp: write the last step's measured per-rank timeline "
                             "(<out>/timeline.json for Perfetto / chrome://tracing, and timeline.png)"),
    ("compile", "compile", "torch.compile each decoder block (after the parallel plans; collectives stay eager); "
                           "the first step compiles, which the run reports once"),
    ("resume", "resume", "continue from the newest complete checkpoint in --out"),
    ("progress", "progress", "progress bar on the console"),
    ("tensorboard", "tensorboard", "TensorBoard event files in <out>/tensorboard"),
    ("plot", "plot", "write <out>/loss.png at the end"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plait", description="Train Transformer language models with composable parallelism.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    defaults = TrainConfig()
    train = commands.add_parser(
        "train", help="train a model",
        description="Train a Llama-family model. With no flags: the 'small' preset on this Python's standard "
                    "library, a few minutes on a laptop CPU. Precedence: flags > --config file > defaults.",
        argument_default=argparse.SUPPRESS)
    train.add_argument("--config", help="TOML file of options (keys as the long flags, '-' or '_')")
    choices = {"dtype": DTYPES, "zero": (0, 1, 2, 3), "on_nonfinite": [mode.value for mode in OnNonFinite],
               "schedule": SCHEDULES, "device": [request.value for request in DeviceRequest],
               "cp_mode": CP_MODES}
    for flag, field, kind, text in TRAIN_FLAGS:
        shown = text if "default" in text else f"{text} (default: {getattr(defaults, field)})"
        train.add_argument(flag, dest=field, type=kind, choices=choices.get(field), help=shown)
    for flag, field, text in TRAIN_SWITCHES:
        train.add_argument(f"--{flag}", dest=field, action=argparse.BooleanOptionalAction,
                           help=f"{text} (default: {getattr(defaults, field)})")
    recompute = train.add_mutually_exclusive_group()
    recompute.add_argument("--activation-checkpointing", dest="activation_checkpointing", nargs="?", const="full",
                           choices=[mode.value for mode in Recompute], metavar="{none,selective,full}",
                           help="recompute each block's activations in backward: full (keep the block's input; "
                                "the bare flag), selective (keep the matmul outputs, recompute attention, norms "
                                f"and elementwise ops) or none (default: {defaults.activation_checkpointing})")
    recompute.add_argument("--no-activation-checkpointing", dest="activation_checkpointing", action="store_const",
                           const="none", help="same as --activation-checkpointing none")
    export = commands.add_parser(
        "export", help="write a checkpoint as a Hugging Face Llama directory",
        description="Export a plait checkpoint (written under any layout) as config.json + model.safetensors "
                    "(fp32), loadable by transformers.LlamaForCausalLM.from_pretrained. A run that started from "
                    "a Hugging Face directory also gets back its token ids, generation_config.json, chat "
                    "template and tokenizer files.")
    export.add_argument("--checkpoint", required=True,
                        help="a checkpoint directory (runs/X/checkpoints/step-00000300) or a run directory (its newest)")
    export.add_argument("--hf", required=True, help="output directory")
    export.add_argument("--config-form", choices=("auto", "4", "5"), default="auto",
                        help="config.json for transformers 4.4x (rope_theta, rope_scaling) or 5.x "
                             "(rope_parameters); auto: the installed transformers, 5 without one (default: auto)")
    schedule = commands.add_parser(
        "schedule", help="draw a pipeline schedule and print its bubble",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Simulate a pipeline schedule from the same action lists the executor runs, draw it "
                    "(rank rows, time columns, forward/backward colours, bubbles white) and print the "
                    "analytic and simulated bubble fractions.")
    schedule.add_argument("--pp", type=int, default=4, help="pipeline ranks")
    schedule.add_argument("--microbatches", type=int, default=8, help="micro-batches per step")
    schedule.add_argument("--schedule", default="1f1b", choices=SCHEDULES)
    schedule.add_argument("--virtual-stages", type=int, default=1, help="chunks per rank (interleaved; 2 for zbv)")
    schedule.add_argument("--backward-cost", type=float, default=2.0, help="backward time / forward time")
    schedule.add_argument("-o", "--output", default="schedule.png", help="PNG to write")
    commands.add_parser("compare", add_help=False, help="run one job under two layouts and report where they "
                                                        "part (plait compare --help)")
    from plait.model_cli import add_commands as add_model_commands
    from plait.planner.cli import add_commands
    add_model_commands(commands)
    add_commands(commands)
    return parser


def schedule_command(args: argparse.Namespace) -> int:
    from plait.pipeline import ScheduleError, analytic_bubble, bubble_fraction, build_schedule, peak_in_flight, simulate
    from plait.pipeline.diagram import draw_slots
    from plait.pipeline.ordering import check_rendezvous, receive_posts
    from plait.pipeline.schedules import analytic_bubble_formula, splits_backward

    folder = Path(args.output).parent
    if not folder.is_dir():
        print(f"plait: error: -o {args.output}: the folder {folder} does not exist", file=sys.stderr)
        return 2
    try:
        plans = build_schedule(args.schedule, args.pp, args.microbatches, args.virtual_stages)
        # interleaved and ZB-V chunks are 1/v of a stage: keep one time unit = one forward of a whole stage
        v = args.virtual_stages
        backward = args.backward_cost / v
        if splits_backward(args.schedule):  # B (input gradients) and W (weights) share the backward
            slots = simulate(plans, forward_cost=1.0 / v, backward_cost=backward / 2, weight_cost=backward / 2)
        else:
            slots = simulate(plans, forward_cost=1.0 / v, backward_cost=backward)
    except ScheduleError as error:
        print(f"plait: error: {error}", file=sys.stderr)
        return 2
    simulated = bubble_fraction(slots, args.pp)
    analytic = analytic_bubble(args.schedule, args.pp, args.microbatches, args.virtual_stages)
    formula = analytic_bubble_formula(args.schedule, args.pp, args.microbatches, v)
    title = (f"{args.schedule}, pp={args.pp}, m={args.microbatches}" + (f", v={v}" if v > 1 else "")
             + f": bubble {100 * simulated:.1f}% (analytic {formula} = {100 * analytic:.1f}%)")
    draw_slots(slots, args.pp, args.output, title)
    print(f"schedule {args.schedule}: pp={args.pp}, microbatches={args.microbatches}, virtual stages={v}")
    print(f"bubble fraction: analytic {formula} = {analytic:.4f}; simulated {simulated:.4f}")
    size = f" (each 1/{v} of a stage)" if v > 1 else ""
    print(f"peak in-flight micro-batch activations per rank, in chunks{size}: {[peak_in_flight(p) for p in plans]}")
    posts = receive_posts(plans)
    for shared_stream in (False, True):  # raises (a bug, not a user error) if NCCL could hang
        check_rendezvous(plans, posts, shared_stream)
    early = sum(len(receives) for rank in posts for receives in rank.values())
    print(f"NCCL message order: every rank issues its messages in the step's order; {early} receives "
          f"posted before they are waited on")
    print(f"wrote {args.output}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    from plait.checkpoint import latest_checkpoint
    from plait.checkpoint.hf import export_hf
    from plait.checkpoint.hf_config import ConfigForm

    path = args.checkpoint
    if not os.path.exists(os.path.join(path, "COMPLETE")):
        newest = latest_checkpoint(path)
        if newest is None:
            print(f"plait: error: {path} is neither a complete checkpoint nor a run directory with one",
                  file=sys.stderr)
            return 2
        path = str(newest)
    form = ConfigForm.installed() if args.config_form == "auto" else ConfigForm(args.config_form)
    try:
        out = export_hf(path, args.hf, form)
    except PlaitError as error:
        print(f"plait: error: {error}", file=sys.stderr)
        return 2
    files = ", ".join(sorted(os.listdir(out)))
    print(f"plait: exported {path} to {out} for transformers {form.value}.x ({files})")
    return 0


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = vars(args).copy()
    values.pop("command", None)
    config_path = values.pop("config", None)
    flag_fields = {flag[2:].replace("-", "_"): field for flag, field, _, _ in TRAIN_FLAGS}
    merged = load_toml(config_path, flag_fields) if config_path else {}
    merged.update(values)
    try:
        return TrainConfig(**merged)
    except TypeError as error:  # a TOML value of the wrong type reaches the dataclass
        raise TrainConfigError(f"bad option value: {error}") from None


def validate_before_launch(cfg: TrainConfig, world_size: int) -> None:
    """Everything checkable without data or processes, so a bad flag fails in one line, once."""
    from plait.checkpoint.hf_config import is_hf_directory, load_hf_config
    from plait.data.mixture import check_sources_exist
    from plait.device import host_device_plan
    from plait.layout import check_run
    from plait.planner.fit import check_host_memory

    dims = ParallelDims.from_world_size(world_size, dp=cfg.dp, pp=cfg.pp, tp=cfg.tp, cp=cfg.cp, dp_shard=cfg.dp_shard)
    devices = host_device_plan(cfg.device, local_ranks=world_size)  # --nproc ranks, all on this host
    model = load_hf_config(cfg.model) if is_hf_directory(cfg.model) else get_preset(cfg.model)
    check_run(cfg, dims, model)
    if devices.kind == "cpu":
        check_host_memory(cfg, dims, model, local_ranks=world_size)
    cfg.tokenizer_spec()
    check_sources_exist(cfg.data)
    if cfg.out is not None:  # plait compare checks layouts before it names their run directories
        make_run_dir(cfg.out)


def torch_distributed_error() -> tuple[type, ...]:
    import torch.distributed as dist
    return tuple(t for t in (getattr(dist, "DistBackendError", None), getattr(dist, "DistError", None)) if t)


def train_worker(cfg: TrainConfig) -> int:
    """Body of one training process (the only process when nproc == 1)."""
    from plait.mesh import init_distributed, shutdown
    from plait.train.preemption import Preempted
    from plait.train.run import run_training

    ctx = None
    code = 0
    try:
        ctx = init_distributed(cfg.dp, cfg.pp, cfg.tp, cfg.timeout_s, cfg.device, cfg.cp, cfg.dp_shard)
        if cfg.out is None:
            cfg.out = agreed_run_dir(cfg.model, ctx.rank, ctx.world_size)
        run_training(cfg, ctx)
    except PlaitError as error:
        print(f"plait: error: {error}", file=sys.stderr)
        code = 2
    except Preempted as stopped:  # every rank stops at the same step, after the same save
        if ctx is None or ctx.is_logging_rank:
            print(f"plait: {stopped}", file=sys.stderr)
        code = stopped.exit_code
    except KeyboardInterrupt:
        code = 130
    except Exception as error:
        rank = os.environ.get("RANK", "0")
        if ctx is not None and ctx.recorder.hung:  # the hang watchdog reports and ends this process
            time.sleep(60)
        in_flight = ctx.recorder.in_flight() if ctx is not None else []
        if in_flight or isinstance(error, torch_distributed_error()):  # a peer died or timed out: one line
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            where = f" in {in_flight[0].describe()}" if in_flight else ""
            saved = ctx.recorder.write(Path(cfg.out) / "hang") if ctx is not None and cfg.out else None
            record = f"; its last collectives: {saved}" if saved else ""
            print(f"plait: rank {rank}: a collective failed{where} (a peer died or timed out): {first_line}{record}",
                  file=sys.stderr)
        else:  # an unexpected failure: the full traceback helps, prefixed by the rank
            print(f"plait: rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr)
        code = 1
    if ctx is not None and ctx.world_size > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        if code:
            os._exit(code)  # peers stuck in a collective time out on their own
        shutdown(ctx, code)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:  # its own parser: every other flag is a plait train flag
        from plait.compare import compare_main
        return compare_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "schedule":
        return schedule_command(args)
    if args.command == "export":
        return export_command(args)
    if args.command == "tokenize":
        from plait.model_cli import tokenize_command
        return tokenize_command(args)
    if args.command in ("generate", "eval"):
        from plait.model_cli import run as run_model_command
        return run_model_command(args, argv)
    if args.command in ("plan", "simulate", "calibrate"):
        from plait.planner.cli import run
        return run(args)
    try:
        cfg = train_config_from_args(args)
        if under_launcher():  # without --out, the ranks agree on one name once they have joined
            return train_worker(cfg)
        if cfg.out is None:
            cfg.out = default_run_dir(cfg.model)
            argv = [*argv, "--out", cfg.out]
        validate_before_launch(cfg, cfg.nproc)
    except PlaitError as error:
        print(f"plait: error: {error}", file=sys.stderr)
        return 2
    if cfg.nproc > 1:
        return launch_local_workers(cfg.nproc, cfg.max_restarts, argv)
    return train_worker(cfg)


if __name__ == "__main__":
    sys.exit(main())
