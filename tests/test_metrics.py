"""MFU's denominator: a calibrated profile when there is one, else the best single product; a
step that beats the peak raises it, so MFU is never reported above 100%."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch

from plait.planner.calibrate import write_profile
from plait.planner.hardware import PROFILES, default_profile_path
from plait.train.metrics import calibrated_peak, measure_matmul_peak
from plait.train.trainer import Trainer


def test_the_calibrated_profile_gives_the_peak_of_the_ranks_threads(tmp_path, monkeypatch):
    monkeypatch.setenv("PLAIT_CACHE", str(tmp_path))
    assert calibrated_peak("float32", torch.device("cpu")) is None  # no profile yet: measured instead
    profile = dataclasses.replace(next(iter(PROFILES.values())), name="cpu",
                                  peak_flops={"float32": 7e9, "bfloat16": 5e9})
    write_profile(profile)
    assert default_profile_path().is_relative_to(tmp_path)
    assert calibrated_peak("float32", torch.device("cpu")) == 7e9 * torch.get_num_threads()
    assert calibrated_peak("bfloat16", torch.device("cpu")) == 5e9 * torch.get_num_threads()
    default_profile_path().write_text("{not json")
    assert calibrated_peak("float32", torch.device("cpu")) is None


def test_the_measured_peak_is_the_best_product_and_mfu_never_exceeds_one():
    peak = measure_matmul_peak(torch.float32, torch.device("cpu"), seconds=0.05, size=256)
    assert peak > 0
    trainer = SimpleNamespace(flops_per_token=1e6, peak_flops=2e9, ctx=SimpleNamespace(world_size=2))
    assert Trainer.model_flops_utilization(trainer, tokens_per_s=2000) == 0.5  # 1e9 per rank of 2e9
    assert Trainer.model_flops_utilization(trainer, tokens_per_s=8000) == 1.0  # beats the peak: it rises
    assert trainer.peak_flops == 4e9
    assert Trainer.model_flops_utilization(trainer, tokens_per_s=4000) == 0.5
