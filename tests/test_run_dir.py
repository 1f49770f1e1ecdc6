"""The run directory (issue 19, items 2, 3 and 6): a fresh start sets the old run aside, every
rank agrees on one default directory, a model directory's runs land under runs/."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from plait.checkpoint import latest_checkpoint
from plait.mesh import ParallelDims
from plait.run_dir import agreed_run_dir, default_run_dir, set_aside_previous_run


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"def f{n}(x):\n    return x + {n}\n" for n in range(2000)))
    return path


def plait(args, cwd, extra_env=None, timeout=240):
    env = {**os.environ, "PLAIT_CACHE": str(cwd / "cache"), **(extra_env or {})}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(name, None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=cwd)


def tiny_run(corpus, *extra):
    return ["-m", "plait", "train", "--model", "tiny", "--data", str(corpus), "--tokenizer", "byte",
            "--global-batch", "4", "--seq-len", "32", "--eval-every", "0", "--no-progress", "--no-tensorboard",
            "--no-plot", *extra]


def steps_of(run_dir: Path) -> list[int]:
    return sorted(int(path.name.split("-")[1]) for path in (run_dir / "checkpoints").glob("step-*"))


def test_no_resume_sets_the_previous_run_aside(corpus, tmp_path):
    out = tmp_path / "run"
    first = plait(tiny_run(corpus, "--steps", "6", "--checkpoint-every", "2", "--out", str(out)), tmp_path)
    assert first.returncode == 0, first.stderr
    assert steps_of(out) == [4, 6]
    assert "loss.png" not in first.stdout  # --no-plot writes none and names none

    again = plait(tiny_run(corpus, "--steps", "4", "--checkpoint-every", "2", "--no-resume", "--out", str(out)),
                  tmp_path)
    assert again.returncode == 0, again.stderr
    assert steps_of(out) == [2, 4]  # the new run's own checkpoints, none of the old one's
    (aside,) = out.glob("previous-*")
    assert f"was moved to {aside}" in again.stdout
    assert steps_of(aside) == [4, 6]  # nothing lost
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    assert latest_checkpoint(out).name == "step-00000004"  # what export takes

    resumed = plait(tiny_run(corpus, "--steps", "4", "--out", str(out)), tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "already at step 4 of 4" in resumed.stdout


def test_set_aside_leaves_other_directories_alone(tmp_path):
    assert set_aside_previous_run(tmp_path / "missing") is None
    (tmp_path / "notes.txt").write_text("mine")
    assert set_aside_previous_run(tmp_path) is None  # not a run: nothing moved
    assert (tmp_path / "notes.txt").exists()


def test_default_run_dir_of_a_model_directory_is_under_runs():
    assert default_run_dir("tiny", "STAMP") == os.path.join("runs", "tiny-STAMP")
    assert default_run_dir("/models/llama-3-8b/", "STAMP") == os.path.join("runs", "llama-3-8b-STAMP")
    assert default_run_dir("../ckpt/run7", "STAMP") == os.path.join("runs", "run7-STAMP")


def _agree_with_skewed_clocks(ctx):
    """Rank 1's clock reads a different second from rank 0's, as two hosts' (or a tick) can."""
    os.environ["TORCHELASTIC_RUN_ID"] = "none"
    real = time.strftime
    if ctx.rank == 1:
        time.strftime = lambda fmt, *args: "19990101-000000"
    try:
        return agreed_run_dir("tiny", ctx.rank, ctx.world_size)
    finally:
        time.strftime = real


def test_ranks_agree_on_one_default_run_dir(pool):
    first, second = pool.run(_agree_with_skewed_clocks, ParallelDims(dp=2))
    assert first == second and "19990101" not in first


def test_torchrun_without_out_writes_one_run_dir(corpus, tmp_path):
    run = plait(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 *tiny_run(corpus, "--steps", "2", "--checkpoint-every", "2")], tmp_path)
    assert run.returncode == 0, run.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("tiny-")
    assert steps_of(run_dir) == [2]


def test_a_run_directory_is_told_from_a_model_directory(tmp_path):
    """A Hugging Face directory has a config.json too: --no-resume never moves one aside, and
    plait generate on a run without a checkpoint says so instead of misreading its config.json."""
    from plait.generate import GenerateError, locate_model
    from plait.run_dir import is_run_directory

    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 32000}))
    assert not is_run_directory(model) and set_aside_previous_run(model) is None
    assert (model / "config.json").exists()

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {"model": "tiny"}, "model": {}}))
    assert is_run_directory(run)
    with pytest.raises(GenerateError, match="is a plait run without a checkpoint: train it with --checkpoint-every"):
        locate_model(run)
