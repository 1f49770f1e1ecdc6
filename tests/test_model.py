"""The model: Hugging Face equivalence, layout-invariant init, presets."""
from __future__ import annotations

import pytest
import torch
import transformers

from plait.models import PRESETS, ConfigError, LlamaConfig, build_model, get_preset, initial_value
from helpers import TEST_DEVICE, relative_error, tiny_model_config


def hf_model_from(config: LlamaConfig) -> transformers.LlamaForCausalLM:
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_word_embeddings, attention_bias=False, mlp_bias=False)
    hf_config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(hf_config).eval()


@pytest.mark.parametrize("tied, kv_heads", [(False, 4), (True, 2), (False, 8)])
def test_logits_match_transformers(tied, kv_heads):
    config = tiny_model_config(tie_word_embeddings=tied, num_key_value_heads=kv_heads)
    ours = build_model(config, seed=7).eval()
    theirs = hf_model_from(config)
    result = theirs.load_state_dict(ours.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    ours, theirs = ours.to(TEST_DEVICE), theirs.to(TEST_DEVICE)  # PLAIT_TEST_DEVICE=cuda: make gpu-check
    if tied:
        assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()
    input_ids = torch.randint(0, config.vocab_size, (3, 45), generator=torch.Generator().manual_seed(0))
    input_ids = input_ids.to(TEST_DEVICE)
    with torch.no_grad():
        expected = theirs(input_ids).logits
        actual = ours(input_ids)
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-5), (actual - expected).abs().max()


def test_init_depends_on_seed_and_name_only():
    config = tiny_model_config()
    a = build_model(config, seed=3).state_dict()
    b = build_model(config, seed=3).state_dict()
    c = build_model(config, seed=4).state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    changed = [n for n in a if not n.endswith("norm.weight")]
    assert all(not torch.equal(a[n], c[n]) for n in changed)
    # A slice of a parameter is the same slice of the full initial value, whatever the layout.
    full = initial_value("model.layers.1.self_attn.q_proj.weight", (128, 128), config, seed=3)
    assert torch.equal(full, a["model.layers.1.self_attn.q_proj.weight"])
    # Different parameters of equal shape get different values.
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], a["model.layers.1.self_attn.q_proj.weight"])


def test_residual_outputs_are_scaled():
    config = tiny_model_config()
    state = build_model(config, seed=0).state_dict()
    q_std = state["model.layers.0.self_attn.q_proj.weight"].std()
    o_std = state["model.layers.0.self_attn.o_proj.weight"].std()
    expected_ratio = (2 * config.num_hidden_layers) ** 0.5
    assert abs(float(q_std / o_std) - expected_ratio) < 0.1 * expected_ratio


def test_presets():
    tiny = get_preset("tiny")
    n_tiny = tiny.num_parameters()
    assert 0.5e6 < n_tiny < 2e6 and tiny.num_hidden_layers >= 4
    for tp in (2, 4):
        assert tiny.num_attention_heads % tp == 0 and tiny.num_key_value_heads % tp == 0
        assert tiny.intermediate_size % tp == 0
    assert 15e6 < get_preset("small").num_parameters() < 25e6
    # The analytic count equals the instantiated model's.
    for name in ("tiny", "small"):
        model = build_model(get_preset(name).replace(tie_word_embeddings=True), seed=0)
        assert sum(p.numel() for p in model.parameters()) == get_preset(name).replace(
            tie_word_embeddings=True).num_parameters()
    # Published sizes of the planner-only shapes (billions, 2 decimals).
    published = {"llama2-7b": 6.74, "llama2-13b": 13.02, "llama2-70b": 68.98, "llama3-8b": 8.03,
                 "llama3-70b": 70.55, "llama3-405b": 405.85}
    for name, billions in published.items():
        assert abs(PRESETS[name].num_parameters() / 1e9 - billions) < 0.01, name
    with pytest.raises(ConfigError, match="unknown model preset 'nope'"):
        get_preset("nope")
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        LlamaConfig(num_attention_heads=6, num_key_value_heads=4)


def test_gradients_flow_to_every_parameter():
    config = tiny_model_config()
    model = build_model(config, seed=0)
    input_ids = torch.randint(0, config.vocab_size, (2, 16))
    model(input_ids).float().logsumexp(-1).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    reference = relative_error(model(input_ids), model(input_ids))
    assert reference == 0.0  # deterministic forward


