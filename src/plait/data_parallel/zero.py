"""Sharded data parallelism: ZeRO-1, ZeRO-2 and ZeRO-3 (FSDP-style units).

Parameters are grouped into *units*: each transformer block, plus a root unit with everything
else (embedding, final norm, head). A unit's parameters are laid end to end in one flat vector,
padded to a multiple of the dp size n; dp rank r owns the slice [r S, (r+1) S), S = padded / n.
Each rank keeps, for its slices only, the fp32 master copy and the AdamW moments.

    level  params (full)      grads (full)           per-step traffic (ring, per rank)
    1      kept, all ranks    kept until reduced     reduce-scatter grads + all-gather params = 2P
    2      kept, all ranks    freed unit by unit     same, reduce-scatter launched in backward
    3      gathered per unit  freed unit by unit     all-gather fwd + all-gather bwd + reduce-scatter = 3P

(P in bytes of the parameters as communicated; (n-1)/n factors per the Collectives convention.)

Gradient reduction: each rank's loss is already divided by the global token count, so the
reduce-scatter *sums* over dp (see ddp.py). ZeRO-1 reduce-scatters once per step after the last
micro-batch; ZeRO-2/3 reduce-scatter each unit as soon as its gradients are complete, on every
micro-batch, and accumulate into the fp32 gradient shard (full gradients never outlive a unit).

ZeRO-3 keeps a unit's full parameters in one flat buffer whose storage is resized to zero when
the unit is not in use (as FSDP does): parameters and the tensors autograd saved stay valid
views, and are refilled before use. Forward: gather unit i (prefetching unit i+1), run it, free
it. Backward: a hook on the unit's output gathers it again (prefetching unit i-1); when its
gradients are complete they are reduce-scattered and the parameters freed.

Mixed precision (``param_dtype=bfloat16``): parameters and gradients are bf16 in the model and
on the wire; master shards, moments and the gradient shard accumulator are fp32.

Clipping counts each element once: squares of this rank's gradient shard (elements replicated
over tp counted on tp rank 0 only) summed over dp and tp.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from plait.comm import Collectives


@dataclass
class _Unit:
    name: str
    module: nn.Module | None
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int
    shard_size: int
    master: nn.Parameter                       # fp32 [shard_size], what the optimizer steps
    decay_ranges: list[tuple[int, int]]        # shard ranges where weight decay applies (matrices)
    norm_ranges: list[tuple[int, int]]         # shard ranges this rank counts in the gradient norm
    partial_ranges: list[tuple[int, int]]      # shard ranges whose grads are partial over tp (SP norms)
    flat: torch.Tensor                         # full parameters, param dtype (ZeRO-3: storage freed when idle)
    grad_shard: torch.Tensor                   # fp32 [shard_size]
    flat_grad: torch.Tensor | None = None      # ZeRO-1: full gradients (params' .grad are views)
    ready: int = 0
    pending_reduce: list = field(default_factory=list)
    gather_work: object | None = None
    gathered: bool = True

    @property
    def padded(self) -> int:
        return self.flat.numel()


class ZeroDataParallel:
    """ZeRO level 1, 2 or 3 over ``dp``; owns the AdamW state of this rank's shards."""

    def __init__(self, model: nn.Module, units: list[tuple[str, nn.Module | None]], dp: Collectives,
                 tp: Collectives, level: int, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, param_dtype: torch.dtype = torch.float32,
                 pp: Collectives | None = None) -> None:
        if level not in (1, 2, 3):
            raise ValueError(f"ZeRO level must be 1, 2 or 3, got {level}")
        self.model, self.dp, self.tp, self.level = model, dp, tp, level
        self.pp = pp  # pipeline stages hold different parameters: the gradient norm sums over them
        self.param_dtype = param_dtype
        self.weight_decay = weight_decay
        self.sync = True
        self.units = self._build_units(model, units)
        self.optimizer = torch.optim.AdamW([u.master for u in self.units], lr=lr, betas=betas, eps=eps,
                                           weight_decay=0.0, fused=True)
        self._hooks = []
        for unit in self.units:
            for param in unit.params:
                self._hooks.append(param.register_post_accumulate_grad_hook(
                    lambda p, unit=unit: self._on_grad_ready(unit)))
        if level == 3:
            self._install_gather_hooks()
            for unit in self.units:
                self._free(unit)

    # ------------------------------------------------------------------ construction
    def _build_units(self, model: nn.Module, units: list[tuple[str, nn.Module | None]]) -> list[_Unit]:
        claimed: set[int] = set()
        groups: list[tuple[str, nn.Module | None, list[nn.Parameter]]] = []
        for name, module in units:
            if module is None:
                continue
            params = [p for p in module.parameters() if id(p) not in claimed]
            claimed.update(id(p) for p in params)
            groups.append((name, module, params))
        rest = [p for p in model.parameters() if id(p) not in claimed]
        if rest:
            groups.append(("root", None, rest))
        n, rank = self.dp.size, self.dp.rank
        built = []
        for name, module, params in groups:
            numel = sum(p.numel() for p in params)
            padded = -(-numel // n) * n
            shard = padded // n
            start = rank * shard
            device = params[0].device
            flat = torch.zeros(padded, dtype=self.param_dtype, device=device)
            master = torch.zeros(shard, dtype=torch.float32, device=device)
            decay, counted, partial = [], [], []
            offsets, offset = [], 0
            for param in params:
                size = param.numel()
                values = param.detach().reshape(-1)
                flat[offset:offset + size] = values.to(self.param_dtype)
                # the part of this parameter that falls in this rank's shard, in shard coordinates
                lo, hi = max(offset, start), min(offset + size, start + shard)
                if lo < hi:
                    master[lo - start:hi - start] = values[lo - offset:hi - offset].float()
                    local = (lo - start, hi - start)
                    if param.dim() >= 2:
                        decay.append(local)
                    if hasattr(param, "_plait_shard_dim") or self.tp.rank == 0:
                        counted.append(local)
                    if getattr(param, "_plait_tp_partial_grad", False):
                        partial.append(local)
                param.data = flat[offset:offset + size].view_as(param)  # the model now views the flat buffer
                offsets.append(offset)
                offset += size
            unit = _Unit(name=name, module=module, params=params, offsets=offsets, numel=numel, shard_size=shard,
                         master=nn.Parameter(master), decay_ranges=decay, norm_ranges=counted,
                         partial_ranges=partial, flat=flat,
                         grad_shard=torch.zeros(shard, dtype=torch.float32, device=device))
            if self.level == 1:
                unit.flat_grad = torch.zeros(padded, dtype=self.param_dtype, device=device)
                for param, off in zip(params, offsets):
                    param.grad = unit.flat_grad[off:off + param.numel()].view_as(param)
            built.append(unit)
        return built

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

    def _install_gather_hooks(self) -> None:
        blocks = [u for u in self.units if u.module is not None]
        root = next((u for u in self.units if u.module is None), None)
        # The root unit (embedding, final norm, head) stays gathered from the first forward of a
        # micro-batch until its gradients are reduced. Training calls the decoder (model.model)
        # and the head's loss directly, evaluation calls model(): hook both entry points.
        if root is not None:
            for entry in {self.model, getattr(self.model, "model", self.model)}:
                entry.register_forward_pre_hook(lambda _m, _a: self._gather(root))
        for index, unit in enumerate(blocks):
            following = blocks[index + 1] if index + 1 < len(blocks) else None
            preceding = blocks[index - 1] if index > 0 else None
            unit.module.register_forward_pre_hook(
                lambda _m, _a, unit=unit, nxt=following: self._pre_forward(unit, nxt))
            unit.module.register_forward_hook(
                lambda _m, _a, output, unit=unit, prev=preceding: self._post_forward(unit, prev, output))

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
        if self.level == 1:
            return  # reduced once per step in finish(), after the last micro-batch
        unit.ready += 1
        if unit.ready < len(unit.params):
            return
        unit.ready = 0
        first = unit.params[0].grad
        flat_grad = torch.empty(unit.padded, dtype=first.dtype, device=first.device)
        for param, offset in zip(unit.params, unit.offsets):  # one copy into the padded buffer
            flat_grad[offset:offset + param.numel()].copy_(param.grad.reshape(-1))
            param.grad = None  # full gradients do not outlive their unit
        flat_grad[unit.numel:].zero_()
        self._complete_reductions()  # at most one unit's reduction in flight: bounded memory
        reduced = torch.empty(unit.shard_size, dtype=flat_grad.dtype, device=flat_grad.device)
        work = self.dp.reduce_scatter(reduced, flat_grad, tag="grads", async_op=True)
        unit.pending_reduce.append((work, reduced, flat_grad))
        if self.level == 3 and unit.module is not None:
            self._free(unit)

    def _complete_reductions(self) -> None:
        for unit in self.units:
            for work, reduced, _ in unit.pending_reduce:
                if work is not None:
                    work.wait()
                unit.grad_shard += reduced.float()
            unit.pending_reduce.clear()

    def finish(self) -> None:
        """After the step's last backward: this rank's fp32 gradient shards hold the gradient.

        ZeRO-1 reduce-scatters the accumulated full gradients here; ZeRO-2/3 only complete the
        reductions they launched during backward. Then the SP partial gradients are synced.
        """
        if self.level == 1:
            for unit in self.units:
                reduced = torch.empty(unit.shard_size, dtype=unit.flat_grad.dtype, device=unit.flat.device)
                self.dp.reduce_scatter(reduced, unit.flat_grad, tag="grads")
                unit.grad_shard += reduced.float()
        self._complete_reductions()
        for unit in self.units:
            unit.ready = 0
            if self.level == 3 and unit.module is None and unit.gathered:
                self._free(unit)
        self._sync_partial_grads()

    def _sync_partial_grads(self) -> None:
        """SP norm weights: their (dp-reduced) gradient shards are partial over tp."""
        if self.tp.size == 1:
            return
        views = [u.grad_shard[a:b] for u in self.units for a, b in u.partial_ranges]
        if not views:
            return
        flat = torch.cat(views)
        self.tp.all_reduce(flat, tag="sp_partial_grads")
        offset = 0
        for view in views:
            view.copy_(flat[offset:offset + view.numel()])
            offset += view.numel()

    # ------------------------------------------------------------------ optimizer
    def clip_grad_norm(self, max_norm: float) -> float:
        squares = torch.zeros((), dtype=torch.float64, device=self.units[0].flat.device)
        for unit in self.units:
            for a, b in unit.norm_ranges:
                squares += torch.linalg.vector_norm(unit.grad_shard[a:b], dtype=torch.float64).square()
        for comm in (self.dp, self.tp, self.pp):
            if comm is not None:
                comm.all_reduce(squares, tag="grad_norm")
        norm = squares.sqrt()
        if max_norm > 0:
            scale = float(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
            for unit in self.units:
                unit.grad_shard.mul_(scale)
        return float(norm)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        for unit in self.units:
            unit.master.grad = unit.grad_shard
            if self.weight_decay:  # decoupled decay on matrices only, before the Adam update (as AdamW)
                for a, b in unit.decay_ranges:
                    unit.master[a:b].mul_(1.0 - lr * self.weight_decay)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.level < 3:  # everyone needs the updated full parameters
            for unit in self.units:
                shard = unit.master.detach().to(self.param_dtype)
                self.dp.all_gather(unit.flat, shard, tag="params")

    def zero_grad(self) -> None:
        for unit in self.units:
            unit.grad_shard.zero_()
            unit.master.grad = None
            if unit.flat_grad is not None:
                unit.flat_grad.zero_()

    def materialize(self) -> None:
        """Make every parameter of the model readable (ZeRO-3 gathers all units; they are freed
        again as the next forward and backward pass through them)."""
        if self.level == 3:
            for unit in self.units:
                self._gather(unit)

    # ------------------------------------------------------------------ accounting
    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds now for parameters, gradients and optimizer state."""
        def size(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.untyped_storage().nbytes()
        params = sum(size(u.flat) for u in self.units)
        grads = sum(size(u.flat_grad) + size(u.grad_shard) for u in self.units)
        optimizer = sum(size(u.master) for u in self.units)
        for state in self.optimizer.state.values():
            optimizer += sum(size(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        return {"params": params, "grads": grads, "optimizer": optimizer}
