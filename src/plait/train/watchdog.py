"""Hang diagnosis: a watchdog thread per rank that ends a job which stopped making progress, and
says where it stopped.

A rank *stalls* when it has waited in a collective for ``--hang-timeout`` seconds (default
120) with no collective started or finished in between (``FlightRecorder.stalled_for``). A
computing rank never stalls: the ranks waiting for it do. The protocol goes through files in
``<out>/hang/`` (the run directory is shared by the ranks already: checkpoints are written
into it by all of them), not through the process group or its store, which may be hosted by
the very rank that hangs:

1. the first rank to stall writes its record (``rank-00003.json``) and creates ``ALARM``;
2. every live rank's watchdog sees ``ALARM`` within a second and writes its record;
3. the first to create ``REPORTER`` (``O_EXCL``) waits a few seconds for the others' records,
   writes ``summary.txt`` (``plait.flight_recorder.summarize``) and prints it; every rank then
   exits with ``HANG_EXIT_CODE``, which the launcher passes on.

A hung-but-alive job thus ends within about ``--hang-timeout`` plus a few seconds instead of
the collective ``--timeout`` (600 s). Files older than this watchdog's start (a previous run in
the same ``--out``) are ignored. The thread runs while the main thread waits inside gloo or
NCCL (both release the interpreter lock there); a rank stopped by a signal, or stuck holding
the lock, cannot write its record, and the summary names it silent.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from plait.flight_recorder import FlightRecorder, summarize

HANG_EXIT_CODE = 3
REPORT_WAIT_S = 5.0  # how long the reporter waits for the other ranks' records


class HangWatchdog:
    """``with HangWatchdog(recorder, world_size, out_dir, timeout_s):`` around training (no-op for
    one process or ``timeout_s <= 0``)."""

    def __init__(self, recorder: FlightRecorder, world_size: int, out_dir: str | Path, timeout_s: float,
                 poll_s: float = 1.0) -> None:
        self.recorder, self.world_size, self.timeout_s, self.poll_s = recorder, world_size, timeout_s, poll_s
        self.folder = Path(out_dir) / "hang"
        self.rank = recorder.rank
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "HangWatchdog":
        if self.world_size > 1 and self.timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="plait-hang-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _fresh(self, name: str, since: float | None = None) -> bool:
        """Whether ``hang/name`` exists and was written by this job (at or after ``since``)."""
        try:
            return (self.folder / name).stat().st_mtime >= (self.started if since is None else since) - 1.0
        except OSError:
            return False

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                stalled = self.recorder.stalled_for()
                if stalled >= self.timeout_s and not self._fresh("ALARM"):
                    self.recorder.write(self.folder)
                    (self.folder / "ALARM").write_text(json.dumps({"rank": self.rank, "stalled_s": stalled}) + "\n")
                if self._fresh("ALARM"):
                    self._report()
            except OSError:  # the run directory cannot be written: nothing to report into
                return

    def _report(self) -> None:
        """Write this rank's record; the elected rank prints the summary; every rank exits."""
        self.recorder.hung = True  # the main thread's failing collective now stays quiet
        alarm_time = (self.folder / "ALARM").stat().st_mtime
        self.recorder.write(self.folder)
        if self._elected():
            records = [f"rank-{rank:05d}.json" for rank in range(self.world_size)]
            deadline = time.time() + REPORT_WAIT_S
            while time.time() < deadline and not all(self._fresh(name, alarm_time) for name in records):
                time.sleep(0.2)
            snapshots = {rank: json.loads((self.folder / name).read_text()) if self._fresh(name, alarm_time) else None
                         for rank, name in enumerate(records)}
            alarm = json.loads((self.folder / "ALARM").read_text())
            lines = summarize(snapshots, self.world_size, alarm["stalled_s"])
            (self.folder / "summary.txt").write_text("\n".join(lines) + "\n")
            print(f"plait: error: {lines[0]} (each rank's last collectives: {self.folder}/)", file=sys.stderr)
            for line in lines[1:]:
                print(f"plait: {line}", file=sys.stderr)
        else:  # exit once the summary is out (the launcher stops the job at the first exit)
            deadline = time.time() + REPORT_WAIT_S + 5.0
            while time.time() < deadline and not self._fresh("summary.txt", alarm_time):
                time.sleep(0.2)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(HANG_EXIT_CODE)

    def _elected(self) -> bool:
        reporter = self.folder / "REPORTER"
        if reporter.exists() and not self._fresh("REPORTER"):
            reporter.unlink(missing_ok=True)  # a previous run's
        try:
            os.close(os.open(reporter, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False
