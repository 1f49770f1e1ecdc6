"""Preemption: SIGTERM or SIGINT saves a checkpoint at the next step boundary, then the run ends.

A scheduler that preempts a job (Slurm, Kubernetes) sends SIGTERM and kills it a grace period
later; Ctrl-C sends SIGINT to every process of the terminal's group; plait's own launcher and
``torchrun`` pass the signal on to their workers. The handler only notes the signal. At each step
boundary the ranks agree on it (a max of the signal number over all ranks: every rank learns
if any rank was signalled, even when one saw its signal a step later), all save a
checkpoint, and every worker ends with exit code 128 + the signal, as a shell reports a process
the signal ended. Rerunning the same command resumes from that checkpoint, bitwise.

A second SIGINT does not wait for the step: it stops the process at once (KeyboardInterrupt).
"""
from __future__ import annotations

import signal
from pathlib import Path

from torch.distributed import ReduceOp

from plait.mesh import ParallelContext

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a signal after saving ``checkpoint`` (None: nothing to save yet)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        saved = f"saved {checkpoint}" if checkpoint else "no step had finished, nothing saved"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; {saved}; "
                         "rerun the same command to resume")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequests:
    """Notes SIGTERM and SIGINT while installed (a context manager; the old handlers come back)."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _note(self, signum: int, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: do not wait for the step boundary
        self.signum = self.signum or signum

    def agreed(self, ctx: ParallelContext) -> int:
        """The signal any rank noted (0: none); one scalar all-reduce over every rank."""
        if ctx.world_size == 1:
            return self.signum
        (value,) = ctx.comm("world").all_reduce_scalars([float(self.signum)], op=ReduceOp.MAX, tag="control")
        return int(value)
