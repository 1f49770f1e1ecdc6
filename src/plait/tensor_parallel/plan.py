"""Plans: which module becomes which parallel layer, applied to an unmodified model.

A plan maps module-name patterns (``fnmatch``: ``*`` matches across dots) to styles.
``parallelize(model, comm, plan)`` replaces every matching module by its parallel
counterpart, slicing the module's current (full) weights, so a model initialised
layout-invariantly stays the same model under any tensor-parallel size. An entry that
matches nothing, or a size tp does not divide, is an error naming the module.

A plan for a two-layer MLP ``fc1 -> activation -> fc2`` is::

    plan = {"fc1": ColumnParallel(), "fc2": RowParallel()}

``fc1`` applies f (identity forward, all-reduce of dL/dX backward) to its input and keeps its
output features split; the activation runs on the split; ``fc2`` sums its partial outputs with
g (all-reduce forward). One all-reduce forward, one backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from plait.comm import Collectives
from plait.errors import PlaitError
from plait.sharding import TensorShard, padded_part, set_shard, shard_of, without_padding
from plait.tensor_parallel.collectives import gather_dim
from plait.tensor_parallel.layers import (ColumnParallelLinear, InputMode, OutputMode, ParallelLMHead,
                                          RowParallelLinear, VocabParallelEmbedding)


class PlanError(PlaitError):
    """A plan that cannot be applied; the message is one line naming the module."""


def _check_divisible(name: str, what: str, size: int, comm: Collectives) -> None:
    if size % comm.size:
        raise PlanError(f"module {name!r}: {what} = {size} is not divisible by tp = {comm.size}")


def _check_type(name: str, module: nn.Module, kind: type, style: object) -> None:
    if not isinstance(module, kind):
        raise PlanError(f"module {name!r} is a {type(module).__name__}; {type(style).__name__} needs "
                        f"an nn.{kind.__name__}")


def _mode(kind: type[InputMode] | type[OutputMode], value: str, field: str):
    """``value`` (a mode, or its spelling in a plan) as a ``kind``; a one-line PlanError if none."""
    try:
        return kind(value)
    except ValueError:
        raise PlanError(f"{field} must be one of {', '.join(m.value for m in kind)}, got {value!r}") from None


@dataclass(frozen=True)
class ColumnParallel:
    """nn.Linear -> ColumnParallelLinear. input: "copy" (f), "gather_sequence" (SP), "none"."""
    input: InputMode | str = InputMode.COPY
    gather_output: bool = False

    def apply(self, name: str, module: nn.Module, comm: Collectives) -> nn.Module:
        _check_type(name, module, nn.Linear, self)
        mode = _mode(InputMode, self.input, "ColumnParallel.input")
        _check_divisible(name, "out_features", module.out_features, comm)
        return ColumnParallelLinear(module, comm, mode, self.gather_output)


@dataclass(frozen=True)
class RowParallel:
    """nn.Linear -> RowParallelLinear. output: "all_reduce" (g) or "reduce_scatter_sequence" (SP)."""
    output: OutputMode | str = OutputMode.ALL_REDUCE

    def apply(self, name: str, module: nn.Module, comm: Collectives) -> nn.Module:
        _check_type(name, module, nn.Linear, self)
        mode = _mode(OutputMode, self.output, "RowParallel.output")
        _check_divisible(name, "in_features", module.in_features, comm)
        return RowParallelLinear(module, comm, mode)


@dataclass(frozen=True)
class VocabParallel:
    """nn.Embedding -> VocabParallelEmbedding (rows of the table split over tp)."""
    output: OutputMode | str = OutputMode.ALL_REDUCE

    def apply(self, name: str, module: nn.Module, comm: Collectives) -> nn.Module:
        _check_type(name, module, nn.Embedding, self)
        mode = _mode(OutputMode, self.output, "VocabParallel.output")
        return VocabParallelEmbedding(module, comm, mode)  # any vocabulary: parts may differ by a row


@dataclass(frozen=True)
class ParallelHead:
    """Output nn.Linear -> ParallelLMHead: vocabulary split; loss parallel if asked."""
    input: InputMode | str = InputMode.COPY
    loss_parallel: bool = True

    def apply(self, name: str, module: nn.Module, comm: Collectives) -> nn.Module:
        _check_type(name, module, nn.Linear, self)
        mode = _mode(InputMode, self.input, "ParallelHead.input")
        return ParallelLMHead(module, comm, mode, self.loss_parallel)


@dataclass(frozen=True)
class PrepareInput:
    """Apply f ("copy") or the SP all-gather ("gather_sequence") once to a module's first
    input, so several column-parallel children (q, k, v) share one collective."""
    mode: InputMode | str = InputMode.COPY

    def apply(self, name: str, module: nn.Module, comm: Collectives) -> nn.Module:
        mode = _mode(InputMode, self.mode, "PrepareInput.mode")

        def hook(_module: nn.Module, args: tuple) -> tuple:
            return (mode.prepare(args[0], comm), *args[1:])

        module.register_forward_pre_hook(hook)
        return module


@dataclass(frozen=True)
class SequenceParallelNorm:
    """A norm that runs on a sequence shard: its (replicated) weight's gradient is a partial
    sum over the tp ranks' tokens and is all-reduced over tp after backward."""

    def apply(self, name: str, module: nn.Module, comm: Collectives) -> nn.Module:
        params = list(module.parameters(recurse=False))
        if not params:
            raise PlanError(f"module {name!r} has no parameters for SequenceParallelNorm")
        for param in params:
            set_shard(param, TensorShard.replicated(comm.rank, comm.size, partial_grad=True))
        return module


