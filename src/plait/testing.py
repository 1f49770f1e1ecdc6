"""Run a function on N gloo ranks, reusing spawned workers (for tests and benchmarks).

Spawning ranks costs seconds here; re-creating a process group inside live workers costs
tens of milliseconds. ``WorkerPool`` therefore spawns its workers once and, for each
``run``, builds a fresh process group over the first ``world_size`` of them, calls
``fn(ctx, *args)`` on every rank with a :class:`~plait.mesh.ParallelContext`, and tears the
group down again. A failure on any rank is reported with that rank's traceback; a run that
outlives its timeout kills the ranks that did not report (they are respawned on next use) and
raises, so a hang fails a test instead of blocking CI.

``fn`` must be importable by name (a module-level function) and return picklable values
(floats, CPU tensors, dicts of them).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any, Callable

from plait.mesh import ParallelDims


class DistributedRunError(RuntimeError):
    pass


def _exit_with_parent(poll_s: float = 1.0) -> None:
    """End this worker when its parent dies (a killed test run, an interrupted benchmark). A
    daemon worker is only stopped at its parent's normal exit; otherwise it would run its job to
    the end, on cores the next run is timing, and find out only when it reports."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:  # a dead parent's children are adopted by another process
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="plait-parent-watch", daemon=True).start()


def _worker_main(rank: int, connection) -> None:
    _exit_with_parent()
    import torch
    import torch.distributed as dist

    from plait.mesh import build_context

    torch.set_num_threads(1)  # one thread per rank: ranks share the machine's cores
    while True:
        job = connection.recv()
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
            report = (job_id, True, value)
        except BaseException:  # report everything, including assertion errors, to the parent
            report = (job_id, False, traceback.format_exc())
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        connection.send(report)


class WorkerPool:
    """``size`` spawned worker processes that run jobs on process groups of up to ``size`` ranks.

    Each worker talks to the parent over its own pipe, so a worker that hangs can be killed and
    respawned alone: the others, and their pipes, stay as they are.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._context = mp.get_context("spawn")
        self._processes: list[mp.Process | None] = [None] * size
        self._connections: list[Any] = [None] * size
        self._job_id = 0
        self._tmp = tempfile.TemporaryDirectory(prefix="plait-pool-")

    def _ensure_alive(self, ranks: range) -> None:
        """(Re)spawn the workers of ``ranks`` that are not running; all start before any is waited on."""
        for rank in ranks:
            process = self._processes[rank]
            if process is not None and process.is_alive():
                continue
            ours, theirs = self._context.Pipe()
            process = self._context.Process(target=_worker_main, args=(rank, theirs), daemon=True,
                                            name=f"plait-rank{rank}")
            process.start()
            theirs.close()
            self._processes[rank], self._connections[rank] = process, ours

    def _kill(self, ranks) -> None:
        for rank in ranks:
            process = self._processes[rank]
            if process is not None and process.is_alive():
                process.kill()
            if process is not None:
                process.join(timeout=5)
            if self._connections[rank] is not None:
                self._connections[rank].close()
            self._processes[rank] = self._connections[rank] = None

    def run(self, fn: Callable[..., Any], dims: ParallelDims, *args: Any, timeout_s: float = 120.0) -> list[Any]:
        """``[fn(ctx_rank, *args) for every rank]``, run concurrently on ``dims.world_size`` ranks."""
        world = dims.world_size
        if world > self.size:
            raise ValueError(f"layout {dims} needs {world} ranks; the pool has {self.size}")
        self._ensure_alive(range(world))
        self._job_id += 1
        store_path = os.path.join(self._tmp.name, f"store-{self._job_id}")
        # Collectives time out a little before the job does, so ranks report instead of hanging.
        for rank in range(world):
            self._connections[rank].send((self._job_id, fn, args, dims, store_path, max(5.0, timeout_s - 5.0)))
        values: dict[int, Any] = {}
        failures: dict[int, str] = {}
        waiting = {self._connections[rank]: rank for rank in range(world)}
        deadline = time.monotonic() + timeout_s
        while waiting:
            # After the first failure give the others a short grace to report, then stop waiting.
            remaining = deadline - time.monotonic()
            if failures:
                remaining = min(remaining, 3.0)
            ready = wait(list(waiting), timeout=max(0.01, remaining))
            if not ready:
                break
            for connection in ready:
                rank = waiting.pop(connection)
                try:
                    job_id, ok, value = connection.recv()
                except (EOFError, OSError):  # the worker died
                    failures[rank] = "the worker process died"
                    continue
                assert job_id == self._job_id, "a report from another job"  # each job gets one per rank
                (values if ok else failures)[rank] = value
        if len(values) < world:
            missing = sorted(set(range(world)) - set(values) - set(failures))
            # silent ranks may be stuck in a collective, dead ones are gone: respawn them next time
            self._kill([*missing, *(r for r, why in failures.items() if why == "the worker process died")])
            lines = [f"{fn.__qualname__} on {dims} failed:"]
            lines += [f"--- rank {rank} ---\n{tb}" for rank, tb in sorted(failures.items())]
            if missing:
                lines.append(f"ranks {missing} did not finish within {timeout_s:.0f} s (hang or crash)")
            raise DistributedRunError("\n".join(lines))
        return [values[rank] for rank in range(world)]

    def close(self) -> None:
        self._kill(range(self.size))

    def shutdown(self) -> None:
        for connection, process in zip(self._connections, self._processes):
            if process is not None and process.is_alive():
                try:
                    connection.send(None)
                except OSError:
                    pass
        for process in self._processes:
            if process is not None:
                process.join(timeout=5)
        self.close()
        self._tmp.cleanup()
