"""A step whose loss or gradient norm is not finite never updates the weights (--on-nonfinite).

The non-finite steps are real: a learning rate of 1e30 makes step 0's update blow the weights up,
so step 1's products overflow and its gradient norm is NaN (on every rank at once, as the norm is
reduced over all of them)."""
from __future__ import annotations

import json

import torch

from plait.checkpoint.store import complete_checkpoints, read_full_state
from test_cli import run_plait, text_dir  # noqa: F401  (the fixture)

BLOW_UP = ["train", "--model", "tiny", "--tokenizer", "byte", "--steps", "4", "--lr", "1e30", "--warmup-steps", "0",
           "--global-batch", "4", "--micro-batch", "2", "--seq-len", "32", "--eval-every", "0",
           "--checkpoint-every", "1", "--keep-checkpoints", "5", "--no-progress", "--no-tensorboard", "--no-plot",
           "--timeout", "60"]


def test_stop_names_the_step_and_keeps_the_last_good_checkpoint(text_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"  # on two ranks, which must agree to stop (the skip test runs on one)
    result = run_plait([*BLOW_UP, "--data", str(text_dir), "--out", str(out), "--nproc", "2", "--dp", "2",
                        "--zero", "2"], tmp_path)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("plait: error: step")]
    assert errors and len(set(errors)) == 1, result.stderr
    assert "step 1: loss" in errors[0] and "gradient norm nan" in errors[0] and "not updated" in errors[0]
    assert str(out / "checkpoints" / "step-00000001") in errors[0]
    assert "Traceback" not in result.stderr
    assert [path.name for path in complete_checkpoints(out)] == ["step-00000001"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped"]) for r in records] == [(0, False), (1, True)]


def test_skip_leaves_weights_and_moments_as_they_were_and_counts_the_steps(text_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    result = run_plait([*BLOW_UP, "--data", str(text_dir), "--out", str(out), "--on-nonfinite", "skip"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("plait: warning: step") == 3 and "3 non-finite step(s) skipped" in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [False, True, True, True]
    assert [r["skipped_steps"] for r in records] == [0, 1, 2, 3]
    after_update, after_skips = (read_full_state(path) for path in complete_checkpoints(out)[::3])
    assert [p.name for p in complete_checkpoints(out)] == [f"step-{n:08d}" for n in (1, 2, 3, 4)]
    assert after_update.keys() == after_skips.keys() and any(kind == "exp_avg" for _, kind in after_update)
    for key, value in after_update.items():
        assert torch.equal(value, after_skips[key]), key
        assert torch.isfinite(value).all(), key  # the non-finite gradients never reached the weights
    steps = BLOW_UP.index("--steps") + 1
    longer = [*BLOW_UP[:steps], "6", *BLOW_UP[steps + 1:]]
    resumed = run_plait([*longer, "--data", str(text_dir), "--out", str(out), "--on-nonfinite", "skip"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 1, 2, 3, 4, 5]  # the count survives the resume


def test_a_bad_mode_is_one_line(tmp_path):
    result = run_plait(["train", "--on-nonfinite", "retry"], tmp_path)
    assert result.returncode == 2 and "--on-nonfinite" in result.stderr and "Traceback" not in result.stderr
