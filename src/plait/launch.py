"""Processes of a plait command: whether this one is a launched worker, how the parent starts
local workers (as ``torchrun --standalone`` does), and what the launcher says when they end."""
from __future__ import annotations

import os
import signal
import sys
import uuid
from typing import Sequence


def under_launcher() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def launch_local_workers(nproc: int, max_restarts: int, argv: Sequence[str]) -> int:
    """Start ``nproc`` workers running ``plait ARGV``, like ``torchrun --standalone --nproc-per-node N``."""
    import logging

    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # each sets its own level; plait says what matters
    # Restarted workers must not read the previous attempt's gloo addresses from a store shared
    # with the agent (seen here: "Connection refused" to a dead rank's port); own store per attempt.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=max_restarts,
                          monitor_interval=0.2)
    try:
        elastic_launch(config, sys.executable)("-m", "plait", *argv)
    except SignalException as stopped:  # the agent passed the signal on; the workers saved and said so
        return 128 + int(stopped.sigval)
    except ChildFailedError as error:
        from plait.train.watchdog import HANG_EXIT_CODE
        if any(f.exitcode == HANG_EXIT_CODE for f in error.failures.values()):
            return HANG_EXIT_CODE  # a worker printed where the job hung
        preempted = {f.exitcode for f in error.failures.values()} & {128 + signal.SIGTERM, 128 + signal.SIGINT}
        if preempted and all(f.exitcode in preempted for f in error.failures.values()):
            return preempted.pop()  # the workers were signalled directly, saved and said so
        rank = cause_of({rank: (f.exitcode, f.timestamp) for rank, f in error.failures.items()})
        code = error.failures[rank].exitcode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        print(f"plait: error: worker rank {rank} {how} (exit code {code}; its message, if any, is above)",
              file=sys.stderr)
        return 1
    return 0


def cause_of(failures: dict[int, tuple[int, float]]) -> int:
    """The rank whose failure ended a job, from each failed rank's (exit code, time): a worker
    killed by a signal if any (its peers then fail on the lost connection, sometimes before the
    agent records the kill), else the earliest failure. SIGTERM is how the agent stops the
    survivors, so a worker ended by it is the cause only when no other failed (a survivor stopped
    before it noticed its peer's exit did not end the job)."""
    causes = {rank: f for rank, f in failures.items() if f[0] != -signal.SIGTERM} or failures
    signalled = sorted(rank for rank, (code, _) in causes.items() if code < 0)
    return signalled[0] if signalled else min(causes, key=lambda rank: (causes[rank][1], rank))
