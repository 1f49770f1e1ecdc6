"""A Llama-family decoder in plain PyTorch.

Parameter names and arithmetic match Hugging Face ``LlamaForCausalLM`` (RMSNorm in fp32,
rotate-half RoPE with default, linear or llama3 frequencies, SwiGLU, grouped-query attention),
so weights map 1:1 by name.

The model knows nothing of parallelism. Two habits keep it that way:
- attention derives its local head counts from the projections' output sizes, so a
  tensor-parallel plan can shard q/k/v by heads without touching this file;
- the model returns logits; the loss (and its normalisation) belongs to the trainer.

Generation passes a ``KVCache``: each attention appends its keys and values to its layer's
slot, and the positions of the new tokens start where the cache ends.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plait.models.config import LlamaConfig, RopeScaling
from plait.models.mixed_precision import shared_input
from plait.models.rope import inverse_frequencies


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back (as HF does).

    On CUDA, with x and w in fp32 (the residual stream under autocast, and fp32 training), this
    is torch's fused kernel (``F.rms_norm`` dispatches to ``_fused_rms_norm``; in the GPU
    machine's torch 2.11 build, with fake CUDA tensors, it keeps x, w and 1/rms): the same
    arithmetic in one pass, where the seven eager ops read and write [tokens, h] fp32 about
    seven times and keep x and the normalised value (``planner.memory`` counts both).
    Elsewhere the eager ops: on the CPU ``F.rms_norm`` is these same ops, and in bf16 HF rounds
    the normalised value before the weight's product, which the fused kernel would not.
    """

    def __init__(self, dim: int, eps: float, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        if x.is_cuda and input_dtype == self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotary position embedding, rotate-half layout.

    angle(p, i) = p * inv_freq[i], duplicated over both halves; inv_freq (plain or scaled) comes
    from ``plait.models.rope``. The tables are cached per (length, device, dtype): they cost
    nothing after the first step.
    """

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None = None) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (seq_len, device, dtype)
        if key not in self._cache:
            positions = torch.arange(seq_len, device=device, dtype=torch.float32)
            angles = torch.outer(positions, self.inv_freq.to(device).float())
            emb = torch.cat((angles, angles), dim=-1)
            self._cache = {key: (emb.cos().to(dtype), emb.sin().to(dtype))}
        return self._cache[key]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Rotate(torch.autograd.Function):
    """y = x * cos + rotate_half(x) * sin, written per half (x = [x1, x2], c = [c1, c2], s likewise):

        y1 = x1 * c1 - x2 * s1          dL/dx1 = g1 * c1 + g2 * s2
        y2 = x2 * c2 + x1 * s2          dL/dx2 = g2 * c2 - g1 * s1

    Each product is rounded, then the sum, as transformers' ops round them (negation is exact), so
    forward and gradient are the same bits. Written as x * cos and an in-place update of each half,
    a pass moves about 7 x's worth of bytes in 5 kernels; transformers' negation, concatenation,
    two products and sum move about 10 forward, and autograd's backward of them (zero-padded slice
    gradients summed) more. Measured here, [2, 12, 1024, 64] forward and backward: 1.4x faster in
    bf16, 1.9x in fp32.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, sign=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, sign=-1), None, None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int) -> torch.Tensor:
    """sign 1: the rotation by +angle (forward); -1: by -angle, its transpose (backward)."""
    half = x.shape[-1] // 2
    out = x * cos  # the layout of x: a transposed q stays [b, s, heads, d] in memory for SDPA
    low, high = out[..., :half], out[..., half:]
    if sign > 0:
        low.sub_(x[..., half:] * sin[..., :half])
        high.add_(x[..., :half] * sin[..., half:])
    else:
        low.add_(x[..., half:] * sin[..., half:])
        high.sub_(x[..., :half] * sin[..., :half])
    return out


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos/sin: [seq, head_dim]. One dtype throughout (the
    tables are built in the dtype the projections return) takes ``_Rotate``; mixed dtypes or
    tables that need gradients take transformers' ops."""
    if x.dtype == cos.dtype == sin.dtype and not (cos.requires_grad or sin.requires_grad):
        return _Rotate.apply(x, cos, sin)
    return x * cos + _rotate_half(x) * sin


