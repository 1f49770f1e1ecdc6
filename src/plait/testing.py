"""Run a function on N gloo ranks, reusing spawned workers (for tests and benchmarks).

Spawning ranks costs seconds here; re-creating a process group inside live workers costs
tens of milliseconds. ``WorkerPool`` therefore spawns its workers once and, for each
``run``, builds a fresh process group over the first ``world_size`` of them, calls
``fn(ctx, *args)`` on every rank with a :class:`~plait.mesh.ParallelContext`, and tears the
group down again. A failure on any rank is reported with that rank's traceback; a run that
outlives its timeout kills the pool (it is respawned on next use) and raises, so a hang
fails a test instead of blocking CI.

``fn`` must be importable by name (a module-level function) and return picklable values
(floats, CPU tensors, dicts of them).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

from plait.mesh import ParallelDims


class DistributedRunError(RuntimeError):
    pass


def _worker_main(rank: int, tasks: "mp.Queue", results: "mp.Queue") -> None:
    import torch
    import torch.distributed as dist

    from plait.mesh import build_context

    torch.set_num_threads(1)  # one thread per rank: ranks share the machine's cores
    while True:
        job = tasks.get()
        if job is None:
            break
        job_id, fn, args, dims, store_path, timeout_s = job
        try:
            store = dist.FileStore(store_path, dims.world_size)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=dims.world_size,
                                    timeout=timedelta(seconds=timeout_s))
            ctx = build_context(dims, torch.device("cpu"), "gloo")
            value = fn(ctx, *args)
            dist.barrier()
            results.put((job_id, rank, True, value))
        except BaseException:  # report everything, including assertion errors, to the parent
            results.put((job_id, rank, False, traceback.format_exc()))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


class WorkerPool:
    """``size`` spawned worker processes that run jobs on process groups of up to ``size`` ranks."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._context = mp.get_context("spawn")
        self._processes: list[mp.Process] = []
        self._job_id = 0
        self._tmp = tempfile.TemporaryDirectory(prefix="plait-pool-")

    def _start(self) -> None:
        self._tasks = [self._context.Queue() for _ in range(self.size)]
        self._results = self._context.Queue()
        self._processes = [self._context.Process(target=_worker_main, args=(rank, self._tasks[rank], self._results),
                                                 daemon=True, name=f"plait-rank{rank}")
                           for rank in range(self.size)]
        for process in self._processes:
            process.start()

    def run(self, fn: Callable[..., Any], dims: ParallelDims, *args: Any, timeout_s: float = 120.0) -> list[Any]:
        """``[fn(ctx_rank, *args) for every rank]``, run concurrently on ``dims.world_size`` ranks."""
        world = dims.world_size
        if world > self.size:
            raise ValueError(f"layout {dims} needs {world} ranks; the pool has {self.size}")
        if not self._processes or not all(p.is_alive() for p in self._processes):
            self.close()
            self._start()
        self._job_id += 1
        store_path = os.path.join(self._tmp.name, f"store-{self._job_id}")
        # Collectives time out a little before the job does, so ranks report instead of hanging.
        for rank in range(world):
            self._tasks[rank].put((self._job_id, fn, args, dims, store_path, max(5.0, timeout_s - 5.0)))
        values: dict[int, Any] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        while len(values) + len(failures) < world:
            # After the first failure give the others a short grace to report, then stop waiting.
            remaining = deadline - time.monotonic()
            if failures:
                remaining = min(remaining, 3.0)
            try:
                job_id, rank, ok, value = self._results.get(timeout=max(0.01, remaining))
            except queue.Empty:
                break
            if job_id != self._job_id:
                continue  # a late report from a job that already failed
            (values if ok else failures)[rank] = value
        if len(values) < world:
            missing = sorted(set(range(world)) - set(values) - set(failures))
            if missing:
                self.close()  # the silent ranks may be stuck in a collective: start afresh next time
            lines = [f"{fn.__qualname__} on {dims} failed:"]
            lines += [f"--- rank {rank} ---\n{tb}" for rank, tb in sorted(failures.items())]
            if missing:
                lines.append(f"ranks {missing} did not finish within {timeout_s:.0f} s (hang or crash)")
            raise DistributedRunError("\n".join(lines))
        return [values[rank] for rank in range(world)]

    def close(self) -> None:
        for process in self._processes:
            if process.is_alive():
                process.kill()
        for process in self._processes:
            process.join(timeout=5)
        self._processes = []

    def shutdown(self) -> None:
        for tasks, process in zip(getattr(self, "_tasks", []), self._processes):
            if process.is_alive():
                tasks.put(None)
        for process in self._processes:
            process.join(timeout=5)
        self.close()
        self._tmp.cleanup()
