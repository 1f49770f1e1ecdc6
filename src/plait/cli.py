"""The ``plait`` command line: one subcommand each, dispatched by ``main``.

``train`` is ``plait.train_cli``; ``generate``, ``eval`` and ``tokenize`` are ``plait.model_cli``;
``plan``, ``simulate`` and ``calibrate`` are ``plait.planner.cli``; ``compare`` parses its own
flags (``plait.compare``); ``schedule`` and ``export`` are here.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

from plait.errors import PlaitError
from plait.pipeline.schedules import SCHEDULES
from plait.train_cli import add_train_command, train_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plait", description="Train Transformer language models with composable parallelism.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_command(commands)
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
    from plait.pipeline.schedules import Schedule, analytic_bubble_formula

    folder = Path(args.output).parent
    if not folder.is_dir():
        print(f"plait: error: -o {args.output}: the folder {folder} does not exist", file=sys.stderr)
        return 2
    try:
        plans = build_schedule(args.schedule, args.pp, args.microbatches, args.virtual_stages)
        # interleaved and ZB-V chunks are 1/v of a stage: keep one time unit = one forward of a whole stage
        v = args.virtual_stages
        backward = args.backward_cost / v
        if Schedule(args.schedule).splits_backward:  # B (input gradients) and W (weights) share the backward
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


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return dispatch(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        # Whoever read our output has stopped (`plait plan ... | head`): end quietly, as cat does,
        # with the shell's code for it. Python would otherwise fail again flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def dispatch(argv: list[str]) -> int:
    """Run the subcommand ``argv`` names; its exit code."""
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
    return train_command(args, argv)

if __name__ == "__main__":
    sys.exit(main())
