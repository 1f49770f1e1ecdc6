"""Randomized layouts against one process, with plait compare's reading and tolerance.

Each draw picks a layout of up to 8 ranks (dp x pp x tp x cp and cp's mode, ZeRO level, sequence and loss
parallel, pipeline schedule, virtual stages, micro-batches, activation checkpointing) and a
model (tied or untied embeddings, multi-head or grouped-query attention), drops the ones the
layout rules refuse (the same ``check_run`` as ``plait train``), trains it in the worker pool
through ``run_training`` in ``plait compare``'s two phases, and compares it with the
single-process run of the same job by ``plait.compare.Comparison``. A failing draw prints the
``plait compare`` command that reproduces it (the data and models stay in pytest's tmp dir).

``make test`` runs PLAIT_RANDOM_DRAWS (default 3) draws of seed PLAIT_RANDOM_SEED (default:
fixed); ``make test-random`` runs 40 draws of a fresh seed.
"""
from __future__ import annotations

import argparse
import os
import random
import shlex

import numpy as np
import pytest

from helpers import synthetic_data
from plait.compare import Comparison, Tolerance, flags_of, read_run, run_phases, train_fields
from plait.mesh import ParallelDims

SEED = int(os.environ.get("PLAIT_RANDOM_SEED", "20261204"))
DRAWS = int(os.environ.get("PLAIT_RANDOM_DRAWS", "3"))
STEPS = 4
MODELS = {  # name: (tie_word_embeddings, num_key_value_heads)
    "untied-mha": (False, 8), "untied-gqa": (False, 4), "tied-mha": (True, 8), "tied-gqa": (True, 4)}


def _configure(flags: list[str]):
    from plait.train_cli import train_config_from_args
    return train_config_from_args(argparse.Namespace(**train_fields(flags)))


def _train_in_pool(ctx, flags: list[str]) -> None:
    from plait.train.run import run_training
    run_training(_configure(flags), ctx)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The common flags of every draw's job, per model, with the files they name."""
    from transformers import LlamaConfig, LlamaForCausalLM
    import torch

    root = tmp_path_factory.mktemp("random-layouts")
    tokens = synthetic_data().train
    data = root / "tokens.bin"
    np.asarray(tokens, dtype=np.uint16).tofile(data)
    common = {}
    for name, (tied, kv_heads) in MODELS.items():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=kv_heads, max_position_embeddings=128,
                             tie_word_embeddings=tied)
        LlamaForCausalLM(config).save_pretrained(root / name)
        common[name] = ["--model", str(root / name), "--data", str(data), "--seq-len", "32", "--global-batch", "8",
                        "--steps", str(STEPS), "--lr", "2e-3", "--warmup-steps", "2",
                        "--eval-every", "0", "--seed", "7", "--no-progress", "--no-plot", "--no-tensorboard"]
    return root, common


def draw_layout(rng: random.Random) -> list[str]:
    """Layout flags of up to 8 ranks (not yet checked against the layout rules)."""
    world = rng.choice([2, 4, 4, 8])
    sizes = {"dp": 1, "pp": 1, "tp": 1, "cp": 1}
    remaining = world
    while remaining > 1:  # split the world into random factors of 2
        sizes[rng.choice(["dp", "pp", "tp", "cp"])] *= 2
        remaining //= 2
    flags = ["--nproc", str(world), "--dp", str(sizes["dp"]), "--pp", str(sizes["pp"]), "--tp", str(sizes["tp"]),
             "--zero", str(rng.choice([0, 1, 2, 3]))]
    if sizes["cp"] > 1:
        flags += ["--cp", str(sizes["cp"]), "--cp-mode", rng.choice(["ring", "alltoall"])]
    if sizes["tp"] > 1:
        flags += [rng.choice(["--sequence-parallel", "--no-sequence-parallel"]),
                  rng.choice(["--loss-parallel", "--no-loss-parallel"])]
    per_rank = 8 // sizes["dp"]
    if sizes["pp"] > 1:
        schedule = rng.choice(["gpipe", "1f1b", "interleaved", "zb1p", "zbv"])
        flags += ["--schedule", schedule, "--microbatches", str(rng.choice([m for m in (2, 4, 8) if m <= per_rank]
                                                                           or [per_rank]))]
        if schedule in ("interleaved", "zbv"):
            flags += ["--virtual-stages", "2"]
    else:
        flags += ["--micro-batch", str(rng.choice([b for b in (1, 2, 4, 8) if b <= per_rank]))]
    flags += ["--activation-checkpointing", rng.choice(["none", "selective", "full"])]
    return flags


