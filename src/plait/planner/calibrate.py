"""``plait calibrate``: measure this machine and write the ``cpu`` hardware profile.

Measured per core (one torch thread), as plait's ranks run: the rate of a large matmul per
dtype (also the MFU peak, as the trainer's own), causal SDPA attention per dtype (FLOPs
counted as done: half of 4 b s^2 h forward), streaming memory bandwidth (a large copy), the
fixed cost of one eager op, and, on two spawned gloo ranks, plait's own collectives
(``Collectives.all_reduce`` / ``reduce_scatter`` / ``all_gather`` / ``send``) at message
sizes from 16 KiB to 16 MiB, fitted by least squares to t = latency + factor x bytes /
bandwidth with the ring factors of ``network.py``.
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Callable

from plait.planner.hardware import HardwareProfile, LinkFit, default_profile_path
from plait.planner.network import FACTORS

SIZES = [1 << 14, 1 << 17, 1 << 20, 1 << 22, 1 << 24]  # bytes per collective


def _rate(work: Callable[[], None], units: float, seconds: float) -> float:
    work()
    work()
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return units / statistics.median(times)


def measure_compute(seconds: float = 1.0) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    matmul, attention = {}, {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        size = 1024
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        matmul[name] = _rate(lambda: a @ b, 2.0 * size ** 3, seconds)
        batch, heads, seq, dim = 1, 8, 512, 64
        q, k, v = (torch.randn(batch, heads, seq, dim).to(dtype) for _ in range(3))
        attention[name] = _rate(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                0.5 * 4 * batch * seq * seq * heads * dim, seconds)
    big = torch.empty(1 << 24)  # 64 MB
    out = torch.empty_like(big)
    bandwidth = _rate(lambda: out.copy_(big), 2.0 * big.numel() * 4, seconds)
    tiny = torch.zeros(16)
    launch = 1.0 / _rate(lambda: tiny.add_(1.0), 1.0, seconds / 4)
    return {"matmul": matmul, "attention": attention, "memory_bandwidth": bandwidth, "launch_s": launch}


def _time_collectives(ctx, sizes: list[int], repeats: int) -> dict[str, list[tuple[int, float]]]:
    import torch

    torch.set_num_threads(1)
    comm = ctx.comm("dp")
    n = comm.size
    results: dict[str, list[tuple[int, float]]] = {op: [] for op in FACTORS}
    for nbytes in sizes:
        elements = nbytes // 4
        full = torch.ones(elements)
        shard = torch.ones(elements // n)
        out_full, out_shard = torch.empty(elements), torch.empty(elements // n)
        operations = {
            "all_reduce": lambda: comm.all_reduce(full),
            "all_gather": lambda: comm.all_gather(out_full, shard),
            "reduce_scatter": lambda: comm.reduce_scatter(out_shard, full),
            "send": lambda: comm.send(full, 1, tag=7) if comm.rank == 0 else comm.recv(out_full, 0, tag=7),
        }
        for op, run in operations.items():
            times = []
            for repeat in range(repeats + 1):  # the first is a warm-up
                comm.barrier()
                start = time.perf_counter()
                work = run()
                if work is not None:  # an isend: wait for it, or it may never leave
                    work.wait()
                if op == "send":
                    comm.barrier()  # the receive completing bounds the message time
                if repeat:
                    times.append(time.perf_counter() - start)
            results[op].append((nbytes, statistics.median(times)))
    return results


def fit(points: list[tuple[int, float]], factor: float) -> LinkFit:
    """t = latency + factor * bytes / bandwidth through (bytes, seconds) points, least squares of
    the *relative* error (weights 1/t^2), so the small messages set the latency and the large
    ones the bandwidth."""
    xs = [factor * b for b, _ in points]
    ys = [t for _, t in points]
    w = [1.0 / (y * y) for y in ys]
    sw, sx, sy = sum(w), sum(wi * x for wi, x in zip(w, xs)), sum(wi * y for wi, y in zip(w, ys))
    sxx = sum(wi * x * x for wi, x in zip(w, xs))
    sxy = sum(wi * x * y for wi, x, y in zip(w, xs, ys))
    slope = (sw * sxy - sx * sy) / (sw * sxx - sx * sx)
    slope = max(slope, 1e-15)
    latency = max(0.0, (sy - slope * sx) / sw)
    return LinkFit(latency_s=latency, bandwidth=1.0 / slope)


def measure_collectives(ranks: int = 2, repeats: int = 5) -> dict[str, LinkFit]:
    from plait.mesh import ParallelDims
    from plait.testing import WorkerPool

    pool = WorkerPool(ranks)
    try:
        timings = pool.run(_time_collectives, ParallelDims(dp=ranks, pp=1, tp=1), SIZES, repeats, timeout_s=300)
    finally:
        pool.shutdown()
    fits = {}
    for op in FACTORS:  # the slowest rank's time at each size
        points = [(size, max(rank[op][i][1] for rank in timings)) for i, size in enumerate(SIZES)]
        fits[op] = fit(points, FACTORS[op](ranks))
    return fits


def calibrate(seconds: float = 1.0, ranks: int = 2) -> HardwareProfile:
    compute = measure_compute(seconds)
    collectives = measure_collectives(ranks)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    shared = collectives["all_reduce"]
    return HardwareProfile(
        name="cpu", peak_flops=dict(compute["matmul"]), gemm_efficiency=1.0, attention_efficiency=1.0,
        memory_bytes=_physical_memory(), memory_bandwidth=compute["memory_bandwidth"], memory_efficiency=1.0,
        devices_per_node=max(cores, 64), intra_node_bandwidth=shared.bandwidth, inter_node_bandwidth=shared.bandwidth,
        intra_node_latency_s=shared.latency_s, inter_node_latency_s=shared.latency_s, link_efficiency=1.0,
        kernel_latency_s=compute["launch_s"], framework_memory_bytes=0.0, comm_overlaps_compute=False, cores=cores,
        measured_flops=dict(compute["matmul"]), measured_attention=dict(compute["attention"]),
        collectives=collectives,
        source=f"plait calibrate on {os.uname().nodename}, {time.strftime('%Y-%m-%d %H:%M')}, 1 thread per core")


def _physical_memory() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return 16e9


def write_profile(profile: HardwareProfile, path: Path | None = None) -> Path:
    path = Path(path) if path else default_profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(profile.to_json())
    os.replace(tmp, path)
    return path
