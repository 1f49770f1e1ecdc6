"""``plait calibrate``: measure this machine and write the ``cpu`` hardware profile.

Measured per core (one torch thread) on as many spawned ranks as there are cores (at most 8),
all at once, as plait's ranks run: the rate of a large matmul per dtype (also the MFU peak, as
the trainer's own), causal SDPA attention per dtype (FLOPs
counted as done: half of 4 b s^2 h forward), streaming memory bandwidth (a large copy), the
fixed cost of one eager op, and, on the same ranks, plait's own collectives
(``Collectives.all_reduce`` / ``reduce_scatter`` / ``all_gather`` / ``send``) at message
sizes from 16 KiB to 64 MiB, each as the time it adds between matmuls (in situ, as inside a
step), fitted by least squares to t = latency + factor x bytes / bandwidth with the ring
factors of ``network.py``. Last, one forward + backward of plait's own Llama block (hidden 512,
sequence 256) per dtype, against the time the model predicts for it from those rates: the
ratio (``kernel_mix_efficiency``) scales the rates, because kernels inside a real block run
slower than the same kernels measured alone.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import Callable

from plait.files import atomic_write_text
from plait.planner.hardware import HardwareProfile, LinkFit, default_profile_path, usable_cores
from plait.planner.network import FACTORS

# the collectives timed; the network model prices any other (all-to-all) as one of these with
# the same traffic (network.CALIBRATED_AS)
MEASURED = ("all_reduce", "all_gather", "reduce_scatter", "send")
FLOOR_S = 1e-6  # what a collective that measured as free (or less) is recorded as
SIZES = [1 << 14, 1 << 16, 1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 22, 1 << 24, 1 << 26]  # bytes per collective


def _rate(work: Callable[[], None], units: float, seconds: float) -> float:
    work()
    work()
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return units / min(times)  # best of: interference from other processes only ever slows a run


def measure_compute(seconds: float = 1.0, barrier: Callable[[], None] = lambda: None) -> dict:
    """Rates of one thread; ``barrier`` lines up the ranks measuring at once (every core busy,
    as in a multi-rank run: cores that share caches, memory or a physical core slow each other)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    matmul, attention = {}, {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        size = 1024
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        barrier()
        matmul[name] = _rate(lambda: a @ b, 2.0 * size ** 3, seconds)
        batch, heads, seq, dim = 1, 8, 512, 64
        q, k, v = (torch.randn(batch, heads, seq, dim).to(dtype) for _ in range(3))
        barrier()
        attention[name] = _rate(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                0.5 * 4 * batch * seq * seq * heads * dim, seconds)
    big = torch.empty(1 << 24)  # 64 MB
    out = torch.empty_like(big)
    barrier()
    bandwidth = _rate(lambda: out.copy_(big), 2.0 * big.numel() * 4, seconds)
    tiny = torch.zeros(16)
    barrier()
    launch = 1.0 / _rate(lambda: tiny.add_(1.0), 1.0, seconds / 4)
    return {"matmul": matmul, "attention": attention, "memory_bandwidth": bandwidth, "launch_s": launch}


def _time_collectives(ctx, sizes: list[int], repeats: int) -> dict[str, list[tuple[int, float]]]:
    """Seconds each collective adds to a loop of compute, per message size, on this rank.

    Measured *in situ*: a matmul (about a layer's worth) then the collective, against the same
    loop without it. That is the cost plait's blocking collectives have inside a step -- with
    gloo's threads competing for the cores, caches refilled, ranks re-synchronised -- which on
    a small CPU is several times the collective's time back to back.
    """
    import torch

    torch.set_num_threads(1)
    comm = ctx.comm("dp")
    n = comm.size
    a, w = torch.randn(256, 512), torch.randn(512, 1536)
    inner = 4

    def loop(run) -> float:
        comm.barrier()
        start = time.perf_counter()
        for _ in range(inner):
            a @ w
            work = run()
            if work is not None:  # an isend: wait for it, or it may never leave
                work.wait()
        comm.barrier()
        return (time.perf_counter() - start) / inner

    nothing = lambda: None  # noqa: E731

    def added(run) -> float:
        """The median over ``repeats`` pairs of (the loop with ``run`` - the loop without), each
        pair back to back: the VM's drift between pairs cancels, and no single lucky loop
        decides (a best-of against a separately timed baseline read some collectives as free)."""
        return statistics.median(loop(run) - loop(nothing) for _ in range(repeats))

    loop(nothing)
    results: dict[str, list[tuple[int, float]]] = {op: [] for op in MEASURED}
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
        for op in MEASURED:
            run = operations[op]
            loop(run)  # warm-up
            results[op].append((nbytes, max(added(run), FLOOR_S)))
    return results


def fit(points: list[tuple[int, float]], factor: float) -> LinkFit:
    """t = latency + factor * bytes / bandwidth through (bytes, seconds) points, least squares of
    the *relative* error (weights 1/t^2), so the small messages set the latency and the large
    ones the bandwidth. Points at the measurement's floor (noise read a collective as free) say
    nothing and, weighted 1/t^2, would decide the fit alone: they are left out while two others
    remain."""
    measured = [(b, t) for b, t in points if t > FLOOR_S]
    used = measured if len(measured) >= 2 else points
    xs = [factor * b for b, _ in used]
    ys = [t for _, t in used]
    w = [1.0 / (y * y) for y in ys]
    sw, sx, sy = sum(w), sum(wi * x for wi, x in zip(w, xs)), sum(wi * y for wi, y in zip(w, ys))
    sxx = sum(wi * x * x for wi, x in zip(w, xs))
    sxy = sum(wi * x * y for wi, x, y in zip(w, xs, ys))
    slope = (sw * sxy - sx * sy) / (sw * sxx - sx * sx)
    slope = max(slope, 1e-15)
    latency = max(0.0, (sy - slope * sx) / sw)
    return LinkFit(latency_s=latency, bandwidth=1.0 / slope, points=tuple((float(b), t) for b, t in points))


# The reference block timed by calibrate: plait's own Llama layer, one sequence.
REFERENCE = {"hidden": 512, "ffn": 1536, "heads": 8, "seq": 256}


def time_reference_block(barrier: Callable[[], None], repeats: int = 7) -> dict[str, float]:
    """Seconds of forward + backward of one plait Llama block (REFERENCE shape) per dtype."""
    import torch

    from plait.models import get_preset
    from plait.models.llama import LlamaModel

    config = get_preset("small").replace(hidden_size=REFERENCE["hidden"], intermediate_size=REFERENCE["ffn"],
                                         num_attention_heads=REFERENCE["heads"],
                                         num_key_value_heads=REFERENCE["heads"], num_hidden_layers=1, head_dim=None)
    model = LlamaModel(config)
    layer = model.layers[0]
    x = torch.randn(1, REFERENCE["seq"], REFERENCE["hidden"], requires_grad=True)
    cos, sin = model.position_tables(REFERENCE["seq"], x)
    seconds = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        def run() -> None:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                out = layer(x, cos, sin)
            out.sum().backward()
        for _ in range(3):
            run()
        barrier()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        seconds[name] = min(times)
    return seconds


def _calibrate_rank(ctx, seconds: float, sizes: list[int], repeats: int) -> dict:
    barrier = ctx.comm("dp").barrier
    compute = measure_compute(seconds, barrier=barrier)
    compute["reference_block_s"] = time_reference_block(barrier)
    return {"compute": compute, "collectives": _time_collectives(ctx, sizes, repeats)}


def kernel_mix_efficiency(profile: HardwareProfile, measured: dict[str, float], ranks: int) -> dict[str, float]:
    """Predicted / measured time of the reference block, per dtype.

    Isolated kernels (a hot 1024^3 matmul, one SDPA call, one copy) run faster than the same
    kernels inside a layer's forward and backward, where caches are cold, autograd and module
    calls add work, and the other ranks' kernels share the memory system. The ratio is measured
    on one block of fixed shape, with every core busy, and scales the profile's rates.
    """
    from plait.planner.compute import Timer, device_rates, layer_backward, layer_forward
    from plait.planner.workload import Layout, ModelShape

    shape = ModelShape("llama", REFERENCE["hidden"], 1, REFERENCE["heads"], REFERENCE["heads"], REFERENCE["ffn"],
                       8192, REFERENCE["seq"])
    ratios = {}
    for dtype, seconds in measured.items():
        layout = Layout(micro_batch=1, global_batch=1, dtype=dtype)
        rates = device_rates(profile, dtype, ranks)
        timer = Timer(rates, 4 if dtype == "float32" else 2)
        layer_forward(timer, shape, layout)
        layer_backward(timer, shape, layout)
        ratios[dtype] = min(1.0, timer.cost.seconds / seconds)
    return ratios


def measure(ranks: int, seconds: float, repeats: int = 5) -> tuple[dict, dict[str, LinkFit]]:
    """(compute rates per core with ``ranks`` cores busy, averaged over ranks; collective fits)."""
    from plait.mesh import ParallelDims
    from plait.testing import WorkerPool

    pool = WorkerPool(ranks)
    try:
        results = pool.run(_calibrate_rank, ParallelDims(dp=ranks, pp=1, tp=1), seconds, SIZES, repeats,
                           timeout_s=600)
    finally:
        pool.shutdown()
    computes = [r["compute"] for r in results]
    compute = {key: ({dtype: statistics.fmean(c[key][dtype] for c in computes) for dtype in computes[0][key]}
                     if isinstance(computes[0][key], dict) else statistics.fmean(c[key] for c in computes))
               for key in computes[0]}
    fits = {}
    for op in MEASURED:  # the slowest rank's cost at each size
        points = [(size, max(r["collectives"][op][i][1] for r in results)) for i, size in enumerate(SIZES)]
        fits[op] = fit(points, FACTORS[op](ranks))
    return compute, fits


def calibrate(seconds: float = 1.0) -> HardwareProfile:
    cores = usable_cores()
    compute, collectives = measure(max(2, min(cores, 8)), seconds)
    shared = collectives["all_reduce"]
    reference = compute.pop("reference_block_s")
    profile = HardwareProfile(
        name="cpu", peak_flops=dict(compute["matmul"]), gemm_efficiency=1.0, attention_efficiency=1.0,
        memory_bytes=_physical_memory(), memory_bandwidth=compute["memory_bandwidth"], memory_efficiency=1.0,
        devices_per_node=max(cores, 64), intra_node_bandwidth=shared.bandwidth, inter_node_bandwidth=shared.bandwidth,
        intra_node_latency_s=shared.latency_s, inter_node_latency_s=shared.latency_s, link_efficiency=1.0,
        kernel_latency_s=compute["launch_s"], framework_memory_bytes=0.0, comm_overlaps_compute=False, cores=cores,
        measured_flops=dict(compute["matmul"]), measured_attention=dict(compute["attention"]),
        collectives=collectives, collective_group_size=max(2, min(cores, 8)),
        source=f"plait calibrate on {os.uname().nodename}, {time.strftime('%Y-%m-%d %H:%M')}, 1 thread per core")
    mix = kernel_mix_efficiency(profile, reference, max(2, min(cores, 8)))
    return dataclasses.replace(profile, kernel_mix_efficiency=mix)


def _physical_memory() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return 16e9


def write_profile(profile: HardwareProfile, path: Path | None = None) -> Path:
    path = Path(path) if path else default_profile_path()
    atomic_write_text(path, profile.to_json())
    return path
