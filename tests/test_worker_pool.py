"""The spawned worker pool that tests and benchmarks share."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# A parent that starts two workers, prints their pids and keeps them busy for ten minutes.
PARENT = textwrap.dedent("""
    import os, time
    from plait.mesh import ParallelDims
    from plait.testing import WorkerPool

    def pid(ctx):
        return os.getpid()

    def busy(ctx):
        time.sleep(600)

    if __name__ == "__main__":
        pool = WorkerPool(2)
        dims = ParallelDims(dp=2, pp=1, tp=1)
        print(*pool.run(pid, dims), flush=True)
        pool.run(busy, dims, timeout_s=900)
""")


def _running(pid: int) -> bool:
    """Alive and not a zombie (an adopted child may wait unreaped under a container's init)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.timeout(60)
def test_busy_workers_end_when_their_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    workers: list[int] = []
    try:
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) == 2 and all(_running(pid) for pid in workers)
        parent.send_signal(signal.SIGKILL)  # no exit handler runs: daemon workers are not stopped
        parent.wait()
        deadline = time.monotonic() + 15
        while any(_running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_running(pid) for pid in workers), "workers outlived their parent"
    finally:
        parent.kill()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
