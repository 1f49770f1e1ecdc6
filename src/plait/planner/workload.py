"""What the planner predicts: a model's shape and a training layout, and their checks.

``ModelShape`` holds only what cost depends on. Two architectures:

- ``llama``: plait's own model (RMSNorm, RoPE, SwiGLU MLP of width ``ffn_hidden``, GQA with
  ``kv_heads``, no biases, untied or tied head), attention by fused SDPA (flash) kernels.
- ``gpt``: the GPT of Megatron-LM as benchmarked by Narayanan et al. (2021): LayerNorm, learned
  positions, 4h GELU MLP, biases, tied embeddings, dropout, and attention materialised
  (scores in memory, fused scale-mask-softmax), which is what Korthikanti et al.'s activation
  formula sbh(34 + 5as/h) describes.

``Layout`` (``plait.layout``) is one choice of every knob ``plait plan`` searches.
``check_layout`` returns the first reason a layout cannot run, or None: the very function
``plait train`` and the trainer apply, so the planner never proposes what training refuses.
"""
from __future__ import annotations

from dataclasses import dataclass

from plait.layout import Layout, ModelFacts, Recompute, layout_problem
from plait.models.config import LlamaConfig
from plait.pipeline.schedules import SCHEDULES

ARCHS = ("llama", "gpt")
RECOMPUTE = tuple(mode.value for mode in Recompute)
__all__ = ["ARCHS", "Layout", "ModelShape", "RECOMPUTE", "SCHEDULES", "check_layout"]


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
        extra forward of full activation recomputation. Without it, 72 B s l h^2 (1 + s/6h +
        V/12lh): the logit layer (6 B s h V) is never recomputed, so its term keeps its size."""
        b, s, l, h, v = global_batch, self.seq_len, self.layers, self.hidden, self.vocab
        factor, logits = (96, 16) if recompute else (72, 12)
        return factor * b * s * l * h * h * (1 + s / (6 * h) + v / (logits * l * h))

    def model_flops_per_token(self) -> float:
        """Forward + backward model FLOPs per token, no recomputation (PaLM's MFU convention):
        6 per matmul parameter, plus attention scores and values 12 l s h (not causal-halved)."""
        h, f = self.hidden, self.ffn_hidden
        mlp = (2 if self.arch == "gpt" else 3) * h * f
        per_layer = h * (h + 2 * self.kv_hidden) + h * h + mlp
        return 6 * (self.layers * per_layer + self.vocab * h) + 12 * self.layers * self.seq_len * h

    def facts(self) -> ModelFacts:
        return ModelFacts(self.heads, self.kv_heads, self.ffn_hidden, self.vocab, self.layers, self.seq_len)

    @classmethod
    def from_llama_config(cls, config: LlamaConfig, seq_len: int) -> "ModelShape":
        return cls("llama", config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                   config.num_key_value_heads, config.intermediate_size, config.vocab_size, seq_len,
                   config.tie_word_embeddings)

    @classmethod
    def gpt(cls, hidden: int, layers: int, heads: int, vocab: int, seq_len: int) -> "ModelShape":
        return cls("gpt", hidden, layers, heads, heads, 4 * hidden, vocab, seq_len, tied=True)


def check_layout(shape: ModelShape, layout: Layout) -> str | None:
    """Why this layout cannot run (a one-line reason), or None when it can: plait's own rules
    (``plait.layout.layout_problem``, which ``plait train`` applies) plus the shape's."""
    if shape.hidden % shape.heads:
        return f"heads {shape.heads} do not divide hidden {shape.hidden}"
    if shape.arch == "gpt" and layout.cp > 1:
        return "context parallelism is modelled for the llama architecture only"
    return layout_problem(shape.facts(), layout)