Plan = dict[str, object]


def llama_plan(sequence_parallel: bool = False, loss_parallel: bool = True) -> Plan:
    """Megatron's layout for plait's Llama: q/k/v and gate/up column-parallel (by heads, GQA kv
    heads too), o/down row-parallel, vocabulary-parallel embedding and head."""
    enter = InputMode.GATHER_SEQUENCE if sequence_parallel else InputMode.COPY
    leave = OutputMode.REDUCE_SCATTER_SEQUENCE if sequence_parallel else OutputMode.ALL_REDUCE
    plan: Plan = {
        "model.embed_tokens": VocabParallel(output=leave),
        "model.layers.*.self_attn": PrepareInput(enter),
        "model.layers.*.self_attn.q_proj": ColumnParallel(input=InputMode.NONE),
        "model.layers.*.self_attn.k_proj": ColumnParallel(input=InputMode.NONE),
        "model.layers.*.self_attn.v_proj": ColumnParallel(input=InputMode.NONE),
        "model.layers.*.self_attn.o_proj": RowParallel(output=leave),
        "model.layers.*.mlp": PrepareInput(enter),
        "model.layers.*.mlp.gate_proj": ColumnParallel(input=InputMode.NONE),
        "model.layers.*.mlp.up_proj": ColumnParallel(input=InputMode.NONE),
        "model.layers.*.mlp.down_proj": RowParallel(output=leave),
        "lm_head": ParallelHead(input=enter, loss_parallel=loss_parallel),
    }
    if sequence_parallel:
        plan["model.layers.*.input_layernorm"] = SequenceParallelNorm()
        plan["model.layers.*.post_attention_layernorm"] = SequenceParallelNorm()
        plan["model.norm"] = SequenceParallelNorm()
    return plan


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def parallelize(model: nn.Module, comm: Collectives, plan: Plan) -> nn.Module:
    """Apply ``plan`` over the tensor-parallel group ``comm``, in place; returns ``model``."""
    # Parameters shared by several modules (tied embeddings) must stay shared after slicing.
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{module_name}.{param_name}" if module_name else param_name)
    tied = [names for names in owners.values() if len(names) > 1]

    modules = dict(model.named_modules())
    for pattern, style in plan.items():
        matched = [name for name in modules if fnmatchcase(name, pattern)]
        if not matched:
            raise PlanError(f"plan entry {pattern!r} matches no module of {type(model).__name__}")
        for name in matched:
            replacement = style.apply(name, modules[name], comm)
            if replacement is not modules[name]:
                _set_submodule(model, name, replacement)
    for names in tied:
        first = model.get_parameter(names[0])
        for other in names[1:]:
            module_name, _, param_name = other.rpartition(".")
            module = model.get_submodule(module_name)
            if module.get_parameter(param_name).shape != first.shape:
                raise PlanError(f"tied parameters {names[0]!r} and {other!r} are sharded differently")
            setattr(module, param_name, first)
    for param in model.parameters():  # the rest is whole on every tp rank: say so, with the tp rank
        if not shard_of(param).is_split and not shard_of(param).partial_grad:
            set_shard(param, TensorShard.replicated(comm.rank, comm.size))
    return model


def sum_partial_grads(tensors: list[torch.Tensor], comm: Collectives) -> None:
    """Sum over tp, in one message, gradients that are per-rank partial sums (SP norm weights)."""
    if comm.size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    comm.all_reduce(flat, tag="sp_partial_grads")
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def _unshard(tensor: torch.Tensor, param: nn.Parameter, comm: Collectives) -> torch.Tensor:
    shard = shard_of(param)
    if not shard.is_split:
        return tensor
    size = shard.full_shape(tuple(tensor.shape))[shard.dim]
    gathered = gather_dim(padded_part(tensor, shard.dim, size, comm.size), comm, shard.dim, "gather_state")
    return without_padding(gathered, shard.dim, size, comm.size)


def full_tensor(param: nn.Parameter, comm: Collectives) -> torch.Tensor:
    """The unsharded value of a (possibly tensor-parallel) parameter."""
    return _unshard(param.detach(), param, comm)


def full_grad(param: nn.Parameter, comm: Collectives) -> torch.Tensor:
    """The unsharded gradient of a (possibly tensor-parallel) parameter."""
    return _unshard(param.grad.detach(), param, comm)
