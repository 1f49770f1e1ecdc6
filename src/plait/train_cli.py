"""``plait train``: its flags, the TrainConfig they make, the checks before any worker starts,
and one worker's body (with its one-line errors and exit codes).

It runs in one of three ways:
- one process (``--nproc 1``, the default);
- ``--nproc N``: plait launches N local workers itself through PyTorch's elastic launcher
  (the same rendezvous as ``torchrun --standalone``), each re-running this command;
- under ``torchrun`` (any number of hosts): the launcher's environment says who is who and
  ``--nproc`` is ignored.

``plait compare`` parses and checks its two layouts with the same functions.
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
from plait.models import PRESETS, get_preset
from plait.pipeline.schedules import SCHEDULES
from plait.run_dir import agreed_run_dir, default_run_dir, make_run_dir
from plait.train.config import DTYPES, OnNonFinite, TrainConfig, TrainConfigError, load_toml


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


def add_train_command(commands) -> argparse.ArgumentParser:
    """The ``train`` subcommand with every flag of TrainConfig (only the given ones are set)."""
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
    return train


def parse_train_flags(flags: Sequence[str]) -> argparse.Namespace:
    """``plait train FLAGS`` parsed as the command line would (argparse's errors included)."""
    parser = argparse.ArgumentParser(prog="plait")
    add_train_command(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return parser.parse_args(["train", *flags])


def train_command(args: argparse.Namespace, argv: list[str]) -> int:
    """``plait train``: check everything checkable, then run here, under a launcher, or launch."""
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
    from plait.mesh import ParallelDims
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