def test_rms_norm_equals_torchs_own_on_the_cpu_and_on_the_test_device():
    """RMSNorm's eager ops against torch's ``F.rms_norm`` (values, input and weight gradients,
    fp32); under PLAIT_TEST_DEVICE=cuda (make gpu-check) also the module on the GPU, where it
    runs torch's fused kernel, against the same module's eager ops on the CPU."""
    from plait.models.llama import RMSNorm

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 45, 64, generator=generator) * 3
    weight = torch.rand(64, generator=generator) + 0.5
    grad = torch.randn(3, 45, 64, generator=generator)

    def run(device, torch_own: bool):
        leaf = x.to(device).requires_grad_()
        if torch_own:
            w = weight.to(device).requires_grad_()
            out = torch.nn.functional.rms_norm(leaf, (64,), w, 1e-5)
        else:
            norm = RMSNorm(64, eps=1e-5, device=device)
            with torch.no_grad():
                norm.weight.copy_(weight)
            w, out = norm.weight, norm(leaf)
        out.backward(grad.to(device))
        return [t.detach().cpu() for t in (out, leaf.grad, w.grad)]

    # two fp32 orders of the same sums differ by ~1e-7 here (each ~6e-8 from float64); a wrong
    # formula is off by 1e-2 or more
    ours = run("cpu", torch_own=False)
    for theirs in (run("cpu", torch_own=True), run(TEST_DEVICE, torch_own=False)):
        for a, b in zip(ours, theirs):
            assert relative_error(a, b) < 1e-5


@pytest.mark.parametrize("uses", [2, 3])
def test_one_shared_autocast_cast_equals_a_cast_per_matmul(uses):
    """Under bf16 autocast over an fp32 input, q/k/v (and gate/up) share one cast of it
    (``models.mixed_precision``): the outputs and weight gradients are the same bits as autocast's
    cast per matmul, the input's gradient the same fp32 sum of the consumers' bf16 gradients up to
    its order; and the layer keeps one bf16 copy of the input instead of ``uses``."""
    from plait.models.mixed_precision import shared_input

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 45, 64, generator=generator).to(TEST_DEVICE)
    weights = [(torch.randn(48, 64, generator=generator) / 8).to(TEST_DEVICE) for _ in range(uses)]
    grads = [torch.randn(2, 45, 48, generator=generator).to(TEST_DEVICE) for _ in range(uses)]

    def run(shared: bool):
        leaf = x.clone().requires_grad_()
        ws = [w.clone().requires_grad_() for w in weights]
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            with torch.autocast(TEST_DEVICE.type, dtype=torch.bfloat16):
                normalised = leaf * 1.5  # not a leaf: autocast caches casts of leaves only
                inputs = shared_input(normalised, uses) if shared else (normalised,) * uses
                outs = [torch.nn.functional.linear(a, w) for a, w in zip(inputs, ws)]
        torch.autograd.backward(outs, [g.bfloat16() for g in grads])
        copies = {t.untyped_storage().data_ptr() for t in kept if t.dtype == torch.bfloat16 and t.numel() == x.numel()}
        return outs, leaf.grad, [w.grad for w in ws], len(copies)

    outs, grad_x, grad_w, copies = run(shared=True)
    ref_outs, ref_grad_x, ref_grad_w, ref_copies = run(shared=False)
    assert all(a.dtype == torch.bfloat16 and torch.equal(a, b) for a, b in zip(outs, ref_outs))
    assert all(torch.equal(a, b) for a, b in zip(grad_w, ref_grad_w))
    assert grad_x.dtype == torch.float32 and relative_error(grad_x, ref_grad_x) < 1e-6
    assert (copies, ref_copies) == (1, uses)


