"""``plait plan``: search the layouts of a job and rank them by predicted throughput.

Candidates: every tp (powers of two up to a node) x cp (powers of two whose 2 cp chunks split
the sequence, ring or all-to-all) x pp (divisors of what is left) with dp the rest, each ZeRO level
(ZeRO-2/3 also hybrid-sharded within 1, 2 or 4 nodes), sequence parallelism on or off (tp > 1;
loss parallelism always on then), micro-batch sizes (powers of two up to 16 dividing the per-replica batch), the pipeline
schedules (1F1B, interleaved with 2 or 4 chunks per rank, GPipe, ZB-H1, ZB-V) and recomputation
(none, selective, full). A candidate is rejected with its reason (a size tp does not divide, a
batch that does not split, a combination plait does not support, out of memory); the rest are
ranked by tokens/s per device. A first pass prices pipelines with the closed-form bubble, one
(tp, cp, cp mode) family at a time (in parallel processes where asked); the best candidates of
all are then re-predicted exactly by simulating their schedules' action lists.
"""
from __future__ import annotations

import dataclasses
import functools
import multiprocessing
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from plait.planner.hardware import HardwareProfile, usable_cores
from plait.planner.simulator import LayoutRejected, Prediction, predict
from plait.planner.workload import Layout, ModelShape

EXACT_CANDIDATES = 24
MAX_MICRO_BATCH = 16


@dataclass
class PlanResult:
    best: list[Prediction]
    rejections: Counter = field(default_factory=Counter)   # kind of reason (numbers as N) -> count
    examples: dict[str, str] = field(default_factory=dict)  # kind -> its first reason and layout
    considered: int = 0


def _powers_of_two(limit: int) -> list[int]:
    values, value = [], 1
    while value <= limit:
        values.append(value)
        value *= 2
    return values


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _context_parallel(shape: ModelShape, ranks: int) -> list[tuple[int, str]]:
    """(cp, mode) choices: cp = 1, and powers of two whose 2 cp chunks split the sequence."""
    choices = [(1, "ring")]
    for cp in _powers_of_two(ranks)[1:]:
        if ranks % cp == 0 and shape.seq_len % (2 * cp) == 0:
            choices += [(cp, "ring"), (cp, "alltoall")]
    return choices


