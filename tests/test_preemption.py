"""Preemption: a real SIGTERM or SIGINT to `plait train` (one process, or the launcher of two)
saves a checkpoint at the next step boundary and exits 128 + signal within a minute; rerunning
the same command resumes (on dp2 x ZeRO-2: ending bitwise where the uninterrupted run ends)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from plait.checkpoint import complete_checkpoints, read_full_state
from test_cli import run_plait

STEPS = 40


def command(corpus, out, layout):
    return ["train", "--model", "tiny", "--tokenizer", "byte", "--data", str(corpus), "--steps", str(STEPS),
            "--global-batch", "4", "--micro-batch", "2", "--seq-len", "32", "--eval-every", "0",
            "--checkpoint-every", "1000", "--no-progress", "--no-tensorboard", "--no-plot", "--timeout", "60",
            "--out", str(out), *layout]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "a.py"
    path.write_text("".join(f"def f{n}(x):\n    return x * {n}\n" for n in range(400)))
    return path


@pytest.mark.parametrize("layout, signum", [
    ([], signal.SIGINT),
    pytest.param(["--nproc", "2", "--dp", "2", "--zero", "2"], signal.SIGTERM, marks=pytest.mark.large),  # 18 s
], ids=["1proc-sigint", "dp2-sigterm"])
def test_a_signal_saves_at_the_step_boundary_and_the_rerun_resumes_bitwise(corpus, tmp_path, layout, signum):
    out = tmp_path / "run"
    env = {**os.environ, "PLAIT_CACHE": str(tmp_path / "cache")}
    env.pop("WORLD_SIZE", None)
    job = subprocess.Popen([sys.executable, "-m", "plait", *command(corpus, out, layout)], env=env, cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.05)
    job.send_signal(signum)  # to the launcher, which passes it on, or to the only process
    signalled = time.monotonic()
    stdout, stderr = job.communicate(timeout=60)
    assert time.monotonic() - signalled < 60
    assert job.returncode == 128 + signum, stderr
    stopped = [line for line in stderr.splitlines() if line.startswith("plait: stopped by")]
    assert len(stopped) == 1 and signal.Signals(signum).name in stopped[0] and "Traceback" not in stderr, stderr
    (saved,) = complete_checkpoints(out)
    step = int(saved.name.split("-")[1])
    assert 5 <= step < STEPS and f"after step {step}; saved {saved}" in stopped[0]
    assert len(metrics.read_text().splitlines()) == step

    resumed = run_plait(command(corpus, out, layout), tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {saved} (step {step})" in resumed.stdout
    if not layout:
        return  # the same resume on one process is bitwise too; checked once, on two
    clean = run_plait(command(corpus, tmp_path / "clean", layout), tmp_path)
    assert clean.returncode == 0, clean.stderr
    expected = read_full_state(complete_checkpoints(tmp_path / "clean")[-1])
    actual = read_full_state(complete_checkpoints(out)[-1])
    assert complete_checkpoints(out)[-1].name == f"step-{STEPS:08d}" and expected.keys() == actual.keys()
    for key, value in expected.items():
        assert torch.equal(value, actual[key]), key
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (out, tmp_path / "clean")]
    assert len(losses[0]) == STEPS and losses[0] == losses[1]  # every step's loss, the same floats
