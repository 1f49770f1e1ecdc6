"""The ``--device`` policy: the rule as a function of visible GPUs, local ranks and the request,
and where plait applies it (before launching workers, in each worker)."""
from __future__ import annotations

import pytest
import torch

import plait.device
from helpers import TEST_DEVICE, assert_runs_match, tiny_config, train_and_collect
from plait.cli import main
from plait.mesh import ParallelContext
from plait.device import CPU_PLAN, CUDA_PLAN, DeviceError, device_plan, host_device_plan, to_device


@pytest.mark.parametrize("requested, gpus, local_ranks, plan", [
    ("auto", 0, 1, CPU_PLAN),
    ("auto", 0, 8, CPU_PLAN),   # gloo runs any number of ranks on the CPU
    ("auto", 1, 1, CUDA_PLAN),
    ("auto", 8, 8, CUDA_PLAN),
    ("auto", 8, 4, CUDA_PLAN),  # fewer ranks than GPUs: the first four
    ("cuda", 2, 2, CUDA_PLAN),
    ("cpu", 8, 16, CPU_PLAN),   # --device cpu forces gloo on a GPU host, whatever the rank count
    ("cpu", 1, 1, CPU_PLAN),
])
def test_device_rule(requested, gpus, local_ranks, plan):
    assert device_plan(requested, gpus, local_ranks) == plan
    assert plan.backend == {"cuda": "nccl", "cpu": "gloo"}[plan.kind]


@pytest.mark.parametrize("requested, gpus, local_ranks, named", [
    ("auto", 1, 2, ["2 ranks on this host but 1 visible GPU", "--nproc 1", "--device cpu"]),
    ("cuda", 4, 8, ["8 ranks on this host but 4 visible GPUs", "--nproc 4", "--device cpu"]),
    ("cuda", 0, 1, ["--device cuda", "no CUDA device is visible", "--device cpu"]),
    ("tpu", 0, 1, ["--device must be one of auto, cuda, cpu, got 'tpu'"]),
])
def test_device_refusals_are_one_line_naming_both_numbers(requested, gpus, local_ranks, named):
    with pytest.raises(DeviceError) as refused:
        device_plan(requested, gpus, local_ranks)
    message = str(refused.value)
    assert "\n" not in message
    for words in named:
        assert words in message, message


def test_each_rank_takes_its_own_gpu():
    assert CUDA_PLAN.device(3) == torch.device("cuda", 3)
    assert CPU_PLAN.device(3) == torch.device("cpu")


def test_workers_apply_the_rule_with_the_launchers_local_world_size(monkeypatch):
    monkeypatch.setattr(plait.device, "visible_gpus", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # what torchrun or plait's launcher set in a worker
    with pytest.raises(DeviceError, match="2 ranks on this host but 1 visible GPU"):
        host_device_plan("auto")
    assert host_device_plan("cpu") == CPU_PLAN
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert host_device_plan("auto") == CUDA_PLAN


def test_train_refuses_two_local_ranks_on_one_gpu_before_launching(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(plait.device, "visible_gpus", lambda: 1)  # as on a one-GPU host
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path))
    code = main(["train", "--model", "tiny", "--nproc", "2", "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err == ("plait: error: 2 ranks on this host but 1 visible GPU: NCCL needs one GPU per rank; run at "
                   "most 1 local rank (--nproc 1), or --device cpu to train on the CPU with gloo")
    assert not (tmp_path / "out").exists()  # refused before any worker started


def test_host_batches_reach_the_device_unchanged():
    batch = torch.arange(12).view(3, 4)
    moved = to_device(batch, torch.device("cpu"))
    assert moved.device.type == "cpu" and torch.equal(moved, batch)


def test_trainer_steps_on_the_test_device_follow_the_cpu(data, model_config):
    """PLAIT_TEST_DEVICE=cuda (make gpu-check): four fp32 steps on the GPU equal the CPU's to 1e-5
    (the same inputs, weights and order; only the kernels' summation order differs)."""
    cfg = tiny_config(steps=4)
    reference = train_and_collect(ParallelContext.single(torch.device("cpu")), cfg, data, model_config)
    losses, norms, params, val = train_and_collect(ParallelContext.single(TEST_DEVICE), cfg, data, model_config)
    assert all(param.device.type == TEST_DEVICE.type for param in params.values())
    # fp32 products stay IEEE fp32, not TF32 (what the planner's GPU profiles price fp32 at)
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cuda.matmul.allow_tf32
    assert_runs_match([(losses, norms, {name: param.cpu() for name, param in params.items()}, val)], reference, 1e-5)