class LayerCache:
    """One attention layer's keys and values so far: [batch, kv heads, length, head_dim]."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v


class KVCache:
    """What decoding keeps between steps: every layer's keys and values, and how many positions
    they cover (where the next tokens' positions start). ``max_length``, when known, sizes the
    RoPE tables once for the whole decoding instead of once per step."""

    def __init__(self, layers: int, max_length: int | None = None) -> None:
        self.layers = [LayerCache() for _ in range(layers)]
        self.length = 0
        self.max_length = max_length


def _attention_mask(queries: int, keys: int, device: torch.device) -> torch.Tensor | None:
    """Causal mask of ``queries`` new positions after ``keys - queries`` cached ones (None for one
    new query, which sees every key)."""
    if queries == 1:
        return None
    start = keys - queries
    return torch.arange(keys, device=device)[None, :] <= (start + torch.arange(queries, device=device))[:, None]


def expands_shared_heads(q: torch.Tensor) -> bool:
    """Whether grouped-query attention copies each kv head per query head before SDPA: in fp32
    on CUDA. CUDA's flash kernels, which read shared kv heads, take 16-bit inputs only; fp32
    runs the memory-efficient kernel, which wants one kv head per query head, and SDPA would
    otherwise fall back to its math kernel, which keeps the [b, heads, s, s] scores (and their
    probabilities) for backward. The copies cost heads / kv heads times k and v; the scores, s / d
    times q, each. On the CPU the flash kernel reads shared heads in every dtype."""
    return q.is_cuda and q.dtype == torch.float32


def repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, kv heads, s, d] -> [b, heads, s, d], kv head j serving query heads j * g .. j * g + g - 1
    (g = heads / kv heads): SDPA's ``enable_gqa`` grouping, written out."""
    batch, kv_heads, seq, dim = x.shape
    return x[:, :, None].expand(batch, kv_heads, heads // kv_heads, seq, dim).reshape(batch, heads, seq, dim)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA's causal attention, q [b, heads, s, d], k and v [b, kv heads, s, d], grouped-query
    attention included (the model's and the all-to-all context parallel's)."""
    grouped = q.shape[1] > k.shape[1]
    if grouped and expands_shared_heads(q):
        k, v = repeat_heads(k, q.shape[1]), repeat_heads(v, q.shape[1])
        grouped = False
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        h, hd = config.hidden_size, config.head_dim
        self.head_dim = hd
        self.q_proj = nn.Linear(h, config.num_attention_heads * hd, bias=False, device=device)
        self.k_proj = nn.Linear(h, config.num_key_value_heads * hd, bias=False, device=device)
        self.v_proj = nn.Linear(h, config.num_key_value_heads * hd, bias=False, device=device)
        self.o_proj = nn.Linear(config.num_attention_heads * hd, h, bias=False, device=device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        x_q, x_k, x_v = shared_input(x, 3)  # autocast: one bf16 cast of x, not three
        # -1 heads: under tensor parallelism the projections hold a slice of the heads.
        q = self.q_proj(x_q).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_k).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_v).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        out = self.attend(q, k, v) if cache is None else self._attend_cached(q, k, v, cache)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of one whole sequence: q [b, heads, s, d], k and v [b, kv heads, s, d]
        -> [b, heads, s, d]. A seam: context parallelism replaces it per layer, from outside.

        Grouped-query attention (each kv head serves heads / kv heads query heads) is SDPA's own:
        the flash kernels (CUDA, and this CPU's) read the shared kv heads, so k and v are neither
        copied per query head nor kept so for backward (measured here: attention's forward and
        backward 10-20% faster than expanding them first). Except where no flash kernel runs
        (``expands_shared_heads``)."""
        return causal_attention(q, k, v)

    def _attend_cached(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """Decoding: the new positions attend to the cached ones and themselves; SDPA shares the kv
        heads (the cache is not copied). A prompt with nothing cached before it is the training
        path's causal attention (on CUDA in fp32 that keeps SDPA off its math kernel, whose
        [b, heads, s, s] scores a long prompt would otherwise hold)."""
        k, v = cache.extend(k, v)
        seq = q.shape[2]
        if k.shape[2] == seq:  # nothing cached before these positions
            return causal_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_attention_mask(seq, k.shape[2], q.device),
                                              enable_gqa=q.shape[1] > k.shape[1])


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False, device=device)
        self.up_proj = nn.Linear(h, f, bias=False, device=device)
        self.down_proj = nn.Linear(f, h, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_gate, x_up = shared_input(x, 2)  # autocast: one bf16 cast of x, not two
        return self.down_proj(F.silu(self.gate_proj(x_gate)) * self.up_proj(x_up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, device)
        self.mlp = LlamaMLP(config, device)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        # On the meta device there are no values to initialise, and the meta kernel of the
        # embedding's normal_ init would import torch._dynamo (2 s per process): skip it.
        table = torch.empty(config.vocab_size, config.hidden_size, device=device) \
            if torch.device(device or "cpu").type == "meta" else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, device=device, _weight=table)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, device) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)

    def position_tables(self, seq_len: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos/sin for a sequence of ``seq_len``, in the dtype the attention will see."""
        # Autocast leaves the embedding in fp32; build the tables in the dtype matmuls return.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return self.rotary_emb(seq_len, x.device, dtype)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if cache is None:
            cos, sin = self.position_tables(input_ids.shape[1], x)
            for layer in self.layers:
                x = layer(x, cos, sin)
            return self.norm(x)
        start, seq = cache.length, input_ids.shape[1]
        cos, sin = self.position_tables(max(start + seq, cache.max_length or 0), x)
        cos, sin = cos[start:start + seq], sin[start:start + seq]
        for layer, slot in zip(self.layers, cache.layers):
            x = layer(x, cos, sin, slot)
        cache.length += seq
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Decoder + language-model head. ``forward(input_ids) -> logits [batch, seq, vocab]``.

    ``device`` places the parameters (``"meta"``: shapes only); the RoPE tables, which are not
    parameters, are always real."""

    def __init__(self, config: LlamaConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, device)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        return self.lm_head(self.model(input_ids, cache))
