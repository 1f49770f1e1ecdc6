"""The sections of ``make gpu-check`` (``benchmarks/gpu_check.py``) that run two ranks: plait's
layouts under ``plait train --nproc 2`` against one process, the all-reduce bus bandwidth, and ring
attention against PyTorch's own ``context_parallel``. On the CPU they run with gloo and tiny
shapes; on CUDA with NCCL, one rank per GPU, when two or more GPUs are visible."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
LOSS_TOLERANCE = 1e-5  # fp32: one process against another layout or device (tests/helpers.tiny_config)


def subprocess_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("WORLD_SIZE", None)
    return env



MULTI_RANK_LAYOUTS = {
    "dp2": ["--dp", "2"],
    "tp2 + SP": ["--tp", "2", "--sequence-parallel"],
    "pp2 1F1B": ["--pp", "2", "--microbatches", "4", "--schedule", "1f1b"],
    "dp2 ZeRO-3": ["--dp", "2", "--zero", "3"],
    "cp2 ring": ["--cp", "2", "--cp-mode", "ring"],
    "cp2 alltoall": ["--cp", "2", "--cp-mode", "alltoall"],
}


def plait_losses(tmp: Path, name: str, nproc: int, layout: list[str], steps: int, device: str,
                 model: str = "tiny", seq_len: int = 64) -> list[float]:
    out = tmp / name.replace(" ", "_").replace(",", "")
    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("".join(f"def f{n}(x):\n    return x * {n} + {n % 7}\n" for n in range(4000)))
    command = [sys.executable, "-m", "plait", "train", "--model", model, "--data", str(corpus), "--tokenizer",
               "byte", "--nproc", str(nproc), *layout, "--steps", str(steps), "--global-batch", "8",
               "--seq-len", str(seq_len), "--dtype", "float32", "--lr", "1e-3", "--warmup-steps", "2", "--eval-every", "0",
               "--device", device, "--out", str(out), "--no-progress", "--no-plot", "--no-tensorboard"]
    result = subprocess.run(command, cwd=tmp, env={**subprocess_env(), "PLAIT_CACHE": str(tmp / "cache")},
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"{name}: exit {result.returncode}: {result.stderr.strip()[-1500:]}")
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _join(rank: int, world: int, port: int, backend: str) -> torch.device:
    """A spawned worker joins its group on 127.0.0.1:port; returns its device."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    return device


def _allreduce_worker(rank: int, world: int, nbytes: int, port: int, backend: str, queue) -> None:
    import torch.distributed as dist

    device = _join(rank, world, port, backend)
    tensor = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    for _ in range(3):
        dist.all_reduce(tensor)
    if backend == "nccl":
        torch.cuda.synchronize(device)
    repeats = 10
    start = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(tensor)
    if backend == "nccl":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    if rank == 0:  # bus bandwidth, as nccl-tests defines it: 2 (n - 1) / n bytes per rank
        queue.put(2 * (world - 1) / world * nbytes / seconds)
    dist.barrier()
    dist.destroy_process_group()


def run_workers(worker, world: int, args: tuple, timeout_s: float):
    """Spawn ``world`` ranks of ``worker(rank, world, *args, port, backend, queue)`` and return what
    rank 0 puts on the queue; ranks still running after ``timeout_s`` (a hang: NCCL would wait
    out its own 10-minute timeout) are killed and the section fails, leaving the others' time."""
    import queue as queues
    import socket
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.get_context("spawn").Queue()
    workers = mp.start_processes(worker, args=(world, *args[:-1], port, args[-1], results), nprocs=world,
                                 start_method="spawn", join=False)
    try:
        result = results.get(timeout=timeout_s)
        workers.join(timeout=30)
        return result
    except queues.Empty:
        raise TimeoutError(f"{worker.__name__}: no result within {timeout_s:.0f} s") from None
    finally:
        for process in workers.processes:
            if process.is_alive():
                process.kill()


def allreduce_bandwidth(world: int, nbytes: int, backend: str) -> float:
    return run_workers(_allreduce_worker, world, (nbytes, backend), timeout_s=60)


