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
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plait.checkpoint.hf_config import is_hf_directory, load_hf_config
from plait.checkpoint.sources import HFSource, InitSource
from plait.context_parallel import apply_context_parallel, context_slice
from plait.data import BatchSampler, TokenData, ValidationWindows, validation_windows
from plait.data_parallel import DataParallelStrategy, Replicated, Sharded, TiedWeights
from plait.device import to_device
from plait.layout import LayoutError, Recompute, check_run, layout_of
from plait.mesh import ParallelContext
from plait.models import LlamaConfig, build_meta_model, get_preset, model_parameters
from plait.runtime import gemm_context
from plait.pipeline import (PipelineExecutor, ScheduleError, StageError, build_schedule, keep_stage,
                            named_blocks, plan_chunks)
from plait.pipeline.ordering import receive_posts
from plait.pipeline.schedules import Schedule
from plait.pipeline.stage import defer_weight_gradients
from plait.pipeline.weight_grad import DeferredWeightGradients
from plait.tensor_parallel import ParallelLMHead, keep_sequence_shards, llama_plan, parallelize
from plait.train.config import TrainConfig
from plait.loss import IGNORE_INDEX, linear_cross_entropy_sum
from plait.train.metrics import calibrated_peak, measure_matmul_peak, peak_memory_bytes
from plait.train.optim import learning_rate
from plait.train.compiled import compile_blocks
from plait.train.recompute import apply_recomputation

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


def plan_pipeline(cfg: TrainConfig, dims, model_config: LlamaConfig, n_micro: int):
    """(chunks, per-rank schedules) of a pipeline layout that ``check_layout`` accepted."""
    split = [int(part) for part in cfg.pipeline_split.split(",")] if cfg.pipeline_split else None
    try:
        plans = build_schedule(cfg.schedule, dims.pp, n_micro, cfg.virtual_stages)
        chunks = plan_chunks(model_config, dims.pp, cfg.virtual_stages, cfg.seq_len, split)
    except (ScheduleError, StageError) as error:
        raise LayoutError(str(error)) from None
    return chunks, plans


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
    if isinstance(head, ParallelLMHead):  # vocabulary split over tp: its own (loss-parallel) loss
        return head.loss_sum(hidden, targets, label_smoothing)
    return linear_cross_entropy_sum(hidden, head.weight, targets, label_smoothing)


