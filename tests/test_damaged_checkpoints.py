"""Damaged checkpoints: saves record sizes and SHA-256s; resume passes over a damaged newest
checkpoint to the previous intact one with one warning; with none left, and for `plait export`,
one line. The damage is real: files truncated, a byte flipped, JSON garbled, a file deleted."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from plait.checkpoint import CheckpointError, complete_checkpoints, read_full_state, verify_checkpoint
from plait.checkpoint.integrity import damage
from test_cli import run_plait, text_dir  # noqa: F401  (the fixture)

TRAIN = ["train", "--model", "tiny", "--tokenizer", "byte", "--global-batch", "4", "--micro-batch", "2",
         "--seq-len", "32", "--eval-every", "0", "--checkpoint-every", "1", "--keep-checkpoints", "5",
         "--warmup-steps", "1", "--no-progress", "--no-tensorboard", "--no-plot", "--timeout", "60"]


def truncate(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def flip_a_byte(file):
    data = bytearray(file.read_bytes())
    data[len(data) * 3 // 4] ^= 0xFF  # inside the tensor data: the header still parses
    file.write_bytes(bytes(data))


def garble(file):
    file.write_text("{not json")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three steps on one process, checkpointed after each."""
    base = tmp_path_factory.mktemp("runs")
    corpus = base / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("".join(f"def f{n}(x):\n    return x + {n}\n" for n in range(400)))
    made = {}
    out = base / "one"
    result = run_plait([*TRAIN, "--data", str(corpus), "--steps", "3", "--out", str(out)], base)
    assert result.returncode == 0, result.stderr
    made["one"] = (out, [])
    return base, corpus, made


def resume(runs, tmp_path, name, damage_fn, file, steps=3, layout=()):
    base, corpus, made = runs
    source = made[name][0]
    out = tmp_path / name
    shutil.copytree(source, out)
    if damage_fn is not None:
        damage_fn(out / "checkpoints" / "step-00000003" / file)
    return out, run_plait([*TRAIN, "--data", str(corpus), "--steps", str(steps), "--out", str(out), *layout], tmp_path)


DAMAGE = [
    (truncate, "rank-00000.safetensors", "bytes where its save wrote"),
    (flip_a_byte, "rank-00000.safetensors", "does not match its SHA-256"),
    (garble, "rank-00000.json", "bytes where its save wrote"),
    (lambda f: f.unlink(), "rank-00000.json", "is missing"),
    (garble, "meta.json", "cannot be read"),
    (lambda f: f.unlink(), "COMPLETE", "no COMPLETE marker"),
]


@pytest.mark.parametrize("damage_fn, file, reason", DAMAGE, ids=[
    "truncated", "flipped-byte", "garbled-index", "missing-index", "garbled-meta", "no-marker"])
def test_each_kind_of_damage_is_named(runs, tmp_path, damage_fn, file, reason):
    checkpoint = tmp_path / "step-00000003"
    shutil.copytree(runs[2]["one"][0] / "checkpoints" / "step-00000003", checkpoint)
    assert damage(checkpoint) is None
    damage_fn(checkpoint / file)
    assert reason in damage(checkpoint)
    with pytest.raises(CheckpointError, match="damaged|not a complete checkpoint"):
        verify_checkpoint(checkpoint)


@pytest.mark.parametrize("damage_fn, file, reason", [DAMAGE[0]], ids=["truncated"])
def test_resume_falls_back_to_the_previous_checkpoint_and_trains_on_identically(runs, tmp_path, damage_fn, file, reason):
    out, result = resume(runs, tmp_path, "one", damage_fn, file)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("plait: warning: checkpoint")]
    assert len(warnings) == 1 and "step-00000003" in warnings[0] and reason in warnings[0], result.stdout
    assert "resuming from" in result.stdout and "step-00000002 (step 2)" in result.stdout
    original = read_full_state(runs[2]["one"][0] / "checkpoints" / "step-00000003")
    redone = read_full_state(out / "checkpoints" / "step-00000003")
    assert original.keys() == redone.keys()
    for key, value in original.items():  # step 3 trained again from step 2: the same weights and moments
        assert torch.equal(value, redone[key]), key


def test_dp2_ranks_share_the_verification_and_agree(runs, tmp_path):
    # resumed on two ranks (resharded): of the sorted files rank 0 verifies the index, rank 1 the
    # tensor file, so rank 1 finds the damage that rank 0 reports
    out, result = resume(runs, tmp_path, "one", flip_a_byte, "rank-00000.safetensors",
                         layout=("--nproc", "2", "--dp", "2", "--zero", "1"))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("plait: warning: checkpoint")]
    assert len(warnings) == 1 and "rank-00000.safetensors does not match" in warnings[0], result.stdout
    assert "step-00000002 (step 2)" in result.stdout
    assert json.loads((out / "checkpoints" / "step-00000003" / "meta.json").read_text())["files"].keys() == {
        "rank-00000.json", "rank-00000.safetensors", "rank-00001.json", "rank-00001.safetensors"}


def test_every_checkpoint_damaged_is_one_line(runs, tmp_path):
    base, corpus, made = runs
    out = tmp_path / "run"
    shutil.copytree(made["one"][0], out)
    for checkpoint in complete_checkpoints(out):
        truncate(checkpoint / "rank-00000.safetensors")
    result = run_plait([*TRAIN, "--data", str(corpus), "--steps", "3", "--out", str(out)], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("plait: error: every checkpoint in")
    assert result.stdout.count("plait: warning: checkpoint") == 3


def test_export_of_a_damaged_checkpoint_is_one_line(runs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs[2]["one"][0], out)
    flip_a_byte(out / "checkpoints" / "step-00000003" / "rank-00000.safetensors")
    result = run_plait(["export", "--checkpoint", str(out), "--hf", str(tmp_path / "hf")], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"plait: error: checkpoint {out / 'checkpoints' / 'step-00000003'} is damaged: "
        f"{out / 'checkpoints' / 'step-00000003' / 'rank-00000.safetensors'} does not match its SHA-256"]
    assert not (tmp_path / "hf").exists()


def test_out_beneath_a_regular_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    result = run_plait(["train", "--out", str(tmp_path / "file" / "run")], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"plait: error: --out {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file, not a directory"
