"""Hang diagnosis: the flight recorder of every collective, its summary, and a real hung job."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from plait.flight_recorder import FlightRecorder, summarize
from plait.mesh import ParallelDims
from test_cli import _workers, text_dir  # noqa: F401  (fixture)


def _record_collectives(ctx):
    dp = ctx.comm("dp")
    ctx.recorder.set_step(0)
    handle = dp.all_reduce(torch.ones(4), tag="grads", async_op=True)
    pending = [e.op for e in ctx.recorder.in_flight()]
    handle.wait()
    dp.all_gather(torch.empty(4), torch.ones(2), tag="params")
    dp.reduce_scatter(torch.empty(2), torch.ones(4), tag="grads")
    if dp.rank == 0:
        dp.send(torch.ones(3), 1, tag=5).wait()
    else:
        dp.recv(torch.empty(3), 0, tag=5)
    return pending, ctx.recorder.snapshot()


def test_every_collective_is_recorded_with_matching_sequence_numbers(pool):
    results = pool.run(_record_collectives, ParallelDims(dp=2))
    for rank, (pending, snapshot) in enumerate(results):
        assert pending == ["all_reduce"]  # in flight until its handle is waited on
        entries = snapshot["entries"]
        ops = [(e["op"], e["tag"], e["group_seq"]) for e in entries]
        p2p = ("send", "activations", 1) if rank == 0 else ("recv", "", 1)
        assert ops == [("all_reduce", "grads", 1), ("all_gather", "params", 2), ("reduce_scatter", "grads", 3), p2p]
        assert all(e["end"] is not None and e["end"] >= e["start"] for e in entries)
        assert entries[0]["bytes"] == 16 and list(entries[0]["ranks"]) == [0, 1]
        assert entries[3]["peer"] == 1 - rank


def _record_until_done_on_the_device(ctx):
    """NCCL's mode (its calls return once queued) run under gloo: a record ends when its handle
    reports the work completed, found by polling, not when the call returns."""
    dp = ctx.comm("dp")
    dp.ends_on_device = True
    dp.all_reduce(torch.ones(4), tag="grads")
    opened = [e.op for e in ctx.recorder.entries if e.end is None]  # the call returned; not polled yet
    ctx.recorder.poll()
    closed = [e.op for e in ctx.recorder.entries if e.end is None]
    # a receive nobody has sent: its record stays open, and the rank counts as stalled
    buffer = torch.empty(3)
    handle = dp.post_recv(buffer, 1 - dp.rank, tag=9) if dp.rank == 0 else None
    time.sleep(0.3)
    stalled = ctx.recorder.stalled_for()
    waiting = [(e.op, e.peer) for e in ctx.recorder.in_flight()]
    dp.barrier()  # rank 1 sends only now
    if dp.rank == 1:
        dp.send(torch.ones(3), 0, tag=9).wait()
    else:
        handle.wait()
    deadline = time.time() + 5
    while ctx.recorder.in_flight() and time.time() < deadline:
        time.sleep(0.01)
    return opened, closed, stalled, waiting, ctx.recorder.in_flight()


def test_under_nccl_a_record_ends_when_the_device_has_run_it(pool):
    results = pool.run(_record_until_done_on_the_device, ParallelDims(dp=2))
    for rank, (opened, closed, stalled, waiting, left) in enumerate(results):
        assert opened == ["all_reduce"] and closed == [] and left == []
        if rank == 0:
            assert stalled >= 0.25 and waiting == [("recv", 1)]
        else:
            assert stalled == 0.0 and waiting == []


def _entry(seq, group_seq, op, start, end, ranks=(0, 1, 2, 3), group="dp", tag="grads", peer=None):
    return {"seq": seq, "group_seq": group_seq, "group": group, "ranks": list(ranks), "op": op, "tag": tag,
            "bytes": 1024, "peer": peer, "start": start, "end": end}


def test_summary_names_the_rank_behind_and_what_the_others_wait_in():
    now = 1000.0
    waiting = {"step": 5, "time": now, "last_progress": now - 130,
               "entries": [_entry(7, 7, "all_reduce", now - 140, now - 139),
                           _entry(8, 8, "all_reduce", now - 130, None)]}
    behind = {"step": 5, "time": now, "last_progress": now - 135,
              "entries": [_entry(7, 7, "all_reduce", now - 140, now - 135)]}
    lines = summarize({0: {**waiting, "rank": 0}, 1: {**behind, "rank": 1}, 2: {**waiting, "rank": 2}, 3: None},
                      4, 130)
    first = lines[0]
    assert first.startswith("no progress for 130 s at step 5: rank 1 is outside any collective")
    assert "for 135 s after dp/all_reduce 'grads' #7" in first
    assert "waiting for it: rank 0 in dp/all_reduce 'grads' #8" in first
    assert "rank 3 did not report" in first
    assert "  rank 0 waits in dp/all_reduce 'grads' #8 (1,024 bytes, ranks [0, 1, 2, 3]) for 130 s" in lines
    everyone_waits = summarize({0: {**waiting, "rank": 0}, 1: {**waiting, "rank": 1}}, 2, 130)
    assert "mismatched collectives" in everyone_waits[0]


def test_the_watchdog_fires_before_the_collective_timeout():
    from helpers import tiny_config
    assert tiny_config().watchdog_timeout_s == 120.0
    assert tiny_config(timeout_s=60.0).watchdog_timeout_s == 54.0  # a timeout still ends with a summary
    assert tiny_config(hang_timeout_s=0.0).watchdog_timeout_s == 0.0


def test_recorder_stalls_only_while_waiting():
    recorder = FlightRecorder()
    entry = recorder.begin("dp", (0, 1), "all_reduce", "grads", 8)
    assert recorder.stalled_for(time.time() + 50) >= 50
    recorder.end(entry)
    assert recorder.stalled_for(time.time() + 50) == 0.0  # computing is not stalling


def test_a_stopped_rank_ends_the_job_with_a_summary_within_the_hang_timeout(text_dir, tmp_path):  # noqa: F811
    """Rank 1 is stopped (SIGSTOP: alive, silent); rank 0 waits in its next collective. With
    --hang-timeout 4 the job ends a few seconds later, naming rank 1 and rank 0's collective."""
    env = {**os.environ, "PLAIT_CACHE": str(tmp_path / "cache")}
    env.pop("WORLD_SIZE", None)
    out = tmp_path / "o"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "plait", "train", "--model", "tiny", "--data", str(text_dir), "--tokenizer", "byte",
         "--nproc", "2", "--steps", "100000", "--global-batch", "4", "--seq-len", "64", "--out", str(out),
         "--hang-timeout", "4", "--no-progress", "--no-tensorboard", "--no-plot"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    ranks = {}
    for pid in _workers(launcher.pid):
        with open(f"/proc/{pid}/environ", "rb") as environ:
            variables = dict(item.split(b"=", 1) for item in environ.read().split(b"\0") if b"=" in item)
        ranks[int(variables[b"RANK"])] = pid
    os.kill(ranks[1], signal.SIGSTOP)
    stopped = time.monotonic()
    summary = out / "hang" / "summary.txt"
    while time.monotonic() - stopped < 60 and not summary.exists():
        time.sleep(0.1)
    noticed = time.monotonic() - stopped
    os.kill(ranks[1], signal.SIGCONT)  # let the launcher's SIGTERM end it
    _, stderr = launcher.communicate(timeout=90)
    assert summary.exists(), stderr
    assert noticed < 4 + 15, noticed
    assert launcher.returncode == 3, stderr
    text = summary.read_text()
    assert "rank 1 did not report" in text and "rank 0 waits in" in text, text
    assert "plait: error: no progress for" in stderr and "Traceback" not in stderr
    assert (out / "hang" / "rank-00000.json").exists()
