"""``plait compare``: the same job under two layouts, and where they part.

A run of plait is meant to be layout-invariant: any dp x pp x tp layout, ZeRO level, schedule
and recomputation gives the single process's numbers up to the order of floating-point sums.
``plait compare`` checks it on the user's own model and flags before a cluster is spent::

    plait compare --model tiny --steps 10 --dtype float32 \\
        --layout-a "--nproc 1" --layout-b "--nproc 8 --dp 2 --pp 2 --tp 2 --sequence-parallel --zero 1"

Each layout runs ``plait train`` with the common flags twice: one step (its checkpoint holds the
first step's gradients, see ``first_step_gradients``), then resumed to ``--steps`` (resume is
bitwise, tested). Then, read back layout-free from the checkpoints:

* per step, the relative loss difference ``|a - b| / |a|``;
* per parameter, the *max relative difference* ``max|a - b| / max|a|`` of the first step's
  gradients and of the final weights (relative to the tensor's largest element, so elements
  near zero do not blow it up).

Tolerance (``Tolerance.for_dtype``): float reassociation changes each sum by a few units of
the dtype's rounding ``eps`` (fp32 2^-23 ~ 1.2e-7; bf16 2^-7 ~ 7.8e-3), and training carries
the differences forward; AdamW divides each gradient element by its own running magnitude, so
weights whose gradients are tiny move by a full step on rounding noise. The bounds are
multiples of ``eps`` above the worst differences measured over 36 randomized layouts
(tests/test_random_layouts.py, seed 1: tiny models, 6 steps at lr 2e-3; weights: also the
4-step draws of make test, worst 4.9e-4), 2-4x the worst seen:

=========  =========================  ===========================  =========================
dtype      loss (per step)            first-step gradients         final weights
=========  =========================  ===========================  =========================
float32    worst 1.7e-7; 128 eps      worst 1.4e-6; 128 eps        worst 4.9e-4; 16384 eps
bfloat16   worst 2.5e-4; eps / 8      worst 2.8e-2; 8 eps          worst 0.12; 64 eps
=========  =========================  ===========================  =========================

bf16 compute keeps fp32 master weights and fp32 loss reductions, so its loss differs by far
less than its eps; its weights tell little (rounding noise in the gradients moves them by whole
AdamW steps), and its gradients are the sharp test. The layout bugs these tests found were
30-5000x beyond the bounds (tp without sequence parallel under selective recomputation:
first-step gradients 0.5 relative). Longer runs drift further apart: compare short runs.

Exit status: 0 within tolerance, 1 beyond it, 2 for a bad flag or a failed run.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from plait.errors import PlaitError

DEFAULT_STEPS = 10
FIRST_STEP_DIR = "first-step"  # in each layout's run directory: the checkpoint after step 1

# TrainConfig fields a layout may set: they change how the job is spread, not what it computes.
LAYOUT_FIELDS = frozenset({
    "nproc", "dp", "pp", "tp", "zero", "sequence_parallel", "loss_parallel", "schedule", "microbatches",
    "micro_batch", "virtual_stages", "pipeline_split", "activation_checkpointing", "bucket_mb", "threads",
    "timeout_s", "hang_timeout_s"})
# Fields compare sets itself for each run.
MANAGED_FIELDS = frozenset({"out", "checkpoint_every", "keep_checkpoints", "resume", "max_restarts"})


class CompareError(PlaitError):
    """A bad ``plait compare`` invocation or a run that failed; one line."""


@dataclass(frozen=True)
class Tolerance:
    """Bounds of a layout-invariant run, as multiples of the compute dtype's ``eps``."""

    dtype: str
    loss: float     # relative loss difference per step
    grads: float    # max relative difference per parameter, first step's gradients
    weights: float  # max relative difference per parameter, final weights

    MULTIPLES = {"float32": (128, 128, 16384), "bfloat16": (1 / 8, 8, 64)}

    @classmethod
    def for_dtype(cls, dtype: str) -> "Tolerance":
        eps = torch.finfo(getattr(torch, dtype)).eps
        loss, grads, weights = cls.MULTIPLES[dtype]
        return cls(dtype, loss * eps, grads * eps, weights * eps)

    def describe(self) -> str:
        loss, grads, weights = self.MULTIPLES[self.dtype]
        eps = torch.finfo(getattr(torch, self.dtype)).eps
        return (f"{self.dtype} (eps {eps:.2g}): loss {self.loss:.2g} ({loss:g} eps), first-step gradients "
                f"{self.grads:.2g} ({grads:g} eps), weights {self.weights:.2g} ({weights:g} eps)")


