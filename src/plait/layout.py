"""A training layout and the rules it must satisfy, in one function.

``Layout`` is every parallel knob of a run (dp x tp x pp x cp sizes, batch split, ZeRO level, sequence
and loss parallelism, recomputation, pipeline schedule, dtype). ``layout_problem(model, layout)``
returns the first reason it cannot run, as a one-line message in the words of ``plait train``'s
flags, or None. ``plait train`` calls it before launching workers, the trainer calls it again
on every rank, and the planner calls it on every layout it considers, so the planner can only
propose what training runs.

``ModelFacts`` is what the rules need to know of a model; ``layout_of`` turns a ``TrainConfig``
and its ``ParallelDims`` into a ``Layout``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from plait.errors import PlaitError
from plait.pipeline.schedules import SCHEDULES, ScheduleError, check_schedule


class LayoutError(PlaitError):
    """A parallel layout that cannot run; the message is one line."""


class Recompute(str, enum.Enum):
    """Activation recomputation of each block: nothing, the cheap part, or everything."""

    NONE = "none"            # keep every activation the backward needs
    SELECTIVE = "selective"  # keep the matmul outputs; recompute attention core, norms, elementwise
    FULL = "full"            # keep each block's input; recompute the whole block

    @classmethod
    def parse(cls, value: "Recompute | str | bool") -> "Recompute":
        """Flags and TOML say true/false (the bare flag: full) or a mode name."""
        if isinstance(value, bool):
            return cls.FULL if value else cls.NONE
        try:
            return cls(value)
        except ValueError:
            raise LayoutError(f"--activation-checkpointing must be one of {', '.join(r.value for r in cls)}, "
                              f"got {value!r}") from None


@dataclass(frozen=True)
class ModelFacts:
    """The sizes of a model that layouts must divide."""

    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    layers: int
    seq_len: int

    @classmethod
    def of_llama(cls, config, seq_len: int) -> "ModelFacts":
        return cls(config.num_attention_heads, config.num_key_value_heads, config.intermediate_size,
                   config.vocab_size, config.num_hidden_layers, seq_len)


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    micro_batch: int = 1
    global_batch: int = 1
    zero: int = 0
    sequence_parallel: bool = False
    loss_parallel: bool = False
    recompute: Recompute = Recompute.NONE
    schedule: str = "1f1b"
    virtual_stages: int = 1
    dtype: str = "bfloat16"
    cp: int = 1
    cp_mode: str = "ring"
    dp_shard: int | None = None  # hybrid sharding: ZeRO over groups of this many dp ranks (None: all dp)

    def __post_init__(self) -> None:
        object.__setattr__(self, "recompute", Recompute.parse(self.recompute))

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def gradient_replicas(self) -> int:
        """Ranks that hold the same parameters and reduce (under ZeRO: shard) their gradients:
        data-parallel and context-parallel ones."""
        return self.dp * self.cp

    @property
    def replicas(self) -> int:
        """Hybrid sharding's replica groups (1: ZeRO shards over every data-parallel rank)."""
        return self.dp // self.dp_shard if self.dp_shard and self.dp % self.dp_shard == 0 else 1

    @property
    def gradient_shards(self) -> int:
        """Ranks that ZeRO splits one replica's model states over: dp_shard (or dp) x cp."""
        return self.gradient_replicas // self.replicas

    @property
    def per_rank_batch(self) -> int:
        return self.global_batch // self.dp

    @property
    def microbatches(self) -> int:
        """Micro-batches per step and data-parallel rank."""
        return self.global_batch // (self.dp * self.micro_batch)

    @property
    def chunks_per_rank(self) -> int:
        return self.virtual_stages if self.pp > 1 else 1

    def describe(self) -> str:
        parts = [f"dp{self.dp}", f"tp{self.tp}", f"pp{self.pp}"]
        if self.cp > 1:
            parts.append(f"cp{self.cp}-{self.cp_mode}")
        if self.replicas > 1:
            parts.append(f"hsdp{self.replicas}x{self.dp_shard}")
        if self.pp > 1:
            parts.append(self.schedule + (f"(v{self.virtual_stages})" if self.chunks_per_rank > 1 else ""))
        parts.append(f"zero{self.zero}")
        if self.sequence_parallel:
            parts.append("sp")
        if self.recompute is not Recompute.NONE:
            parts.append(f"recompute-{self.recompute.value}")
        parts.append(f"mb{self.micro_batch}x{self.microbatches}")
        return " ".join(parts)

    def with_(self, **changes) -> "Layout":
        return replace(self, **changes)


