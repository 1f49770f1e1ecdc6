"""Peak memory of one rank: model states, kept activations, transient buffers, overhead.

Model states, for the P parameters a rank holds after tensor and pipeline parallelism (N the
dp size; plait's implementation: AdamW moments and master weights always fp32; parameters
and gradients fp32 without ZeRO, in the parameter dtype -- bf16 under ``--dtype bfloat16`` --
with it):

    zero 0   4P params + 4P grads + 8P moments          = 16P
    zero 1   pP params + pP grads + 16P/N               (p = 2 for bf16, 4 for fp32)
    zero 2   pP params + 16P/N        (a unit's gradients live only until reduce-scattered)
    zero 3   16P/N                    (+ gathered units, see ``rank_memory``)

(16P/N = fp32 master 4 + moments 8 + gradient-shard accumulator 4.) Rajbhandari et al.'s
mixed-precision figures (16P, 4P + 12P/N, 2P + 14P/N, 16P/N) keep no separate gradient shard.

Activations kept for backward, per layer and micro-batch (t = tp, s = sequence, b = micro-batch,
e = bytes of the matmul dtype):

- gpt (Korthikanti et al. 2022, half precision): s b h (34 + 5 a s / h) with TP + SP divided by
  t; TP without SP s b h (10 + 24/t + 5 a s / (h t)).
- llama (plait, counted from the tensors its kernels save, checked by a test with
  ``saved_tensors_hooks``): per token, each RMSNorm keeps its fp32 input and normalised value
  (8h bytes) and the matmuls behind it their input (e h, or under autocast with an fp32
  residual one bf16 cast per consumer: 3 for q, k, v and 2 for gate, up); attention keeps q,
  k and v after rotary (k and v expanded to every head), the output (4 h e / t) and the fp32
  log-sum-exp (4 a / t); the MLP keeps gate, SiLU(gate), up and their product (4 f e / t).
  Norm terms are divided by t under SP.
- full recomputation keeps only each block's input (s b h, /t under SP), plus one block's
  full activations while it is recomputed.

Pipelines multiply by the micro-batches in flight on the rank, read from the schedule's
action lists (1F1B: at most pp; GPipe: all m). The head keeps its logits (b s V / t in the
compute dtype; without loss parallelism at tp > 1 the gathered fp32 logits, their log-softmax
and gradient too). Under bf16 autocast with fp32 parameters, each micro-batch in flight also
keeps bf16 copies of the weights its matmuls used (2P).
"""
from __future__ import annotations

from plait.planner.compute import DTYPE_BYTES, residual_bytes
from plait.planner.workload import Layout, ModelShape


def parameter_bytes(layout: Layout) -> int:
    """Bytes per element of the parameters and gradients plait keeps in the model."""
    return DTYPE_BYTES[layout.dtype] if layout.zero >= 1 else 4


def model_state_bytes(params: float, layout: Layout) -> dict[str, float]:
    """{params, grads, optimizer} bytes for ``params`` elements on one rank before dp sharding."""
    n, p = layout.dp, parameter_bytes(layout)
    if layout.zero == 0:
        return {"params": 4 * params, "grads": 4 * params, "optimizer": 8 * params}
    sharded = {"optimizer": 12 * params / n, "grad_shard": 4 * params / n}
    if layout.zero == 1:
        return {"params": p * params, "grads": p * params + sharded["grad_shard"], "optimizer": sharded["optimizer"]}
    if layout.zero == 2:
        return {"params": p * params, "grads": sharded["grad_shard"], "optimizer": sharded["optimizer"]}
    # zero 3: the fp32 master shard is the only resident copy of the parameters
    return {"params": 0.0, "grads": sharded["grad_shard"], "optimizer": sharded["optimizer"]}


