"""``plait train`` inside one worker process: join the job, load data, train, write outputs."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from plait.checkpoint import latest_checkpoint, load_checkpoint, newest_intact_checkpoint, save_checkpoint
from plait.checkpoint.store import TOKENIZER_DIR
from plait.data import load_token_data
from plait.data.mixture import parse_data_spec
from plait.errors import PlaitError
from plait.mesh import ParallelContext, init_distributed
from plait.runtime import configure_threads, tune_cpu_allocator
from plait.train.config import OnNonFinite, TrainConfig
from plait.train.metrics import MemoryWatch, MetricsLogger
from plait.train.preemption import Preempted, StopRequests
from plait.run_dir import make_run_dir, restart_count, set_aside_previous_run
from plait.train.trainer import Trainer
from plait.train.watchdog import HangWatchdog


def load_data_once(cfg: TrainConfig, ctx: ParallelContext, model_vocab: int | None = None):
    """Rank 0 builds the tokenizer and token caches; the other ranks then read them."""
    def load(show_progress: bool):
        return load_token_data(cfg.data, cfg.tokenizer_spec(), cfg.vocab_size, bin_vocab_size=model_vocab,
                               show_progress=show_progress, field=cfg.field)
    if ctx.world_size == 1:
        return load(cfg.progress)
    data = load(cfg.progress) if ctx.rank == 0 else None
    ctx.comm("world").barrier()  # recorded: if rank 0 fails here, the others say so in one line
    return data if data is not None else load(False)


def write_timeline(trainer: Trainer, ctx: ParallelContext, out_dir: Path) -> None:
    """Gather the last step's per-rank pipeline events to rank 0 and draw them."""
    from plait.pipeline.diagram import draw_slots, write_chrome_trace
    from plait.pipeline.schedules import Slot, bubble_fraction

    mine = (ctx.coords, trainer.pipeline.events)
    gathered = [None] * ctx.world_size if ctx.world_size > 1 else [mine]
    if ctx.world_size > 1:
        dist.all_gather_object(gathered, mine)
    if not ctx.is_logging_rank:
        return
    slots = [Slot(coords.pp, kind, mb, chunk, start, end)
             for coords, events in gathered if coords.dp == coords.tp == coords.cp == 0
             for kind, mb, chunk, start, end in events]
    write_chrome_trace(slots, out_dir / "timeline.json")
    pp = ctx.dims.pp
    bubble = bubble_fraction(slots, pp)
    draw_slots(slots, pp, out_dir / "timeline.png",
               f"measured last step: {trainer.cfg.schedule}, pp={pp}, m={trainer.n_micro}: idle {100 * bubble:.1f}%",
               time_unit="seconds")
    print(f"plait: timeline of the last step in {out_dir}/timeline.json and timeline.png "
          f"(measured idle {100 * bubble:.1f}%)", flush=True)


def write_memory_report(memory: MemoryWatch, ctx: ParallelContext, out_dir: Path) -> None:
    """Every rank's peak memory while constructing and while training, in <out>/memory.json."""
    mine = {"rank": ctx.rank, **memory.peaks}
    ranks = [mine]
    if ctx.world_size > 1:
        ranks = [None] * ctx.world_size
        dist.all_gather_object(ranks, mine)
    if not ctx.is_logging_rank:
        return
    kind = "allocated CUDA memory" if ctx.device.type == "cuda" else "resident memory (process peak)"
    (out_dir / "memory.json").write_text(json.dumps({"measure": kind, "bytes": ranks}, indent=2) + "\n")
    gb = {phase: max(rank[phase] for rank in ranks) / 1e9 for phase in ("construction", "training")}
    total = sum(max(rank["construction"], rank["training"]) for rank in ranks) / 1e9
    print(f"plait: peak {kind} per rank: {gb['construction']:.2f} GB constructing, {gb['training']:.2f} GB "
          f"training (all ranks: {total:.2f} GB); see {out_dir}/memory.json", flush=True)


