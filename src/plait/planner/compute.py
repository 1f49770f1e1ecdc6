"""Compute time of one layer, the embedding and the head, per micro-batch and rank.

Each operation plait (or, for ``arch='gpt'``, Megatron-LM 2021) runs is listed with its
shape after tensor parallelism, and timed by a roofline plus a fixed launch cost:

    GEMM (m x k) @ (k x n):   t = max(2mnk / R_gemm, (mk + kn + mn) e / B_mem) + t_launch
    fused attention:           t = FLOPs actually done / R_attn + t_launch (flash skips the
                               masked half of causal attention: half of 4 b s^2 h forward)
    elementwise / norm / copy: t = bytes moved / B_mem + t_launch

R_gemm is the profile's large-GEMM rate (peak x gemm_efficiency, or measured on cpu), B_mem
the streaming memory bandwidth. That is how shape enters: under high tensor parallelism the
per-device GEMMs get thin (n or k divided by tp), their arithmetic intensity mnk/(mk+kn+mn)
falls towards the memory roof, and the fixed launch cost weighs more against less work; a
materialised attention's QK^T (k = head_dim) is memory-bound outright. Backward runs two GEMMs
per forward GEMM (input and weight gradients, same FLOPs, transposed shapes) and moves about
twice the forward's bytes through elementwise kernels. Flash attention's backward does 2.5x its
forward's FLOPs (it recomputes the scores).

Bytes moved by the elementwise work of a layer, per token (T_n: tokens a rank's norms see, s/t
of them with sequence parallelism), are counted from the kernels each model runs:
- llama (plait, eager PyTorch): RMSNorm in fp32 (x^2, mean, scale, cast, weight: ~7 passes of
  h; on a GPU torch's fused kernel, 2 passes, see ``fused_norms``), rotary embedding on q and k
  (~7 passes each way, ``rotary_traffic``), two residual adds, SiLU and the gate product (5
  passes of f/t), and, with bf16 autocast over fp32 parameters, the casts of matmul
  inputs (one per fp32 normalised input, shared by q, k, v and by gate, up:
  ``models.mixed_precision``). The attention output costs no copy: SDPA and the
  context-parallel kernels lay it out [b, s, heads, d], so o_proj reads it through a view.
  The casts of the layer's fp32 weights to bf16 are
  ``weight_casts``: once a step, the trainer keeping the casts for the step, or once a
  micro-batch forward (and again in a recomputed backward) under recomputation, where it does
  not (``weights_cast_per_microbatch``); the weight gradients' casts back, in every backward.
- gpt (Megatron-LM with fused kernels): LayerNorm (read + write h), fused bias-GELU (4h/t),
  two fused bias-dropout-adds (3h + a 1-byte mask), fused scale-mask-softmax and dropout on
  the b a s^2 scores (the 5as/h of Korthikanti et al.).
"""
from __future__ import annotations

from dataclasses import dataclass

from plait.layout import ContextParallelMode, Recompute
from plait.planner.hardware import HardwareProfile
from plait.planner.workload import Layout, ModelShape

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class DeviceRates:
    """What one rank gets: on a GPU the whole device; on cpu its share of the node's cores."""
    matmul: float         # FLOP/s of large GEMMs
    attention: float      # FLOP/s of fused attention
    memory: float         # bytes/s streaming
    launch_s: float       # fixed cost per kernel / eager op
    peak: float           # FLOP/s, the MFU denominator
    cuda: bool = False    # a GPU: plait's fp32 RMSNorm is one fused kernel there (fused_norms)