def layer_activation_bytes(shape: ModelShape, layout: Layout) -> float:
    """Bytes one layer keeps for backward for one micro-batch on one rank (no recomputation)."""
    t, b, s, h = layout.tp, layout.micro_batch, shape.seq_len, shape.hidden
    sp = t if layout.sequence_parallel else 1
    e = DTYPE_BYTES[layout.dtype]
    if shape.arch == "gpt":
        scores = 5 * shape.heads * s / h
        per = (34 + scores) / t if layout.sequence_parallel else 10 + 24 / t + scores / t
        return s * b * h * per * e / 2
    heads_local = shape.heads / t
    residual = residual_bytes(shape, layout)
    # each RMSNorm keeps its fp32 input and normalised value; the matmuls behind it keep their
    # input: once when it already has the matmul dtype, else autocast casts it per consumer
    # (q, k, v behind the first norm; gate, up behind the second)
    inputs = 2 * e if residual == e else 5 * e
    norms = (2 * 8 + inputs) * h / sp
    # q, k and v after rotary (k, v expanded to all heads for SDPA), the output, fp32 log-sum-exp
    attention = 4 * h * e / t + 4 * heads_local
    mlp = 4 * shape.ffn_hidden * e / t
    return s * b * (norms + attention + mlp)


def checkpoint_bytes(shape: ModelShape, layout: Layout) -> float:
    """What full recomputation keeps per layer and micro-batch: the block's input."""
    sp = layout.tp if layout.sequence_parallel else 1
    return shape.seq_len * layout.micro_batch * shape.hidden * residual_bytes(shape, layout) / sp


def head_bytes(shape: ModelShape, layout: Layout) -> float:
    """Logit buffers of the last stage for one micro-batch."""
    tokens, v, t = layout.micro_batch * shape.seq_len, shape.vocab, layout.tp
    e = DTYPE_BYTES[layout.dtype]
    if t == 1:  # fused chunked head + cross-entropy: one N x V buffer, one fp32 chunk
        return tokens * v * e + 2 * 4 * (1 << 22)
    if layout.loss_parallel:
        return tokens * v / t * (e + 4 + 4)
    return tokens * v / t * e + tokens * v * (e + 3 * 4)


def rank_memory(shape: ModelShape, layout: Layout, layers: int, first: bool, last: bool, in_flight: int,
                framework_bytes: float) -> dict[str, float]:
    """Peak bytes of one rank holding ``layers`` blocks (the embedding if ``first``, the head if
    ``last``), with ``in_flight`` micro-batches' activations kept at the peak."""
    t = layout.tp
    params = layers * shape.layer_parameters() / t
    if first:
        params += shape.embedding_parameters() / t
    if last:
        params += shape.head_parameters() / t
    states = model_state_bytes(params, layout)
    recompute = layout.recompute == "full"
    per_layer = checkpoint_bytes(shape, layout) if recompute else layer_activation_bytes(shape, layout)
    activations = in_flight * layers * per_layer
    transient = []
    if recompute:
        transient.append(layer_activation_bytes(shape, layout))
    if last:
        transient.append(head_bytes(shape, layout))
    # ZeRO's per-unit buffers: a unit is a block, or the root (embedding, final norm, head)
    p = parameter_bytes(layout)
    block_unit = shape.layer_parameters() / t * p
    root_unit = ((shape.embedding_parameters() if first else 0) + (shape.head_parameters() if last else 0)) / t * p
    largest = max(block_unit, root_unit)
    if layout.zero == 3:
        # the root stays gathered through forward and backward (not re-gathered, as FSDP), a
        # block and its prefetched successor are gathered, and the unit being reduced has
        # its parameters' gradients, their flat copy and the all-to-all receive buffer
        transient.append(root_unit + 2 * block_unit + 3 * largest)
    elif layout.zero == 2:
        transient.append(3 * largest)  # gradients, flat copy, receive buffer of one unit
    elif layout.zero == 1:
        transient.append(largest)  # the reduce-scatter's receive buffer of one unit
    if shape.arch == "llama" and layout.dtype != "float32" and layout.zero == 0:  # autocast's weight copies
        activations += in_flight * 2 * params
    result = dict(states)
    result.update(activations=activations, transient=max(transient, default=0.0), framework=framework_bytes)
    result["total"] = sum(result.values())
    return result