def print_sample(trainer: Trainer, prompt: str, out_dir: Path, new_tokens: int = 48) -> None:
    """The trained model's greedy continuation of ``prompt`` (one process: the whole model is here)."""
    from plait.generate import GenerateError, Sampling, generate_ids
    from plait.runtime import gemm_context

    ctx, tokenizer = trainer.ctx, trainer.tokenizer
    if not ctx.is_logging_rank:
        return
    if ctx.world_size > 1 or tokenizer is None:
        why = "the model is spread over ranks" if ctx.world_size > 1 else "the run has no tokenizer"
        later = f"plait generate --model {out_dir} --prompt ..."
        if not trainer.cfg.checkpoint_every:  # generate reads a checkpoint: there will be none
            later = f"train with --checkpoint-every N, then {later}"
        print(f"plait: no sample ({why}); to sample it, {later}", flush=True)
        return
    trainer.strategy.materialize()
    try:
        with gemm_context(ctx.device, trainer.compute_dtype), torch.autocast(ctx.device.type, enabled=False):
            new = generate_ids(trainer.model, tokenizer.encode(prompt), Sampling(new_tokens, temperature=0),
                               tokenizer.eos_id)
    except GenerateError as error:
        print(f"plait: no sample ({error})", flush=True)
        return
    print(f"plait: the model's greedy continuation of {prompt!r} ({len(new)} tokens):\n"
          f"{prompt}{tokenizer.decode(new)}", flush=True)


class NonFiniteStepError(PlaitError):
    """A step's loss or gradient norm was not finite under ``--on-nonfinite stop``."""


def check_nonfinite(record: dict[str, Any], cfg: TrainConfig, out_dir: Path, logger: MetricsLogger | None) -> None:
    """After a step whose update was dropped: stop the run (every rank raises the same error), or
    say so in one line and go on."""
    what = f"step {record['step']}: loss {record['loss']}, gradient norm {record['grad_norm']}; the weights were not updated"
    if cfg.on_nonfinite == OnNonFinite.STOP.value:
        kept = latest_checkpoint(out_dir)
        last_good = f"the last good checkpoint is {kept}" if kept else "no checkpoint was written before it"
        raise NonFiniteStepError(f"{what}; {last_good} (--on-nonfinite skip steps over such steps)")
    if logger is not None:
        logger.message(f"plait: warning: {what} (skipped, {record['skipped_steps']} so far)")


def compile_report(history: list[dict[str, Any]], blocks: int) -> str:
    """``--compile``'s cost, said once: the first step compiles, the second runs the compiled code."""
    first = history[0]["step_time_s"]
    if len(history) == 1:
        return f"plait: --compile: {blocks} blocks; the first step took {first:.1f} s, compilation included"
    second = history[1]["step_time_s"]
    return (f"plait: --compile: {blocks} blocks compiled in about {max(0.0, first - second):.1f} s "
            f"(first step {first:.1f} s, the next {second:.2f} s)")


def run_training(cfg: TrainConfig, ctx: ParallelContext | None = None) -> list[dict[str, Any]]:
    ctx = ctx or init_distributed(cfg.dp, cfg.pp, cfg.tp, cfg.timeout_s, cfg.device, cfg.cp, cfg.dp_shard)
    # the host's cores shared by its ranks: the math on a CPU, start-up and data on a GPU machine
    configure_threads(cfg.threads)
    if ctx.device.type == "cpu":  # glibc's heap matters only where the activations live in it
        tune_cpu_allocator(keep_freed=cfg.zero < 3)  # ZeRO-3: resident memory follows live memory
    with HangWatchdog(ctx.recorder, ctx.world_size, cfg.out, cfg.watchdog_timeout_s):
        return _train(cfg, ctx)


def prepare_run_dir(cfg: TrainConfig, ctx: ParallelContext) -> bool:
    """Create ``--out`` (rank 0, before any rank writes there); under ``--no-resume`` set a previous
    run in it aside. Returns whether to resume: a worker group the launcher restarted after a
    failure resumes the run it started, even under ``--no-resume``."""
    restarted = restart_count() > 0
    if ctx.rank == 0:
        make_run_dir(cfg.out)
        if not cfg.resume and not restarted and (aside := set_aside_previous_run(cfg.out)) is not None:
            print(f"plait: --no-resume: the previous run in {cfg.out} was moved to {aside}", flush=True)
    ctx.comm("world").barrier()
    return cfg.resume or restarted