def test_shared_input_without_autocast_or_gradients():
    """Without autocast, or when x already has the autocast dtype, every matmul gets x itself;
    without gradients (decoding) one plain cast serves them all."""
    from plait.models.mixed_precision import shared_input

    x = torch.randn(4, 8, requires_grad=True) * 2
    assert all(a is x for a in shared_input(x, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = x.bfloat16()
        assert all(a is half for a in shared_input(half, 2))
        with torch.no_grad():
            cast = shared_input(x, 2)
    assert cast[0] is cast[1] and cast[0].dtype == torch.bfloat16 and torch.equal(cast[0], x.detach().bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_equals_transformers_bit_for_bit(dtype):
    """``apply_rotary`` (per-half in-place updates, its own backward) against transformers'
    ``apply_rotary_pos_emb`` on q and k laid out as the model lays them ([b, s, heads, d] in
    memory, seen as [b, heads, s, d]): the same bits forward and in the input's gradient, in fp32
    and bf16, with tables of the llama3-scaled and plain kinds; the output keeps the layout."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from plait.models.config import RopeScaling, RopeType
    from plait.models.llama import RotaryEmbedding, apply_rotary

    generator = torch.Generator().manual_seed(0)
    batch, seq, heads, kv_heads, head_dim = 2, 37, 4, 2, 16
    scaling = RopeScaling(RopeType.LLAMA3, 8.0, 1.0, 4.0, 16)
    for rope in (RotaryEmbedding(head_dim, 10000.0), RotaryEmbedding(head_dim, 500000.0, scaling)):
        cos, sin = rope(seq, TEST_DEVICE, dtype)
        q = torch.randn(batch, seq, heads, head_dim, generator=generator).to(TEST_DEVICE, dtype).transpose(1, 2)
        k = torch.randn(batch, seq, kv_heads, head_dim, generator=generator).to(TEST_DEVICE, dtype).transpose(1, 2)
        grads = [torch.randn(t.shape, generator=generator).to(TEST_DEVICE, dtype) for t in (q, k)]

        def run(ours: bool):
            leaves = [t.detach().requires_grad_() for t in (q, k)]
            if ours:
                outs = [apply_rotary(t, cos, sin) for t in leaves]
            else:
                outs = list(apply_rotary_pos_emb(*leaves, cos[None], sin[None]))
            torch.autograd.backward(outs, grads)
            return outs, [t.grad for t in leaves]

        (outs, grads_in), (ref_outs, ref_grads_in) = run(ours=True), run(ours=False)
        for a, b in zip(outs + grads_in, ref_outs + ref_grads_in):
            assert a.dtype == dtype and torch.equal(a, b)
        assert outs[0].transpose(1, 2).is_contiguous()
        assert not torch.equal(outs[0], q)  # the rotation did something


def test_expanded_kv_heads_give_sdpas_grouped_attention(monkeypatch):
    """Where the kv heads are copied per query head (fp32 on CUDA: ``expands_shared_heads``),
    attention's output and the q, k, v gradients equal SDPA's own grouping of the shared heads
    (forced here on the test device, fp32)."""
    import plait.models.llama as llama

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, 33, 16, generator=generator).to(TEST_DEVICE) for heads in (8, 2, 2))
    grad = torch.randn(2, 8, 33, 16, generator=generator).to(TEST_DEVICE)
    attention = llama.LlamaAttention(tiny_model_config(), device=TEST_DEVICE)

    def run(expand: bool):
        monkeypatch.setattr(llama, "expands_shared_heads", lambda _q: expand)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention.attend(*leaves)
        out.backward(grad)
        return [out.detach(), *(t.grad for t in leaves)]

    expanded, grouped = run(True), run(False)
    # two fp32 kernels on CUDA (memory-efficient against math) differ in summation order; a wrong
    # head mapping is off by O(1)
    for a, b in zip(expanded, grouped):
        assert a.shape == b.shape and relative_error(a, b) < 1e-5
    assert llama.repeat_heads(k, 8)[:, 3].equal(k[:, 0]) and llama.repeat_heads(k, 8)[:, 4].equal(k[:, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_runs_without_sdpas_math_kernel(dtype):
    """Grouped-query attention, forward and backward, and a decoded prompt's first pass, with
    SDPA's math kernel (which keeps the [b, heads, s, s] scores) ruled out: on the CPU the flash kernel reads shared heads in both
    dtypes; on CUDA (make gpu-check) bf16 takes flash and fp32 the memory-efficient kernel over
    copied heads. SDPA raises where only the math kernel would do."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from plait.models.llama import LayerCache, LlamaAttention

    attention = LlamaAttention(tiny_model_config(), device=TEST_DEVICE)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, 64, 16, generator=generator).to(TEST_DEVICE, dtype).requires_grad_()
               for heads in (8, 2, 2))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        out = attention.attend(q, k, v)
        out.float().square().sum().backward()
        with torch.no_grad():  # a prompt's first pass when decoding: nothing cached before it
            prompt = attention._attend_cached(q.detach(), k.detach(), v.detach(), LayerCache())
    assert out.shape == q.shape and all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.equal(prompt, out.detach())
