"""Model configuration and named presets.

Field names follow Hugging Face's ``LlamaConfig`` so a ``config.json`` maps 1:1.
The large presets exist for the planner: they are never instantiated in tests.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

from plait.errors import PlaitError


class ConfigError(PlaitError):
    """A model configuration that cannot work; the message is one line."""


class RopeType(str, enum.Enum):
    """How the frequency table is scaled; ``default`` is plain RoPE (``rope_scaling`` None)."""

    LINEAR = "linear"
    LLAMA3 = "llama3"


@dataclass(frozen=True)
class RopeScaling:
    """A scaled RoPE. ``low_freq_factor``, ``high_freq_factor`` and
    ``original_max_position_embeddings`` belong to ``llama3`` only."""

    rope_type: RopeType
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "rope_type", RopeType(self.rope_type))
        except ValueError:
            raise ConfigError(f"rope scaling: rope_type {self.rope_type!r} is not one of "
                              f"{', '.join(t.value for t in RopeType)}") from None
        if not self.factor > 0:
            raise ConfigError(f"rope scaling: factor must be > 0, got {self.factor}")
        llama3_fields = (self.low_freq_factor, self.high_freq_factor, self.original_max_position_embeddings)
        if self.rope_type is RopeType.LLAMA3:
            if any(value is None for value in llama3_fields):
                raise ConfigError("rope scaling llama3 needs low_freq_factor, high_freq_factor and "
                                  "original_max_position_embeddings")
            if not self.high_freq_factor > self.low_freq_factor > 0:
                raise ConfigError(f"rope scaling llama3: needs high_freq_factor > low_freq_factor > 0, got "
                                  f"{self.high_freq_factor} and {self.low_freq_factor}")
            if self.original_max_position_embeddings < 1:
                raise ConfigError("rope scaling llama3: original_max_position_embeddings must be >= 1")
        elif any(value is not None for value in llama3_fields):
            raise ConfigError(f"rope scaling {self.rope_type.value}: low_freq_factor, high_freq_factor and "
                              f"original_max_position_embeddings belong to llama3 only")

    @classmethod
    def coerce(cls, value: "RopeScaling | dict | None") -> "RopeScaling | None":
        """A RopeScaling from itself, from its ``to_dict()`` (checkpoint meta JSON), or None."""
        return cls(**value) if isinstance(value, dict) else value

    def to_dict(self) -> dict:
        values = {"rope_type": self.rope_type.value, "factor": self.factor}
        if self.rope_type is RopeType.LLAMA3:
            values.update(low_freq_factor=self.low_freq_factor, high_freq_factor=self.high_freq_factor,
                          original_max_position_embeddings=self.original_max_position_embeddings)
        return values


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 8192
    hidden_size: int = 384
    intermediate_size: int = 1024
    num_hidden_layers: int = 8
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # None: plain RoPE (transformers' rope_type "default")
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        object.__setattr__(self, "rope_scaling", RopeScaling.coerce(self.rope_scaling))
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads"):
            if getattr(self, field) < 1:
                raise ConfigError(f"model config: {field} must be >= 1, got {getattr(self, field)}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"model config: hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model config: num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}")
        if not self.rope_theta > 0:
            raise ConfigError(f"model config: rope_theta must be > 0, got {self.rope_theta}")
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim {self.head_dim} must be even for RoPE")

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON values (checkpoint meta, run info); ``LlamaConfig(**to_dict())`` is the same config."""
        values = dataclasses.asdict(self)
        values["rope_scaling"] = self.rope_scaling.to_dict() if self.rope_scaling else None
        return values

    # ---- sizes used by the trainer's metrics and by the planner ----
    def num_parameters(self, include_embedding: bool = True) -> int:
        h, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * hd * self.num_attention_heads * 2 + h * hd * self.num_key_value_heads * 2
        per_layer = attn + 3 * h * f + 2 * h
        total = self.num_hidden_layers * per_layer + h  # + final norm
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        if include_embedding:
            total += self.vocab_size * h + head
        else:
            total += head  # the lm_head is a matmul, the embedding lookup is not
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs per trained token, forward + backward (PaLM appendix B convention).

        6 N for every matmul parameter (the lm_head included, the embedding lookup not), plus
        attention scores and values: 12 * layers * heads * head_dim * seq_len (not halved for
        the causal mask, as PaLM, Megatron and torchtitan count it). Recomputation is not
        counted: these are *model* FLOPs, the basis of MFU.
        """
        n_matmul = self.num_parameters(include_embedding=False)
        n_matmul -= (2 * self.num_hidden_layers + 1) * self.hidden_size  # norm weights are not matmuls
        attention = 12 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len
        return 6 * n_matmul + attention


PRESETS: dict[str, LlamaConfig] = {
    # ~1M parameters: tests. 8 heads / 4 kv heads / FFN 384 divide by tp = 2 and 4.
    "tiny": LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=384,
                        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                        max_position_embeddings=1024),
    # ~20M parameters: the default demo, trains on a laptop CPU in minutes.
    "small": LlamaConfig(vocab_size=8192, hidden_size=384, intermediate_size=1024,
                         num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2,
                         max_position_embeddings=2048),
    # ~0.53B parameters with the default 8192-token vocabulary: more than a rank of this 24 GiB,
    # 2-core machine can train replicated (8 ranks x 16 bytes per parameter, about 68 GB); trains
    # with --zero 3 on 8 ranks (benchmarks/large_model.py).
    "medium": LlamaConfig(vocab_size=8192, hidden_size=1536, intermediate_size=4096,
                          num_hidden_layers=20, num_attention_heads=12, num_key_value_heads=4,
                          max_position_embeddings=2048),
    # GPT-2-small shape with Llama blocks (~134M untied): the benchmark model.
    "llama-125m": LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                              num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                              max_position_embeddings=2048),
    # ~0.85B, TinyLlama-like shape (GQA 32 / 8 heads): the ~1B model of `make gpu-check` on one GPU.
    "llama-1b": LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                            num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                            max_position_embeddings=2048),
    # Published shapes, for the planner only.
    "llama2-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                             max_position_embeddings=4096),
    "llama2-13b": LlamaConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                              num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                              max_position_embeddings=4096),
    "llama2-70b": LlamaConfig(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                              num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                              max_position_embeddings=4096),
    "llama3-8b": LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                             max_position_embeddings=8192, rope_theta=500000.0),
    "llama3-70b": LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                              num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                              max_position_embeddings=8192, rope_theta=500000.0),
    "llama3-405b": LlamaConfig(vocab_size=128256, hidden_size=16384, intermediate_size=53248,
                               num_hidden_layers=126, num_attention_heads=128, num_key_value_heads=8,
                               max_position_embeddings=8192, rope_theta=500000.0),
}


def get_preset(name: str) -> LlamaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r} (and not a directory with a config.json); "
                          f"choose one of {', '.join(PRESETS)}") from None
