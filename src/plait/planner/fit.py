"""Does a ``plait train`` run fit in this host's memory? Asked once, before any worker starts.

A run that cannot fit (``--model llama2-7b`` on a laptop, an absurd ``--global-batch``) would
otherwise die deep in a worker: killed by the kernel, or a numpy / torch allocation traceback.
The estimate is the planner's own (``predict``: model states, kept activations, transient
buffers, construction) for the rank that needs most, without the framework's overhead, plus
the rank's batch of token ids, times the ranks on this host. It is refused only when that
lower bound exceeds the memory the kernel says is available (``MemAvailable``): the planner's
figures are checked against measured runs in BENCHMARKS.md, and everything left out only adds.
GPU memory is not checked here (the CUDA runtime says so itself, in one line per rank).
"""
from __future__ import annotations

from plait.errors import PlaitError

GB = 1e9
TOKEN_ID_BYTES = 8  # int64 ids


class MemoryFitError(PlaitError):
    """A run whose estimated memory exceeds what this host has available; one line."""


def available_host_bytes() -> int | None:
    """``MemAvailable`` of /proc/meminfo (None where there is none, e.g. macOS)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def batch_bytes(cfg, dp: int) -> float:
    """Token ids a rank holds for one step: the global batch's offsets, its rows' windows of
    seq_len + 1 ids, and their inputs and targets."""
    per_rank = cfg.global_batch // max(dp, 1)
    return cfg.global_batch * 2 * TOKEN_ID_BYTES + 3 * per_rank * (cfg.seq_len + 1) * TOKEN_ID_BYTES


def rank_bytes(cfg, dims, model_config) -> dict[str, float]:
    """The planner's peak of the rank that needs most (``training`` or ``construction``, no
    framework overhead) and its parts, plus ``batch``, for a run that ``check_run`` accepted."""
    import dataclasses

    from plait.layout import layout_of
    from plait.planner.hardware import PROFILES
    from plait.planner.simulator import predict
    from plait.planner.workload import ModelShape

    # memory does not depend on the profile's speeds, only on the kind of device (a CPU's norms
    # keep more than CUDA's fused kernel): a GPU profile made a one-core CPU; its framework
    # overhead is taken off again
    profile = dataclasses.replace(PROFILES["h100-80gb"], cores=1)
    prediction = predict(ModelShape.from_llama_config(model_config, cfg.seq_len), layout_of(cfg, dims), profile,
                         exact_pipeline=False)
    parts = {key: value for key, value in prediction.memory_breakdown.items() if key not in ("total", "framework")}
    training = sum(parts.values())
    construction = prediction.construction_bytes_per_gpu - profile.framework_memory_bytes
    return {**parts, "model": max(training, construction), "batch": batch_bytes(cfg, dims.dp)}


def check_host_memory(cfg, dims, model_config, local_ranks: int, available: int | None = None) -> None:
    """Raise MemoryFitError when ``local_ranks`` ranks of this run need more than is available."""
    available = available_host_bytes() if available is None else available
    if available is None:
        return
    ranks = f"{local_ranks} local rank{'s' if local_ranks > 1 else ''}"
    advice = "a smaller --global-batch or --micro-batch, --activation-checkpointing, --zero 3 over more ranks"
    batch = batch_bytes(cfg, dims.dp)
    if batch * local_ranks > available:  # before the planner: its pipeline model walks every micro-batch
        raise MemoryFitError(f"--global-batch {cfg.global_batch} x --seq-len {cfg.seq_len} needs "
                             f"{batch / GB:.1f} GB of token ids per rank x {ranks}, more than the "
                             f"{available / GB:.1f} GB available on this host")
    need = rank_bytes(cfg, dims, model_config)
    total = (need["model"] + need["batch"]) * local_ranks
    if total > available:
        states = sum(need.get(key, 0.0) for key in ("params", "grads", "optimizer"))
        raise MemoryFitError(
            f"this run needs about {(need['model'] + need['batch']) / GB:.1f} GB per rank (model states "
            f"{states / GB:.1f} GB, activations {need.get('activations', 0.0) / GB:.1f} GB; the planner's "
            f"estimate) x {ranks} = {total / GB:.1f} GB, more than the {available / GB:.1f} GB available "
            f"on this host; try {advice}, or a smaller model")