def layout_problem(model: ModelFacts, layout: Layout) -> str | None:
    """Why ``layout`` cannot train ``model`` (one line), or None when it can."""
    t, p, dp = layout.tp, layout.pp, layout.dp
    if min(dp, t, p, layout.micro_batch, layout.global_batch, layout.virtual_stages) < 1:
        return "--dp, --tp, --pp, --micro-batch, --global-batch and --virtual-stages must be >= 1"
    # a vocabulary tp does not divide is split unevenly (the first ranks one row more)
    for what, size in (("num_attention_heads", model.heads), ("num_key_value_heads", model.kv_heads),
                       ("intermediate_size (FFN width)", model.ffn)):
        if size % t:
            return f"tp={t} does not divide the model's {what} = {size}"
    if p > model.layers:
        return f"pp={p} is larger than the model's {model.layers} layers"
    if (layout.sequence_parallel or layout.loss_parallel) and t == 1:
        return "--sequence-parallel and --loss-parallel need --tp > 1"
    if (problem := _context_parallel_problem(model, layout)) is not None:
        return problem
    if layout.sequence_parallel and (model.seq_len // layout.cp) % t:
        if layout.cp > 1:
            return (f"--sequence-parallel needs each cp rank's {model.seq_len // layout.cp} positions "
                    f"(--seq-len {model.seq_len} / cp {layout.cp}) divisible by tp={t}")
        return f"--sequence-parallel needs --seq-len {model.seq_len} divisible by tp={t}"
    if layout.global_batch % dp:
        return f"--global-batch {layout.global_batch} is not divisible by dp={dp}"
    if layout.per_rank_batch % layout.micro_batch:
        return (f"the per-rank batch {layout.per_rank_batch} (global batch {layout.global_batch} / dp {dp}) "
                f"is not divisible by --micro-batch {layout.micro_batch}")
    if layout.zero not in (0, 1, 2, 3):
        return f"--zero must be 0, 1, 2 or 3, got {layout.zero}"
    if layout.dp_shard is not None:
        if layout.dp_shard < 1 or dp % layout.dp_shard:
            return f"--dp-shard {layout.dp_shard} must divide the data-parallel size dp={dp}"
        if layout.zero == 0 and layout.dp_shard < dp:
            return "--dp-shard needs --zero 1, 2 or 3 (it groups the ranks ZeRO shards over)"
    if layout.schedule not in SCHEDULES:
        return f"--schedule must be one of {', '.join(SCHEDULES)}, got {layout.schedule!r}"
    if p > 1:
        if layout.microbatches < p:
            return (f"--pp {p} needs at least {p} micro-batches per step, got {layout.microbatches} "
                    f"(set --microbatches)")
        try:
            check_schedule(layout.schedule, p, layout.microbatches, layout.virtual_stages)
        except ScheduleError as error:
            return str(error)
        if model.layers < p * layout.virtual_stages:
            return f"cannot split {model.layers} layers into {p * layout.virtual_stages} pipeline chunks"
    return None


class ContextParallelMode(str, enum.Enum):
    """How attention sees the whole of a cp-sharded sequence."""

    RING = "ring"          # keys and values passed around the cp ranks, overlapped with compute
    ALLTOALL = "alltoall"  # sequence shard traded for a head shard around attention (Ulysses)


CP_MODES = tuple(mode.value for mode in ContextParallelMode)  # the --cp-mode choices


def _context_parallel_problem(model: ModelFacts, layout: Layout) -> str | None:
    """--cp: 2 cp load-balanced chunks per sequence; all-to-all splits each tp rank's heads over cp."""
    cp, t = layout.cp, layout.tp
    if layout.cp_mode not in CP_MODES:
        return f"--cp-mode must be one of {', '.join(CP_MODES)}, got {layout.cp_mode!r}"
    if cp < 1:
        return f"--cp must be >= 1, got {cp}"
    if cp == 1:
        return None
    if model.seq_len % (2 * cp):
        return (f"--cp {cp} needs --seq-len {model.seq_len} divisible by 2 x cp = {2 * cp} "
                "(each rank holds two load-balanced chunks)")
    if layout.cp_mode == ContextParallelMode.ALLTOALL:
        heads, kv_heads = model.heads // t, model.kv_heads // t
        if heads % cp:
            return (f"--cp-mode alltoall needs the {heads} attention heads per tp rank divisible by cp={cp}; "
                    "use --cp-mode ring")
        if kv_heads % cp and cp % kv_heads:
            return (f"--cp-mode alltoall needs cp={cp} to divide, or be a multiple of, the {kv_heads} kv heads "
                    "per tp rank; use --cp-mode ring")
    return None


def alltoall_kv_repeats(kv_heads: int, cp: int) -> int:
    """How often all-to-all context parallelism repeats each of a rank's ``kv_heads`` before the
    exchange, so that every cp rank receives whole heads (1 when cp divides them)."""
    return 1 if kv_heads % cp == 0 else cp // kv_heads


def check_layout(model: ModelFacts, layout: Layout) -> None:
    """``layout_problem`` as a LayoutError."""
    problem = layout_problem(model, layout)
    if problem is not None:
        raise LayoutError(problem)


def layout_of(cfg, dims) -> Layout:
    """The layout of a ``TrainConfig`` on ``ParallelDims`` (micro-batch from --microbatches or
    --micro-batch, else the whole per-rank batch)."""
    per_rank = cfg.global_batch // dims.dp if dims.dp and cfg.global_batch % dims.dp == 0 else 0
    if cfg.microbatches and per_rank % cfg.microbatches:
        raise LayoutError(f"the per-rank batch {per_rank} is not divisible by --microbatches {cfg.microbatches}")
    micro_batch = cfg.micro_batch or (per_rank // cfg.microbatches if cfg.microbatches else per_rank)
    return Layout(dp=dims.dp, tp=dims.tp, pp=dims.pp, micro_batch=max(1, micro_batch), global_batch=cfg.global_batch,
                  zero=cfg.zero, sequence_parallel=cfg.sequence_parallel, loss_parallel=cfg.loss_parallel,
                  recompute=cfg.activation_checkpointing, schedule=cfg.schedule,
                  virtual_stages=cfg.virtual_stages, dtype=cfg.dtype, cp=dims.cp, cp_mode=cfg.cp_mode,
                  dp_shard=cfg.dp_shard)


def check_run(cfg, dims, model_config) -> None:
    """Every rule of a ``plait train`` run on ``dims``: the layout's, and that its pipeline split
    (``--pipeline-split`` or the balanced one) exists. Called before launch and by the trainer."""
    from plait.pipeline.stage import StageError, plan_chunks

    layout = layout_of(cfg, dims)
    check_layout(ModelFacts.of_llama(model_config, cfg.seq_len), layout)
    if dims.pp == 1:  # a setting that cannot take effect is refused, never ignored
        pipeline_only = [flag for flag, given in (
            ("--schedule", cfg.schedule != type(cfg).schedule), ("--virtual-stages", cfg.virtual_stages != 1),
            ("--pipeline-split", cfg.pipeline_split is not None), ("--timeline", cfg.timeline)) if given]
        if pipeline_only:
            raise LayoutError(f"{', '.join(pipeline_only)} only apply to pipeline parallel runs; "
                              "add --pp N (N > 1) or leave them out")
    else:
        split = [int(part) for part in cfg.pipeline_split.split(",")] if cfg.pipeline_split else None
        try:
            plan_chunks(model_config, dims.pp, cfg.virtual_stages, cfg.seq_len, split)
        except StageError as error:
            raise LayoutError(str(error)) from None