@dataclass
class RunResult:
    """What compare reads back from one layout's run, layout-free."""

    losses: list[float]
    first_grads: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]


def max_relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|a|`` in float64 (0 for two zero tensors, inf if only ``a`` is zero)."""
    a, b = a.double(), b.double()
    difference = float((a - b).abs().max()) if a.numel() else 0.0
    scale = float(a.abs().max()) if a.numel() else 0.0
    if scale == 0.0:
        return 0.0 if difference == 0.0 else float("inf")
    return difference / scale


def _natural(name: str) -> list:
    """Sort key putting layers.10 after layers.9."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def read_run(run_dir: str | Path, beta1: float) -> RunResult:
    """Losses from ``metrics.jsonl``; first-step gradients and final weights from the checkpoints."""
    from plait.checkpoint import latest_checkpoint
    from plait.checkpoint.store import read_full_state

    run_dir = Path(run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [record["loss"] for record in sorted(records, key=lambda r: r["step"]) if "loss" in record]
    final = latest_checkpoint(run_dir)
    if final is None:
        raise CompareError(f"{run_dir} has no checkpoint to compare")
    weights = {name: tensor for (name, kind), tensor in read_full_state(final).items() if kind == "param"}
    return RunResult(losses, first_step_gradients(run_dir / FIRST_STEP_DIR, beta1), weights)


def first_step_gradients(checkpoint: Path, beta1: float) -> dict[str, torch.Tensor]:
    """The gradients step 1 applied (after clipping), from the checkpoint written after it: AdamW's
    first moment starts at zero, so after one step ``exp_avg = (1 - beta1) g`` exactly as the
    optimizer computed it, in every layout alike."""
    from plait.checkpoint.store import read_full_state

    return {name: tensor / (1.0 - beta1) for (name, kind), tensor in read_full_state(checkpoint).items()
            if kind == "exp_avg"}


@dataclass
class Comparison:
    """Where two runs part, against a tolerance."""

    tolerance: Tolerance
    losses: list[tuple[int, float, float, float]] = field(default_factory=list)  # (step, a, b, rel)
    grads: list[tuple[str, float]] = field(default_factory=list)  # (name, max rel), model order
    weights: list[tuple[str, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # structural differences (missing parameters...)

    @classmethod
    def of(cls, a: RunResult, b: RunResult, tolerance: Tolerance) -> "Comparison":
        result = cls(tolerance)
        if len(a.losses) != len(b.losses):
            result.problems.append(f"A logged {len(a.losses)} steps, B {len(b.losses)}")
        for step, (loss_a, loss_b) in enumerate(zip(a.losses, b.losses), start=1):
            result.losses.append((step, loss_a, loss_b, abs(loss_a - loss_b) / max(abs(loss_a), 1e-30)))
        for mine, theirs, out, what in ((a.first_grads, b.first_grads, result.grads, "first-step gradients"),
                                        (a.weights, b.weights, result.weights, "weights")):
            if set(mine) != set(theirs):
                only = sorted(set(mine) ^ set(theirs), key=_natural)
                result.problems.append(f"{what}: parameters not in both runs: {', '.join(only[:4])}")
            for name in sorted(set(mine) & set(theirs), key=_natural):
                if mine[name].shape != theirs[name].shape:
                    result.problems.append(f"{name}: shape {tuple(mine[name].shape)} vs {tuple(theirs[name].shape)}")
                    continue
                out.append((name, max_relative(mine[name], theirs[name])))
        return result

    def first_loss_beyond(self) -> tuple[int, float, float, float] | None:
        return next((row for row in self.losses if not row[3] <= self.tolerance.loss), None)

    def first_beyond(self, rows: list[tuple[str, float]], bound: float) -> tuple[str, float] | None:
        return next((row for row in rows if not row[1] <= bound), None)

    def failures(self) -> list[str]:
        """One line per kind of difference beyond tolerance: the first step / parameter."""
        lines = list(self.problems)
        loss = self.first_loss_beyond()
        grad = self.first_beyond(self.grads, self.tolerance.grads)
        in_order = []  # in the order they happen: step 1's loss, its gradients, later losses
        if loss is not None:
            in_order.append((loss[0], f"loss at step {loss[0]}: {loss[1]:.8g} vs {loss[2]:.8g} (relative "
                                      f"{loss[3]:.2e} > {self.tolerance.loss:.2e})"))
        if grad is not None:
            in_order.append((1.5, f"first-step gradient of {grad[0]}: max relative difference {grad[1]:.2e} > "
                                  f"{self.tolerance.grads:.2e}"))
        lines += [line for _, line in sorted(in_order)]
        weight = self.first_beyond(self.weights, self.tolerance.weights)
        if weight is not None:
            lines.append(f"final weight {weight[0]}: max relative difference {weight[1]:.2e} > "
                         f"{self.tolerance.weights:.2e}")
        return lines

    @property
    def ok(self) -> bool:
        return not self.failures()

    def report(self, rows: int = 10) -> list[str]:
        """A one-screen report: a loss table (at most ``rows`` steps: the first, the worst, the
        first beyond tolerance and the last among them), the worst parameters, the verdict."""
        lines = [f"tolerance {self.tolerance.describe()}"]
        if self.losses:
            shown = _pick_rows(self.losses, rows, self.first_loss_beyond())
            lines.append(f"{'step':>5}  {'loss A':>12}  {'loss B':>12}  {'relative':>9}")
            previous = 0
            for step, loss_a, loss_b, rel in shown:
                if step > previous + 1:
                    lines.append(f"{'...':>5}")
                mark = "" if rel <= self.tolerance.loss else "  beyond"
                lines.append(f"{step:>5}  {loss_a:>12.8f}  {loss_b:>12.8f}  {rel:>9.2e}{mark}")
                previous = step
            worst = max(self.losses, key=lambda row: row[3])
            lines.append(f"worst loss difference: {worst[3]:.2e} at step {worst[0]}")
        for what, rows_of, bound in (("first-step gradients", self.grads, self.tolerance.grads),
                                     ("final weights", self.weights, self.tolerance.weights)):
            if rows_of:
                worst = sorted(rows_of, key=lambda row: -row[1])[:3]
                beyond = sum(1 for _, rel in rows_of if not rel <= bound)
                listed = ", ".join(f"{name} {rel:.2e}" for name, rel in worst)
                lines.append(f"{what}: {len(rows_of)} parameters, {beyond} beyond tolerance; worst: {listed}")
        failures = self.failures()
        if failures:
            lines.append("DIFFERENT: " + failures[0])
            lines += [f"           {line}" for line in failures[1:]]
        else:
            lines.append("SAME within tolerance")
        return lines


def _pick_rows(rows: list, count: int, beyond) -> list:
    """At most ``count`` of ``rows``: the first, the last, the worst and the first beyond
    tolerance always, then evenly spaced ones."""
    if len(rows) <= count:
        return rows
    chosen = {0, len(rows) - 1, max(range(len(rows)), key=lambda i: rows[i][3])}
    if beyond is not None:
        chosen.add(beyond[0] - 1)
    for index in (round(k * (len(rows) - 1) / (count - 1)) for k in range(count)):
        if len(chosen) >= count:
            break
        chosen.add(index)
    return [rows[i] for i in sorted(chosen)]


def run_phases(run: Callable[[dict], None], run_dir: Path, steps: int) -> None:
    """Train ``run_dir`` in the two phases compare reads: one step (its checkpoint is set aside as
    FIRST_STEP_DIR), then resumed to ``steps``. ``run(overrides)`` trains with TrainConfig
    ``overrides`` on top of the job's flags (``plait compare``: a ``plait train`` process; the
    randomized layout tests: ``run_training`` in a worker pool)."""
    from plait.checkpoint import latest_checkpoint

    shutil.rmtree(run_dir, ignore_errors=True)
    managed = {"out": str(run_dir), "keep_checkpoints": 1, "max_restarts": 0, "resume": True}
    run({**managed, "steps": 1, "checkpoint_every": 1})
    first = latest_checkpoint(run_dir)
    if first is None:
        raise CompareError(f"the one-step run into {run_dir} wrote no checkpoint")
    shutil.copytree(first, run_dir / FIRST_STEP_DIR)
    if steps > 1:
        run({**managed, "steps": steps, "checkpoint_every": steps})


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plait compare", usage="plait compare [plait train flags] --layout-a FLAGS --layout-b FLAGS",
        description="Run the same training job under two layouts and report where they part: per step the "
                    "loss difference, per parameter the max relative difference (max|a-b| / max|a|) of the "
                    "first step's gradients and of the final weights, against a tolerance derived from "
                    "--dtype. Exit 0 within tolerance, 1 beyond it. Every flag other than the ones below is "
                    "a plait train flag common to both runs (default --steps here: "
                    f"{DEFAULT_STEPS}); --out, --checkpoint-every, --keep-checkpoints and --resume are set "
                    "by compare.")
    parser.add_argument("--layout-a", required=True, help="layout flags of run A, e.g. \"--nproc 1\"")
    parser.add_argument("--layout-b", required=True,
                        help="layout flags of run B, e.g. \"--nproc 8 --dp 2 --pp 2 --tp 2 --zero 1\"")
    parser.add_argument("--work-dir", help="where the two runs go (a/ and b/, kept); default: a temporary "
                                           "directory, removed at the end")
    return parser


def train_fields(flags: Sequence[str]) -> dict:
    """The TrainConfig fields ``flags`` set (plait train's own parser; SUPPRESS keeps only given ones)."""
    from plait.train_cli import parse_train_flags

    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            parsed = parse_train_flags(flags)
    except SystemExit:  # argparse's usage and message, kept to the message's one line
        message = said.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1] if said.getvalue().strip() else ""
        raise CompareError(f"plait train flags {' '.join(flags)}: {message}") from None
    return {key: value for key, value in vars(parsed).items() if key != "command"}


def flags_of(overrides: dict) -> list[str]:
    flags = []
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{key.replace('_', '-')}")
        else:
            flags += [flag, str(value)]
    return flags


def compare_main(argv: Sequence[str]) -> int:
    args, common = build_parser().parse_known_args(list(argv))
    try:
        return _compare(args, common)
    except PlaitError as error:
        print(f"plait: error: {error}", file=sys.stderr)
        return 2


def _compare(args: argparse.Namespace, common: list[str]) -> int:
    from plait.train_cli import train_config_from_args, validate_before_launch

    fields = train_fields(common)
    managed = sorted(set(fields) & MANAGED_FIELDS)
    if managed:
        raise CompareError(f"--{managed[0].replace('_', '-')} is set by plait compare (see --help)")
    if "steps" not in fields:
        common = [*common, "--steps", str(DEFAULT_STEPS)]
    quiet = ["--no-progress", "--no-plot", "--no-tensorboard"]
    layouts = {"A": shlex.split(args.layout_a), "B": shlex.split(args.layout_b)}
    configs = {}
    for name, flags in layouts.items():
        job = sorted(set(train_fields(flags)) - LAYOUT_FIELDS)
        if job:
            raise CompareError(f"--layout-{name.lower()} sets --{job[0].replace('_', '-')}, which changes the job, "
                               "not its layout: give it once, outside the layouts")
        namespace = argparse.Namespace(**train_fields([*common, *quiet, *flags]))
        cfg = train_config_from_args(namespace)
        validate_before_launch(cfg, cfg.nproc)
        configs[name] = cfg
    cfg = configs["A"]
    tolerance = Tolerance.for_dtype(cfg.dtype)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="plait-compare-"))
    try:
        results = {}
        for name, flags in layouts.items():
            run_dir = work / name.lower()
            log = run_dir.with_suffix(".log")
            print(f"plait compare: layout {name} ({' '.join(flags)}): {cfg.steps} steps of {cfg.model} "
                  f"in {run_dir} (log {log})", flush=True)
            run_phases(lambda overrides: _train_process([*common, *quiet, *flags, *flags_of(overrides)], log),
                       run_dir, cfg.steps)
            results[name] = read_run(run_dir, cfg.beta1)
        comparison = Comparison.of(results["A"], results["B"], tolerance)
        print(f"plait compare: A = {' '.join(layouts['A'])}  vs  B = {' '.join(layouts['B'])}")
        for line in comparison.report():
            print(line)
        return 0 if comparison.ok else 1
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def _train_process(flags: list[str], log: Path) -> None:
    """``plait train FLAGS`` in a child process, its output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        handle.write(f"$ plait train {shlex.join(flags)}\n")
        handle.flush()
        code = subprocess.run([sys.executable, "-m", "plait", "train", *flags], stdout=handle,
                              stderr=subprocess.STDOUT).returncode
    if code != 0:
        lines = [line for line in log.read_text().splitlines() if line.startswith("plait")]
        last = lines[-1] if lines else f"exit code {code}"
        raise CompareError(f"plait train {shlex.join(flags)} failed: {last} (see {log})")
