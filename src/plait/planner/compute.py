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
per forward GEMM (input and weight gradients, same FLOPs, transposed shapes). Flash attention's
backward does 2.5x its forward's FLOPs (it recomputes the scores).

Bytes moved by the elementwise work of a layer, per token (T_n: tokens a rank's norms see, s/t
of them with sequence parallelism), are counted from the kernels each model runs:
- llama (plait, eager PyTorch; ``llama_elementwise``, forward and backward each counted, tested
  against a dispatch mode's count of a real layer's kernels): RMSNorm in fp32 (x^2, mean, scale,
  cast, weight: 7 passes of h, 25 back; on a GPU torch's fused kernel, 2 and 3, see
  ``fused_norms``), RoPE on q and k (7 passes each way), two residual adds (and their
  gradients' sums), SiLU and the gate product (5 passes of f/t, 9 back), and, with bf16
  autocast over fp32 parameters, the casts of matmul inputs (one per fp32 normalised input,
  shared by q, k, v and by gate, up: ``models.mixed_precision``; without autocast, autograd's
  sums of their gradients). The attention output costs no copy: SDPA and the
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


@dataclass(frozen=True)
class Traffic:
    """One kind of elementwise work of a layer: bytes read and written and kernels launched,
    forward and in its backward (counted from the eager kernels' tensors by a dispatch mode in
    ``tests/test_planner.py``; a fused CUDA kernel from what it reads and writes)."""

    forward_bytes: float
    forward_kernels: int
    backward_bytes: float
    backward_kernels: int


def norm_traffic(cuda: bool, shape: ModelShape, layout: Layout, tokens: float, count: int) -> Traffic:
    """``count`` RMSNorms over ``tokens`` rows of h. The fused kernel reads x and writes y, and
    its backward reads x and dy and writes dx (1/rms and the weight's partial sums are small);
    the eager ops (x^2, mean, rsqrt, scale, cast, weight) move 28 bytes an element over an fp32
    stream (36 over a bf16 one, upcast first), and autograd's backward of them 100 (98)."""
    elements = count * tokens * shape.hidden
    if fused_norms(cuda, shape, layout):
        return Traffic(2 * 4 * elements, count, 3 * 4 * elements, 2 * count)
    if residual_bytes(shape, layout) == 4:
        return Traffic(28 * elements, 5 * count, 100 * elements, 13 * count)
    return Traffic(36 * elements, 7 * count, 98 * elements, 14 * count)


def llama_elementwise(cuda: bool, shape: ModelShape, layout: Layout) -> list[Traffic]:
    """The elementwise work of one Llama layer (everything but the GEMMs and the attention core)
    on one rank, one micro-batch."""
    t, s = layout.tp, local_seq(shape, layout)
    h, f, kv = shape.hidden, shape.ffn_hidden, shape.kv_hidden
    tokens = layout.micro_batch * s
    norm_tokens = tokens / t if layout.sequence_parallel else tokens
    e, e_res = DTYPE_BYTES[layout.dtype], residual_bytes(shape, layout)
    rotary = 7 * tokens * (h + kv) / t * e  # q and k (``models.llama._Rotate``): the same rotation back
    swiglu = tokens * f / t * e  # silu(gate) * up; back: two products and silu's gradient
    parts = [Traffic(rotary, 10, rotary, 10), Traffic(5 * swiglu, 2, 9 * swiglu, 3),
             norm_traffic(cuda, shape, layout, norm_tokens, count=2)]
    # two residual adds; back: the stream's gradient summed with the norm's, once each
    residual = 2 * 3 * norm_tokens * h * e_res
    parts.append(Traffic(residual, 2, residual, 2))
    # the inputs that q, k, v (3 uses) and gate, up (2) share: under autocast one cast each
    # (``models.mixed_precision``), whose backward casts the first gradient to fp32 and adds the
    # others to it; without, autograd sums the uses' gradients in the input's dtype
    uses = (3, 2)
    if autocast_casts(shape, layout):
        back = sum((e + 4) + (n - 1) * (8 + e) for n in uses)
        parts.append(Traffic(len(uses) * tokens * h * (4 + e), len(uses), back * tokens * h, sum(uses)))
    else:
        parts.append(Traffic(0.0, 0, sum((n - 1) * 3 * e_res for n in uses) * tokens * h, sum(uses) - len(uses)))
    return parts


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
    e = timer.e
    heads = shape.heads // t
    if shape.arch == "llama":
        timer.gemm(tokens, h / t, h)                    # q
        timer.gemm(tokens, kv / t, h, count=2)          # k, v
        kernels = layout.cp if layout.cp_mode == ContextParallelMode.RING else 1
        for _ in range(kernels):  # causal flash: half the score blocks
            timer.attention(0.5 * 4 * b * s * shape.seq_len * h / t / kernels)
        timer.gemm(tokens, h, h / t)                    # o_proj
        timer.gemm(tokens, f / t, h, count=2)           # gate, up
        timer.gemm(tokens, h, f / t)                    # down
        for part in llama_elementwise(timer.rates.cuda, shape, layout):
            timer.memory(part.forward_bytes, kernels=part.forward_kernels)
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


def layer_backward(timer: Timer, shape: ModelShape, layout: Layout) -> None:
    """Backward of one layer: every GEMM twice (input and weight gradients, transposed shapes,
    same FLOPs), flash attention 2.5x its forward; the elementwise work's backward as counted
    (``llama_elementwise``; Megatron's fused kernels: twice the forward's bytes); under autocast
    over fp32 parameters the weight gradients' casts to fp32 and their accumulation (charged as
    twice the weights' cast)."""
    probe = Timer(timer.rates, timer.e)
    layer_forward(probe, shape, layout)
    forward = probe.cost
    timer.cost.gemm += 2 * forward.gemm
    timer.cost.attention += 2.5 * forward.attention
    if shape.arch == "llama":
        for part in llama_elementwise(timer.rates.cuda, shape, layout):
            timer.memory(part.backward_bytes, kernels=part.backward_kernels)
    else:
        timer.cost.memory += 2 * forward.memory
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
    norm = norm_traffic(timer.rates.cuda, shape, layout, norm_tokens, count=1)  # gpt: as plait's eager norm
    timer.memory(norm.forward_bytes, kernels=norm.forward_kernels)
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
