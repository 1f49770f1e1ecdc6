"""Peak memory of one rank: model states, kept activations, transient buffers, overhead.

Model states, for the P parameters a rank holds after tensor and pipeline parallelism (N the
dp size; plait's implementation: AdamW moments and master weights always fp32; parameters
and gradients fp32 without ZeRO, in the parameter dtype -- bf16 under ``--dtype bfloat16`` --
with it):

    zero 0   4P params + 4P grads + 8P moments          = 16P
    zero 1   pP params + pP grads + (12 + g)P/N         (p = 2 for bf16, 4 for fp32; the
             shard gP/N exists after the last backward only: at the peak it meets no activations)
    zero 2   pP params + (12 + g)P/N  (a unit's gradients live only until reduce-scattered)
    zero 3   (12 + g)P/N              (+ gathered units, see ``rank_memory``)

(N counts context-parallel ranks too: they reduce and shard the same gradients; under hybrid
sharding it is the shard group, dp_shard x cp. 12P/N = fp32
master 4 + moments 8; gP/N the gradient shard, which exists from a unit's first
reduction to the step: g = p with one reduction per step (ZeRO-1, or one micro-batch per rank
and step), the reduction's output as it arrived, else g = 4, an fp32 accumulator.) Rajbhandari et al.'s mixed-precision figures
(16P, 4P + 12P/N, 2P + 14P/N, 16P/N) keep no separate gradient shard.

Activations kept for backward, per layer and micro-batch (t = tp, s = the positions of a sequence
on the rank, S / cp under context parallelism, b = micro-batch, e = bytes of the matmul dtype):

- gpt (Korthikanti et al. 2022, half precision): s b h (34 + 5 a s / h) with TP + SP divided by
  t; TP without SP s b h (10 + 24/t + 5 a s / (h t)).
- llama (plait, counted from the tensors its kernels save, checked by a test with
  ``saved_tensors_hooks``): per token, each RMSNorm keeps its fp32 input and normalised value
  (8h bytes; 6h over a bf16 residual stream, whose normalised value is bf16; on a GPU, where an
  fp32 norm is torch's fused kernel, its input and 1/rms: 4h + 4) and the matmuls behind it
  their input (e h: under autocast with an fp32 residual the one bf16 cast that q, k and v,
  and gate and up, share, ``models.mixed_precision``); attention keeps q,
  k and v after rotary (k and v with the kv heads, which SDPA's grouped-query kernels share) and
  the output ((2 h + 2 kv) e / t) and the fp32 log-sum-exp (4 a / t); the MLP keeps gate,
  SiLU(gate), up and their product (4 f e / t).
  Norm terms are divided by t under SP.
- full recomputation keeps only each block's input (s b h, /t under SP), plus one block's
  full activations while it is recomputed.
- selective recomputation (plait's policy: the outputs of every matmul are kept, all else is
  recomputed) keeps per token the block's input, q, k, v (h e / t + 2 kv e / t), the attention
  and MLP output projections before their reduction (2 h e: a row-parallel partial sum is
  [b, s, h] on every tp rank), gate and up (2 f e / t); and, like full, one block's full
  activations while it is recomputed. Neither keeps autocast's weight copies (recomputed too).

Construction (``construction_bytes``): a rank materialises only its own pieces, one
parameter at a time: what its strategy keeps at rest before the first step (no moments yet)
plus the largest full parameter in fp32, the one being generated or read.

Pipelines multiply by the micro-batches in flight on the rank, read from the schedule's
action lists (1F1B: at most pp; GPipe: all m). The head keeps its logits (b s V / t in the
compute dtype; without loss parallelism at tp > 1 the gathered fp32 logits, their log-softmax
and gradient too). Under bf16 autocast with fp32 parameters, the step keeps one set of bf16
copies of the weights its matmuls used (2P), which every micro-batch shares (autocast's cache
kept for the step, ``Trainer._weights_cast_once``; without recomputation, which frees them).
"""
from __future__ import annotations

from plait.layout import ContextParallelMode, Recompute, alltoall_kv_repeats
from plait.planner.compute import DTYPE_BYTES, autocast_casts, fused_norms, local_seq, residual_bytes
from plait.planner.workload import Layout, ModelShape


def parameter_bytes(layout: Layout) -> int:
    """Bytes per element of the parameters and gradients plait keeps in the model."""
    return DTYPE_BYTES[layout.dtype] if layout.zero >= 1 else 4


