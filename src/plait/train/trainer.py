"""The training loop: one optimizer step = micro-batches -> gradient sync -> clip -> AdamW.

Loss normalisation. The loss of a step is the sum of token cross-entropies over the whole
global batch divided by N, the global number of target tokens (targets != IGNORE_INDEX):

    L = (1 / N) * sum_{ranks r} sum_{micro-batches m} sum_{tokens t in (r, m)} CE_t

Each rank backpropagates its own partial sum divided by the *global* N (which every rank
computes from the deterministic sampler, with no communication), so micro-batching, gradient
accumulation and data parallelism all give the gradient of the same L -- not a mean of
per-micro-batch or per-rank means, which would weight tokens unequally.
"""
from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from plait.checkpoint.hf import load_hf_weights
from plait.checkpoint.hf_config import is_hf_directory, load_hf_config
from plait.data import BatchSampler, TokenData, validation_batches
from plait.data_parallel import DataParallel, ZeroDataParallel
from plait.mesh import LayoutError
from plait.pipeline import (PipelineExecutor, ScheduleError, StageError, build_schedule, keep_stage,
                            named_blocks, plan_chunks)
from plait.mesh import ParallelContext
from plait.models import LlamaConfig, build_model, get_preset
from plait.tensor_parallel import keep_sequence_shards, llama_plan, parallelize, sync_partial_grads
from plait.train.config import TrainConfig
from plait.loss import IGNORE_INDEX, linear_cross_entropy_sum
from plait.train.metrics import measure_matmul_peak, peak_memory_bytes
from plait.train.optim import build_adamw, clip_grad_norm, learning_rate

VOCAB_MULTIPLE = 64  # pad the embedding so tensor-parallel splits of the vocabulary stay even

