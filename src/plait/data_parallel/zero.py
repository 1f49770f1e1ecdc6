"""Sharded data parallelism: ZeRO-1, ZeRO-2 and ZeRO-3 (FSDP-style units).

Parameters are grouped into *units*: each transformer block, a weight tied across pipeline
stages (alone, so both stages lay it out alike), and a root unit with everything else
(embedding, final norm, head). A unit's parameters are laid end to end in one flat vector,
padded to a multiple of the dp size n; dp rank r owns the slice [r S, (r+1) S), S = padded / n
(``FlatLayout``, the one place that says which part of which parameter a shard holds).
Each rank keeps, for its slices only, the fp32 master copy and the AdamW moments.

    level  params (full)      grads (full)           per-step traffic (ring, per rank)
    1      kept, all ranks    kept until reduced     reduce-scatter grads + all-gather params = 2P
    2      kept, all ranks    freed unit by unit     same, reduce-scatter launched in backward
    3      gathered per unit  freed unit by unit     all-gather fwd + all-gather bwd + reduce-scatter = 3P

(P in bytes of the parameters as communicated; (n-1)/n factors per the Collectives convention.)

Gradient reduction: each rank's loss is already divided by the global token count, so the
reduce-scatter *sums* over dp (see replicated.py). ZeRO-1 reduce-scatters once per step after
the last micro-batch; ZeRO-2/3 reduce-scatter each unit as soon as its gradients are complete,
on every micro-batch (full gradients never outlive a unit). A unit's gradient shard exists from
its first reduction of the step to the optimizer step: it is that reduction's output as it
arrived (bf16 under mixed precision) and becomes an fp32 accumulator only when a second
micro-batch adds to it. With one micro-batch per rank and step, a bf16 run so holds 2 bytes
of gradient per shard element, not 4, with the same values (``_accumulate``).

ZeRO-3 keeps a unit's full parameters in one flat buffer whose storage is resized to zero when
the unit is not in use (as FSDP does): parameters and the tensors autograd saved stay valid
views, and are refilled before use. Forward: gather block i (prefetching the next block of the
same pipeline chunk), run it, free it. Backward: a hook on the block's output gathers it again
(prefetching the previous block of the chunk); when its gradients are complete they are
reduce-scattered and the parameters freed. A block under activation checkpointing recomputes
inside its own backward, after that gather: recomputation costs no extra traffic. The resident
units (root, tied) are gathered by the first module of the step that needs them and freed when
the step's gradients are complete. Under a pipeline the same rules apply per micro-batch.

Construction: parameters may be on the meta device. ``load_parameters`` allocates only what
the level keeps (levels 1/2: the full flat buffer; level 3: the master shards) and reads from
the source exactly those values, one parameter at a time.

Mixed precision (``param_dtype=bfloat16``): parameters and gradients are bf16 in the model and
on the wire; master shards and moments are fp32, and so is the gradient shard once it
accumulates; the step widens each unit's shard to fp32 in turn (one unit's fp32 copy at a time).

Clipping counts each element once: squares of this rank's gradient shard (elements replicated
over tp counted on tp rank 0 only, a tied weight on the first stage only) summed over dp, tp, pp.

Hybrid sharding (HSDP, ``--dp-shard N``): ``dp`` is then the group of N data-parallel ranks
(with their cp ranks) that a replica shards over, and ``replicate`` the dp / N ranks holding the
same shard in the other replicas. Everything above happens inside the shard group; each unit's
gradient shard is then all-reduced over ``replicate`` once per step (ZeRO-2/3 start it for each
unit as its last reduce-scatter of the step's last backward arrives, overlapped with the rest of
that backward; ZeRO-1, and a pipeline's schedule, in ``finish``), so every replica steps the
same shard identically. Per step and rank that adds 2 (R - 1) / R x P / N bytes (R replicas) on
the replicate group, while the all-gathers and reduce-scatters span N ranks instead of dp. Checkpoints are written by the first replica
only; their pieces are flat ranges, so they load into any grouping.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from plait.checkpoint.pieces import KINDS, Piece
from plait.comm import Collectives
from plait.data_parallel.strategy import (DataParallelStrategy, ParameterInfo, ParameterSource, TiedWeights,
                                          clip_scale, describe_parameters, reduce_squares)
from plait.sharding import swap_parameter_data
from plait.tensor_parallel.plan import sum_partial_grads


@dataclass(frozen=True)
class FlatLayout:
    """Tensors of ``sizes`` elements laid end to end, padded to a multiple of ``parts``."""

    sizes: tuple[int, ...]
    parts: int

    @property
    def offsets(self) -> list[int]:
        offsets, offset = [], 0
        for size in self.sizes:
            offsets.append(offset)
            offset += size
        return offsets

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @property
    def padded(self) -> int:
        return -(-self.numel // self.parts) * self.parts

    @property
    def shard_size(self) -> int:
        return self.padded // self.parts

    def overlaps(self, rank: int) -> list[tuple[int, int, int, int]]:
        """(tensor index, lo, hi, at): elements [lo, hi) of that tensor's flattening lie at
        [at, at + hi - lo) of shard ``rank``; tensors outside the shard are left out."""
        start, size = rank * self.shard_size, self.shard_size
        found = []
        for index, (offset, numel) in enumerate(zip(self.offsets, self.sizes)):
            lo, hi = max(offset, start), min(offset + numel, start + size)
            if lo < hi:
                found.append((index, lo - offset, hi - offset, lo - start))
        return found


@dataclass
class _Unit:
    name: str
    module: nn.Module | None                   # a block; None: resident (root, tied) within a step
    infos: list[ParameterInfo]
    layout: FlatLayout
    tied: bool = False
    master: nn.Parameter | None = None          # fp32 [shard_size], what the optimizer steps
    optimizer: torch.optim.AdamW | None = None  # over `master` alone: a unit steps without visiting the others
    decay_ranges: list[tuple[int, int]] = field(default_factory=list)    # matrices: weight decay
    norm_ranges: list[tuple[int, int]] = field(default_factory=list)     # counted in the gradient norm
    partial_ranges: list[tuple[int, int]] = field(default_factory=list)  # grads partial over tp (SP norms)
    flat: torch.Tensor | None = None            # full parameters, param dtype (ZeRO-3: storage freed when idle)
    grad_shard: torch.Tensor | None = None      # [shard_size] from the unit's first reduction to the step
    flat_grad: torch.Tensor | None = None       # ZeRO-1: full gradients (params' .grad are views)
    pending_reduce: list = field(default_factory=list)
    pending_replicate: object | None = None     # HSDP: the shard's all-reduce over the replicas, in flight
    gather_work: object | None = None
    gathered: bool = True

    @property
    def params(self) -> list[nn.Parameter]:
        return [info.param for info in self.infos]

    @property
    def padded(self) -> int:
        return self.layout.padded

    @property
    def shard_size(self) -> int:
        return self.layout.shard_size


class Sharded(DataParallelStrategy):
    """ZeRO level 1, 2 or 3 over ``dp``; owns the AdamW state of this rank's shards.

    ``chunks``: the rank's decoder blocks as (name, module), grouped by pipeline chunk (one group
    without a pipeline): each block is a unit, prefetched within its group. ``entries``: the
    modules whose forward needs the resident units (embedding, final norm, head)."""

    def __init__(self, model: nn.Module, named: list[tuple[str, nn.Parameter]],
                 chunks: list[list[tuple[str, nn.Module]]], entries: list[nn.Module], dp: Collectives,
                 tp: Collectives, pp: Collectives, level: int, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, device: torch.device, param_dtype: torch.dtype = torch.float32,
                 tied: TiedWeights | None = None, replicate: Collectives | None = None) -> None:
        if level not in (1, 2, 3):
            raise ValueError(f"ZeRO level must be 1, 2 or 3, got {level}")
        self.model, self.dp, self.tp, self.pp, self.level, self.tied = model, dp, tp, pp, level, tied
        self.replicate = replicate  # hybrid sharding: the same shard in the other replicas
        self._final_backward = False  # the step's last backward: a unit's shard is complete once reduced
        self.device, self.param_dtype = device, param_dtype
        self.weight_decay = weight_decay
        self.hyper = dict(lr=lr, betas=betas, eps=eps)
        self.entries = entries
        self.chunks: list[list[_Unit]] = []
        self.units = self._plan_units(describe_parameters(named, tied), chunks)
        self._grad_scale = 1.0
        self._hooks: list = []

    # ------------------------------------------------------------------ construction
    def _plan_units(self, infos: list[ParameterInfo], chunks: list[list[tuple[str, nn.Module]]]) -> list[_Unit]:
        by_id = {id(info.param): info for info in infos}
        claimed: set[int] = set()
        units: list[_Unit] = []

        def take(params) -> list[ParameterInfo]:
            mine = [by_id[id(p)] for p in params if id(p) in by_id and id(p) not in claimed]
            claimed.update(id(info.param) for info in mine)
            return mine

        for group in chunks:
            chunk_units = []
            for name, module in group:
                members = take(module.parameters())
                if members:
                    chunk_units.append(_Unit(name, module, members, self._layout(members)))
            self.chunks.append(chunk_units)
            units += chunk_units
        if self.tied is not None:
            members = take([self.tied.param])
            units.append(_Unit("tied", None, members, self._layout(members), tied=True))
        rest = take(info.param for info in infos)
        if rest:
            units.append(_Unit("root", None, rest, self._layout(rest)))
        return units

    def _layout(self, members: list[ParameterInfo]) -> FlatLayout:
        return FlatLayout(tuple(info.param.numel() for info in members), self.dp.size)

    @torch.no_grad()
    def load_parameters(self, source: ParameterSource) -> None:
        """Allocate what this level keeps and read this rank's values of it from ``source``."""
        rank = self.dp.rank
        for unit in self.units:
            layout = unit.layout
            unit.master = nn.Parameter(torch.zeros(layout.shard_size, dtype=torch.float32, device=self.device))
            # ZeRO-3 never holds the full unit at rest: its storage is released right after the views exist
            unit.flat = (torch.empty if self.level == 3 else torch.zeros)(layout.padded, dtype=self.param_dtype,
                                                                         device=self.device)
            in_shard = {index: (lo, hi, at) for index, lo, hi, at in layout.overlaps(rank)}
            for index, (info, offset) in enumerate(zip(unit.infos, layout.offsets)):
                if self.level < 3:  # one read of the full local values: the flat buffer and the master slice
                    values = source.read(info.name, info.shard, info.full_shape).to(self.device, torch.float32)
                    unit.flat[offset:offset + values.numel()] = values.to(self.param_dtype)
                if index not in in_shard:
                    continue
                lo, hi, at = in_shard[index]
                if self.level == 3:  # only this rank's range is ever read
                    values = source.read(info.name, info.shard, info.full_shape, flat_range=(lo, hi))
                    unit.master[at:at + hi - lo] = values.to(self.device, torch.float32)
                else:
                    unit.master[at:at + hi - lo] = values[lo:hi]
                local = (at, at + hi - lo)
                if len(info.full_shape) >= 2:
                    unit.decay_ranges.append(local)
                if info.counted:
                    unit.norm_ranges.append(local)
                if info.shard.partial_grad:
                    unit.partial_ranges.append(local)
            for info, offset in zip(unit.infos, layout.offsets):  # the model now views the flat buffer
                view = unit.flat[offset:offset + info.param.numel()].view(info.param.shape)
                swap_parameter_data(info.param, view)
            if self.level == 1:
                unit.flat_grad = torch.zeros(layout.padded, dtype=self.param_dtype, device=self.device)
                for info, offset in zip(unit.infos, layout.offsets):
                    info.param.grad = unit.flat_grad[offset:offset + info.param.numel()].view_as(info.param)
        hyper = self.hyper
        for unit in self.units:
            unit.optimizer = torch.optim.AdamW([unit.master], lr=hyper["lr"], betas=hyper["betas"],
                                               eps=hyper["eps"], weight_decay=0.0, fused=True)
            for param in unit.params:
                self._hooks.append(param.register_post_accumulate_grad_hook(
                    lambda p, unit=unit: self._on_grad_ready(unit)))
        if self.level == 3:
            self._install_gather_hooks()
            for unit in self.units:
                self._free(unit)

    # ------------------------------------------------------------------ ZeRO-3 gather / free
    def _gather(self, unit: _Unit, async_op: bool = False) -> None:
        if unit.gathered or unit.gather_work is not None:
            if not async_op:
                self._wait_gather(unit)
            return
        storage = unit.flat.untyped_storage()
        storage.resize_(unit.padded * unit.flat.element_size())
        shard = unit.master.detach().to(self.param_dtype)
        unit.gather_work = self.dp.all_gather(unit.flat, shard, tag="params", async_op=True) or "done"
        if not async_op:
            self._wait_gather(unit)

    def _wait_gather(self, unit: _Unit) -> None:
        if unit.gather_work is not None:
            if unit.gather_work != "done":
                unit.gather_work.wait()
            unit.gather_work = None
        unit.gathered = True

    def _free(self, unit: _Unit) -> None:
        self._wait_gather(unit)
        unit.flat.untyped_storage().resize_(0)
        unit.gathered = False

    def _gather_resident(self) -> None:
        for unit in self.units:
            if unit.module is None:
                self._gather(unit)

    def _install_gather_hooks(self) -> None:
        # Resident units stay gathered from the first forward that needs them until the step's
        # gradients are reduced (FSDP keeps its root the same way).
        for entry in self.entries:
            self._hooks.append(entry.register_forward_pre_hook(lambda _m, _a: self._gather_resident()))
        for group in self.chunks:
            for index, unit in enumerate(group):
                following = group[index + 1] if index + 1 < len(group) else None
                preceding = group[index - 1] if index > 0 else None
                self._hooks.append(unit.module.register_forward_pre_hook(
                    lambda _m, _a, unit=unit, nxt=following: self._pre_forward(unit, nxt)))
                self._hooks.append(unit.module.register_forward_hook(
                    lambda _m, _a, output, unit=unit, prev=preceding: self._post_forward(unit, prev, output)))

    def _pre_forward(self, unit: _Unit, following: _Unit | None) -> None:
        self._gather(unit)
        if following is not None:
            self._gather(following, async_op=True)  # prefetch: overlaps this block's compute

    def _post_forward(self, unit: _Unit, preceding: _Unit | None, output):
        self._free(unit)
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda grad, unit=unit, prev=preceding: self._pre_backward(unit, prev, grad))
        return None

    def _pre_backward(self, unit: _Unit, preceding: _Unit | None, grad: torch.Tensor):
        self._gather(unit)
        if preceding is not None:
            self._gather(preceding, async_op=True)
        return grad

    # ------------------------------------------------------------------ gradients
    def _on_grad_ready(self, unit: _Unit) -> None:
        """A unit is reduced once every member holds a gradient: after each ordinary backward of
        it, or, under a split backward (zero bubble), at the W that completes its linear weights.
        By then its other members (norms) may hold later micro-batches' B contributions too;
        a reduce-scatter is linear, so reducing them early is exact, and ``finish`` reduces
        whatever a step leaves over."""
        if self.level == 1:
            return  # reduced once per step in finish(), after the last micro-batch
        if all(param.grad is not None for param in unit.params):
            self._reduce(unit)

    def _reduce(self, unit: _Unit) -> None:
        """Launch the reduce-scatter of the unit's gradients (a member without one counts zero)."""
        # the previous unit's reduction completes (its buffers freed) before this one's are made:
        # at most one unit's flat gradient and receive buffer exist besides the fresh gradients
        self._complete_reductions()
        first = next(param.grad for param in unit.params if param.grad is not None)
        flat_grad = torch.empty(unit.padded, dtype=first.dtype, device=first.device)
        for param, offset in zip(unit.params, unit.layout.offsets):  # one copy into the padded buffer
            part = flat_grad[offset:offset + param.numel()]
            part.copy_(param.grad.reshape(-1)) if param.grad is not None else part.zero_()
            param.grad = None  # full gradients do not outlive their unit
        flat_grad[unit.layout.numel:].zero_()
        reduced = torch.empty(unit.shard_size, dtype=flat_grad.dtype, device=flat_grad.device)
        work = self.dp.reduce_scatter(reduced, flat_grad, tag="grads", async_op=True)
        unit.pending_reduce.append((work, reduced, flat_grad, self._final_backward))
        if self.level == 3 and unit.module is not None:
            self._free(unit)

    def communicate_in_backward(self, enabled: bool) -> None:
        """``enabled``: the coming backward is the step's last, so under hybrid sharding a unit's
        shard may be all-reduced over the replicas as soon as its reduce-scatter is in, overlapped
        with the rest of the backward (else ``finish`` does it)."""
        self._final_backward = enabled

    def _hybrid(self) -> bool:
        return self.replicate is not None and self.replicate.size > 1

    def _complete_reductions(self) -> None:
        for unit in self.units:
            for work, reduced, _, final in unit.pending_reduce:
                if work is not None:
                    work.wait()
                self._accumulate(unit, reduced)
                # launched in the step's last backward: the unit's shard is complete (an earlier
                # micro-batch's reduction completing now is not)
                if final and self.level >= 2 and self._hybrid():
                    self._replicate_shard(unit)
            unit.pending_reduce.clear()

    def _replicate_shard(self, unit: _Unit) -> None:
        """HSDP: start summing this unit's complete gradient shard over the replicas."""
        unit.pending_replicate = self.replicate.all_reduce(unit.grad_shard, tag="grads", async_op=True)

    @staticmethod
    def _accumulate(unit: _Unit, reduced: torch.Tensor) -> None:
        """The first reduction of a step is the gradient shard as it arrived (bf16 stays bf16:
        an fp32 copy would hold the same values in twice the bytes); a second one, from another
        micro-batch, turns the shard into an fp32 accumulator."""
        if unit.grad_shard is None:
            unit.grad_shard = reduced
        else:
            unit.grad_shard = unit.grad_shard.float().add_(reduced.float())

    def finish(self) -> None:
        """After the step's last backward: this rank's gradient shards hold the gradient.

        ZeRO-1 reduce-scatters the accumulated full gradients here; ZeRO-2/3 complete the
        reductions they launched during backward, after reducing the gradients a split backward
        left over (every dp rank runs the same schedule, so all reduce the same units). Then the
        SP partial gradients are summed over tp and a weight tied across stages over its two
        stages.
        """
        if self.level == 1:
            for unit in self.units:
                reduced = torch.empty(unit.shard_size, dtype=unit.flat_grad.dtype, device=unit.flat.device)
                self.dp.reduce_scatter(reduced, unit.flat_grad, tag="grads")
                self._accumulate(unit, reduced)
        else:
            for unit in self.units:
                if any(param.grad is not None for param in unit.params):
                    self._reduce(unit)
        self._complete_reductions()
        for unit in self.units:
            if unit.grad_shard is None:  # no parameter of the unit took part in this step's loss
                unit.grad_shard = torch.zeros(unit.shard_size, dtype=self.param_dtype, device=self.device)
            if self.level == 3 and unit.module is None and unit.gathered:
                self._free(unit)
        if self._hybrid():  # HSDP: sum the replicas' shards (those not yet started in backward)
            for unit in self.units:
                if unit.pending_replicate is None:
                    self._replicate_shard(unit)
            for unit in self.units:
                unit.pending_replicate.wait()
                unit.pending_replicate = None
        self._final_backward = False
        views = [u.grad_shard[a:b] for u in self.units for a, b in u.partial_ranges]
        sum_partial_grads(views, self.tp)
        for unit in self.units:
            if unit.tied:
                self.tied.sum_between_stages(unit.grad_shard)

    # ------------------------------------------------------------------ optimizer
    def clip_grad_norm(self, max_norm: float) -> float:
        counted = [unit.grad_shard[a:b] for unit in self.units for a, b in unit.norm_ranges]
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        if counted:  # one foreach call: on CUDA one kernel for every range, not one launch each
            squares = torch.stack(torch._foreach_norm(counted, 2, dtype=torch.float64)).square().sum()
        norm = reduce_squares(squares, self.dp, self.tp, self.pp).sqrt()
        # applied in fp32 as each unit steps (a bf16 shard scaled in place would round)
        self._grad_scale = float(clip_scale(norm, max_norm)) if max_norm > 0 else 1.0
        return float(norm)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """AdamW on each unit's master shard in turn: a bf16 gradient shard is widened to fp32
        one unit at a time, so the step holds one unit's fp32 gradient, not the rank's."""
        for unit in self.units:
            unit.optimizer.param_groups[0]["lr"] = lr
            if self.weight_decay:  # decoupled decay on matrices only, before the Adam update (as AdamW)
                for a, b in unit.decay_ranges:
                    unit.master[a:b].mul_(1.0 - lr * self.weight_decay)
            grad = unit.grad_shard.float()
            if self._grad_scale != 1.0:
                grad.mul_(self._grad_scale)
            unit.master.grad = grad
            unit.optimizer.step()
            unit.master.grad = None
            unit.grad_shard = None
        self._grad_scale = 1.0
        if self.level < 3:  # everyone needs the updated full parameters
            for unit in self.units:
                self._all_gather_master(unit)

    def _all_gather_master(self, unit: _Unit) -> None:
        self.dp.all_gather(unit.flat, unit.master.detach().to(self.param_dtype), tag="params")

    def zero_grad(self) -> None:
        for unit in self.units:
            unit.grad_shard = None
            unit.master.grad = None
            if unit.flat_grad is not None:
                unit.flat_grad.zero_()

    def materialize(self) -> None:
        """Make every parameter of the model readable (ZeRO-3 gathers all units; they are freed
        again as the next forward and backward pass through them)."""
        if self.level == 3:
            for unit in self.units:
                self._gather(unit)

    # ------------------------------------------------------------------ checkpoints
    def state_pieces(self) -> list[tuple[Piece, torch.Tensor]]:
        if self.replicate is not None and self.replicate.rank > 0:
            return []  # another replica's copy of the first replica's shards
        pieces = []
        for unit in self.units:
            state = unit.optimizer.state.get(unit.master, {})
            sources = {"param": unit.master.detach(), **{k: state[k] for k in KINDS[1:] if k in state}}
            for index, lo, hi, at in unit.layout.overlaps(self.dp.rank):
                info = unit.infos[index]
                if not info.counted:
                    continue
                for kind, flat in sources.items():
                    piece = Piece.of(info.name, kind, info.shard, tuple(info.param.shape), lo, hi)
                    pieces.append((piece, flat[at:at + hi - lo].detach().float().cpu().clone()))
        return pieces

    @torch.no_grad()
    def load_state(self, source: ParameterSource, step: int) -> None:
        moments = step > 0 and source.has("exp_avg")
        for unit in self.units:
            state = {kind: torch.zeros(unit.shard_size, dtype=torch.float32, device=self.device)
                     for kind in KINDS[1:]} if moments else {}
            for index, lo, hi, at in unit.layout.overlaps(self.dp.rank):
                info = unit.infos[index]
                for kind, target in (("param", unit.master), *state.items()):
                    values = source.read(info.name, info.shard, info.full_shape, kind, flat_range=(lo, hi))
                    target[at:at + hi - lo] = values.to(self.device, torch.float32)
            if moments:
                unit.optimizer.state[unit.master] = {
                    "step": torch.tensor(float(step), dtype=torch.float32, device=self.device), **state}
            if self.level < 3:  # the full flat buffer is live: the model reads it
                self._all_gather_master(unit)
            elif unit.gathered:
                self._free(unit)  # refilled from the new master shard at its next use

    # ------------------------------------------------------------------ accounting
    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds now for parameters, gradients and optimizer state."""
        def size(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.untyped_storage().nbytes()
        params = sum(size(u.flat) for u in self.units)
        grads = sum(size(u.flat_grad) + size(u.grad_shard) for u in self.units)
        optimizer = sum(size(u.master) for u in self.units)
        for unit in self.units:
            for state in unit.optimizer.state.values():
                optimizer += sum(size(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        return {"params": params, "grads": grads, "optimizer": optimizer}
