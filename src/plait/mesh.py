"""The parallel layout (``ParallelDims``) and the per-process runtime (``ParallelContext``).

Ranks are laid out dp-outermost, then pp, then cp (context parallel), tp-innermost::

    rank = ((dp_rank * pp + pp_rank) * cp + cp_rank) * tp + tp_rank

so the tp ranks of one (dp, pp, cp) coordinate are consecutive, i.e. on the same host when
``torchrun`` places ``nproc_per_node`` consecutive ranks per node, and the cp ranks next to them
(as in Megatron-Core's tp-cp-dp-pp order). Tensor parallelism, the most talkative dimension,
stays on the fastest links, context parallelism's ring on the next fastest, and data
parallelism crosses hosts.

Gradients are reduced over data *and* context parallelism: cp ranks hold the same parameters and
see different positions of the same sequences, so for the data-parallel strategy they are data
parallel. ``comm("dp_cp")`` is that group (dp-major: group rank = dp_rank * cp + cp_rank); with
cp = 1 it is the "dp" group itself.

Hybrid sharding (``dp_shard`` = N < dp, ZeRO only): the dp ranks form dp / N replica groups of N
consecutive dp ranks (dp_rank = replica * N + shard index). ZeRO shards over ``comm("dp_shard")``
(the N dp ranks of one replica group, with their cp ranks) and all-reduces the shards over
``comm("dp_replicate")`` (the dp / N ranks of one shard index). Without it "dp_shard" is "dp_cp"
and "dp_replicate" has one member.

There is no module-level process-group state: a ``ParallelContext`` is built once per process
and handed to whatever needs a group.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

from plait.comm import Collectives, TrafficCounter
from plait.device import DeviceRequest, host_device_plan
from plait.flight_recorder import FlightRecorder
from plait.layout import LayoutError

DIM_NAMES = ("dp", "pp", "cp", "tp")


class Coordinates(NamedTuple):
    dp: int
    pp: int
    tp: int
    cp: int = 0


@dataclass(frozen=True)
class ParallelDims:
    """Sizes of the data-, pipeline-, tensor- and context-parallel dimensions (pure; no processes)."""

    dp: int = 1
    pp: int = 1
    tp: int = 1
    cp: int = 1
    dp_shard: int | None = None  # hybrid sharding: ZeRO over groups of this many dp ranks (None: all)

    def __post_init__(self) -> None:
        for name in DIM_NAMES:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"--{name} must be an integer >= 1, got {value!r}")
        if self.dp_shard is not None and (self.dp_shard < 1 or self.dp % self.dp_shard):
            raise LayoutError(f"--dp-shard {self.dp_shard} must divide the data-parallel size dp={self.dp}")

    @property
    def replicas(self) -> int:
        """Replica groups of hybrid sharding (1 without it)."""
        return self.dp // (self.dp_shard or self.dp)

    @classmethod
    def from_world_size(cls, world_size: int, dp: int | None = None, pp: int = 1, tp: int = 1,
                        cp: int = 1, dp_shard: int | None = None) -> "ParallelDims":
        """Fill in ``dp`` (when None) as world_size / (pp * cp * tp), then check the product."""
        if pp < 1 or tp < 1 or cp < 1:
            raise LayoutError(f"--pp, --tp and --cp must be >= 1, got pp={pp} tp={tp} cp={cp}")
        if dp is None:
            if world_size % (pp * tp * cp):
                product = f"pp x tp = {pp * tp}" if cp == 1 else f"pp x cp x tp = {pp * cp * tp}"
                raise LayoutError(f"world size {world_size} is not divisible by {product}")
            dp = world_size // (pp * tp * cp)
        dims = cls(dp=dp, pp=pp, tp=tp, cp=cp, dp_shard=dp_shard)
        dims.check_world_size(world_size)
        return dims

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.cp * self.tp

    def check_world_size(self, world_size: int) -> None:
        if self.world_size != world_size:
            cp = f" x cp {self.cp}" if self.cp > 1 else ""
            raise LayoutError(f"dp x pp x tp = {self.dp} x {self.pp} x {self.tp}{cp} = {self.world_size} "
                              f"does not equal the world size {world_size}")

    def coordinates(self, rank: int) -> Coordinates:
        tp_rank = rank % self.tp
        cp_rank = (rank // self.tp) % self.cp
        pp_rank = (rank // (self.tp * self.cp)) % self.pp
        dp_rank = rank // (self.tp * self.cp * self.pp)
        return Coordinates(dp_rank, pp_rank, tp_rank, cp_rank)

    def rank_of(self, dp: int, pp: int, tp: int, cp: int = 0) -> int:
        return ((dp * self.pp + pp) * self.cp + cp) * self.tp + tp

    def data_parallel_groups(self) -> list[list[int]]:
        """The ranks of each dp x cp group (gradient reduction), dp-major, one per (pp, tp)."""
        return [[self.rank_of(d, p, t, c) for d in range(self.dp) for c in range(self.cp)]
                for p in range(self.pp) for t in range(self.tp)]

    def shard_groups(self) -> list[list[int]]:
        """Hybrid sharding: the dp_shard x cp ranks of each replica group, dp-major."""
        n = self.dp_shard or self.dp
        return [[self.rank_of(r * n + d, p, t, c) for d in range(n) for c in range(self.cp)]
                for r in range(self.replicas) for p in range(self.pp) for t in range(self.tp)]

    def replicate_groups(self) -> list[list[int]]:
        """Hybrid sharding: the ranks holding the same shard, one in each replica group."""
        n = self.dp_shard or self.dp
        return [[self.rank_of(r * n + d, p, t, c) for r in range(self.replicas)]
                for d in range(n) for p in range(self.pp) for c in range(self.cp) for t in range(self.tp)]


@dataclass
class ParallelContext:
    """What a process knows about the job: layout, its coordinates, device, groups, traffic."""

    dims: ParallelDims
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "gloo"
    mesh: object | None = None  # torch.distributed.device_mesh.DeviceMesh when world_size > 1
    counter: TrafficCounter = field(default_factory=TrafficCounter)
    comms: dict[str, Collectives] = field(default_factory=dict)
    recorder: FlightRecorder | None = None  # the last collectives of this rank (hang diagnosis)

    def __post_init__(self) -> None:
        self.coords = self.dims.coordinates(self.rank)
        self.recorder = self.recorder or FlightRecorder(self.rank)
        for name in DIM_NAMES:
            if name not in self.comms:
                group = self.mesh.get_group(name) if self.mesh is not None else None
                self.comms[name] = Collectives(name, group, self.counter, self.device, self.recorder)
        if "dp_cp" not in self.comms:  # see the module docstring
            self.comms["dp_cp"] = self.comms["dp"]
        if "dp_shard" not in self.comms:
            self.comms["dp_shard"] = self.comms["dp_cp"]
            self.comms["dp_replicate"] = Collectives("dp_replicate", None, self.counter, self.device, self.recorder)
        if "world" not in self.comms:  # every rank: control messages and the run's set-up barriers
            world = dist.group.WORLD if self.mesh is not None else None
            self.comms["world"] = Collectives("world", world, self.counter, self.device, self.recorder)

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def dp_rank(self) -> int:
        return self.coords.dp

    @property
    def pp_rank(self) -> int:
        return self.coords.pp

    @property
    def tp_rank(self) -> int:
        return self.coords.tp

    @property
    def cp_rank(self) -> int:
        return self.coords.cp

    @property
    def is_logging_rank(self) -> bool:
        """Rank 0 prints and writes run files (the last pipeline stage reports the loss to it)."""
        return self.rank == 0

    def comm(self, name: str) -> Collectives:
        return self.comms[name]

    @classmethod
    def single(cls, device: torch.device | None = None) -> "ParallelContext":
        """One process, no process group (on CUDA when a GPU is visible, unless ``device`` says)."""
        device = device if device is not None else host_device_plan(DeviceRequest.AUTO, 1).device(0)
        return cls(dims=ParallelDims(), device=device)


def build_context(dims: ParallelDims, device: torch.device, backend: str, local_rank: int = 0) -> ParallelContext:
    """A context for an already initialised default process group."""
    from torch.distributed.device_mesh import init_device_mesh

    dims.check_world_size(dist.get_world_size())
    mesh = init_device_mesh(device.type, (dims.dp, dims.pp, dims.cp, dims.tp), mesh_dim_names=DIM_NAMES)
    ctx = ParallelContext(dims=dims, rank=dist.get_rank(), local_rank=local_rank, device=device,
                          backend=backend, mesh=mesh)
    if dims.cp > 1:
        group = mesh.get_group("cp") if dims.dp == 1 else None
        for ranks in dims.data_parallel_groups():  # every rank creates every group, in one order
            created = dist.new_group(ranks) if dims.dp > 1 else None
            if ctx.rank in ranks and created is not None:
                group = created
        ctx.comms["dp_cp"] = Collectives("dp_cp", group, ctx.counter, device, ctx.recorder)
        ctx.comms["dp_shard"] = ctx.comms["dp_cp"]
    if dims.replicas > 1:
        for name, groups in (("dp_shard", dims.shard_groups()), ("dp_replicate", dims.replicate_groups())):
            mine = None
            for ranks in groups:
                created = dist.new_group(ranks)
                if ctx.rank in ranks:
                    mine = created
            ctx.comms[name] = Collectives(name, mine, ctx.counter, device, ctx.recorder)
    return ctx


def init_distributed(dp: int | None = None, pp: int = 1, tp: int = 1, timeout_s: float = 600.0,
                     device: DeviceRequest | str = DeviceRequest.AUTO, cp: int = 1,
                     dp_shard: int | None = None) -> ParallelContext:
    """Join the job described by the launcher's environment (torchrun or ``plait train --nproc``).

    Without WORLD_SIZE in the environment (or WORLD_SIZE=1) this is a single process and no
    process group is created. ``device`` is ``--device``: ``plait.device`` turns it and this
    host's GPUs and local ranks into the device (``cuda:LOCAL_RANK`` or the CPU) and backend
    (NCCL or gloo), or a one-line error. A collective that waits longer than ``timeout_s`` fails
    instead of hanging, so a dead peer ends the job with a message.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dims = ParallelDims.from_world_size(world_size, dp=dp, pp=pp, tp=tp, cp=cp, dp_shard=dp_shard)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    plan = host_device_plan(device)
    device, backend = plan.device(local_rank), plan.backend
    if world_size == 1:
        return ParallelContext.single(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return build_context(dims, device, backend, local_rank)


def shutdown(ctx: ParallelContext | None, exit_code: int | None = None) -> None:
    """Leave the job cleanly: barrier, destroy the group, and (in workers) ``os._exit``.

    Exiting through ``os._exit`` after destroying the group avoids an abort seen at interpreter
    exit with device meshes on gloo ("terminate called without an active exception"; destroying
    the group alone still aborted 1 exit in 20 here). Python's stdout and stderr are flushed first.
    """
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
    if exit_code is not None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        os._exit(exit_code)
