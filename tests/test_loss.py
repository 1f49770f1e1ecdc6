"""The fused, chunked head + cross-entropy equals the plain computation, gradients included."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import plait.loss as loss_module
from plait.loss import IGNORE_INDEX, linear_cross_entropy_sum
from helpers import TEST_DEVICE, relative_error


@pytest.mark.parametrize("chunk_elements, smoothing", [(3000 * 7, 0.0), (3000 * 100, 0.1), (1 << 23, 0.0),
                                                       (1 << 23, 0.25)])
def test_matches_unfused_cross_entropy(monkeypatch, chunk_elements, smoothing):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", chunk_elements)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 250, 64, generator=generator).to(TEST_DEVICE).requires_grad_()
    weight = (0.1 * torch.randn(3000, 64, generator=generator)).to(TEST_DEVICE).requires_grad_()
    targets = torch.randint(0, 3000, (4, 250), generator=generator)
    targets[:, ::7] = IGNORE_INDEX
    targets = targets.to(TEST_DEVICE)
    expected = F.cross_entropy((hidden @ weight.t()).flatten(0, 1), targets.flatten(), reduction="sum",
                               ignore_index=IGNORE_INDEX, label_smoothing=smoothing)
    expected_grads = torch.autograd.grad(expected * 0.37, (hidden, weight))
    actual = linear_cross_entropy_sum(hidden, weight, targets, label_smoothing=smoothing)
    actual_grads = torch.autograd.grad(actual * 0.37, (hidden, weight))
    assert abs(actual.item() - expected.item()) <= 1e-6 * expected.item()
    for got, want in zip(actual_grads, expected_grads):
        assert relative_error(got, want) < 1e-6
    # ignored rows get no gradient
    assert actual_grads[0][:, ::7].abs().max() == 0


def test_bfloat16_autocast_is_close_and_grads_are_fp32_shaped():
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(300, 64, generator=generator).to(TEST_DEVICE).requires_grad_()
    weight = (0.1 * torch.randn(1000, 64, generator=generator)).to(TEST_DEVICE).requires_grad_()
    targets = torch.randint(0, 1000, (300,), generator=generator).to(TEST_DEVICE)
    with torch.autocast(TEST_DEVICE.type, dtype=torch.bfloat16):
        actual = linear_cross_entropy_sum(hidden, weight, targets)
    actual.backward()
    expected = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    assert actual.dtype == torch.float32 and weight.grad.dtype == torch.float32
    assert abs(actual.item() - expected.item()) < 1e-2 * expected.item()