def _train(cfg: TrainConfig, ctx: ParallelContext) -> list[dict[str, Any]]:
    resume = prepare_run_dir(cfg, ctx)
    data = load_data_once(cfg, ctx)
    memory = MemoryWatch(ctx.device)
    trainer = Trainer(cfg, ctx, data)
    memory.end_phase("construction")
    out_dir = Path(cfg.out)
    start = 0
    latest = newest_intact_checkpoint(out_dir, ctx) if resume else None  # rank 0 warns of damage
    if latest is not None:
        start = load_checkpoint(trainer, latest)
    logger = None
    if ctx.is_logging_rank:
        out_dir.mkdir(parents=True, exist_ok=True)
        if start == 0:
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)
        run_info = {"train": cfg.to_dict(), "model": trainer.model_config.to_dict(),
                    "layout": {"dp": ctx.dims.dp, "pp": ctx.dims.pp, "tp": ctx.dims.tp, "cp": ctx.dims.cp,
                               "dp_shard": ctx.dims.dp_shard},
                    "world_size": ctx.world_size, "device": str(ctx.device), "backend": ctx.backend,
                    "parameters": trainer.model_config.num_parameters(),
                    "train_tokens": data.train_tokens, "val_tokens": int(len(data.val)),
                    "data_sources": [{"spec": source.spec, "weight": source.weight, "train_tokens": len(stream)}
                                     for source, stream in zip(parse_data_spec(cfg.data), data.train)]}
        (out_dir / "config.json").write_text(json.dumps(run_info, indent=2) + "\n")
        if data.tokenizer is not None:  # what the run's token ids mean, in Hugging Face's format
            data.tokenizer.save_pretrained(out_dir / TOKENIZER_DIR)
        logger = MetricsLogger(out_dir, cfg.steps, progress=cfg.progress, tensorboard=cfg.tensorboard,
                               start_step=start)
        if latest is not None:
            logger.message(f"plait: resuming from {latest} (step {start})")
        sources = f" from {len(data.train)} sources" if len(data.train) > 1 else ""
        cp = f" cp={ctx.dims.cp} ({cfg.cp_mode})" if ctx.dims.cp > 1 else ""
        logger.message(f"plait: {trainer.model_config.num_parameters() / 1e6:.1f}M parameters, "
                       f"dp={ctx.dims.dp} pp={ctx.dims.pp} tp={ctx.dims.tp}{cp} on {ctx.world_size} x {ctx.device}, "
                       f"{data.train_tokens:,} training tokens{sources}, writing {out_dir}")
    history = []
    try:
        with StopRequests() as stop:
            for step in range(start, cfg.steps):
                ctx.recorder.set_step(step)  # as metrics.jsonl numbers it
                record = trainer.train_step(step)
                last = step == cfg.steps - 1
                if trainer.val_windows is not None and ((step + 1) % cfg.eval_every == 0 or last):
                    record["val_loss"] = trainer.evaluate()
                history.append(record)
                if logger is not None:
                    logger.log(record)
                    if cfg.compile and len(history) == min(2, cfg.steps - start):
                        logger.message(compile_report(history, trainer.compiled_blocks))
                if record["skipped"]:
                    check_nonfinite(record, cfg, out_dir, logger)
                saved = None
                if cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or last):
                    saved = save_checkpoint(trainer, out_dir, step + 1, keep=cfg.keep_checkpoints)
                signum = stop.agreed(ctx)
                if signum and not last:  # preempted: keep this step's state and end here
                    saved = saved or save_checkpoint(trainer, out_dir, step + 1, keep=cfg.keep_checkpoints)
                    raise Preempted(signum, step + 1, saved)
    finally:
        if logger is not None:
            logger.close(plot=cfg.plot and bool(history))
    memory.end_phase("training")
    write_memory_report(memory, ctx, out_dir)
    if cfg.timeline and trainer.pipeline is not None and history:
        write_timeline(trainer, ctx, out_dir)
    if logger is not None and not history:
        print(f"plait: {out_dir} is already at step {start} of {cfg.steps}; nothing to do", flush=True)
    if cfg.sample is not None and history:
        print_sample(trainer, cfg.sample, out_dir)
    if logger is not None and history:
        final = history[-1]
        summary = f"plait: done, step {cfg.steps} ({len(history)} run now), final loss {final['loss']:.4f}"
        if "val_loss" in final:
            summary += f", validation loss {final['val_loss']:.4f}"
        if trainer.skipped_steps:
            summary += f", {trainer.skipped_steps} non-finite step(s) skipped"
        plot = f" and {out_dir}/loss.png" if cfg.plot else ""
        print(summary + f"; see {out_dir}/metrics.jsonl{plot}", flush=True)
    return history
