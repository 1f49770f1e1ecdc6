"""The planner: published results reproduced, the cost model checked against plait itself,
search rejections, and the commands' output. Pure Python except one pool job."""
from __future__ import annotations

import json

import pytest
import torch

from plait.cli import main
from plait.models import get_preset
from plait.models.llama import LlamaModel
from plait.pipeline.schedules import analytic_bubble
from plait.planner import Layout, LayoutRejected, ModelShape, load_profile, plan, predict
from plait.planner.calibrate import fit
from plait.planner.memory import layer_activation_bytes, model_state_bytes
from plait.planner.network import collective_time

# Narayanan et al. 2021, Table 1: (billions of parameters, heads, hidden, layers, tp, pp, GPUs,
# global batch, achieved TFLOP/s per GPU). A100-80GB, vocabulary 51,200, sequence 2048.
NARAYANAN_2021_TABLE_1 = [
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163),
]


def simulate_json(args: list[str], capsys) -> dict:
    assert main(["simulate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def megatron_flags(hidden, heads, layers, tp, pp, gpus, batch) -> list[str]:
    """The paper's setup: full recomputation, fp16, micro-batch 1, and for pipelines the
    interleaved schedule with the fewest chunks (>= 2) that divide each stage's layers."""
    flags = ["--arch", "gpt", "--hidden", str(hidden), "--layers", str(layers), "--heads", str(heads),
             "--vocab", "51200", "--seq-len", "2048", "--tp", str(tp), "--pp", str(pp),
             "--dp", str(gpus // (tp * pp)), "--global-batch", str(batch), "--gpu", "a100-80gb",
             "--recompute", "full", "--dtype", "float16", "--no-loss-parallel"]
    if pp > 1:
        per_stage = layers // pp
        chunks = next((v for v in range(2, per_stage + 1) if per_stage % v == 0), 1)
        if chunks > 1:
            flags += ["--schedule", "interleaved", "--virtual-stages", str(chunks)]
    return flags


@pytest.mark.parametrize("row", NARAYANAN_2021_TABLE_1, ids=lambda row: f"{row[0]}B")
def test_reproduces_narayanan_2021_table_1_within_15_percent(row, capsys):
    billions, heads, hidden, layers, tp, pp, gpus, batch, achieved = row
    result = simulate_json(megatron_flags(hidden, heads, layers, tp, pp, gpus, batch), capsys)
    shape = ModelShape.gpt(hidden, layers, heads, 51200, 2048)
    assert abs(shape.parameters() / 1e9 - billions) / billions < 0.05  # the same models (paper rounds)
    assert result["tflops_per_gpu"] == pytest.approx(achieved, rel=0.15)
    assert result["memory_gb_per_gpu"] < 80  # the paper ran them on 80 GB devices
    # the reported basis is Eq. 3 over the predicted step
    eq3 = shape.megatron_flops(batch, recompute=True)
    assert result["tflops_per_gpu"] == pytest.approx(eq3 / result["step_time_s"] / gpus / 1e12, rel=1e-9)


def test_activation_formula_matches_what_plait_saves():
    """Bytes one decoder layer keeps for backward, counted by saved_tensors_hooks, equal the
    planner's formula (plus, under autocast, the bf16 weight copies it charges separately)."""
    config = get_preset("small").replace(hidden_size=256, intermediate_size=704, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=1, head_dim=None)
    batch, seq = 2, 64
    shape = ModelShape.from_llama_config(config, seq)
    # (dtype, ZeRO level): fp32; bf16 autocast over fp32 parameters; bf16 parameters as ZeRO keeps
    # them, with a bf16 residual stream
    for dtype, zero in (("float32", 0), ("bfloat16", 0), ("bfloat16", 1)):
        model = LlamaModel(config).to(torch.bfloat16 if zero else torch.float32)
        layer = model.layers[0]
        parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        x = torch.randn(batch, seq, config.hidden_size, requires_grad=True, dtype=next(model.parameters()).dtype)
        cos, sin = model.position_tables(seq, x)
        tables = {cos.untyped_storage().data_ptr(), sin.untyped_storage().data_ptr()}
        kept: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameter_storages | tables:
                kept[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                layer(x, cos, sin)
        predicted = layer_activation_bytes(shape, Layout(dp=2, micro_batch=batch, global_batch=2 * batch, dtype=dtype,
                                                         zero=zero))
        if dtype == "bfloat16" and zero == 0:
            norms = 2 * config.hidden_size
            predicted += 2 * (shape.layer_parameters() - norms)  # autocast's weight copies
        assert sum(kept.values()) == pytest.approx(predicted, rel=0.01), (dtype, zero)


class _ElementwiseBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes the non-GEMM, non-attention kernels read and write: every tensor argument and
    result of each op that computes (views and matmuls left out)."""

    LEFT_OUT = {"mm", "addmm", "bmm", "t", "view", "_unsafe_view", "transpose", "expand", "slice", "select",
                "unsqueeze", "permute", "as_strided", "detach", "alias", "split", "reshape", "squeeze", "empty",
                "empty_like", "_scaled_dot_product_flash_attention_for_cpu",
                "_scaled_dot_product_flash_attention_for_cpu_backward"}

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ not in self.LEFT_OUT:
            leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
            self.nbytes += sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor)
                               and t.numel() > 1)
        return out


@pytest.mark.parametrize("dtype, zero", [("float32", 0), ("bfloat16", 0), ("bfloat16", 1)])
def test_elementwise_traffic_matches_what_a_layer_moves(dtype, zero):
    """The bytes of a decoder layer's elementwise kernels (norms, RoPE, SwiGLU's products,
    residual adds, autocast's input casts, and all their gradients), counted op by op by a
    dispatch mode on this CPU, equal the planner's ``llama_elementwise`` forward and backward
    (eager norms: the CPU's), fp32, bf16 autocast, and bf16 parameters as ZeRO keeps them.
    Under autocast the weights' casts (once a step) and their gradients' casts are counted
    apart (``weight_casts``)."""
    from plait.planner.compute import llama_elementwise

    config = get_preset("small").replace(hidden_size=256, intermediate_size=704, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=1, head_dim=None)
    batch, seq = 2, 64
    model = LlamaModel(config).to(torch.bfloat16 if zero else torch.float32)
    layer = model.layers[0]
    x = torch.randn(batch, seq, config.hidden_size, dtype=next(model.parameters()).dtype, requires_grad=True)
    autocast = dtype == "bfloat16" and zero == 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        cos, sin = model.position_tables(seq, x)
        forward = _ElementwiseBytes()
        with forward:
            y = layer(x, cos, sin)
    grad = torch.randn_like(y)
    backward = _ElementwiseBytes()
    with backward:
        y.backward(grad)
    shape = ModelShape.from_llama_config(config, seq)
    parts = llama_elementwise(False, shape, Layout(micro_batch=batch, global_batch=batch, dtype=dtype, zero=zero))
    weight_casts = 6 * (shape.layer_parameters() - 2 * config.hidden_size) if autocast else 0  # read 4, write 2
    assert forward.nbytes - weight_casts == pytest.approx(sum(p.forward_bytes for p in parts), rel=0.02)
    assert backward.nbytes - weight_casts == pytest.approx(sum(p.backward_bytes for p in parts), rel=0.02)


def test_activation_formula_counts_kv_heads_copied_for_cuda_fp32(monkeypatch):
    """In fp32 on CUDA SDPA's k and v are copies per query head (``expands_shared_heads``): the
    layer keeps 2 (h - kv) fp32 more a token, measured here with the copies forced on the CPU,
    and the planner's CUDA formula charges exactly that beyond its fused norms' difference."""
    import plait.models.llama as llama

    config = get_preset("small").replace(hidden_size=256, intermediate_size=704, num_attention_heads=8,
                                         num_key_value_heads=2, num_hidden_layers=1, head_dim=None)
    batch, seq = 2, 64
    layer = LlamaModel(config).layers[0]
    x = torch.randn(batch, seq, config.hidden_size, requires_grad=True)
    cos, sin = LlamaModel(config).position_tables(seq, x)

    def kept_bytes(expand: bool) -> int:
        monkeypatch.setattr(llama, "expands_shared_heads", lambda _q: expand)
        kept: dict[int, int] = {}

        def pack(tensor):
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            layer(x, cos, sin)
        return sum(kept.values())

    tokens, h, kv = batch * seq, config.hidden_size, config.num_key_value_heads * config.head_dim
    copies = 2 * (h - kv) * 4 * tokens
    assert kept_bytes(True) - kept_bytes(False) == copies
    shape, layout = ModelShape.from_llama_config(config, seq), Layout(micro_batch=batch, global_batch=batch, dtype="float32")
    fused_norms = 2 * (4 - 4 * h) * tokens  # two norms keep 1/rms instead of the normalised value
    assert layer_activation_bytes(shape, layout, cuda=True) - layer_activation_bytes(shape, layout) == copies + fused_norms


def test_model_states_match_plait_zero(pool, data, model_config):
    """The planner's model-state bytes per rank equal what plait's ZeRO holds (dp=2) between
    the last backward and the step, fp32 and bf16, one micro-batch per rank and two."""
    results = pool.run(_zero_state_bytes, _dims(dp=2), data, model_config, timeout_s=120)
    for zero, dtype, micro, measured, params in results[0]:
        predicted = model_state_bytes(params, Layout(dp=2, zero=zero, dtype=dtype, micro_batch=micro,
                                                     global_batch=4))
        assert sum(measured.values()) == pytest.approx(sum(predicted.values()), rel=0.01), zero


def _dims(**sizes):
    from plait.mesh import ParallelDims
    return ParallelDims(**{"dp": 1, "pp": 1, "tp": 1, **sizes})


def _zero_state_bytes(ctx, data, model_config):
    from helpers import tiny_config
    from plait.train import Trainer

    out = []
    for zero, dtype, micro in [(z, d, m) for z in (1, 2, 3) for d in ("float32", "bfloat16") for m in (1, 2)]:
        cfg = tiny_config(dp=2, zero=zero, steps=2, dtype=dtype, global_batch=4, micro_batch=micro)
        trainer = Trainer(cfg, ctx, data, model_config)
        trainer.train_step(0)  # AdamW's moments exist from the first step on
        trainer.compute_gradients(1)  # the peak: gradient shards exist from their reduction to the step
        params = sum(p.numel() for p in trainer.model.parameters())
        out.append((zero, dtype, micro, trainer.strategy.state_bytes(), params))
    return out


def test_pipeline_time_comes_from_the_schedule_simulation():
    shape = ModelShape.from_llama_config(get_preset("llama3-8b"), 4096)
    hw = load_profile("h100-80gb")
    base = Layout(dp=1, tp=8, pp=4, micro_batch=1, global_batch=8, sequence_parallel=True, loss_parallel=True)
    exact = predict(shape, base, hw)
    closed_form = analytic_bubble("1f1b", 4, 8)
    assert exact.bubble_fraction == pytest.approx(closed_form, abs=0.05)
    interleaved = predict(shape, base.with_(schedule="interleaved", virtual_stages=2), hw)
    gpipe = predict(shape, base.with_(schedule="gpipe"), hw)
    assert interleaved.bubble_fraction < exact.bubble_fraction
    assert gpipe.memory_breakdown["activations"] > exact.memory_breakdown["activations"]  # m vs p in flight


def test_pipeline_split_is_plaits_own():
    from plait.pipeline.stage import plan_chunks
    from plait.planner.simulator import chunk_layer_counts

    for preset, pp, v in (("small", 2, 1), ("llama3-8b", 4, 2), ("llama3-405b", 16, 2)):
        config = get_preset(preset)
        expected = [len(chunk.layers) for chunk in plan_chunks(config, pp, v, 2048)]
        assert chunk_layer_counts(ModelShape.from_llama_config(config, 2048), pp * v) == expected, preset


def test_model_effects_point_the_right_way():
    shape = ModelShape.from_llama_config(get_preset("llama3-8b"), 4096)
    hw = load_profile("h100-80gb")
    base = Layout(dp=8, micro_batch=1, global_batch=64)
    z0, z1, z3 = (predict(shape, base.with_(zero=z), hw) for z in (0, 1, 3))
    assert z0.memory_bytes_per_gpu > z1.memory_bytes_per_gpu > z3.memory_bytes_per_gpu
    tp = Layout(tp=8, micro_batch=1, global_batch=8, loss_parallel=True)
    plain, sp = predict(shape, tp, hw), predict(shape, tp.with_(sequence_parallel=True), hw)
    assert sp.memory_breakdown["activations"] < plain.memory_breakdown["activations"]
    recompute = predict(shape, tp.with_(recompute="full"), hw)
    assert recompute.memory_breakdown["activations"] < plain.memory_breakdown["activations"]
    assert recompute.step_time_s > plain.step_time_s
    # the same collective is slower across nodes than inside one
    assert collective_time(hw, "all_reduce", 1e9, 16, 1) > collective_time(hw, "all_reduce", 1e9, 8, 8)


def test_plan_reports_rejections_with_reasons():
    shape = ModelShape("llama", 768, 12, 12, 12, 2048, 32000, 1024)
    result = plan(shape, load_profile("a100-40gb"), gpus=24, global_batch=36)
    reasons = " | ".join(result.examples.values())
    assert "tp=8 does not divide the model's num_attention_heads = 12" in reasons
    assert "not divisible by dp" in reasons
    assert result.best and all(p.fits for p in result.best)
    times = [p.step_time_s for p in result.best]
    assert times == sorted(times)
    big = plan(ModelShape.from_llama_config(get_preset("llama3-70b"), 4096), load_profile("a100-40gb"),
               gpus=8, global_batch=8)
    assert not big.best and "out of memory" in big.rejections


def test_the_plan_does_not_depend_on_the_number_of_workers():
    """Layout families priced in two spawned processes give the one-process answer: the same best
    layouts and times, rejection counts, first examples and number considered."""
    shape = ModelShape("llama", 768, 12, 12, 4, 2048, 32000, 1024)
    one = plan(shape, load_profile("a100-40gb"), gpus=16, global_batch=32)
    two = plan(shape, load_profile("a100-40gb"), gpus=16, global_batch=32, workers=2)
    assert [(p.layout, p.step_time_s) for p in two.best] == [(p.layout, p.step_time_s) for p in one.best]
    for got, want in ((two.rejections, one.rejections), (two.examples, one.examples)):
        assert list(got.items()) == list(want.items())  # in the order the report prints ties
    assert two.considered == one.considered
    assert len(one.best) == 5 and len(one.rejections) > 1


def test_cli_simulate_json_keys_and_one_line_errors(capsys):
    result = simulate_json(["--model", "llama3-8b", "--seq-len", "8192", "--global-batch", "32", "--tp", "8",
                            "--dp", "1", "--sequence-parallel", "--gpu", "h100"], capsys)
    for key in ("tflops_per_gpu", "tokens_per_s_per_gpu", "step_time_s", "memory_gb_per_gpu", "mfu"):
        assert result[key] > 0
    assert 0 < result["mfu"] < 1
    assert main(["simulate", "--model", "llama3-8b", "--seq-len", "8192", "--global-batch", "8",
                 "--tp", "3"]) == 2
    error = capsys.readouterr().err
    assert error.strip() == "plait: error: tp=3 does not divide the model's num_attention_heads = 32"
    assert main(["simulate", "--hidden", "512", "--seq-len", "128", "--global-batch", "8"]) == 2
    assert "missing --layers, --heads, --vocab" in capsys.readouterr().err
    assert main(["plan", "--model", "llama3-8b", "--gpus", "8", "--seq-len", "4096", "--global-batch", "32",
                 "--gpu", "tpu-v9"]) == 2
    assert "unknown hardware 'tpu-v9'" in capsys.readouterr().err


def test_cli_plan_json(capsys):
    assert main(["plan", "--model", "llama3-8b", "--gpus", "8", "--seq-len", "4096", "--global-batch", "32",
                 "--gpu", "h100-80gb", "--json", "--top", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["best"]) == 3 and result["rejected"]
    best = result["best"][0]
    assert best["memory_gb_per_gpu"] <= 80 and best["layout"]["dp"] * best["layout"]["tp"] * best["layout"]["pp"] == 8


def test_calibration_fit_recovers_latency_and_bandwidth():
    latency, bandwidth = 3e-4, 2e9
    points = [(size, latency + 0.5 * size / bandwidth) for size in (1 << 14, 1 << 18, 1 << 22, 1 << 24)]
    fitted = fit(points, 0.5)
    assert fitted.latency_s == pytest.approx(latency, rel=1e-6)
    assert fitted.bandwidth == pytest.approx(bandwidth, rel=1e-6)


def test_calibration_fit_leaves_out_collectives_measured_as_free():
    """A size that noise read as free (recorded at the floor) would, weighted 1/t^2, decide the
    fit alone (2026-12-08: an all-gather fitted at 4 TB/s); it is left out."""
    from plait.planner.calibrate import FLOOR_S

    latency, bandwidth = 3e-4, 2e9
    sizes = (1 << 14, 1 << 18, 1 << 20, 1 << 22, 1 << 24)
    points = [(size, FLOOR_S if size == 1 << 20 else latency + 0.5 * size / bandwidth) for size in sizes]
    fitted = fit(points, 0.5)
    assert fitted.latency_s == pytest.approx(latency, rel=1e-6)
    assert fitted.bandwidth == pytest.approx(bandwidth, rel=1e-6)
    assert len(fitted.points) == len(sizes)  # kept in the profile, as measured


def test_rejected_layout_raises():
    shape = ModelShape.from_llama_config(get_preset("tiny"), 64)
    with pytest.raises(LayoutRejected, match="--pp 2 needs at least 2 micro-batches per step, got 1"):
        predict(shape, Layout(dp=2, pp=2, zero=2, global_batch=8, micro_batch=4), load_profile("a100-80gb"))


# torchtitan's published FSDP2 throughput on 64 A100-80GB (docs/performance.md of pytorch/torchtitan,
# commit 0413364): (preset, sequence, local batch, recomputation, tokens/s per GPU)
TORCHTITAN_A100 = [("llama3-8b", 8192, 1, "selective", 2973), ("llama3-70b", 8192, 1, "full", 331),
                   ("llama2-13b", 4096, 2, "none", 2162), ("llama2-13b", 4096, 2, "selective", 1904),
                   ("llama2-70b", 4096, 2, "full", 353)]


@pytest.mark.parametrize("preset, seq, batch, recompute, published", TORCHTITAN_A100)
def test_zero3_predictions_match_published_fsdp_throughput(preset, seq, batch, recompute, published):
    """ZeRO-3 over 64 A100s, as FSDP2 runs Llama 2 / 3 in torchtitan: at most 25% above what it
    reports and at most 15% below. The model charges no stragglers or allocator stalls, and
    plait's step has less to do than FSDP2's (the fused loss; bf16 parameters cast nothing),
    so it may lean high; 1.06-1.20 (docs/planner.md)."""
    shape = ModelShape.from_llama_config(get_preset(preset), seq)
    layout = Layout(dp=64, zero=3, micro_batch=batch, global_batch=64 * batch, recompute=recompute)
    predicted = predict(shape, layout, load_profile("a100-80gb")).tokens_per_s_per_gpu
    assert 0.85 <= predicted / published <= 1.25, predicted / published


def test_plan_proposes_context_parallel_for_long_sequences():
    """At 128k tokens per sequence no rank can keep a whole sequence's activations: the best
    layouts shard the sequence (and training accepts them: the search uses plait's rules)."""
    shape = ModelShape.from_llama_config(get_preset("llama-1b"), 131072)
    result = plan(shape, load_profile("h100-80gb"), gpus=64, global_batch=16, top=3)
    assert result.best and all(p.layout.cp > 1 for p in result.best)
    whole = predict(shape, result.best[0].layout.with_(cp=1), load_profile("h100-80gb"))
    assert not whole.fits  # the same layout with whole sequences per rank runs out of memory


@pytest.mark.parametrize("seq, gpus, hsdp_wins", [(2048, 2048, True), (4096, 2048, True), (8192, 512, False)])
def test_hybrid_sharding_against_zero3_at_scale(seq, gpus, hsdp_wins):
    """ZeRO-3 over thousands of ranks pays n - 1 ring steps per all-gather and reduce-scatter of
    every block; sharding inside a node pays them over 8 and all-reduces the shard across nodes.
    Llama 3 8B: HSDP wins where a block's compute no longer hides the latency (docs/planner.md)."""
    shape = ModelShape("llama", 4096, 32, 32, 8, 14336, 128256, seq)
    base = Layout(dp=gpus, global_batch=gpus, micro_batch=1, zero=3, recompute="selective")
    zero3 = predict(shape, base, load_profile("h100-80gb"))
    hsdp = predict(shape, base.with_(dp_shard=8), load_profile("h100-80gb"))
    assert (hsdp.step_time_s < zero3.step_time_s) == hsdp_wins
    assert hsdp.memory_bytes_per_gpu > zero3.memory_bytes_per_gpu  # states over 8 ranks, not all


def test_megatron_flops_without_recomputation_equal_the_model_flops():
    """Eq. 3 without recomputation, 72 B s l h^2 (1 + s/6h + V/12lh), is 6 per matmul parameter plus
    attention for Megatron's GPT: the logit layer keeps its 6 B s h V (it was counted at 16 instead of 12)."""
    from plait.planner.workload import ModelShape

    shape = ModelShape.gpt(2304, 24, 24, 51200, 2048)
    assert shape.megatron_flops(8, recompute=False) == pytest.approx(8 * 2048 * shape.model_flops_per_token(), rel=1e-12)
    logits = 6 * 8 * 2048 * 2304 * 51200
    layers_forward = (shape.megatron_flops(8, recompute=False) - logits) / 3
    assert shape.megatron_flops(8, recompute=True) == pytest.approx(4 * layers_forward + logits, rel=1e-12)


@pytest.mark.timeout(180)
def test_calibrate_measures_this_machine_and_prices_every_collective(tmp_path, monkeypatch, capsys):
    """`plait calibrate` end to end (short measurements, small messages), then a layout whose
    collectives include one it does not time (all-to-all, priced as a reduce-scatter)."""
    import json

    import plait.planner.calibrate
    from plait.cli import main

    monkeypatch.setattr(plait.planner.calibrate, "SIZES", [1 << 14, 1 << 16, 1 << 18])
    profile = tmp_path / "cpu.json"
    assert main(["calibrate", "--seconds", "0.05", "--output", str(profile)]) == 0
    written = json.loads(profile.read_text())
    assert set(written["collectives"]) == {"all_reduce", "all_gather", "reduce_scatter", "send"}
    assert all(rate > 0 for rate in written["measured_flops"].values())
    capsys.readouterr()
    assert main(["simulate", "--model", "small", "--gpu", str(profile), "--dp", "2", "--cp", "2", "--cp-mode",
                 "alltoall", "--zero", "2", "--seq-len", "256", "--global-batch", "8", "--json"]) == 0
    prediction = json.loads(capsys.readouterr().out)
    assert prediction["step_time_s"] > 0 and prediction["memory_gb_per_gpu"] > 0


def test_gpu_profiles_price_fp32_products_at_the_fp32_rate_plait_runs_them_at():
    """plait leaves PyTorch's fp32 products IEEE fp32 on CUDA, not TF32 (the device test of
    fp32 steps against the CPU holds them to 1e-5): the GPU profiles' fp32 rate is the datasheet's
    FP32, an eighth or less of TF32's, so an fp32 layout is not predicted 7x faster than it runs."""
    for name, fp32_tflops in (("a100-80gb", 19.5), ("h100-80gb", 67), ("h200", 67)):
        hardware = load_profile(name)
        assert hardware.peak("float32") == fp32_tflops * 1e12 and hardware.peak("bfloat16") > 14 * hardware.peak("float32")