def _shard_groups(dp: int, ranks_per_replica_rank: int, gpus_per_node: int) -> list[int | None]:
    """Hybrid sharding choices for ZeRO-2/3: all dp ranks (None), or the dp ranks of 1, 2 or 4
    nodes, where that is fewer than dp."""
    per_node = max(1, gpus_per_node // ranks_per_replica_rank)
    return [None] + [n for n in (per_node, 2 * per_node, 4 * per_node) if n < dp and dp % n == 0]


def layout_families(shape: ModelShape, gpus: int, gpus_per_node: int) -> list[tuple[int, int, str]]:
    """(tp, cp, cp mode) of every family of candidates, in search order."""
    return [(tp, cp, mode) for tp in _powers_of_two(min(gpus, gpus_per_node)) if gpus % tp == 0
            for cp, mode in _context_parallel(shape, gpus // tp)]


def _layouts_with(shape: ModelShape, gpus: int, gpus_per_node: int, tp: int, cp: int, cp_mode: str,
                  global_batch: int, dtype: str):
    """Every candidate of the family (tp, cp, cp mode), in search order."""
    for pp in _divisors(gpus // (tp * cp)):
        dp = gpus // (tp * pp * cp)
        per_replica = global_batch // dp if global_batch % dp == 0 else 1
        for micro_batch in _powers_of_two(min(MAX_MICRO_BATCH, per_replica)):
            schedules = [("1f1b", 1)]
            if pp > 1:
                schedules += [("interleaved", 2), ("interleaved", 4), ("gpipe", 1), ("zb1p", 1), ("zbv", 2)]
            for schedule, v in schedules:
                for zero in (0, 1, 2, 3):
                    if dp * cp == 1 and zero:  # nothing to shard over
                        continue
                    for dp_shard in _shard_groups(dp, tp * pp * cp, gpus_per_node) if zero >= 2 else (None,):
                        for sp in ((False, True) if tp > 1 else (False,)):
                            for recompute in ("none", "selective", "full"):
                                yield Layout(dp=dp, tp=tp, pp=pp, micro_batch=micro_batch,
                                             global_batch=global_batch, zero=zero, sequence_parallel=sp,
                                             loss_parallel=tp > 1, recompute=recompute, schedule=schedule,
                                             virtual_stages=v, dtype=dtype, cp=cp, cp_mode=cp_mode,
                                             dp_shard=dp_shard)


@dataclass
class FamilyResult:
    """One family's first pass: its fastest fitting estimates (closed-form pipelines) and why the
    others were rejected."""
    fastest: list[Prediction]
    rejections: Counter
    examples: dict[str, str]
    considered: int


def search_family(shape: ModelShape, hw: HardwareProfile, gpus: int, global_batch: int, dtype: str,
                  family: tuple[int, int, str], keep: int = EXACT_CANDIDATES) -> FamilyResult:
    """Predict every layout of one (tp, cp, cp mode) family; keep its ``keep`` fastest that fit."""
    tp, cp, cp_mode = family
    result = FamilyResult([], Counter(), {}, 0)
    fitting: list[Prediction] = []
    for layout in _layouts_with(shape, gpus, hw.devices_per_node, tp, cp, cp_mode, global_batch, dtype):
        result.considered += 1
        try:
            estimate = predict(shape, layout, hw, exact_pipeline=False)
        except LayoutRejected as error:
            reason = str(error)
        else:
            if estimate.fits:
                fitting.append(estimate)
                continue
            reason = "out of memory"
        key = re.sub(r"\d+", "N", reason)  # one line per kind of reason, with its first instance
        result.rejections[key] += 1
        result.examples.setdefault(key, f"{reason}: {layout.describe()}")
    fitting.sort(key=lambda p: p.step_time_s)  # stable: equal times keep the search order
    result.fastest = fitting[:keep]
    return result


def plan(shape: ModelShape, hw: HardwareProfile, gpus: int, global_batch: int, gpus_per_node: int | None = None,
         dtype: str = "bfloat16", top: int = 5, progress: bool = False, workers: int = 1) -> PlanResult:
    """The ``top`` fastest layouts that fit. Each (tp, cp, cp mode) family is priced on its own,
    over ``workers`` processes (the families' results are merged in search order, so the answer
    does not depend on ``workers``); the fastest EXACT_CANDIDATES of all are then re-predicted
    with their schedules simulated."""
    from tqdm import tqdm

    hw = dataclasses.replace(hw, devices_per_node=gpus_per_node or hw.devices_per_node)
    families = layout_families(shape, gpus, hw.devices_per_node)
    search = functools.partial(search_family, shape, hw, gpus, global_batch, dtype)
    bar = dict(desc="layout families", unit="", disable=not progress, leave=False, total=len(families))
    if workers > 1 and len(families) > 1:
        with ProcessPoolExecutor(min(workers, len(families)), mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(tqdm(pool.map(search, families), **bar))
    else:
        parts = [search(family) for family in tqdm(families, **bar)]
    result = PlanResult(best=[])
    fastest: list[Prediction] = []
    for part in parts:
        result.considered += part.considered
        result.rejections.update(part.rejections)
        for key, example in part.examples.items():
            result.examples.setdefault(key, example)
        fastest.extend(part.fastest)
    fastest.sort(key=lambda p: p.step_time_s)
    exact = []
    for estimate in fastest[:EXACT_CANDIDATES]:
        prediction = predict(shape, estimate.layout, hw) if estimate.layout.pp > 1 else estimate
        if prediction.fits:
            exact.append(prediction)
    exact.sort(key=lambda p: p.step_time_s)
    result.best = exact[:top]
    return result


def default_workers() -> int:
    """Processes for the search: this machine's usable cores, at most 16."""
    return max(1, min(16, usable_cores()))
