"""Predict one layout: step time, memory per rank, throughput and MFU.

The step is assembled from the pieces of the other modules, the way plait runs it:

1. Per chunk of layers, the forward and backward time of one micro-batch on one rank
   (``compute.py``) plus the tensor-parallel collectives plait issues inside them, which run
   in the compute stream (not overlapped): without SP two all-reduces of b s h forward and two
   backward per layer; with SP two all-gathers and two reduce-scatters each way, plus the two
   re-gathers of the kept shards in backward. Full recomputation repeats the forward and its
   collectives inside the backward; selective repeats all of it but the GEMMs.
2. The pipeline: the very action lists plait's executor runs (``pipeline.build_schedule``),
   simulated with those chunk costs and a point-to-point message time per boundary
   (``pipeline.simulate``); the bubble comes out of the same code as the executor's order.
   Without a pipeline this is m x (forward + backward).
3. Data parallel traffic (``network.py``): plain DP all-reduces fp32 gradients in buckets
   during the last micro-batch's backward; ZeRO-1 reduce-scatters after backward and
   all-gathers parameters after the step; ZeRO-2 reduce-scatters each unit in every
   micro-batch's backward; ZeRO-3 also all-gathers every unit before its forward and again
   before its backward. On GPUs traffic launched during compute hides behind it (the exposed
   part is what exceeds the compute); on the cpu profile gloo shares the cores, so all of it
   adds.
4. The optimizer: AdamW reads parameter, gradient and moments and writes three of them, a
   memory-bound 28 bytes per local fp32 element, plus the gradient norm (4 bytes).
5. Under bf16 autocast over fp32 parameters, the weights' casts to bf16: once a step, or in
   every micro-batch's forward under recomputation (``compute.weights_cast_per_microbatch``).

Throughput: tokens/s per device = global batch x sequence / step time / devices.
``mfu`` = model FLOPs (6 per matmul parameter per token plus attention, no recomputation) /
(step time x devices x peak). ``tflops_per_gpu`` counts the FLOPs the hardware executes in the
way Megatron-LM reports them: the model FLOPs plus the recomputed forward (for ``arch=gpt``
exactly Narayanan et al.'s Eq. 3, 96 B s l h^2 (1 + s/6h + V/16lh) with full recomputation,
72 without). ``model_tflops_per_gpu`` is the same without recomputation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache

from plait.errors import PlaitError
from plait.layout import ContextParallelMode, Recompute, alltoall_kv_repeats
from plait.pipeline.schedules import Schedule, build_schedule, in_flight_per_rank, simulate
from plait.pipeline.split import balanced_split
from plait.planner.compute import (DTYPE_BYTES, Cost, Timer, device_rates, embedding_backward, embedding_forward,
                                   head_backward, head_forward, layer_backward, layer_forward, local_seq, weight_casts,
                                   weights_cast_per_microbatch)
from plait.planner.hardware import HardwareProfile
from plait.planner.memory import (construction_bytes, parameter_bytes, rank_memory, stage_parameters,
                                  weight_copy_bytes)
from plait.planner.network import collective_time, members_per_node
from plait.planner.workload import Layout, ModelShape, check_layout

ADAM_BYTES_PER_ELEMENT = 28 + 4
DDP_BUCKET_BYTES = 25 * 2 ** 20


class LayoutRejected(PlaitError):
    """This layout cannot run; the message says why in one line."""


@dataclass
class Prediction:
    layout: Layout
    step_time_s: float
    memory_bytes_per_gpu: float
    memory_breakdown: dict[str, float]
    tokens_per_s_per_gpu: float
    tflops_per_gpu: float
    model_tflops_per_gpu: float
    mfu: float
    fits: bool
    time_breakdown: dict[str, float] = field(default_factory=dict)
    bubble_fraction: float = 0.0
    construction_bytes_per_gpu: float = 0.0  # peak while building the rank's part of the model

    def to_dict(self) -> dict:
        values = {key: value for key, value in asdict(self).items() if key != "layout"}
        values["layout"] = asdict(self.layout)
        values["layout_name"] = self.layout.describe()
        values["memory_gb_per_gpu"] = self.memory_bytes_per_gpu / 1e9
        values["construction_gb_per_gpu"] = self.construction_bytes_per_gpu / 1e9
        return values


def _ranks_per_node(hw: HardwareProfile, layout: Layout) -> int:
    return layout.world_size if hw.kind == "cpu" else min(layout.world_size, hw.devices_per_node)


def chunk_layer_counts(shape: ModelShape, parts: int) -> list[int]:
    """Layers per pipeline chunk as plait's stage split makes them (``pipeline.stage``): balanced
    by training FLOPs per token, the head's 6 h V charged to the last layer."""
    h = shape.hidden
    matmul = h * (h + 2 * shape.kv_hidden) + h * h + (2 if shape.arch == "gpt" else 3) * h * shape.ffn_hidden
    layer = 6 * matmul + 12 * shape.seq_len * h
    return list(_balanced_counts(shape.layers, parts, round(6 * shape.hidden * shape.vocab / layer, 6)))