def evaluation_share(windows: int, dp: int, dp_rank: int, micro_batch: int) -> list[list[int | None]]:
    """This dp rank's micro-batches of a validation set of ``windows`` windows, as window indices:
    window i goes to dp rank i mod dp.

    Every rank runs the same number of full micro-batches (ZeRO-3 gathers parameters in each
    forward, a collective all dp ranks must join; a pipeline sends fixed shapes): rows missing
    from a rank's share are None, a copy of a window whose targets are all ignored (loss 0, 0
    tokens). The loss is the sum over the set's tokens divided by their count, whatever the layout."""
    mine: list[int | None] = list(range(dp_rank, windows, dp))
    rows = -(-windows // dp)  # the busiest rank's windows
    mine += [None] * (-(-rows // micro_batch) * micro_batch - len(mine))
    return [mine[start:start + micro_batch] for start in range(0, len(mine), micro_batch)]


def evaluation_batch(windows: ValidationWindows, indices: list[int | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of one micro-batch of ``evaluation_share``: a None row is window 0 with
    every target ignored."""
    inputs, targets = windows.rows([0 if index is None else index for index in indices])
    padding = torch.tensor([index is None for index in indices])
    return inputs, targets.masked_fill(padding.unsqueeze(1), IGNORE_INDEX)


class Trainer:
    """Owns the model, optimizer and data order of one rank; ``train_step(k)`` runs step k."""

    def __init__(self, cfg: TrainConfig, ctx: ParallelContext, data: TokenData,
                 model_config: LlamaConfig | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.tokenizer = data.tokenizer  # saved with every checkpoint (None: a .bin without one)
        self.model_config = model_config or model_config_for(cfg, data.vocab_size)
        dims = ctx.dims
        check_run(cfg, dims, self.model_config)
        self.layout = layout_of(cfg, dims)
        self.per_rank_batch, self.micro_batch = self.layout.per_rank_batch, self.layout.micro_batch
        self.n_micro = self.layout.microbatches

        # Built on the meta device, cut to this rank's stage and tensor-parallel parts, and only
        # then given values: no rank ever holds the full model (plait.checkpoint.sources).
        self.model = build_meta_model(self.model_config)
        if dims.tp > 1:
            parallelize(self.model, ctx.comm("tp"), llama_plan(cfg.sequence_parallel, cfg.loss_parallel))
        apply_context_parallel(self.model, ctx.comm("cp"), cfg.cp_mode)  # nothing at cp = 1
        self.pipeline = None
        self.weight_gradients: DeferredWeightGradients | None = None  # split-backward schedules' W store
        chunk_blocks = [[(f"model.layers.{i}", block) for i, block in named_blocks(self.model)]]
        if dims.pp > 1:
            chunk_blocks = self._setup_pipeline()
        self.compiled_blocks = 0  # --compile: the math of each block, between its collectives
        if cfg.compile:
            self.compiled_blocks = compile_blocks(block for group in chunk_blocks for _, block in group)
        apply_recomputation((block for group in chunk_blocks for _, block in group), self.layout.recompute)
        # The Hugging Face directory the weights come from (its other files go into checkpoints).
        self.hf_source = Path(cfg.model) if is_hf_directory(cfg.model) else None
        self.strategy = self._data_parallel_strategy(chunk_blocks)
        source = HFSource(self.hf_source) if self.hf_source is not None else InitSource(self.model_config, cfg.seed)
        self.strategy.load_parameters(source)

        self.sampler = BatchSampler(data.train, cfg.seq_len, cfg.global_batch, cfg.seed, data.weights)
        self.val_windows = None  # the fixed validation set (evaluate), the same under every layout
        if cfg.eval_every > 0:
            self.set_validation(data.val, cfg.eval_batches * cfg.global_batch)
        self.compute_dtype = DTYPE_BY_NAME[cfg.dtype]
        self.flops_per_token = self.model_config.flops_per_token(cfg.seq_len)
        self.skipped_steps = 0  # steps whose update was dropped (--on-nonfinite skip); kept in checkpoints
        if cfg.peak_tflops:
            self.peak_flops = cfg.peak_tflops * 1e12
        elif (calibrated := calibrated_peak(cfg.dtype, ctx.device)) is not None:
            self.peak_flops = calibrated
        else:  # timed as the model's products run
            with gemm_context(ctx.device, self.compute_dtype):
                self.peak_flops = measure_matmul_peak(self.compute_dtype, ctx.device)

    def _tied_weights(self) -> TiedWeights | None:
        """A tied embedding across pipeline stages: the first chunk's table, the last's head.
        Under ZB-V's V both chunks are rank 0's, and the tie stays one parameter."""
        ctx, pp = self.ctx, self.ctx.dims.pp
        if pp == 1 or not self.model_config.tie_word_embeddings:
            return None
        placement = Schedule(self.cfg.schedule).placement
        first, last = placement.rank_of(0, pp), placement.rank_of(pp * self.cfg.virtual_stages - 1, pp)
        if first == last or ctx.pp_rank not in (first, last):
            return None
        param = self.model.model.embed_tokens.weight if ctx.pp_rank == first else self.model.lm_head.weight
        return TiedWeights(param, ctx.comm("pp"), peer=last if ctx.pp_rank == first else first,
                           owner=ctx.pp_rank == first)

    def _data_parallel_strategy(self, chunk_blocks) -> DataParallelStrategy:
        cfg, ctx = self.cfg, self.ctx
        named = model_parameters(self.model)
        common = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
                      device=ctx.device, tied=self._tied_weights())
        # cp ranks hold the same parameters and see other positions: data parallel for gradients
        comms = (ctx.comm("dp_cp"), ctx.comm("tp"), ctx.comm("pp"))
        if cfg.zero == 0:
            return Replicated(self.model, named, *comms, bucket_bytes=int(cfg.bucket_mb * 2 ** 20), **common)
        decoder = self.model.model
        entries = [m for m in (decoder.embed_tokens, decoder.norm, self.model.lm_head) if m is not None]
        param_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        # hybrid sharding: shard within a replica group, all-reduce the shards across the groups
        comms = (ctx.comm("dp_shard"), ctx.comm("tp"), ctx.comm("pp"))
        return Sharded(self.model, named, chunk_blocks, entries, *comms, level=cfg.zero, param_dtype=param_dtype,
                       replicate=ctx.comm("dp_replicate"), **common)

    def _setup_pipeline(self) -> list[list[tuple[str, nn.Module]]]:
        """Keep this rank's chunks of blocks and build the executors of its schedule; returns the
        rank's blocks grouped by chunk."""
        cfg, ctx, dims = self.cfg, self.ctx, self.ctx.dims
        chunks, plans = plan_pipeline(cfg, dims, self.model_config, self.n_micro)
        placement = Schedule(cfg.schedule).placement
        mine = keep_stage(self.model, chunks, ctx.pp_rank, dims.pp, placement)
        positions = cfg.seq_len // dims.cp  # this cp rank's part of each sequence
        seq_local = positions // dims.tp if cfg.sequence_parallel else positions
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

        if Schedule(cfg.schedule).splits_backward:  # zero bubble: the blocks' weight products wait for W
            self.weight_gradients = DeferredWeightGradients()
            layers = self.model.model.layers
            defer_weight_gradients((layers[str(i)] for chunk in mine for i in chunk.layers), self.weight_gradients)

        def executor(all_plans, microbatches, split=self.weight_gradients):
            # every rank's list is needed to agree each pair's message order (NCCL's rule)
            return PipelineExecutor(self.model, mine, all_plans[ctx.pp_rank], ctx.comm("pp"), microbatches,
                                    positions, shape, activation_dtype, loss_fn, forward_context, split,
                                    receive_posts(all_plans)[ctx.pp_rank])

        self.pipeline = executor(plans, self.n_micro)
        self._eval_executor = lambda m: executor(
            build_schedule(Schedule.GPIPE, dims.pp, m, cfg.virtual_stages, placement), m, None)
        layers = self.model.model.layers
        return [[(f"model.layers.{i}", layers[str(i)]) for i in chunk.layers] for chunk in mine]

    def _autocast(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=self.compute_dtype)

    def _weights_cast_once(self):
        """A region around all of a step's micro-batches in which each weight is cast to bf16
        once, not once per micro-batch forward. Autocast caches its casts of parameters until its
        outermost region ends; this one is that region, with autocast off (each forward turns it
        on), so backward runs outside autocast as before. The micro-batches in flight (a
        pipeline's) share one bf16 copy of the weights instead of each keeping its own.

        Not under recomputation: there a block's casts are dropped after its forward and made
        again in its backward, and a cache held for the step would keep a bf16 copy of every
        weight that recomputation exists to free. Split-backward schedules' layers cast their
        blocks' weights themselves (``pipeline.weight_grad``), once a step too within the store's
        ``casting_once``; the fused loss casts the head's once a micro-batch."""
        stack = contextlib.ExitStack()
        if self.compute_dtype == torch.float32 or self.layout.recompute is not Recompute.NONE:
            return stack
        stack.enter_context(torch.autocast(self.ctx.device.type, enabled=False))
        if self.weight_gradients is not None:
            stack.enter_context(self.weight_gradients.casting_once())
        return stack

    def _keep_shards(self):
        """Under SP, save sequence shards (not gathered activations) for backward."""
        if not self.cfg.sequence_parallel:
            return contextlib.nullcontext()
        return keep_sequence_shards(self.ctx.comm("tp"))

    def _my_positions(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids or targets [rows, seq] -> this cp rank's positions of them."""
        return context_slice(x, self.ctx.cp_rank, self.ctx.dims.cp)

    def global_target_count(self, step: int) -> int:
        _, targets = self.sampler.global_batch(step)
        return int((targets != IGNORE_INDEX).sum())

    def compute_gradients(self, step: int) -> tuple[float, int]:
        """Forward and backward over this rank's micro-batches of step ``step``, gradients synced.

        Returns (global loss sum, global target count); the step's loss is their ratio.
        """
        ctx, cfg = self.ctx, self.cfg
        inputs, targets = map(self._my_positions, self.sampler.shard(step, ctx.dp_rank, ctx.dims.dp))
        n_targets = self.global_target_count(step)
        n_micro = self.n_micro
        local_loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        with self._weights_cast_once():
            if self.pipeline is not None:
                self.strategy.communicate_in_backward(False)  # all buckets go out in finish(), after the schedule
                micro_inputs = list(to_device(inputs, ctx.device).split(self.micro_batch))
                micro_targets = list(to_device(targets, ctx.device).split(self.micro_batch))
                local_loss_sum += self.pipeline.run(micro_inputs, micro_targets, n_targets)
                n_micro = 0  # the schedule did every micro-batch
            for index in range(n_micro):
                self.strategy.communicate_in_backward(index == n_micro - 1)  # replicated: once, on the last
                rows = slice(index * self.micro_batch, (index + 1) * self.micro_batch)
                x = to_device(inputs[rows], ctx.device)
                y = to_device(targets[rows], ctx.device)
                with self._autocast(), self._keep_shards():
                    loss_sum = token_loss_sum(self.model, x, y, cfg.label_smoothing)
                (loss_sum / n_targets).backward()
                local_loss_sum += loss_sum.detach()
        self.strategy.finish()  # dp-reduced, SP partial and tied gradients summed
        (loss_sum_all,) = ctx.comm("pp").all_reduce_scalars([float(local_loss_sum)], tag="metrics")
        (loss_sum_all,) = ctx.comm("dp_cp").all_reduce_scalars([loss_sum_all], tag="metrics")
        return loss_sum_all, n_targets

    def apply_update(self, step: int, loss: float) -> tuple[float, float, bool]:
        """Clip, set the learning rate of ``step``, take the AdamW step, zero gradients.

        A non-finite loss or gradient norm skips the AdamW step: the weights and the optimizer's
        moments stay as they were. Both numbers are reduced over every rank before this, so all
        ranks take the same decision without a further collective.

        Returns (gradient norm before clipping, learning rate, whether the weights were updated).
        """
        cfg = self.cfg
        lr = learning_rate(step, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
        grad_norm = self.strategy.clip_grad_norm(cfg.grad_clip)
        updated = math.isfinite(loss) and math.isfinite(grad_norm)
        if updated:
            self.strategy.step(lr)
        self.strategy.zero_grad()
        return grad_norm, lr, updated

    def train_step(self, step: int) -> dict[str, Any]:
        start = time.perf_counter()
        with gemm_context(self.ctx.device, self.compute_dtype):  # forward and backward
            loss_sum, n_targets = self.compute_gradients(step)
        loss = loss_sum / n_targets
        grad_norm, lr, updated = self.apply_update(step, loss)
        self.skipped_steps += not updated
        if self.ctx.device.type == "cuda":  # the optimizer's kernels are queued, not done: time them too
            torch.cuda.synchronize(self.ctx.device)
        elapsed = time.perf_counter() - start
        tokens = self.cfg.global_batch * self.cfg.seq_len
        tokens_per_s = tokens / elapsed
        return {
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped": not updated,
            "skipped_steps": self.skipped_steps,
            "tokens": tokens,
            "step_time_s": elapsed,
            "tokens_per_s": tokens_per_s,
            "mfu": self.model_flops_utilization(tokens_per_s),
            "peak_memory_gb": peak_memory_bytes(self.ctx.device) / 1e9,
        }

    def model_flops_utilization(self, tokens_per_s: float) -> float:
        """Model FLOP/s per rank over the rank's peak. The peak is a measured lower bound of the
        true one (a calibrated profile or the best single product at start); a step that beats it
        raises it, so MFU never exceeds 1."""
        achieved = self.flops_per_token * tokens_per_s / self.ctx.world_size
        self.peak_flops = max(self.peak_flops, achieved)
        return achieved / self.peak_flops

    def set_validation(self, tokens, max_windows: int) -> None:
        """Evaluate on the first ``max_windows`` windows of ``tokens`` (none if shorter than one)."""
        self.val_windows = validation_windows(tokens, self.cfg.seq_len, max_windows) \
            if len(tokens) > self.cfg.seq_len else None

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean token loss over the fixed validation windows, shared out over dp ranks."""
        with gemm_context(self.ctx.device, self.compute_dtype), self._weights_cast_once():
            return self._evaluate()

    def _evaluate(self) -> float:
        # the loss sum stays on the device and the targets are counted on the host before their
        # copy: no wait for the GPU per micro-batch, one at the end
        total = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        count = 0
        share = evaluation_share(len(self.val_windows), self.ctx.dims.dp, self.ctx.dp_rank, self.micro_batch)
        mine = (tuple(map(self._my_positions, evaluation_batch(self.val_windows, indices))) for indices in share)
        if self.pipeline is not None:  # a forward-only GPipe pass; the last stage has the loss
            mine = list(mine)
            count = sum(int((y != IGNORE_INDEX).sum()) for _, y in mine)
            inputs = [to_device(x, self.ctx.device) for x, _ in mine]
            targets = [to_device(y, self.ctx.device) for _, y in mine]
            stage_total = self._eval_executor(len(mine)).run(inputs, targets, 1, forward_only=True)
            (pipeline_total,) = self.ctx.comm("pp").all_reduce_scalars([stage_total], tag="eval")
            total += pipeline_total
        else:
            for x, y in mine:
                count += int((y != IGNORE_INDEX).sum())
                with self._autocast():
                    total += token_loss_sum(self.model, to_device(x, self.ctx.device), to_device(y, self.ctx.device),
                                            self.cfg.label_smoothing).double()
        total_all, count_all = self.ctx.comm("dp_cp").all_reduce_scalars([float(total), float(count)], tag="eval")
        return total_all / max(count_all, 1.0)
