"""Sampling from a trained model: KV-cached decoding on one process or tensor-parallel ranks.

    plait generate --model runs/x --prompt "def main(" --max-new-tokens 64 --temperature 0

The model comes from a run directory (its newest checkpoint), a checkpoint directory or a Hugging
Face Llama directory, built on the meta device and given only this rank's tensor-parallel part
(``plait.checkpoint.sources``, as training builds it). Decoding: one forward over the prompt fills
the ``KVCache``, then one forward per new token. The next token, from the last position's fp32
logits z (full vocabulary; under tp gathered from the vocabulary-parallel head):

    temperature 0        argmax z                       (greedy: transformers' do_sample=False)
    otherwise            sample softmax(z / T), restricted first to the k largest (top-k), then
                         to the smallest set whose probability reaches p (top-p, nucleus)

Sampling draws from a ``torch.Generator`` seeded by ``--seed``; under tp every rank computes the
same logits and tp rank 0's choice is broadcast, so the ranks never diverge. Decoding stops at
the tokenizer's EOS or after ``max_new_tokens``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from plait.checkpoint import latest_checkpoint
from plait.checkpoint.hf_config import is_hf_directory, load_hf_config
from plait.checkpoint.store import TOKENIZER_DIR, read_meta
from plait.data import DataError
from plait.data.hf_tokenizer import PretrainedTokenizer, has_tokenizer
from plait.errors import PlaitError
from plait.models import LlamaConfig, build_meta_model, model_parameters
from plait.models.llama import KVCache
from plait.sharding import shard_of, swap_parameter_data
from plait.run_dir import is_run_directory


class GenerateError(PlaitError):
    """A generation request that cannot be served; one line."""


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0          # 0: the whole vocabulary
    top_p: float = 1.0      # 1: no nucleus cut
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerateError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise GenerateError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerateError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerateError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass
class ModelFiles:
    """Where a model's weights, config and tokenizer are."""

    kind: str                      # "checkpoint" or "hf"
    weights: Path
    config: LlamaConfig
    tokenizer: Path | None


def locate_model(path: str | Path) -> ModelFiles:
    """A run directory (its newest checkpoint), a checkpoint, or a Hugging Face directory."""
    path = Path(path).expanduser()
    if not path.exists():
        raise GenerateError(f"--model {path} does not exist")
    checkpoint = path if (path / "COMPLETE").exists() else latest_checkpoint(path)
    if checkpoint is None and is_run_directory(path):
        raise GenerateError(f"--model {path} is a plait run without a checkpoint: train it with --checkpoint-every N "
                            "(a checkpoint is also written at the end)")
    if checkpoint is None and is_hf_directory(path):  # a run directory has a config.json too: checked first
        return ModelFiles("hf", path, load_hf_config(path), path if has_tokenizer(path) else None)
    if checkpoint is None:
        raise GenerateError(f"--model {path} is neither a Hugging Face directory, a complete checkpoint nor a "
                            "run directory with one")
    meta = read_meta(checkpoint)
    tokenizer = next((d for d in (checkpoint / TOKENIZER_DIR, path / TOKENIZER_DIR) if has_tokenizer(d)), None)
    return ModelFiles("checkpoint", checkpoint, LlamaConfig(**meta["model"]), tokenizer)


@torch.no_grad()
def load_model(files: ModelFiles, ctx, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """This rank's part of the model (tp), read piece by piece from its files."""
    from plait.checkpoint.sources import CheckpointSource, HFSource
    from plait.tensor_parallel import llama_plan, parallelize

    model = build_meta_model(files.config)
    if ctx.dims.tp > 1:
        parallelize(model, ctx.comm("tp"), llama_plan(False, False))
    source = HFSource(files.weights) if files.kind == "hf" else CheckpointSource(files.weights)
    try:
        for name, param in model_parameters(model):
            shard = shard_of(param)
            values = source.read(name, shard, shard.full_shape(tuple(param.shape))).view(param.shape)
            swap_parameter_data(param, values.to(ctx.device, dtype).clone())
    finally:
        source.close()
    return model.eval()


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token from one position's logits [vocab] (see the module docstring)."""
    logits = logits.float()
    if sampling.temperature == 0:
        return int(logits.argmax())
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        ordered, order = torch.sort(logits, descending=True)
        probabilities = ordered.softmax(-1)
        # keep a token while the probability of those before it is below p (the first always)
        outside = probabilities.cumsum(-1) - probabilities >= sampling.top_p
        logits = logits.scatter(0, order[outside], float("-inf"))
    probabilities = logits.softmax(-1)
    return int(torch.multinomial(probabilities.cpu(), 1, generator=generator))


@torch.no_grad()
def generate_ids(model: torch.nn.Module, prompt: list[int], sampling: Sampling, eos_id: int | None,
                 ctx=None) -> list[int]:
    """New token ids after ``prompt`` (the EOS that ends them is not included)."""
    config = model.config
    room = config.max_position_embeddings - len(prompt)
    if not prompt:
        raise GenerateError("the prompt encodes to no tokens")
    if room < 1:
        raise GenerateError(f"the prompt is {len(prompt)} tokens, as long as the model's context "
                            f"({config.max_position_embeddings}) or longer")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(sampling.seed)
    tp = ctx.comm("tp") if ctx is not None and ctx.dims.tp > 1 else None
    cache = KVCache(config.num_hidden_layers, len(prompt) + min(sampling.max_new_tokens, room))
    logits = model(torch.tensor([prompt], device=device), cache)[0, -1]
    new: list[int] = []
    for _ in range(min(sampling.max_new_tokens, room)):
        token = next_token(logits, sampling, generator)
        if tp is not None:  # tp rank 0 decides: the ranks' logits agree, their rounding might not
            choice = torch.tensor([token], dtype=torch.int64, device=device)
            tp.broadcast(choice, 0, tag="generate")
            token = int(choice)
        if token == eos_id:
            break
        new.append(token)
        logits = model(torch.tensor([[token]], device=device), cache)[0, -1]
    return new


def load_tokenizer(files: ModelFiles) -> PretrainedTokenizer:
    if files.tokenizer is None:
        raise GenerateError(f"{files.weights} has no tokenizer (tokenizer.json) to encode the prompt with")
    try:
        return PretrainedTokenizer(files.tokenizer)
    except DataError as error:
        raise GenerateError(str(error)) from None


__all__ = ["GenerateError", "ModelFiles", "Sampling", "generate_ids", "load_model",
           "load_tokenizer", "locate_model", "next_token"]