def multi_rank(device: torch.device, steps: int, layouts: tuple[str, ...], big_messages: tuple[str, int],
               allreduce_bytes: int) -> dict:
    """``layouts`` (of MULTI_RANK_LAYOUTS) under ``plait train --nproc 2`` against one process, fp32
    losses to LOSS_TOLERANCE over ``steps``; a pp2 1F1B run of ``big_messages`` = (preset, seq_len);
    the all-reduce bus bandwidth of ``allreduce_bytes``."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and gpus < 2:
        return {"status": "skipped", "why": f"{gpus} GPU: needs 2 or more"}
    device = device.type
    figures: dict[str, Any] = {"steps": steps, "tolerance": LOSS_TOLERANCE, "layouts": {}}
    failed = False
    # on the CPU each run is mostly interpreter and worker start-up: two at a time; on GPUs one
    # job owns them
    concurrent = 1 if device == "cuda" else 2
    # (model, seq_len, layout) of each run; NCCL makes a send wait for its receive only above its
    # buffer size (a few MB), so one pipeline run has messages that large (a wrong message order
    # hangs there, not with tiny's)
    runs = {name: ("tiny", 64, MULTI_RANK_LAYOUTS[name]) for name in layouts}
    big_model, big_seq = big_messages
    if (big_model, big_seq) != ("tiny", 64):
        runs[f"pp2 1F1B, {big_model} seq {big_seq}"] = (big_model, big_seq, MULTI_RANK_LAYOUTS["pp2 1F1B"])
    with tempfile.TemporaryDirectory() as tmp:
        references = {}
        for model, seq_len in dict.fromkeys((model, seq_len) for model, seq_len, _ in runs.values()):
            references[model, seq_len] = plait_losses(Path(tmp), f"one {model} {seq_len}", 1, [], steps, device,
                                                      model, seq_len)  # also fills the token cache
        with ThreadPoolExecutor(concurrent) as runner:
            pending = {name: runner.submit(plait_losses, Path(tmp), name, 2, layout, steps, device, model, seq_len)
                       for name, (model, seq_len, layout) in runs.items()}
        for name, run in pending.items():
            losses = run.result()
            reference = references[runs[name][:2]]
            error = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
            figures["layouts"][name] = {"max_loss_rel_error": error, "ok": error <= LOSS_TOLERANCE}
            failed |= error > LOSS_TOLERANCE
    backend = "nccl" if device == "cuda" else "gloo"
    bandwidth = allreduce_bandwidth(2, allreduce_bytes, backend)
    figures.update(allreduce_backend=backend, allreduce_mb=allreduce_bytes >> 20,
                   allreduce_bus_gb_s=bandwidth / 1e9, status="failed" if failed else "ok")
    return figures


def _context_parallel_worker(rank: int, world: int, shape: tuple, port: int, backend: str, queue) -> None:
    """One rank: plait's ring attention, and on CUDA torch's ``context_parallel``, on its slice."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from plait.context_parallel import context_slice
    from plait.context_parallel.ring import ring_attention
    from plait.mesh import ParallelDims, build_context

    device = _join(rank, world, port, backend)
    ctx = build_context(ParallelDims(cp=world), device, backend)
    dtype = torch.bfloat16 if backend == "nccl" else torch.float32
    generator = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(shape, generator=generator).to(device, dtype) for _ in range(4))
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    report: dict[str, Any] = {}

    def timed(run) -> float:
        for _ in range(2):
            run()
        if backend == "nccl":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(5):
            run()
        if backend == "nccl":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / 5

    mine = [context_slice(t, rank, world, dim=2) for t in (q, k, v, grad)]

    def plait_run():
        leaves = [t.detach().requires_grad_() for t in mine[:3]]
        out = ring_attention(*leaves, ctx.comm("cp"))
        out.backward(mine[3])
        return out

    out = plait_run()
    reference = context_slice(want, rank, world, dim=2)
    report["plait_rel_error"] = float((out.detach().float() - reference).norm() / reference.norm())
    report["plait_s"] = timed(plait_run)
    if backend == "nccl":
        try:
            from torch.distributed.tensor.experimental import context_parallel

            mesh = ctx.mesh["cp"]

            def torch_run():
                buffers = [t.detach().clone() for t in (q, k, v)]  # sharded in place on entry
                with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2]):
                    theirs = F.scaled_dot_product_attention(*(b.requires_grad_() for b in buffers), is_causal=True)
                    theirs.backward(context_slice(grad, rank, world, dim=2))
                return theirs

            theirs = torch_run()
            report["torch_rel_error"] = float((theirs.float() - reference).norm() / reference.norm())
            report["torch_s"] = timed(torch_run)
        except Exception as error:  # recorded, not fatal: the API is experimental
            report["torch_error"] = f"{type(error).__name__}: {error}"[:300]
    if rank == 0:
        queue.put(report)
    dist.barrier()
    dist.destroy_process_group()


def context_parallel(device: torch.device) -> dict:
    """Ring attention of one causal attention sharded over 2 ranks against the full-sequence SDPA,
    and on CUDA against torch's own ``context_parallel``."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and gpus < 2:
        return {"status": "skipped", "why": f"{gpus} GPU: needs 2 or more"}
    backend = "nccl" if device.type == "cuda" else "gloo"
    shape = (1, 32, 16384, 64) if backend == "nccl" else (1, 4, 256, 16)
    report = run_workers(_context_parallel_worker, 2, (shape, backend), timeout_s=120)
    tolerance = 2e-2 if backend == "nccl" else 1e-5  # bf16 on CUDA, fp32 on the CPU
    failed = report["plait_rel_error"] > tolerance or report.get("torch_rel_error", 0.0) > tolerance
    if "torch_s" in report:
        report["plait_over_torch"] = report["plait_s"] / report["torch_s"]
    return {"shape": list(shape), "backend": backend, "tolerance": tolerance, **report,
            "status": "failed" if failed else "ok"}
