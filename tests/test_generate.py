"""plait generate: KV-cached decoding equals the uncached model, greedy decoding equals
transformers' greedy generate on the same weights, on one process and at tp=2."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_tokenizers import llama_like_tokenizer  # noqa: E402

from plait.generate import GenerateError, Sampling, generate_ids, next_token  # noqa: E402
from plait.models import build_model, get_preset  # noqa: E402
from plait.models.llama import KVCache  # noqa: E402


def test_cached_decoding_gives_the_logits_of_the_whole_sequence():
    config = get_preset("tiny").replace(vocab_size=96, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = build_model(config).eval()
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(config.num_hidden_layers)
        pieces = [model(ids[:, :7], cache), model(ids[:, 7:12], cache)]  # a prompt, then a block of 5
        pieces += [model(ids[:, i:i + 1], cache) for i in range(12, 20)]  # then one token at a time
    assert cache.length == 20
    assert torch.allclose(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_sampling_rules():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    generator = torch.Generator().manual_seed(0)
    assert next_token(logits, Sampling(temperature=0), generator) == 1
    assert all(next_token(logits, Sampling(top_k=1), generator) == 1 for _ in range(20))
    assert {next_token(logits, Sampling(top_k=2), generator) for _ in range(200)} == {1, 3}
    # top-p 0.5: token 1 alone holds less than half, 1 and 3 together more
    assert {next_token(logits, Sampling(top_p=0.5), generator) for _ in range(200)} == {1, 3}
    draws = [[next_token(logits, Sampling(seed=5), torch.Generator().manual_seed(5)) for _ in range(3)]]
    assert draws == [[next_token(logits, Sampling(seed=5), torch.Generator().manual_seed(5)) for _ in range(3)]]
    for bad in (dict(max_new_tokens=0), dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5)):
        with pytest.raises(GenerateError):
            Sampling(**bad)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "model"
    torch.manual_seed(11)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0, eos_token_id=1))
    with torch.no_grad():  # larger q, k: attention (and so the cache and RoPE positions) matters
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    model.save_pretrained(path)
    llama_like_tokenizer(path)
    return path


def transformers_greedy(path, prompt: str, new_tokens: int) -> tuple[list[int], str]:
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    if new and new[-1] == tokenizer.eos_token_id:
        new = new[:-1]
    return new, tokenizer.decode(new, skip_special_tokens=True)


def test_greedy_generate_equals_transformers_for_32_tokens(hf_model):
    from plait.generate import load_model, load_tokenizer, locate_model
    from plait.mesh import ParallelContext

    files = locate_model(hf_model)
    tokenizer = load_tokenizer(files)
    model = load_model(files, ParallelContext.single())
    for prompt in ("def add(a, b):", "class Point:"):
        theirs, _ = transformers_greedy(hf_model, prompt, 32)
        ours = generate_ids(model, tokenizer.encode(prompt), Sampling(max_new_tokens=32, temperature=0),
                            tokenizer.eos_id)
        assert ours == theirs and len(ours) > 8
    with pytest.raises(GenerateError, match="as long as the model's context"):
        generate_ids(model, [5] * 128, Sampling(), tokenizer.eos_id)


def run_plait(args, timeout=240):
    env = dict(os.environ)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "plait", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


@pytest.mark.parametrize("layout", [[], ["--nproc", "2", "--tp", "2"]], ids=["1 process", "tp2"])
def test_plait_generate_prints_transformers_greedy_continuation(hf_model, layout):
    _, text = transformers_greedy(hf_model, "def add(a, b):", 32)
    run = run_plait(["generate", "--model", str(hf_model), "--prompt", "def add(a, b):", "--temperature", "0",
                     "--max-new-tokens", "32", *layout])
    assert run.returncode == 0, run.stderr
    assert run.stdout.rstrip("\n").split("\n")[-1] == text.split("\n")[-1]
    assert text in run.stdout


def test_plait_generate_refuses_bad_requests_in_one_line(hf_model, tmp_path, capsys):
    from plait.cli import main

    for args, message in ((["--model", str(tmp_path / "nothing")], "does not exist"),
                          (["--model", str(hf_model), "--prompt", "x " * 200], "context"),
                          (["--model", str(hf_model), "--top-p", "0"], "--top-p"),
                          (["--model", str(hf_model), "--nproc", "2"], "must equal --nproc")):
        if "--prompt" not in args:
            args = [*args, "--prompt", "hi"]
        code = main(["generate", *args])  # in this process: every check runs before any launch
        stderr = capsys.readouterr().err
        assert code == 2, (args, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, stderr)