DTYPE_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def model_config_for(cfg: TrainConfig, data_vocab_size: int) -> LlamaConfig:
    """A Hugging Face directory's config as is, or the preset named by ``cfg.model`` with its
    vocabulary sized to the tokenizer's (padded to a multiple of 64)."""
    if is_hf_directory(cfg.model):
        config = load_hf_config(cfg.model)
        if data_vocab_size > config.vocab_size:
            raise LayoutError(f"the data's vocabulary ({data_vocab_size}) is larger than the model's "
                              f"({config.vocab_size}); use the model's tokenizer to make a .bin")
        return config
    vocab = -(-data_vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return get_preset(cfg.model).replace(vocab_size=vocab)


def batch_layout(cfg: TrainConfig, dims) -> tuple[int, int, int]:
    """(per-rank batch, micro-batch size, micro-batches per step) of ``cfg`` on ``dims``, checked."""
    per_rank = cfg.global_batch // dims.dp if cfg.global_batch % dims.dp == 0 else 0
    if cfg.microbatches and per_rank % cfg.microbatches:
        raise LayoutError(f"the per-rank batch {per_rank} is not divisible by --microbatches {cfg.microbatches}")
    micro_batch = cfg.micro_batch or (per_rank // cfg.microbatches if cfg.microbatches else per_rank)
    dims.check_batch(cfg.global_batch, max(1, micro_batch))
    dims.check_sequence(cfg.seq_len, cfg.sequence_parallel)
    return per_rank, micro_batch, per_rank // micro_batch


def plan_pipeline(cfg: TrainConfig, dims, model_config: LlamaConfig, n_micro: int):
    """(chunks, per-rank schedules) of a valid pipeline layout, or a one-line LayoutError."""
    if model_config.tie_word_embeddings:
        raise LayoutError("tied embeddings across pipeline stages (--pp > 1) are not yet supported")
    if cfg.zero >= 2:
        raise LayoutError(f"--zero {cfg.zero} with --pp > 1 is not yet supported (use --zero 0 or 1)")
    if n_micro < dims.pp:
        raise LayoutError(f"--pp {dims.pp} needs at least {dims.pp} micro-batches per step, got {n_micro} "
                          f"(set --microbatches)")
    split = [int(part) for part in cfg.pipeline_split.split(",")] if cfg.pipeline_split else None
    try:
        plans = build_schedule(cfg.schedule, dims.pp, n_micro, cfg.virtual_stages)
        chunks = plan_chunks(model_config, dims.pp, cfg.virtual_stages, cfg.seq_len, split)
    except (ScheduleError, StageError) as error:
        raise LayoutError(str(error)) from None
    return chunks, plans


def apply_activation_checkpointing(blocks: Iterable[nn.Module]) -> None:
    """Recompute each block's activations in backward instead of keeping them.

    The block's ``forward`` is wrapped in place, so parameter names and the model's code are
    unchanged.
    """
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def token_loss_sum(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                   label_smoothing: float = 0.0) -> torch.Tensor:
    """Sum over target tokens of the cross-entropy (fp32), for a model with ``.model`` and ``.lm_head``.

    A plain head is fused with the cross-entropy (see ``plait.loss``), so the
    [tokens, vocab] logits are never materialised; a tensor-parallel head computes its own
    (vocabulary-parallel) loss.
    """
    return hidden_loss_sum(model, model.model(inputs), targets, label_smoothing)


def hidden_loss_sum(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                    label_smoothing: float = 0.0) -> torch.Tensor:
    """The head and its cross-entropy, from final-norm hidden states (see ``token_loss_sum``)."""
    head = model.lm_head
    if hasattr(head, "loss_sum"):
        return head.loss_sum(hidden, targets, label_smoothing)
    return linear_cross_entropy_sum(hidden, head.weight, targets, label_smoothing)


class Trainer:
    """Owns the model, optimizer and data order of one rank; ``train_step(k)`` runs step k."""

    def __init__(self, cfg: TrainConfig, ctx: ParallelContext, data: TokenData,
                 model_config: LlamaConfig | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.model_config = model_config or model_config_for(cfg, data.vocab_size)
        dims = ctx.dims
        dims.check_model(self.model_config)
        self.per_rank_batch, self.micro_batch, self.n_micro = batch_layout(cfg, dims)

        self.model = build_model(self.model_config, cfg.seed, ctx.device)
        if dims.tp > 1:  # slice the full, layout-invariant model: every layout starts identical
            parallelize(self.model, ctx.comm("tp"), llama_plan(cfg.sequence_parallel, cfg.loss_parallel))
        self.pipeline = None
        if dims.pp > 1:
            self._setup_pipeline()
        # The Hugging Face directory the weights come from (its other files go into checkpoints).
        self.hf_source = Path(cfg.model) if is_hf_directory(cfg.model) else None
        if self.hf_source is not None:  # pretrained weights: only this rank's stage and slices are read
            load_hf_weights(self.model, self.hf_source)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(block for _, block in named_blocks(self.model))
        self.data_parallel = None
        self.zero = None
        self.optimizer = None
        if cfg.zero:  # sharded optimizer state (and grads, params); it owns the optimizer
            units = [(f"model.layers.{i}", layer) for i, layer in named_blocks(self.model)]
            param_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
            self.zero = ZeroDataParallel(self.model, units, ctx.comm("dp"), ctx.comm("tp"), cfg.zero, cfg.lr,
                                         (cfg.beta1, cfg.beta2), cfg.eps, cfg.weight_decay, param_dtype,
                                         pp=ctx.comm("pp"))
        else:
            if dims.dp > 1:
                self.data_parallel = DataParallel(self.model, ctx.comm("dp"), int(cfg.bucket_mb * 2 ** 20))
            self.optimizer = build_adamw(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)

        self.sampler = BatchSampler(data.train, cfg.seq_len, cfg.global_batch, cfg.seed)
        self.val_batches = []
        if cfg.eval_every > 0 and len(data.val) > cfg.seq_len:
            self.val_batches = validation_batches(data.val, cfg.seq_len, self.micro_batch, cfg.eval_batches)
        self.compute_dtype = DTYPE_BY_NAME[cfg.dtype]
        self.flops_per_token = self.model_config.flops_per_token(cfg.seq_len)
        self.peak_flops = (cfg.peak_tflops * 1e12 if cfg.peak_tflops
                           else measure_matmul_peak(self.compute_dtype, ctx.device))

    def _setup_pipeline(self) -> None:
        """Keep this rank's chunks of blocks and build the executors of its schedule."""
        cfg, ctx, dims = self.cfg, self.ctx, self.ctx.dims
        chunks, plans = plan_pipeline(cfg, dims, self.model_config, self.n_micro)
        mine = keep_stage(self.model, chunks, ctx.pp_rank, dims.pp)
        seq_local = cfg.seq_len // dims.tp if cfg.sequence_parallel else cfg.seq_len
        shape = (self.micro_batch, seq_local, self.model_config.hidden_size)

        def activation_dtype() -> torch.dtype:  # the residual stream has the parameters' dtype
            return next(self.model.parameters()).dtype

        def loss_fn(model, hidden, targets):
            return hidden_loss_sum(model, hidden, targets, cfg.label_smoothing)

        def forward_context():
            stack = contextlib.ExitStack()
            stack.enter_context(self._autocast())
            stack.enter_context(self._keep_shards())
            return stack

        def executor(plan, microbatches):
            return PipelineExecutor(self.model, mine, plan, ctx.comm("pp"), microbatches, cfg.seq_len, shape,
                                    activation_dtype, loss_fn, forward_context)

        self.pipeline = executor(plans[ctx.pp_rank], self.n_micro)
        self._eval_executor = lambda m: executor(build_schedule("gpipe", dims.pp, m, cfg.virtual_stages)[ctx.pp_rank], m)

    def _autocast(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.compute_dtype)

    def _keep_shards(self):
        """Under SP, save sequence shards (not gathered activations) for backward."""
        if not self.cfg.sequence_parallel:
            return contextlib.nullcontext()
        return keep_sequence_shards(self.ctx.comm("tp"))

    def global_target_count(self, step: int) -> int:
        _, targets = self.sampler.global_batch(step)
        return int((targets != IGNORE_INDEX).sum())

    def compute_gradients(self, step: int) -> tuple[float, int]:
        """Forward and backward over this rank's micro-batches of step ``step``, gradients synced.

        Returns (global loss sum, global target count); the step's loss is their ratio.
        """
        ctx, cfg = self.ctx, self.cfg
        inputs, targets = self.sampler.shard(step, ctx.dp_rank, ctx.dims.dp)
        n_targets = self.global_target_count(step)
        n_micro = self.n_micro
        local_loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        if self.pipeline is not None:
            if self.data_parallel is not None:
                self.data_parallel.sync = False  # all buckets go out in finish(), after the schedule
            micro_inputs = list(inputs.to(ctx.device).split(self.micro_batch))
            micro_targets = list(targets.to(ctx.device).split(self.micro_batch))
            local_loss_sum += self.pipeline.run(micro_inputs, micro_targets, n_targets)
            n_micro = 0  # the schedule did every micro-batch
        for index in range(n_micro):
            if self.data_parallel is not None:
                self.data_parallel.sync = index == n_micro - 1  # communicate on the last micro-batch only
            rows = slice(index * self.micro_batch, (index + 1) * self.micro_batch)
            x = inputs[rows].to(ctx.device, non_blocking=True)
            y = targets[rows].to(ctx.device, non_blocking=True)
            with self._autocast(), self._keep_shards():
                loss_sum = token_loss_sum(self.model, x, y, cfg.label_smoothing)
            (loss_sum / n_targets).backward()
            local_loss_sum += loss_sum.detach()
        if self.zero is not None:
            self.zero.finish()  # includes the sequence-parallel partial gradients
        else:
            if self.data_parallel is not None:
                self.data_parallel.finish()
            sync_partial_grads(self.model, ctx.comm("tp"))  # sequence-parallel norm weights
        (loss_sum_all,) = ctx.comm("pp").all_reduce_scalars([float(local_loss_sum)], tag="metrics")
        (loss_sum_all,) = ctx.comm("dp").all_reduce_scalars([loss_sum_all], tag="metrics")
        return loss_sum_all, n_targets

    def apply_update(self, step: int) -> tuple[float, float]:
        """Clip, set the learning rate of ``step``, take the AdamW step, zero gradients.

        Returns (gradient norm before clipping, learning rate).
        """
        cfg = self.cfg
        lr = learning_rate(step, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        if self.zero is not None:
            grad_norm = self.zero.clip_grad_norm(cfg.grad_clip)
            self.zero.step(lr)
            self.zero.zero_grad()
            return grad_norm, lr
        grad_norm = clip_grad_norm(self.model.parameters(), cfg.grad_clip, self.ctx.comm("tp"), self.ctx.comm("pp"))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.data_parallel is not None:
            self.data_parallel.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, lr

    def train_step(self, step: int) -> dict[str, Any]:
        start = time.perf_counter()
        loss_sum, n_targets = self.compute_gradients(step)
        grad_norm, lr = self.apply_update(step)
        elapsed = time.perf_counter() - start
        tokens = self.cfg.global_batch * self.cfg.seq_len
        tokens_per_s = tokens / elapsed
        return {
            "step": step,
            "loss": loss_sum / n_targets,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "step_time_s": elapsed,
            "tokens_per_s": tokens_per_s,
            "mfu": self.flops_per_token * tokens_per_s / (self.peak_flops * self.ctx.world_size),
            "peak_memory_gb": peak_memory_bytes(self.ctx.device) / 1e9,
        }

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over the fixed validation batches, shared out over dp ranks."""
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        dp, dp_rank = self.ctx.dims.dp, self.ctx.dp_rank
        mine = [batch for index, batch in enumerate(self.val_batches) if index % dp == dp_rank]
        if self.pipeline is not None:  # a forward-only GPipe pass; the last stage has the loss
            mine = [(x, y) for x, y in mine if x.shape[0] == self.micro_batch]
            if mine:
                inputs = [x.to(self.ctx.device) for x, _ in mine]
                targets = [y.to(self.ctx.device) for _, y in mine]
                total += self._eval_executor(len(mine)).run(inputs, targets, 1, forward_only=True)
                count = sum(int((y != IGNORE_INDEX).sum()) for y in targets)
            (pipeline_total,) = self.ctx.comm("pp").all_reduce_scalars([float(total)], tag="eval")
            total = torch.tensor(pipeline_total, dtype=torch.float64)
        else:
            for x, y in mine:
                y = y.to(self.ctx.device)
                with self._autocast():
                    total += token_loss_sum(self.model, x.to(self.ctx.device), y,
                                            self.cfg.label_smoothing).double().cpu()
                count += int((y != IGNORE_INDEX).sum())
        total_all, count_all = self.ctx.comm("dp").all_reduce_scalars([float(total), float(count)], tag="eval")
        return total_all / max(count_all, 1.0)
