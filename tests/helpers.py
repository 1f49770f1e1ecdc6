"""Small builders shared by the tests (no processes here)."""
from __future__ import annotations

import os

import numpy as np
import torch

from plait.data import TokenData
from plait.models import get_preset
from plait.train import TrainConfig

VOCAB = 256
# The single-process tests marked as device tests run here (``make gpu-check`` sets cuda); every
# other test, and the gloo workers, run on the CPU (conftest hides GPUs from them).
TEST_DEVICE = torch.device(os.environ.get("PLAIT_TEST_DEVICE", "cpu"))


def synthetic_data(n_tokens: int = 20_000, seed: int = 0) -> TokenData:
    """A token stream with structure to learn (a noisy repeating pattern), and a held-out tail."""
    rng = np.random.default_rng(seed)
    pattern = rng.integers(0, VOCAB, size=97)
    tokens = np.resize(pattern, n_tokens)
    noise = rng.random(n_tokens) < 0.2
    tokens[noise] = rng.integers(0, VOCAB, size=int(noise.sum()))
    tokens = tokens.astype(np.uint16)
    split = int(n_tokens * 0.95)
    return TokenData(train=tokens[:split], val=tokens[split:], vocab_size=VOCAB, eos_id=None, tokenizer=None)


def tiny_config(**overrides) -> TrainConfig:
    """Equivalence-test settings: ten optimizer steps, five of warmup and five of cosine decay (a
    layout's bug shows from the first step; the suite's time goes into steps). lr 1e-3: Adam
    divides by sqrt(v), so float reassociation in the gradients of rarely seen embedding rows
    grows with the step size; at 1e-3 twenty steps stay ~2e-6 relative from one process, at 3e-3
    ~1.3e-5 (measured)."""
    base = dict(model="tiny", steps=10, global_batch=8, micro_batch=2, seq_len=32, lr=1e-3, warmup_steps=5,
                dtype="float32", eval_every=0, progress=False, tensorboard=False, plot=False, peak_tflops=1.0,
                out="unused", seed=1234)
    base.update(overrides)
    return TrainConfig(**base)


def tiny_model_config(**overrides):
    return get_preset("tiny").replace(**{"vocab_size": VOCAB, **overrides})


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (0 when both are zero)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    denominator = expected.norm()
    difference = (actual - expected).norm()
    return float(difference / denominator) if denominator > 0 else float(difference)


def train_and_collect(ctx, cfg, data, model_config):
    """Run ``cfg.steps`` training steps on this rank; return the losses, gradient norms, the full
    (tensor-parallel shards gathered) parameters this rank holds by their names in the full model
    (a tied head on a pipeline's last stage as the embedding), and the validation loss."""
    from plait.models import model_parameters
    from plait.tensor_parallel import full_tensor
    from plait.train import Trainer

    trainer = Trainer(cfg, ctx, data, model_config)
    records = [trainer.train_step(step) for step in range(cfg.steps)]
    trainer.strategy.materialize()
    tp = ctx.comm("tp")
    params = {name: full_tensor(param, tp).clone() for name, param in model_parameters(trainer.model)}
    val = trainer.evaluate() if trainer.val_windows is not None else None
    return [r["loss"] for r in records], [r["grad_norm"] for r in records], params, val


def assert_runs_match(results, reference, tolerance: float = 1e-5) -> None:
    """Every rank's ``train_and_collect`` result equals the single-process reference: each step's
    loss and gradient norm, every parameter it holds (all of them over the ranks), the
    validation loss. Relative tolerance ``tolerance`` (1e-4 on norms: clipping's reductions)."""
    ref_losses, ref_norms, ref_params, ref_val = reference
    seen = set()
    for rank, (losses, norms, params, val) in enumerate(results):
        assert len(losses) == len(ref_losses)
        for step, (got, want) in enumerate(zip(losses, ref_losses)):
            assert abs(got - want) <= tolerance * want, f"rank {rank} step {step}: {got} vs {want}"
        for got, want in zip(norms, ref_norms):  # clipping counts every element once
            assert abs(got - want) <= 1e-4 * want, f"rank {rank} grad norm {got} vs {want}"
        if ref_val is not None:
            assert abs(val - ref_val) <= tolerance * ref_val, f"rank {rank} validation {val} vs {ref_val}"
        for name, got in params.items():
            assert relative_error(got, ref_params[name]) <= tolerance, f"rank {rank} {name}"
            seen.add(name)
    assert seen == set(ref_params)  # every parameter lives on some rank, names unchanged


def block_weight_casts(trainer, run) -> dict[str, int]:
    """How often ``run()`` casts each of the trainer's (local) block matrices to bf16, by name."""
    from torch.utils._python_dispatch import TorchDispatchMode

    weights = {p.data_ptr(): name for name, p in trainer.model.named_parameters() if p.dim() == 2 and ".layers." in name}
    casts: dict[str, int] = {}

    class CountWeightCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
                name = weights.get(args[0].data_ptr())
                if name is not None:
                    casts[name] = casts.get(name, 0) + 1
            return func(*args, **kwargs)

    with CountWeightCasts():
        run()
    return casts