def device_rates(hw: HardwareProfile, dtype: str, ranks_per_node: int) -> DeviceRates:
    share = 1.0
    if hw.kind == "cpu":  # plait gives each rank max(1, cores // ranks) threads; more ranks time-share
        share = max(1, hw.cores // ranks_per_node) if ranks_per_node <= hw.cores else hw.cores / ranks_per_node
    mix = hw.kernel_mix_efficiency.get(dtype, 1.0)  # cpu: isolated kernels vs. a real block, measured
    return DeviceRates(matmul=hw.matmul_rate(dtype) * share * mix, attention=hw.attention_rate(dtype) * share * mix,
                       memory=hw.memory_bandwidth * hw.memory_efficiency * share * mix,
                       launch_s=hw.kernel_latency_s / mix, peak=hw.peak(dtype) * share, cuda=hw.kind == "gpu")


@dataclass
class Cost:
    """Seconds by kind of work."""
    gemm: float = 0.0
    attention: float = 0.0
    memory: float = 0.0
    comm: float = 0.0

    @property
    def seconds(self) -> float:
        return self.gemm + self.attention + self.memory + self.comm

    def add(self, other: "Cost", times: float = 1.0) -> "Cost":
        self.gemm += other.gemm * times
        self.attention += other.attention * times
        self.memory += other.memory * times
        self.comm += other.comm * times
        return self


class Timer:
    """Accumulates a Cost from operations, on one rank's rates."""

    def __init__(self, rates: DeviceRates, element_bytes: int) -> None:
        self.rates, self.e, self.cost = rates, element_bytes, Cost()

    def gemm(self, m: float, n: float, k: float, count: int = 1, batch: float = 1) -> None:
        flops = 2.0 * m * n * k * batch
        moved = (m * k + k * n + m * n) * batch * self.e
        seconds = max(flops / self.rates.matmul, moved / self.rates.memory) + self.rates.launch_s
        self.cost.gemm += seconds * count

    def attention(self, flops_done: float) -> None:
        self.cost.attention += flops_done / self.rates.attention + self.rates.launch_s

    def memory(self, nbytes: float, kernels: int = 1) -> None:
        self.cost.memory += nbytes / self.rates.memory + kernels * self.rates.launch_s

    def comm(self, seconds: float) -> None:
        self.cost.comm += seconds


def residual_bytes(shape: ModelShape, layout: Layout) -> int:
    """Bytes per element of the residual stream: plait keeps it in the parameters' dtype (fp32
    under autocast, bf16 once ZeRO holds bf16 parameters); Megatron's GPT runs it in half."""
    if shape.arch == "gpt":
        return DTYPE_BYTES[layout.dtype]
    return 2 if layout.dtype != "float32" and layout.zero >= 1 else 4


def fused_norms(cuda: bool, shape: ModelShape, layout: Layout) -> bool:
    """Whether plait's RMSNorm runs as torch's fused kernel (``models.llama.RMSNorm``): on CUDA,
    over an fp32 residual stream (bf16 parameters under ZeRO keep the eager ops, HF's rounding)."""
    return cuda and shape.arch == "llama" and residual_bytes(shape, layout) == 4


def norm_traffic(timer: "Timer", shape: ModelShape, layout: Layout, tokens: float, count: int) -> None:
    """``count`` RMSNorms over ``tokens`` rows of h in fp32: the fused kernel reads x and writes
    y; the eager ops (x^2, mean, rsqrt, scale, cast, weight) move about 7 passes in 5 kernels."""
    if fused_norms(timer.rates.cuda, shape, layout):
        timer.memory(count * 2 * tokens * shape.hidden * 4, kernels=count)
    else:
        timer.memory(count * 7 * tokens * shape.hidden * 4, kernels=5 * count)


def local_seq(shape: ModelShape, layout: Layout) -> int:
    """Positions of each sequence one rank processes: the whole sequence, or its 1/cp share."""
    return shape.seq_len // layout.cp


def layer_forward(timer: Timer, shape: ModelShape, layout: Layout) -> None:
    """One transformer layer, one micro-batch, forward, on one tensor- and context-parallel rank.
    Under cp every token-proportional term is 1/cp; causal attention too (the load-balanced chunks
    give each rank 1/cp of the triangle), in c kernels under ring attention."""
    t, b, s = layout.tp, layout.micro_batch, local_seq(shape, layout)
    h, f, kv = shape.hidden, shape.ffn_hidden, shape.kv_hidden
    tokens = b * s
    norm_tokens = tokens / t if layout.sequence_parallel else tokens
    e, e_res = timer.e, residual_bytes(shape, layout)
    heads = shape.heads // t
    if shape.arch == "llama":
        timer.gemm(tokens, h / t, h)                    # q
        timer.gemm(tokens, kv / t, h, count=2)          # k, v
        rotary_traffic(timer, shape, layout, tokens)
        kernels = layout.cp if layout.cp_mode == ContextParallelMode.RING else 1
        for _ in range(kernels):  # causal flash: half the score blocks
            timer.attention(0.5 * 4 * b * s * shape.seq_len * h / t / kernels)
        timer.gemm(tokens, h, h / t)                    # o_proj
        timer.gemm(tokens, f / t, h, count=2)           # gate, up
        timer.memory(5 * tokens * f / t * e, kernels=2)  # silu(gate) * up
        timer.gemm(tokens, h, f / t)                    # down
        norm_traffic(timer, shape, layout, norm_tokens, count=2)
        timer.memory(2 * 3 * norm_tokens * h * e_res, kernels=2)       # two residual adds
        if autocast_casts(shape, layout):
            # each norm's fp32 output is cast to bf16 once for the matmuls that share it (q, k, v;
            # gate, up)
            timer.memory(2 * tokens * h * (4 + e), kernels=2)
    else:
        d = shape.head_dim
        timer.gemm(tokens, 3 * h / t, h)                # fused qkv
        timer.gemm(s, s, d, batch=b * heads)            # QK^T
        timer.memory(2 * b * heads * s * s * e)         # fused scale-mask-softmax
        timer.memory(b * heads * s * s * (2 * e + 1))   # dropout (1-byte mask)
        timer.gemm(s, d, s, batch=b * heads)            # probabilities x V
        timer.gemm(tokens, h, h / t)                    # dense
        timer.gemm(tokens, f / t, h)                    # fc1
        timer.memory(2 * tokens * f / t * e)            # fused bias + GELU
        timer.gemm(tokens, h, f / t)                    # fc2
        timer.memory(2 * 2 * norm_tokens * h * e, kernels=2)          # two LayerNorms
        timer.memory(2 * norm_tokens * h * (3 * e + 1), kernels=2)    # two bias-dropout-adds


def rotary_traffic(timer: Timer, shape: ModelShape, layout: Layout, tokens: float) -> None:
    """RoPE on q and k (``models.llama._Rotate``): x * cos, then each half updated in place by
    the other half's product with sin: about 7 passes of x in 5 kernels each. Its backward is the
    same rotation by the opposite angle."""
    timer.memory(7 * tokens * (shape.hidden + shape.kv_hidden) / layout.tp * timer.e, kernels=10)


def layer_backward(timer: Timer, shape: ModelShape, layout: Layout) -> None:
    """Backward of one layer: every GEMM twice (input and weight gradients, transposed shapes,
    same FLOPs), flash attention 2.5x its forward, elementwise traffic twice the forward's but
    RoPE's once (``rotary_traffic``); under autocast over fp32 parameters the weight gradients'
    casts to fp32 and their accumulation (charged as twice the weights' cast)."""
    probe, rotary = Timer(timer.rates, timer.e), Timer(timer.rates, timer.e)
    layer_forward(probe, shape, layout)
    forward = probe.cost
    if shape.arch == "llama":
        rotary_traffic(rotary, shape, layout, layout.micro_batch * local_seq(shape, layout))
    timer.cost.gemm += 2 * forward.gemm
    timer.cost.attention += 2.5 * forward.attention
    timer.cost.memory += 2 * forward.memory - rotary.cost.memory
    for _ in range(2):
        weight_casts(timer, shape, layout)


def autocast_casts(shape: ModelShape, layout: Layout) -> bool:
    """Whether plait's Llama casts under autocast: bf16 over fp32 parameters (bf16 parameters
    under ZeRO, and their bf16 residual stream, need no casts)."""
    return shape.arch == "llama" and layout.dtype != "float32" and residual_bytes(shape, layout) == 4


def weights_cast_per_microbatch(layout: Layout) -> bool:
    """Whether a layer's weights are cast in every micro-batch's forward: under recomputation
    (the trainer keeps no cast for the step: ``Trainer._weights_cast_once``); else once a step
    (autocast's cache, or the split-backward store's for the layers of zero-bubble schedules)."""
    return layout.recompute != Recompute.NONE


def weight_casts(timer: Timer, shape: ModelShape, layout: Layout) -> None:
    """One layer's fp32 weights cast to bf16 (read 4, write 2 bytes each), under autocast."""
    if autocast_casts(shape, layout):
        timer.memory(shape.layer_parameters() / layout.tp * (4 + timer.e), kernels=7)


def head_forward(timer: Timer, shape: ModelShape, layout: Layout) -> None:
    """Final norm, output projection (vocabulary split over tp) and the cross-entropy."""
    t, tokens = layout.tp, layout.micro_batch * local_seq(shape, layout)
    h, v = shape.hidden, shape.vocab
    norm_tokens = tokens / t if layout.sequence_parallel else tokens
    norm_traffic(timer, shape, layout, norm_tokens, count=1)  # gpt: charged as plait's eager norm
    timer.gemm(tokens, v / t, h)
    timer.memory(4 * tokens * v / t * 4, kernels=4)  # logits to fp32, max, exp-sum, target pick


def head_backward(timer: Timer, shape: ModelShape, layout: Layout) -> None:
    probe = Timer(timer.rates, timer.e)
    head_forward(probe, shape, layout)
    timer.cost.gemm += 2 * probe.cost.gemm
    timer.cost.memory += probe.cost.memory


def embedding_forward(timer: Timer, shape: ModelShape, layout: Layout) -> None:
    tokens = layout.micro_batch * local_seq(shape, layout)
    timer.memory(2 * tokens * shape.hidden * residual_bytes(shape, layout), kernels=2)


def embedding_backward(timer: Timer, shape: ModelShape, layout: Layout) -> None:
    """Scatter-add of the rows' gradients into the (vocabulary-sharded) embedding gradient."""
    tokens = layout.micro_batch * local_seq(shape, layout)
    timer.memory(2 * tokens * shape.hidden * 4 + shape.vocab * shape.hidden / layout.tp * 4, kernels=3)
