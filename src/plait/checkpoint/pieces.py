"""A trainer's state as layout-free *pieces*, and back.

Whatever the layout, every number of the training state belongs to one parameter of the
unsharded model (names as in Hugging Face) and one kind: ``param`` (fp32 master value),
``exp_avg`` or ``exp_avg_sq`` (AdamW moments). A rank holds, for a parameter, its tensor-parallel
slice (the *local* tensor: split along ``tp_dim`` into ``tp_count`` parts, part ``tp_index``), and
of that local tensor either all of it or, under ZeRO, a flat range [start, end) of its
flattening. A piece records exactly that, so pieces from any layout rebuild the full tensors
(``assemble``) and any other layout takes its slices from them (``load_full_state``).

Replicas are written once: plain data parallel writes from dp rank 0 only, tensor-parallel
replicated parameters (norm weights) from tp rank 0 only; ZeRO's dp ranks write disjoint
ranges; pipeline stages hold disjoint parameters.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

KINDS = ("param", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Piece:
    name: str
    kind: str
    local_shape: tuple[int, ...]
    tp_dim: int | None
    tp_index: int
    tp_count: int
    start: int  # flat range within the local tensor
    end: int

    @property
    def key(self) -> str:
        return f"{self.name}|{self.kind}|{self.tp_index}|{self.start}"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Piece":
        return cls(**{**data, "local_shape": tuple(data["local_shape"])})


def _tp_layout(param: torch.nn.Parameter, tp_rank: int, tp_size: int) -> tuple[int | None, int, int]:
    dim = getattr(param, "_plait_shard_dim", None)
    return (dim, tp_rank, tp_size) if dim is not None and tp_size > 1 else (None, 0, 1)


def collect_pieces(trainer) -> list[tuple[Piece, torch.Tensor]]:
    """This rank's share of the training state, each piece written by exactly one rank."""
    ctx = trainer.ctx
    tp_rank, tp_size = ctx.tp_rank, ctx.dims.tp
    names = {id(param): name for name, param in trainer.model.named_parameters()}
    pieces: list[tuple[Piece, torch.Tensor]] = []

    def owned(param) -> bool:  # tp-replicated parameters are written by tp rank 0
        return hasattr(param, "_plait_shard_dim") or tp_rank == 0

    if trainer.zero is not None:
        zero = trainer.zero
        for unit in zero.units:
            start = ctx.dp_rank * unit.shard_size
            state = zero.optimizer.state.get(unit.master, {})
            for param, offset in zip(unit.params, unit.offsets):
                lo, hi = max(offset, start), min(offset + param.numel(), start + unit.shard_size)
                if lo >= hi or not owned(param):
                    continue
                tp_dim, tp_index, tp_count = _tp_layout(param, tp_rank, tp_size)
                sources = {"param": unit.master.detach(), **{k: state[k] for k in KINDS[1:] if k in state}}
                for kind, flat in sources.items():
                    piece = Piece(names[id(param)], kind, tuple(param.shape), tp_dim, tp_index, tp_count,
                                  lo - offset, hi - offset)
                    pieces.append((piece, flat[lo - start:hi - start].detach().float().clone()))
        return pieces
    if ctx.dp_rank != 0:
        return pieces
    for name, param in trainer.model.named_parameters():
        if not owned(param):
            continue
        tp_dim, tp_index, tp_count = _tp_layout(param, tp_rank, tp_size)
        state = trainer.optimizer.state.get(param, {})
        sources = {"param": param.detach(), **{k: state[k] for k in KINDS[1:] if k in state}}
        for kind, tensor in sources.items():
            piece = Piece(name, kind, tuple(param.shape), tp_dim, tp_index, tp_count, 0, param.numel())
            pieces.append((piece, tensor.detach().float().reshape(-1).clone()))
    return pieces


def assemble(pieces: list[tuple[Piece, torch.Tensor]]) -> dict[tuple[str, str], torch.Tensor]:
    """Full (unsharded) tensors from pieces of any layout: {(name, kind): tensor}."""
    locals_: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    layout: dict[tuple[str, str], Piece] = {}
    for piece, data in pieces:
        key = (piece.name, piece.kind)
        layout[key] = piece
        parts = locals_.setdefault(key, {})
        local = parts.setdefault(piece.tp_index, torch.zeros(piece.local_shape, dtype=torch.float32))
        local.view(-1)[piece.start:piece.end] = data
    full = {}
    for key, parts in locals_.items():
        piece = layout[key]
        if piece.tp_dim is None:
            full[key] = parts[0]
        else:
            missing = set(range(piece.tp_count)) - set(parts)
            if missing:
                raise ValueError(f"checkpoint lacks tensor-parallel parts {sorted(missing)} of {key[0]}")
            full[key] = torch.cat([parts[i] for i in range(piece.tp_count)], dim=piece.tp_dim)
    return full


def _local_slice(full: torch.Tensor, param: torch.nn.Parameter, tp_rank: int, tp_size: int) -> torch.Tensor:
    dim = getattr(param, "_plait_shard_dim", None)
    if dim is None or tp_size == 1:
        return full
    size = full.shape[dim] // tp_size
    return full.narrow(dim, tp_rank * size, size)


@torch.no_grad()
def load_full_state(trainer, full: dict[tuple[str, str], torch.Tensor], optimizer_step: int) -> None:
    """Overwrite the trainer's parameters and AdamW state with (slices of) full tensors."""
    ctx = trainer.ctx
    tp_rank, tp_size = ctx.tp_rank, ctx.dims.tp
    named = dict(trainer.model.named_parameters())
    for name in named:
        if (name, "param") not in full:
            raise ValueError(f"checkpoint has no value for parameter {name}")
    step_tensor = torch.tensor(float(optimizer_step), dtype=torch.float32)
    has_moments = all((name, "exp_avg") in full for name in named) and optimizer_step > 0

    def local(name: str, kind: str, param) -> torch.Tensor:
        value = _local_slice(full[(name, kind)], param, tp_rank, tp_size)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(value.shape)} here, the model "
                             f"{tuple(param.shape)}")
        return value.reshape(-1).to(param.device)

    if trainer.zero is not None:
        zero = trainer.zero
        names = {id(param): name for name, param in named.items()}
        for unit in zero.units:
            start = ctx.dp_rank * unit.shard_size
            moments = {kind: torch.zeros(unit.shard_size, dtype=torch.float32, device=unit.master.device)
                       for kind in KINDS[1:]}
            for param, offset in zip(unit.params, unit.offsets):
                name = names[id(param)]
                values = local(name, "param", param)
                if zero.level < 3:  # the full flat buffer is live: the model reads it
                    unit.flat[offset:offset + param.numel()] = values.to(unit.flat.dtype)
                lo, hi = max(offset, start), min(offset + param.numel(), start + unit.shard_size)
                if lo < hi:
                    unit.master[lo - start:hi - start] = values[lo - offset:hi - offset].float()
                    if has_moments:
                        for kind in KINDS[1:]:
                            moments[kind][lo - start:hi - start] = local(name, kind, param)[lo - offset:hi - offset]
            if has_moments:
                zero.optimizer.state[unit.master] = {"step": step_tensor.to(unit.master.device).clone(), **moments}
        return
    for name, param in named.items():
        param.copy_(local(name, "param", param).view_as(param))
        if has_moments:
            trainer.optimizer.state[param] = {
                "step": step_tensor.to(param.device).clone(),  # one tensor per parameter: the kernel increments each
                "exp_avg": local(name, "exp_avg", param).view_as(param).clone(),
                "exp_avg_sq": local(name, "exp_avg_sq", param).view_as(param).clone()}
