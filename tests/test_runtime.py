"""CPU process settings: widened bf16 products."""
from __future__ import annotations

import torch
from torch import nn

from plait.runtime import WidenedGemm, gemm_context


class CountingWidenedGemm(WidenedGemm):
    def __init__(self) -> None:
        super().__init__()
        self.widened = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self._PRODUCTS and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            self.widened += 1
        return super().__torch_dispatch__(func, types, args, kwargs)


def test_widened_products_are_fp32_products_rounded_once():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(17, 33, generator=generator).bfloat16()
    b = torch.randn(33, 9, generator=generator).bfloat16()
    with WidenedGemm():
        product = a @ b
        batched = torch.bmm(a[None], b[None])[0]
    expected = (a.float() @ b.float()).bfloat16()
    assert product.dtype == torch.bfloat16 and torch.equal(product, expected)
    assert torch.equal(batched, expected)


def test_backward_products_are_widened_and_fp32_is_untouched():
    """A linear layer's forward is one product, its backward two (input and weight gradients)."""
    layer = nn.Linear(16, 8, bias=False).bfloat16()
    x = torch.randn(4, 16).bfloat16().requires_grad_()
    mode = CountingWidenedGemm()
    with mode:
        layer(x).float().square().sum().backward()
    assert mode.widened == 3
    expected_grad_x = ((2 * layer(x).float()).bfloat16().float() @ layer.weight.float()).bfloat16()
    assert torch.equal(x.grad, expected_grad_x)
    fp32 = CountingWidenedGemm()
    with fp32:
        nn.Linear(16, 8).float()(torch.randn(4, 16)).sum().backward()
    assert fp32.widened == 0


def test_gemm_context_only_for_bf16_on_a_cpu_without_bf16_products(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert isinstance(gemm_context(torch.device("cpu"), torch.bfloat16), WidenedGemm)
    assert not isinstance(gemm_context(torch.device("cpu"), torch.float32), WidenedGemm)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert not isinstance(gemm_context(torch.device("cpu"), torch.bfloat16), WidenedGemm)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setenv("PLAIT_BF16_GEMM", "native")
    assert not isinstance(gemm_context(torch.device("cpu"), torch.bfloat16), WidenedGemm)
