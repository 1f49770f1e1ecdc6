"""Alpha-beta time of one collective on a group of devices.

    t = alpha + factor(op, n) * bytes / bandwidth

``bytes`` is the full logical tensor (the all-reduced tensor, the gathered result, the sent
message). ``factor`` is the share each device puts on the wire in a ring (as ``plait.comm``
counts it): all-reduce 2(n-1)/n, all-gather and reduce-scatter (n-1)/n, send 1. NCCL's all-reduce
has a tree for latency, so its alpha grows with log2(n); its all-gather and reduce-scatter are
rings only, n - 1 steps, so a group across nodes pays n - 1 ring steps (``ring_hop_latency_s``,
a few microseconds over InfiniBand) on top of alpha: the latency that makes ZeRO-3 over
thousands of ranks slow and hybrid sharding (a shard group inside a node or a few) fast.

Bandwidth depends on where the group lives. A group inside one node runs on NVLink. A group
spread over nodes with k members on each node stripes its rings over those k members' NICs,
so it gets min(NVLink, k x NIC) per device: tensor parallel inside a node (k = tp) is fast,
data parallel across nodes behind tp = 8 gets one NIC per replica. Both are multiplied by the
profile's ``link_efficiency`` (the bus bandwidth NCCL reaches).

On the ``cpu`` profile ``plait calibrate`` measured plait's own gloo collectives (all-reduce,
the all-to-all reduce-scatter, the point-to-point all-gather, send/recv) at sizes from 16 KiB
to 64 MiB and fitted (alpha, bandwidth) with the same factors; the measured points are
interpolated (same per-rank wire volume), beyond them the fitted bandwidth extends the last.
"""
from __future__ import annotations

import math

from plait.planner.hardware import HardwareProfile

FACTORS = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
           "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n, "send": lambda n: 1.0}
# A calibrated profile that did not measure an op times it as one it did with the same traffic:
# plait's gloo reduce-scatter *is* an all-to-all (plus a local sum).
CALIBRATED_AS = {"all_to_all": "reduce_scatter"}


def collective_time(hw: HardwareProfile, op: str, nbytes: float, group_size: int, members_per_node: int) -> float:
    """Seconds for ``op`` over ``group_size`` devices, ``members_per_node`` of them per node."""
    n = group_size
    if n <= 1 and op != "send":
        return 0.0
    factor = FACTORS[op](max(n, 2))
    measured = op if op in hw.collectives else CALIBRATED_AS.get(op)
    if measured in hw.collectives:
        calibrated = FACTORS[measured](max(hw.collective_group_size, 2))
        return hw.collectives[measured].seconds(nbytes, factor, calibrated)
    inside_node = members_per_node >= n
    if inside_node:
        bandwidth, latency = hw.intra_node_bandwidth, hw.intra_node_latency_s
    else:
        bandwidth = min(hw.intra_node_bandwidth, members_per_node * hw.inter_node_bandwidth)
        latency = hw.inter_node_latency_s
    steps = 1 if op == "send" else math.ceil(math.log2(max(n, 2))) * (2 if op == "all_reduce" else 1)
    if op == "all_to_all":  # n - 1 messages, not a tree
        steps = n - 1
    ring = (n - 1) * hw.ring_hop_latency_s if op in ("all_gather", "reduce_scatter") and not inside_node else 0.0
    return steps * latency + ring + factor * nbytes / (bandwidth * hw.link_efficiency)


def members_per_node(group: str, tp: int, pp: int, dp: int, devices_per_node: int, cp: int = 1,
                     dp_shard: int | None = None) -> int:
    """How many members of one tp / cp / pp / dp group (or of the gradients' dp x cp group,
    "dp_cp"; of hybrid sharding's "dp_shard" and "dp_replicate" groups) share a node, with ranks
    placed tp innermost, then cp, then pp, then dp (plait's rank order: rank = ((dp_rank * pp +
    pp_rank) * cp + cp_rank) * tp + tp_rank; dp_rank = replica * dp_shard + shard index)."""
    if group == "tp":
        return min(tp, devices_per_node)
    if group == "cp":
        return max(1, min(cp, devices_per_node // tp))
    if group == "pp":
        return max(1, min(pp, devices_per_node // (tp * cp)))
    dp_members = max(1, min(dp, devices_per_node // (tp * cp * pp)))
    if group == "dp":
        return dp_members
    shard = dp_shard or dp
    if group == "dp_replicate":
        return max(1, min(dp // shard, dp_members // shard))
    if group == "dp_shard":
        dp_members = min(shard, dp_members)
    return members_per_node("cp", tp, pp, dp, devices_per_node, cp) * dp_members