def valid_draws(rng: random.Random, common: dict[str, list[str]], count: int):
    """``count`` (model, dtype, layout flags) triples that the layout rules accept."""
    from plait.checkpoint.hf_config import load_hf_config
    from plait.errors import PlaitError
    from plait.layout import check_run

    found = []
    while len(found) < count:
        model = rng.choice(sorted(MODELS))
        dtype = rng.choice(["float32", "float32", "float32", "bfloat16"])
        flags = draw_layout(rng)
        try:
            cfg = _configure([*common[model], "--dtype", dtype, *flags])
            check_run(cfg, ParallelDims.from_world_size(cfg.nproc, cfg.dp, cfg.pp, cfg.tp, cfg.cp),
                      load_hf_config(cfg.model))
        except PlaitError:
            continue
        found.append((model, dtype, flags))
    return found


def _train(pool, flags: list[str], run_dir) -> None:
    cfg = _configure(flags)
    dims = ParallelDims.from_world_size(cfg.nproc, cfg.dp, cfg.pp, cfg.tp, cfg.cp)
    run_phases(lambda overrides: pool.run(_train_in_pool, dims, [*flags, "--threads", "1", *flags_of(overrides)],
                                          timeout_s=240), run_dir, STEPS)


def _to_terminal(capsys):
    """Print past pytest's capture: the seed and draws belong in the test log of every run."""
    def report(line: str) -> None:
        with capsys.disabled():
            print(line, flush=True)
    return report


@pytest.mark.timeout(120 + 20 * DRAWS)
def test_random_layouts_match_one_process(pool, job, tmp_path, capsys):
    root, common = job
    rng = random.Random(SEED)
    draws = valid_draws(rng, common, DRAWS)
    report = _to_terminal(capsys)
    report(f"\nrandomized layouts: seed {SEED}, {DRAWS} draws (PLAIT_RANDOM_SEED, PLAIT_RANDOM_DRAWS; make test-random)")
    references = {}
    failures = []
    for index, (model, dtype, flags) in enumerate(draws):
        report(f"draw {index}: {model} {dtype} {' '.join(flags)}")
        job_flags = [*common[model], "--dtype", dtype]
        if (model, dtype) not in references:
            reference = root / f"reference-{model}-{dtype}"
            _train(pool, [*job_flags, "--nproc", "1"], reference)
            references[model, dtype] = read_run(reference, 0.9)
        run_dir = tmp_path / f"draw-{index}"
        _train(pool, [*job_flags, *flags], run_dir)
        comparison = Comparison.of(references[model, dtype], read_run(run_dir, 0.9), Tolerance.for_dtype(dtype))
        worst = (max(rel for *_, rel in comparison.losses), max(rel for _, rel in comparison.grads),
                 max(rel for _, rel in comparison.weights))
        report(f"  worst {dtype}: loss {worst[0]:.2e}, first-step gradients {worst[1]:.2e}, weights {worst[2]:.2e}")
        if not comparison.ok:
            shown = [flag for flag in job_flags if flag not in ("--no-progress", "--no-plot", "--no-tensorboard")]
            command = (f"plait compare {shlex.join(shown)} --layout-a '--nproc 1' "
                       f"--layout-b {shlex.quote(' '.join(flags))}")
            failures.append(f"draw {index} ({model}, {dtype}, {' '.join(flags)}): {comparison.failures()[0]}\n"
                            f"  reproduce: {command}")
    assert not failures, f"seed {SEED}:\n" + "\n".join(failures)