@lru_cache(maxsize=4096)
def _balanced_counts(layers: int, parts: int, head_ratio: float) -> tuple[int, ...]:
    costs = [1.0] * layers
    costs[-1] += head_ratio
    return tuple(balanced_split(costs, parts))


class StepModel:
    """The per-micro-batch costs of one layout on one profile (shared by every rank of a stage)."""

    def __init__(self, shape: ModelShape, layout: Layout, hw: HardwareProfile) -> None:
        self.shape, self.layout, self.hw = shape, layout, hw
        self.rates = device_rates(hw, layout.dtype, _ranks_per_node(hw, layout))
        self.e = DTYPE_BYTES[layout.dtype]
        per_node = hw.devices_per_node if hw.kind == "gpu" else layout.world_size
        self.members = {g: members_per_node(g, layout.tp, layout.pp, layout.dp, per_node, layout.cp, layout.dp_shard)
                        for g in ("tp", "pp", "cp", "dp_cp", "dp_shard", "dp_replicate")}
        self.layer_f, self.layer_b = self._layer_costs()
        self.embed_f, self.embed_b, self.head_f, self.head_b = self._edge_costs()
        casts = self._timer()
        if not weights_cast_per_microbatch(layout):  # autocast's cache: once a step (else in layer_f)
            weight_casts(casts, shape, layout)
        self.layer_casts_per_step = casts.cost.seconds

    def collective(self, group: str, op: str, nbytes: float) -> float:
        layout = self.layout
        size = {"tp": layout.tp, "pp": 2, "cp": layout.cp, "dp_cp": layout.gradient_replicas,
                "dp_shard": layout.gradient_shards, "dp_replicate": layout.replicas}[group]
        return collective_time(self.hw, op, nbytes, size, self.members[group])

    def _timer(self) -> Timer:
        return Timer(self.rates, self.e)

    def _layer_costs(self) -> tuple[Cost, Cost]:
        shape, layout = self.shape, self.layout
        activation = layout.micro_batch * local_seq(shape, layout) * shape.hidden * self.e
        forward, backward = self._timer(), self._timer()
        layer_forward(forward, shape, layout)
        layer_backward(backward, shape, layout)
        if weights_cast_per_microbatch(layout):  # recomputation repeats them below, with the forward
            weight_casts(forward, shape, layout)
        if layout.cp > 1:
            self._context_parallel_comm(forward, backward)
        if layout.tp > 1:
            if layout.sequence_parallel:
                gather = self.collective("tp", "all_gather", activation)
                scatter = self.collective("tp", "reduce_scatter", activation)
                forward.comm(2 * gather + 2 * scatter)
                backward.comm(4 * gather + 2 * scatter)
            else:
                reduce = self.collective("tp", "all_reduce", activation)
                forward.comm(2 * reduce)
                backward.comm(2 * reduce)
        if layout.recompute == Recompute.FULL:
            backward.cost.add(forward.cost)
        elif layout.recompute == Recompute.SELECTIVE:  # all but the matmuls again (their collectives too)
            backward.cost.add(Cost(attention=forward.cost.attention, memory=forward.cost.memory,
                                   comm=forward.cost.comm))
        return forward.cost, backward.cost

    def _context_parallel_comm(self, forward: Timer, backward: Timer) -> None:
        """Ring: c - 1 key/value blocks forward, c - 1 again and c fp32 dK/dV accumulators
        backward, each overlapped with the attention block computing meanwhile (where the
        profile overlaps; the last accumulator waits). All-to-all: four exchanges each way."""
        shape, layout = self.shape, self.layout
        c, t, tokens = layout.cp, layout.tp, layout.micro_batch * local_seq(shape, layout)
        kv_hidden = shape.kv_hidden / t
        if layout.cp_mode == ContextParallelMode.RING:
            block = self.collective("cp", "send", 2 * tokens * kv_hidden * self.e)
            grads = self.collective("cp", "send", 2 * tokens * kv_hidden * 4)
            sends_f, sends_b = (c - 1) * block, (c - 1) * block + c * grads
            if self.hw.comm_overlaps_compute:
                sends_f = max(0.0, sends_f - forward.cost.attention)
                sends_b = max(0.0, sends_b - grads - backward.cost.attention) + grads
            forward.comm(sends_f)
            backward.comm(sends_b)
            return
        repeats = alltoall_kv_repeats(shape.kv_heads // t, c)
        queries = self.collective("cp", "all_to_all", tokens * shape.hidden / t * self.e)
        keys = self.collective("cp", "all_to_all", tokens * kv_hidden * repeats * self.e)
        forward.comm(2 * queries + 2 * keys)
        backward.comm(2 * queries + 2 * keys)

    def _edge_costs(self) -> tuple[Cost, Cost, Cost, Cost]:
        shape, layout = self.shape, self.layout
        tokens = layout.micro_batch * local_seq(shape, layout)
        embed_f, embed_b, head_f, head_b = (self._timer() for _ in range(4))
        embedding_forward(embed_f, shape, layout)
        embedding_backward(embed_b, shape, layout)
        head_forward(head_f, shape, layout)
        head_backward(head_b, shape, layout)
        if layout.tp > 1:
            activation = tokens * shape.hidden * self.e
            op = "reduce_scatter" if layout.sequence_parallel else "all_reduce"
            embed_f.comm(self.collective("tp", op, activation))
            if layout.sequence_parallel:  # the head's input is gathered; its gradient reduce-scattered
                head_f.comm(self.collective("tp", "all_gather", activation))
                head_b.comm(self.collective("tp", "reduce_scatter", activation))
            else:  # f before the head: overlapped with the weight-gradient matmul where comm overlaps
                reduce = self.collective("tp", "all_reduce", activation)
                hidden = reduce if not self.hw.comm_overlaps_compute else max(0.0, reduce - head_b.cost.gemm / 2)
                head_b.comm(hidden)
            if not layout.loss_parallel:
                head_f.comm(self.collective("tp", "all_gather", tokens * shape.vocab * self.e))
        return embed_f.cost, embed_b.cost, head_f.cost, head_b.cost

    def chunk_costs(self, counts: list[int]) -> tuple[list[Cost], list[Cost]]:
        forwards, backwards = [], []
        for index, count in enumerate(counts):
            f, b = Cost().add(self.layer_f, count), Cost().add(self.layer_b, count)
            if index == 0:
                f.add(self.embed_f)
                b.add(self.embed_b)
            if index == len(counts) - 1:
                f.add(self.head_f)
                b.add(self.head_b)
            forwards.append(f)
            backwards.append(b)
        return forwards, backwards

    def p2p_time(self) -> float:
        shape, layout = self.shape, self.layout
        message = layout.micro_batch * local_seq(shape, layout) * shape.hidden * self.e
        if layout.sequence_parallel:  # each tp rank sends its sequence shard
            message /= layout.tp
        if self.hw.kind == "gpu" and layout.tp * layout.pp > self.hw.devices_per_node:
            # some stage boundary crosses nodes, and the slowest boundary paces the pipeline
            return collective_time(self.hw, "send", message, 2, 1)
        return self.collective("pp", "send", message)

    def data_parallel(self, params: float, backward_s: float, forward_s: float,
                      units: int = 1) -> tuple[float, float]:
        """(total, exposed) seconds of the dp traffic of a stage holding ``params`` elements
        (after tp) in ``units`` ZeRO units (its blocks and the root), given one micro-batch's
        forward and backward compute time. ZeRO issues one collective per unit, each paying the
        latency; they span the shard group (all dp x cp ranks, or one replica's under hybrid
        sharding), whose shards are then all-reduced over the replicas once per step, after the
        backward."""
        layout = self.layout
        if layout.gradient_replicas == 1:
            return 0.0, 0.0
        m = layout.microbatches
        p_bytes = params * parameter_bytes(layout)
        overlap = self.hw.comm_overlaps_compute
        if layout.zero == 0:
            total = self.collective("dp_cp", "all_reduce", params * 4)
            last_bucket = self.collective("dp_cp", "all_reduce", min(params * 4, DDP_BUCKET_BYTES))
            return total, (max(last_bucket, total - backward_s) if overlap else total)
        gather = units * self.collective("dp_shard", "all_gather", p_bytes / units)
        scatter = units * self.collective("dp_shard", "reduce_scatter", p_bytes / units)
        shard_bytes = params / layout.gradient_shards * (parameter_bytes(layout) if m == 1 or layout.zero == 1 else 4)
        across = units * self.collective("dp_replicate", "all_reduce", shard_bytes / units) if layout.replicas > 1 \
            else 0.0
        if layout.zero == 1:
            return scatter + gather + across, scatter + gather + across

        def across_exposed(busy_in_backward: float) -> float:
            """HSDP's all-reduces, started unit by unit in the last backward (not under a
            pipeline): what the backward's spare time does not cover, and the last unit's."""
            if layout.pp > 1 or not across:
                return across
            return across / units + max(0.0, across * (units - 1) / units - max(0.0, backward_s - busy_in_backward))

        if layout.zero == 2:
            total = m * scatter + gather + across
            return total, (gather + across_exposed(scatter) + m * max(0.0, scatter - backward_s) if overlap else total)
        unit = self.shape.layer_parameters() / layout.tp * parameter_bytes(layout)
        first_unit = self.collective("dp_shard", "all_gather", unit)
        total = m * (2 * gather + scatter) + across
        if not overlap:
            return total, total
        exposed = m * (first_unit + max(0.0, gather - forward_s) + max(0.0, gather + scatter - backward_s))
        return total, exposed + across_exposed(gather + scatter)

    def tied_exchange_time(self) -> float:
        """The first and the last stage swap the tied table's gradient (its dp shard under ZeRO)."""
        layout = self.layout
        grad = self.shape.vocab * self.shape.hidden / layout.tp * 4
        if layout.zero >= 1:
            grad /= layout.gradient_shards
        return self.collective("pp", "send", grad)

    def optimizer_time(self, params: float) -> float:
        layout = self.layout
        local = params / layout.gradient_shards if layout.zero >= 1 else params
        seconds = local * ADAM_BYTES_PER_ELEMENT / self.rates.memory + 10 * self.rates.launch_s
        if layout.zero >= 1:  # the updated master shard written back as parameters
            seconds += local * (4 + parameter_bytes(layout)) / self.rates.memory
        return seconds


@lru_cache(maxsize=64)
def _schedule(schedule: str, pp: int, microbatches: int, virtual_stages: int):
    return build_schedule(schedule, pp, microbatches, virtual_stages)


@lru_cache(maxsize=4096)
def _in_flight(schedule: str, pp: int, microbatches: int, virtual_stages: int) -> tuple[int, ...]:
    return tuple(in_flight_per_rank(schedule, pp, microbatches, virtual_stages))


def predict(shape: ModelShape, layout: Layout, hw: HardwareProfile, exact_pipeline: bool = True) -> Prediction:
    """Predict ``layout``; raises LayoutRejected with the reason when it cannot run.

    ``exact_pipeline=False`` (the search's first pass) replaces the schedule simulation by its
    closed form, m x the slowest rank's work + (p - 1) / v x one stage's forward + backward.
    """
    reason = check_layout(shape, layout)
    if reason:
        raise LayoutRejected(reason)
    model = StepModel(shape, layout, hw)
    pp, m = layout.pp, layout.microbatches
    v = layout.chunks_per_rank if pp > 1 else 1
    parts = pp * v
    counts = chunk_layer_counts(shape, parts)
    forwards, backwards = model.chunk_costs(counts)
    schedule = Schedule(layout.schedule) if pp > 1 else Schedule.ONE_F_ONE_B
    in_flight = _in_flight(schedule, pp, m, v) if pp > 1 else (1,)
    if pp == 1:
        makespan = m * (forwards[0].seconds + backwards[0].seconds)
        bubble = 0.0
    elif not exact_pipeline:
        placement = schedule.placement
        per_rank = [sum(forwards[c].seconds + backwards[c].seconds for c in placement.chunks_of(r, pp, v))
                    for r in range(pp)]
        if schedule is Schedule.ZBV:  # each rank idles while the first forward reaches it: p - 1 chunk forwards
            makespan = m * max(per_rank) + (pp - 1) * max(f.seconds for f in forwards)
        elif schedule.splits_backward:  # ZB-H1 idles (p - 1)(T_F + T_B - T_W) per rank
            weight = max(counts) * model.layer_f.gemm
            makespan = m * max(per_rank) + (pp - 1) * max(0.0, max(per_rank) - 2 * weight)
        else:
            makespan = m * max(per_rank) + (pp - 1) / v * max(per_rank)
        bubble = 1.0 - m * max(per_rank) / makespan
    else:
        # a split backward's W: the blocks' weight-gradient products, as many FLOPs as their forward GEMMs
        weights = [counts[c] * model.layer_f.gemm if schedule.splits_backward else 0.0 for c in range(parts)]
        slots = simulate(_schedule(schedule, pp, m, v), forward_cost=lambda c: forwards[c].seconds,
                         backward_cost=lambda c: backwards[c].seconds - weights[c], comm_cost=model.p2p_time(),
                         weight_cost=lambda c: weights[c])
        makespan = max(slot.end for slot in slots)
        busy = sum(slot.end - slot.start for slot in slots)
        bubble = 1.0 - busy / (pp * makespan)

    tail, memory = 0.0, None
    dp_total, construction = 0.0, 0.0
    # the largest parameter, generated whole before its part is kept
    largest = max(shape.hidden * shape.ffn_hidden, shape.hidden * shape.hidden, shape.vocab * shape.hidden)
    # ranks of one kind (the same chunks' layer counts, embedding and head) differ only in the
    # micro-batches they keep in flight, and a rank's memory grows with those: price each kind
    # once, its memory at its most in flight
    kinds: dict[tuple, tuple[list[int], int]] = {}
    for rank in range(pp):
        chunks = schedule.placement.chunks_of(rank, pp, v)
        kind = tuple((counts[c], c == 0, c == parts - 1) for c in chunks)
        held = kinds.setdefault(kind, (chunks, in_flight[rank]))
        kinds[kind] = (held[0], max(held[1], in_flight[rank]))
    for chunks, most_in_flight in kinds.values():
        layers = sum(counts[c] for c in chunks)
        first, last = 0 in chunks, parts - 1 in chunks
        params = stage_parameters(shape, layout, layers, first, last)
        fwd = sum(forwards[c].seconds for c in chunks)
        bwd = sum(backwards[c].seconds for c in chunks)
        total, exposed = model.data_parallel(params, bwd, fwd, units=layers + (first or last))
        if shape.tied and pp > 1 and first != last:  # the table's gradient, summed between the stages
            exposed += model.tied_exchange_time()
        dp_total = max(dp_total, total)
        # the weights' bf16 casts of a step, where autocast's cache makes them once a step: charged
        # beside the tail (on a pipeline they delay the rank's first forward instead)
        tail = max(tail, layers * model.layer_casts_per_step + exposed + model.optimizer_time(params))
        construction = max(construction, construction_bytes(params, largest, layout) + hw.framework_memory_bytes)
        # interleaved ranks hold chunks of different micro-batches; charge the largest chunk
        per_chunk_layers = max(counts[c] for c in chunks)
        usage = rank_memory(shape, layout, per_chunk_layers, first, last, most_in_flight, hw.framework_memory_bytes,
                            cuda=hw.kind == "gpu")
        if v > 1:  # model states of all v chunks, activations of the in-flight chunks
            states = rank_memory(shape, layout, layers, first, last, 0, 0.0)
            for key in ("params", "grads", "optimizer"):
                usage[key] = states[key]
            # the bf16 weight copies of the step are of all v chunks too
            usage["activations"] += weight_copy_bytes(shape, layout, (layers - per_chunk_layers) *
                                                      shape.layer_parameters() / layout.tp)
            usage["total"] = sum(value for key, value in usage.items() if key != "total")
        if memory is None or usage["total"] > memory["total"]:
            memory = usage
    step = makespan + tail
    world = layout.world_size
    tokens = layout.global_batch * shape.seq_len
    model_flops = shape.model_flops_per_token() * tokens
    attention_forward = 4 * shape.layers * shape.seq_len * shape.hidden * tokens  # QK^T and PV, not halved
    if shape.arch == "gpt":
        executed = shape.megatron_flops(layout.global_batch, recompute=layout.recompute == Recompute.FULL)
    else:
        layer_forward_flops = (model_flops - 6 * shape.vocab * shape.hidden * tokens) / 3
        executed = model_flops + (layer_forward_flops if layout.recompute == Recompute.FULL else 0.0)
    if layout.recompute == Recompute.SELECTIVE:  # the attention core runs again in backward
        executed += attention_forward
    compute = sum(c.seconds - c.comm for c in forwards + backwards)
    breakdown = {"pipeline_makespan": makespan, "dp_and_optimizer_tail": tail, "dp_traffic": dp_total,
                 "compute_per_microbatch": compute / max(pp, 1),
                 "tp_comm_per_microbatch": sum(c.comm for c in forwards + backwards) / max(pp, 1),
                 "p2p_message": model.p2p_time() if pp > 1 else 0.0}
    return Prediction(
        layout=layout, step_time_s=step, memory_bytes_per_gpu=memory["total"], memory_breakdown=memory,
        tokens_per_s_per_gpu=tokens / step / world, tflops_per_gpu=executed / step / world / 1e12,
        model_tflops_per_gpu=model_flops / step / world / 1e12,
        mfu=model_flops / (step * world * model.rates.peak),
        fits=max(memory["total"], construction) <= hw.memory_bytes, time_breakdown=breakdown,
        bubble_fraction=bubble, construction_bytes_per_gpu=construction)
