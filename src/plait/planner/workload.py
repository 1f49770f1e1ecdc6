"""What the planner predicts: a model's shape and a training layout, and their checks.

``ModelShape`` holds only what cost depends on. Two architectures:

- ``llama``: plait's own model (RMSNorm, RoPE, SwiGLU MLP of width ``ffn_hidden``, GQA with
  ``kv_heads``, no biases, untied or tied head), attention by fused SDPA (flash) kernels.
- ``gpt``: the GPT of Megatron-LM as benchmarked by Narayanan et al. (2021): LayerNorm, learned
  positions, 4h GELU MLP, biases, tied embeddings, dropout, and attention materialised
  (scores in memory, fused scale-mask-softmax), which is what Korthikanti et al.'s activation
  formula sbh(34 + 5as/h) describes.

``Layout`` is one choice of every knob ``plait plan`` searches. ``check_layout`` returns the
first reason a layout cannot run (the same rules as plait's trainer), or None.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from plait.models.config import LlamaConfig

ARCHS = ("llama", "gpt")
SCHEDULES = ("gpipe", "1f1b", "interleaved")
RECOMPUTE = ("none", "full")


@dataclass(frozen=True)
class ModelShape:
    arch: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn_hidden: int
    vocab: int
    seq_len: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_hidden(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_parameters(self) -> int:
        h = self.hidden
        attention = h * (h + 2 * self.kv_hidden) + h * h
        if self.arch == "gpt":  # 4h GELU MLP, biases, two LayerNorms with bias
            return attention + 2 * h * self.ffn_hidden + (h + 2 * self.kv_hidden) + h + self.ffn_hidden + h + 4 * h
        return attention + 3 * h * self.ffn_hidden + 2 * h

    def embedding_parameters(self) -> int:
        positions = self.seq_len * self.hidden if self.arch == "gpt" else 0
        return self.vocab * self.hidden + positions

    def head_parameters(self) -> int:
        """The output projection's own parameters (0 when tied to the embedding) + final norm."""
        norm = 2 * self.hidden if self.arch == "gpt" else self.hidden
        return norm + (0 if self.tied else self.vocab * self.hidden)

    def parameters(self) -> int:
        return self.layers * self.layer_parameters() + self.embedding_parameters() + self.head_parameters()

    def megatron_flops(self, global_batch: int, recompute: bool = True) -> float:
        """Narayanan et al. (2021) Eq. 3: F = 96 B s l h^2 (1 + s/6h + V/16lh) per iteration,
        which counts a 4h MLP, full (not causal-halved) attention and, with ``recompute``, the
        extra forward of full activation recomputation; 72 instead of 96 without it."""
        b, s, l, h, v = global_batch, self.seq_len, self.layers, self.hidden, self.vocab
        factor = 96 if recompute else 72
        return factor * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))

    def model_flops_per_token(self) -> float:
        """Forward + backward model FLOPs per token, no recomputation (PaLM's MFU convention):
        6 per matmul parameter, plus attention scores and values 12 l s h (not causal-halved)."""
        h, f = self.hidden, self.ffn_hidden
        mlp = (2 if self.arch == "gpt" else 3) * h * f
        per_layer = h * (h + 2 * self.kv_hidden) + h * h + mlp
        return 6 * (self.layers * per_layer + self.vocab * h) + 12 * self.layers * self.seq_len * h

    @classmethod
    def from_llama_config(cls, config: LlamaConfig, seq_len: int) -> "ModelShape":
        return cls("llama", config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                   config.num_key_value_heads, config.intermediate_size, config.vocab_size, seq_len,
                   config.tie_word_embeddings)

    @classmethod
    def gpt(cls, hidden: int, layers: int, heads: int, vocab: int, seq_len: int) -> "ModelShape":
        return cls("gpt", hidden, layers, heads, heads, 4 * hidden, vocab, seq_len, tied=True)


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
    recompute: str = "none"             # "none" or "full" (activation checkpointing of every block)
    schedule: str = "1f1b"
    virtual_stages: int = 1
    dtype: str = "bfloat16"

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def microbatches(self) -> int:
        """Micro-batches per step and data-parallel rank."""
        return self.global_batch // (self.dp * self.micro_batch)

    @property
    def chunks_per_rank(self) -> int:
        return self.virtual_stages if self.schedule == "interleaved" else 1

    def describe(self) -> str:
        parts = [f"dp{self.dp}", f"tp{self.tp}", f"pp{self.pp}"]
        if self.pp > 1:
            parts.append(self.schedule + (f"(v{self.virtual_stages})" if self.chunks_per_rank > 1 else ""))
        parts.append(f"zero{self.zero}")
        if self.sequence_parallel:
            parts.append("sp")
        if self.recompute != "none":
            parts.append(f"recompute-{self.recompute}")
        parts.append(f"mb{self.micro_batch}x{self.microbatches}")
        return " ".join(parts)

    def with_(self, **changes) -> "Layout":
        return replace(self, **changes)


def check_layout(shape: ModelShape, layout: Layout) -> str | None:
    """Why this layout cannot run (a one-line reason), or None when it can."""
    t, p = layout.tp, layout.pp
    if min(layout.dp, t, p, layout.micro_batch, layout.global_batch, layout.virtual_stages) < 1:
        return "sizes must be >= 1"
    if shape.hidden % shape.heads:
        return f"heads {shape.heads} do not divide hidden {shape.hidden}"
    for what, size in (("heads", shape.heads), ("kv heads", shape.kv_heads), ("ffn hidden", shape.ffn_hidden),
                       ("vocabulary", shape.vocab)):
        if size % t:
            return f"tp {t} does not divide the {what} ({size})"
    if layout.sequence_parallel and shape.seq_len % t:
        return f"tp {t} does not divide the sequence {shape.seq_len} (sequence parallel)"
    if layout.global_batch % layout.dp:
        return f"global batch {layout.global_batch} not divisible by dp {layout.dp}"
    if (layout.global_batch // layout.dp) % layout.micro_batch:
        return f"per-replica batch {layout.global_batch // layout.dp} not divisible by micro-batch {layout.micro_batch}"
    if layout.zero not in (0, 1, 2, 3):
        return f"zero must be 0-3, got {layout.zero}"
    if layout.recompute not in RECOMPUTE:
        return f"recompute must be one of {', '.join(RECOMPUTE)}"
    if layout.schedule not in SCHEDULES:
        return f"unknown schedule {layout.schedule!r}"
    if layout.zero == 3 and layout.recompute != "none":
        return "zero 3 with activation recomputation is not yet supported by plait"
    if p > 1:
        if layout.zero >= 2:
            return f"zero {layout.zero} with pp > 1 is not yet supported by plait"
        if shape.tied and shape.arch == "llama":
            return "tied embeddings with pp > 1 are not yet supported by plait"
        if layout.microbatches < p:
            return f"pp {p} needs at least {p} micro-batches, got {layout.microbatches}"
        v = layout.chunks_per_rank
        if layout.schedule == "interleaved":
            if v < 2:
                return "the interleaved schedule needs virtual stages >= 2"
            if layout.microbatches % p:
                return f"interleaved needs the micro-batch count {layout.microbatches} to be a multiple of pp {p}"
        elif layout.virtual_stages != 1:
            return "virtual stages > 1 need the interleaved schedule"
        if shape.layers < p * v:
            return f"{shape.layers} layers cannot fill pp {p} x {v} chunks"
    return None
