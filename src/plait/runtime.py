"""Process-level settings that make CPU training faster; each is a no-op where it does not apply."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_MMAP_THRESHOLD = -3
_allocator_tuned = False


def tune_cpu_allocator(keep_freed: bool = True) -> bool:
    """Choose what glibc does with freed large blocks; returns whether it was applied (glibc only).

    By default glibc serves large allocations with a fresh ``mmap`` and unmaps them on free, but
    its threshold moves up (to 32 MiB) each time such a block is freed, after which blocks of
    that size come from the heap, which is only trimmed from its top.

    ``keep_freed=True`` (the default): mmap off and a high trim threshold, so the heap reuses
    freed pages and steps do not page-fault their activations and gradients in again (measured
    here: ~10-15% of a llama-125m step, visible as system time), as jemalloc / tcmalloc would.

    ``keep_freed=False`` (ZeRO-3, see ``run_training``): a fixed 1 MiB threshold, so every large
    block is mapped on allocation and returned on free, and resident memory follows live memory.
    ZeRO-3 frees and refills each unit's storage in every pass, gradients and widened products
    come and go per block; a heap fragments under them. Measured on ``medium`` at 8 ranks (sum of
    the workers' peaks): 18.1 GB with ``keep_freed``, 17.5 GB with glibc's moving threshold,
    14.7 GB with this one.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("PLAIT_NO_MALLOPT"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    if keep_freed:
        _allocator_tuned = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    else:
        _allocator_tuned = bool(mallopt(_M_MMAP_THRESHOLD, 1 << 20))
    return _allocator_tuned


def configure_threads(threads: int | None) -> int:
    """Torch threads for this rank: the given number, or the host's cores shared by its local ranks."""
    if threads is None:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, (os.cpu_count() or 1) // local_ranks) if local_ranks > 1 else torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads


def bf16_gemm_is_emulated(device: torch.device) -> bool:
    """Whether torch's bf16 matrix products on ``device`` take its scalar fallback: on x86 CPUs
    without AVX-512, oneDNN's bf16 kernels are not used (``mkldnn_bf16_device_check``) and
    ``cpublas_gemm_impl`` loops element by element. Measured here (AVX2, one thread, 256 x 1536
    by 1536 x 4096): x @ W^T 3.0 s, g @ W 31.7 s, the same product widened to fp32 0.10 s.
    ``PLAIT_BF16_GEMM=native`` turns the widening off (to compare)."""
    if device.type != "cpu" or os.environ.get("PLAIT_BF16_GEMM") == "native":
        return False
    return torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2")


class WidenedGemm(TorchDispatchMode):
    """Runs bf16 matrix products as fp32 products of widened copies, rounded back to bf16.

    A bf16 GEMM accumulates in fp32 and rounds its result once, so this is the same arithmetic
    up to the order of the fp32 sums; storage, communication and the saved activations stay
    bf16 (the fp32 copies live for one product). Active on the forward and the backward (the
    autograd engine carries the mode into backward), recomputation included."""

    _PRODUCTS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                 torch.ops.aten.baddbmm.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._PRODUCTS and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            wide = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a for a in args]
            return func(*wide, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


def gemm_context(device: torch.device, dtype: torch.dtype):
    """``WidenedGemm`` where bf16 products are emulated (``bf16_gemm_is_emulated``), else nothing."""
    if dtype == torch.bfloat16 and bf16_gemm_is_emulated(device):
        return WidenedGemm()
    return contextlib.nullcontext()
