"""Rotary position embedding: the frequency table, plain or scaled, as transformers defines it.

RoPE rotates each pair (i, i + d/2) of a query or key head of size d by the angle
``p * inv_freq[i]`` at position p, with

    inv_freq[i] = theta^(-2i/d),    i = 0 .. d/2 - 1      (wavelength 2 pi / inv_freq[i])

Scaling stretches the frequencies so a model reaches further than it was pretrained for; it
changes ``inv_freq`` only, so it is computed once, here, and every use of the tables
(training, evaluation, sampling, pipeline chunks) sees the same numbers:

- ``linear`` (position interpolation): inv_freq / factor, i.e. positions divided by factor.
- ``llama3`` (Llama 3.1 / 3.2), with L = original_max_position_embeddings:
    wavelength < L / high_freq_factor        kept (high frequencies carry local order);
    wavelength > L / low_freq_factor         divided by factor;
    in between                               (1 - s) inv_freq / factor + s inv_freq,
                                             s = (L / wavelength - low_freq_factor)
                                                 / (high_freq_factor - low_freq_factor).

The arithmetic follows ``transformers.modeling_rope_utils`` operation by operation (float32
throughout), so the tables are bitwise those of ``LlamaForCausalLM``. Any other rope type is
refused when the config is read: a model with a rope we do not compute is a different model.
"""
from __future__ import annotations

import math

import torch

from plait.models.config import RopeScaling, RopeType


def _scale_linear(scaling: RopeScaling, inv_freq: torch.Tensor) -> torch.Tensor:
    return inv_freq / scaling.factor


def _scale_llama3(scaling: RopeScaling, inv_freq: torch.Tensor) -> torch.Tensor:
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelength = old_context / low
    high_freq_wavelength = old_context / high
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > low_freq_wavelength, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelength < high_freq_wavelength) * ~(wavelength > low_freq_wavelength)
    return torch.where(medium, smoothed, scaled)


_SCALERS = {RopeType.LINEAR: _scale_linear, RopeType.LLAMA3: _scale_llama3}


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """inv_freq [head_dim / 2] in float32, scaled if ``scaling`` says so."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    return inv_freq if scaling is None else _SCALERS[scaling.rope_type](scaling, inv_freq)
