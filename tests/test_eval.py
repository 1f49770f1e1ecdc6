"""plait eval: the mean token loss of a model on a corpus equals transformers' loss on the same
tokens (fp32, 1e-4): the command on one process, and evaluate_corpus under tensor, data and
pipeline parallel layouts with ZeRO (the command's workers run the same function)."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_tokenizers import llama_like_tokenizer, text_corpus  # noqa: E402

from plait.data.hf_tokenizer import PretrainedTokenizer  # noqa: E402
from plait.mesh import ParallelDims  # noqa: E402

SEQ, BATCH = 32, 4


@pytest.fixture(scope="module")
def model_and_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(21)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1))
    model.save_pretrained(root / "model")
    llama_like_tokenizer(root / "model")
    return root / "model", text_corpus(root / "corpus")


def transformers_loss(model_dir, corpus) -> float:
    """Cross-entropy of every predicted token of the corpus's windows, by transformers."""
    tokenizer = PretrainedTokenizer(model_dir)
    texts = [path.read_text() for path in sorted(corpus.iterdir())]
    stream = np.array([t for ids in tokenizer.encode_documents(texts) for t in ids])
    windows = (len(stream) - 1) // SEQ  # every window, as plait eval under any layout
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(windows):
            window = torch.from_numpy(stream[i * SEQ:(i + 1) * SEQ + 1]).long()[None]
            logits = model(window[:, :-1]).logits
            total += float(torch.nn.functional.cross_entropy(logits[0].double(), window[0, 1:], reduction="sum"))
            count += SEQ
    return total / count


def plait_eval(model_dir, corpus, tmp_path, *layout):
    env = {**os.environ, "PLAIT_CACHE": str(tmp_path / "cache")}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    run = subprocess.run([sys.executable, "-m", "plait", "eval", "--model", str(model_dir), "--data", str(corpus),
                          "--seq-len", str(SEQ), "--batch-size", str(BATCH), *layout],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    found = re.search(r"eval loss ([0-9.]+), perplexity ([0-9.]+)", run.stdout)
    assert found, run.stdout
    return float(found.group(1)), float(found.group(2))


@pytest.fixture(scope="module")
def expected_loss(model_and_corpus) -> float:
    return transformers_loss(*model_and_corpus)


def test_plait_eval_equals_transformers_loss(model_and_corpus, expected_loss, tmp_path):
    loss, perplexity = plait_eval(*model_and_corpus, tmp_path)
    assert loss == pytest.approx(expected_loss, rel=1e-4)
    assert perplexity == pytest.approx(math.exp(expected_loss), rel=1e-3)


def evaluate_on_rank(ctx, model_dir, corpus, cache_dir, zero):
    from plait.evaluate import evaluate_corpus

    os.environ["PLAIT_CACHE"] = str(cache_dir)
    return evaluate_corpus(str(model_dir), str(corpus), ctx, SEQ, BATCH, 1_000_000, zero=zero).loss


@pytest.mark.parametrize("dims, zero", [(ParallelDims(tp=2), 0), (ParallelDims(dp=2, pp=2), 3),
                                        (ParallelDims(dp=2, tp=2), 1)], ids=["tp2", "dp2 x pp2 zero3", "dp2 x tp2 zero1"])
def test_every_layout_evaluates_to_transformers_loss(pool, model_and_corpus, expected_loss, tmp_path, dims, zero):
    losses = pool.run(evaluate_on_rank, dims, *model_and_corpus, tmp_path / "cache", zero)
    assert losses == pytest.approx([expected_loss] * dims.world_size, rel=1e-4)


def test_plait_eval_refuses_bad_requests_in_one_line(model_and_corpus, tmp_path, capsys):
    from plait.cli import main

    model_dir, corpus = model_and_corpus
    for args, message in ((["--model", str(tmp_path / "none"), "--data", str(corpus)], "does not exist"),
                          (["--model", str(model_dir), "--data", str(corpus), "--seq-len", "4096"], "context"),
                          (["--model", str(model_dir), "--data", str(tmp_path / "nodata"), "--seq-len", "32"],
                           "does not exist")):
        code = main(["eval", *args])
        stderr = capsys.readouterr().err
        assert code == 2, (args, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, stderr)



def test_plait_eval_of_a_run_equals_transformers_on_its_export(model_and_corpus, tmp_path):
    """A run directory (its newest checkpoint, plait's own BPE) evaluates as its export does in transformers."""
    from plait.cli import main

    _, corpus = model_and_corpus
    env = {**os.environ, "PLAIT_CACHE": str(tmp_path / "cache")}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    train = subprocess.run([sys.executable, "-m", "plait", "train", "--model", "tiny", "--data", str(corpus),
                            "--vocab-size", "320", "--steps", "2", "--global-batch", "2", "--seq-len", "32",
                            "--checkpoint-every", "2", "--out", str(tmp_path / "run"), "--eval-every", "0",
                            "--no-progress", "--no-tensorboard", "--no-plot"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert train.returncode == 0, train.stderr
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--hf", str(tmp_path / "export")]) == 0
    loss, _ = plait_eval(tmp_path / "run", corpus, tmp_path)
    assert loss == pytest.approx(transformers_loss(tmp_path / "export", corpus), rel=1e-4)