def model_state_bytes(params: float, layout: Layout) -> dict[str, float]:
    """{params, grads, optimizer} bytes for ``params`` elements on one rank before dp sharding."""
    n, p = layout.gradient_shards, parameter_bytes(layout)
    if layout.zero == 0:
        return {"params": 4 * params, "grads": 4 * params, "optimizer": 8 * params}
    g = p if layout.zero == 1 or layout.microbatches <= 1 else 4  # ZeRO-1 reduces once per step
    sharded = {"optimizer": 12 * params / n, "grad_shard": g * params / n}
    if layout.zero == 1:
        return {"params": p * params, "grads": p * params + sharded["grad_shard"], "optimizer": sharded["optimizer"]}
    if layout.zero == 2:
        return {"params": p * params, "grads": sharded["grad_shard"], "optimizer": sharded["optimizer"]}
    # zero 3: the fp32 master shard is the only resident copy of the parameters
    return {"params": 0.0, "grads": sharded["grad_shard"], "optimizer": sharded["optimizer"]}


def layer_activation_bytes(shape: ModelShape, layout: Layout, cuda: bool = False) -> float:
    """Bytes one layer keeps for backward for one micro-batch on one rank (no recomputation);
    ``cuda``: on a GPU, where an fp32 RMSNorm is torch's fused kernel (``compute.fused_norms``)."""
    t, b, s, h = layout.tp, layout.micro_batch, local_seq(shape, layout), shape.hidden
    sp = t if layout.sequence_parallel else 1
    e = DTYPE_BYTES[layout.dtype]
    if shape.arch == "gpt":
        scores = 5 * shape.heads * s / h
        per = (34 + scores) / t if layout.sequence_parallel else 10 + 24 / t + scores / t
        return s * b * h * per * e / 2
    heads_local = shape.heads / t
    residual = residual_bytes(shape, layout)
    # each RMSNorm keeps its fp32 input and normalised value (a bf16 residual: its fp32 upcast
    # and the normalised value cast back; the fused kernel: its input and 1/rms, 4 bytes a
    # token); the matmuls behind it keep their input once: q, k, v (and gate, up) share it, in
    # the matmul dtype (under autocast one cast for all, ``models.mixed_precision``)
    inputs = 2 * e
    if fused_norms(cuda, shape, layout):
        kept_by_norm = 4 * h + 4
    else:
        kept_by_norm = 4 * h + residual * h
    norms = (2 * kept_by_norm + inputs * h) / sp
    # q, k and v after rotary (k, v with the kv heads: SDPA's grouped-query attention and the ring
    # read them shared), the output (also o_proj's input), fp32 log-sum-exp; all-to-all keeps
    # SDPA's q, k, v and output on the head shard (k, v as exchanged) and o_proj's input apart
    kv = shape.kv_hidden
    ring = layout.cp > 1 and layout.cp_mode == ContextParallelMode.RING
    if cuda and layout.dtype == "float32" and not ring:  # SDPA's k, v copied per query head
        kv = h  # (``models.llama.expands_shared_heads``; the ring's own kernels read them shared)
    if layout.cp > 1 and layout.cp_mode == ContextParallelMode.ALLTOALL:
        repeats = 1 if kv == h else alltoall_kv_repeats(shape.kv_heads // t, layout.cp)
        attention = (3 * h + 2 * kv * repeats) * e / t + 4 * heads_local
    else:
        attention = (2 * h + 2 * kv) * e / t + 4 * heads_local
    mlp = 4 * shape.ffn_hidden * e / t
    return s * b * (norms + attention + mlp)


def selective_bytes(shape: ModelShape, layout: Layout) -> float:
    """What selective recomputation keeps per layer and micro-batch: matmul outputs and the input."""
    if shape.arch == "gpt":  # Korthikanti et al.: the attention core's 5 a s / h term is dropped
        t, e = layout.tp, DTYPE_BYTES[layout.dtype]
        per = 34 / t if layout.sequence_parallel else 10 + 24 / t
        return shape.seq_len * layout.micro_batch * shape.hidden * per * e / 2
    t, e = layout.tp, DTYPE_BYTES[layout.dtype]  # cp: llama only (check_layout)
    h, f, kv = shape.hidden, shape.ffn_hidden, shape.kv_hidden
    outputs = e * ((h + 2 * kv + 2 * f) / t + 2 * h)
    return local_seq(shape, layout) * layout.micro_batch * outputs + checkpoint_bytes(shape, layout)


def kept_per_layer(shape: ModelShape, layout: Layout, cuda: bool = False) -> float:
    """Activation bytes one layer keeps for backward, per micro-batch, under ``layout.recompute``."""
    if layout.recompute == Recompute.FULL:
        return checkpoint_bytes(shape, layout)
    if layout.recompute == Recompute.SELECTIVE:
        return selective_bytes(shape, layout)
    return layer_activation_bytes(shape, layout, cuda)


def construction_bytes(params: float, largest: float, layout: Layout) -> float:
    """Peak bytes while a rank builds its part of the model: its states before the first step
    (no AdamW moments yet) plus one full fp32 parameter being generated or read."""
    if layout.zero == 0:  # parameters, and with dp > 1 the gradient buckets; moments come later
        at_rest = 4 * params * (2 if layout.gradient_replicas > 1 else 1)
    else:  # the flat buffers this level keeps (no gradient shard before a reduction), the master shard
        p = parameter_bytes(layout)
        at_rest = (p * params if layout.zero <= 2 else 0.0) + (p * params if layout.zero == 1 else 0.0) \
            + 4 * params / layout.gradient_shards
    return at_rest + 4 * largest


def checkpoint_bytes(shape: ModelShape, layout: Layout) -> float:
    """What full recomputation keeps per layer and micro-batch: the block's input."""
    sp = layout.tp if layout.sequence_parallel else 1
    return local_seq(shape, layout) * layout.micro_batch * shape.hidden * residual_bytes(shape, layout) / sp


def head_bytes(shape: ModelShape, layout: Layout) -> float:
    """Logit buffers of the last stage for one micro-batch."""
    tokens, v, t = layout.micro_batch * local_seq(shape, layout), shape.vocab, layout.tp
    e = DTYPE_BYTES[layout.dtype]
    if t == 1:  # fused chunked head + cross-entropy: one N x V buffer, one fp32 chunk
        return tokens * v * e + 2 * 4 * (1 << 22)
    if layout.loss_parallel:
        return tokens * v / t * (e + 4 + 4)
    return tokens * v / t * e + tokens * v * (e + 3 * 4)


def stage_parameters(shape: ModelShape, layout: Layout, layers: int, first: bool, last: bool) -> float:
    """Elements one rank holds: its blocks, the embedding on the first stage, the head (and the
    final norm) on the last; a tied table is held by both the first and the last stage."""
    t = layout.tp
    params = layers * shape.layer_parameters() / t
    if first:
        params += shape.embedding_parameters() / t
    if last:
        params += shape.head_parameters() / t
        if shape.tied and not first:
            params += shape.vocab * shape.hidden / t
    return params


def weight_copy_bytes(shape: ModelShape, layout: Layout, params: float) -> float:
    """The bf16 copies of ``params`` weight elements that a step under bf16 autocast over fp32
    parameters keeps, shared by its micro-batches (none under recomputation, which frees them)."""
    return 2 * params if autocast_casts(shape, layout) and layout.recompute == Recompute.NONE else 0.0


def rank_memory(shape: ModelShape, layout: Layout, layers: int, first: bool, last: bool, in_flight: int,
                framework_bytes: float, cuda: bool = False) -> dict[str, float]:
    """Peak bytes of one rank holding ``layers`` blocks (the embedding if ``first``, the head if
    ``last``), with ``in_flight`` micro-batches' activations kept at the peak; ``cuda``: on a GPU."""
    t = layout.tp
    params = stage_parameters(shape, layout, layers, first, last)
    states = model_state_bytes(params, layout)
    recompute = layout.recompute != Recompute.NONE
    activations = in_flight * layers * kept_per_layer(shape, layout, cuda)
    transient = []
    if recompute:  # one block's activations exist while it is recomputed
        transient.append(layer_activation_bytes(shape, layout, cuda))
    if last:
        transient.append(head_bytes(shape, layout))
    # ZeRO's per-unit buffers: a unit is a block, or the root (embedding, final norm, head)
    p = parameter_bytes(layout)
    block_unit = shape.layer_parameters() / t * p
    root_unit = (stage_parameters(shape, layout, 0, first, last)) * p
    largest = max(block_unit, root_unit)
    if layout.zero == 3:
        # the root stays gathered through forward and backward (not re-gathered, as FSDP), a
        # block and its prefetched successor are gathered, and the unit being reduced has
        # its parameters' gradients, their flat copy and the all-to-all receive buffer
        transient.append(root_unit + 2 * block_unit + 3 * largest)
    elif layout.zero == 2:
        transient.append(3 * largest)  # gradients, flat copy, receive buffer of one unit
    if in_flight:
        activations += weight_copy_bytes(shape, layout, params)
    result = dict(states)
    if layout.zero == 1:
        # ZeRO-1 reduces once, after the step's last backward: its gradient shard and each unit's
        # receive buffer never meet the activations. The peak is the larger of the backward's
        # (activations) and the step's (shard + one buffer), over the states both share.
        shard = states["grads"] - parameter_bytes(layout) * params
        result["grads"] -= shard
        transient.append(shard + largest - activations)
    result.update(activations=activations, transient=max([0.0, *transient]), framework=framework_bytes)
    result["total"] = sum(result.values())
    return result
