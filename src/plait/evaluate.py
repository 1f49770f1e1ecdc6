"""Loss and perplexity of a model on a corpus, under any layout.

    plait eval --model runs/x --data mytext/ [--seq-len 256 --batch-size 8 --max-batches 16]
    plait eval --model hf-llama/ --data corpus.bin --nproc 4 --tp 2 --pp 2

The corpus is encoded with the model's tokenizer (as ``plait train`` encodes it) into one stream;
windows of ``seq_len + 1`` tokens start every ``seq_len`` tokens (``validation_windows``: each
token is predicted once); the first ``batch_size x max_batches`` of them are shared out over the
data-parallel ranks in micro-batches of ``batch_size``. The result is the mean over every
predicted token of the cross-entropy,

    loss = sum_t -log softmax(z_t)[y_t] / T,       perplexity = exp(loss),

computed by ``Trainer.evaluate`` (the same code as the validation loss of training, so every
layout plait trains, tp / pp / ZeRO included, evaluates too and gives the same number).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from plait.data import TokenData
from plait.data.mixture import TokenChain, has_text_source
from plait.generate import GenerateError, locate_model


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    tokens: int
    windows: int


def evaluate_corpus(model_path: str, data_spec: str, ctx, seq_len: int, batch_size: int, max_batches: int,
                    tokenizer: str | None = None, dtype: str = "float32", zero: int = 0,
                    field: str = "text") -> EvalResult:
    """Mean token loss of the model at ``model_path`` on ``data_spec`` (collective over ``ctx``)."""
    from plait.checkpoint import load_checkpoint
    from plait.train import TrainConfig, Trainer
    from plait.train.run import load_data_once

    files = locate_model(model_path)
    if tokenizer is None and files.tokenizer is not None:
        tokenizer = str(files.tokenizer)
    if tokenizer is None and has_text_source(data_spec):
        raise GenerateError(f"{files.weights} has no tokenizer to encode --data {data_spec} with: pass "
                            "--tokenizer PATH or a .bin")
    if seq_len > files.config.max_position_embeddings:
        raise GenerateError(f"--seq-len {seq_len} is longer than the model's context "
                            f"({files.config.max_position_embeddings})")
    dims = ctx.dims
    # one training step's worth of batches must be valid for the layout (a pipeline needs pp micro-batches)
    cfg = TrainConfig(model=str(files.weights), data=data_spec, field=field, tokenizer=tokenizer, steps=1,
                      seq_len=seq_len, micro_batch=batch_size, global_batch=batch_size * dims.dp * dims.pp,
                      eval_every=0, dp=dims.dp, tp=dims.tp, pp=dims.pp, zero=zero,
                      dtype=dtype, progress=ctx.is_logging_rank, tensorboard=False, plot=False, peak_tflops=1.0,
                      out="unused")
    data = load_data_once(cfg, ctx, model_vocab=files.config.vocab_size)
    # the whole corpus is evaluated: each source's training part, then its held-out tail
    vals = data.val.parts if isinstance(data.val, TokenChain) else [data.val]
    whole = TokenChain([part for train, val in zip(data.train, vals) for part in (train, val)])
    whole = TokenData(train=whole, val=whole, vocab_size=data.vocab_size, eos_id=data.eos_id,
                      tokenizer=data.tokenizer)
    trainer = Trainer(cfg, ctx, whole, files.config)
    trainer.set_validation(whole.val, batch_size * max_batches)  # the same windows under every layout
    if files.kind == "checkpoint":
        load_checkpoint(trainer, files.weights)
    if trainer.val_windows is None:
        raise GenerateError(f"--data {data_spec} has {len(whole.val)} tokens, fewer than --seq-len + 1 = {seq_len + 1}")
    loss = trainer.evaluate()
    windows = len(trainer.val_windows)
    return EvalResult(loss, math.exp(min(loss, 700.0)), windows * seq_len, windows)
