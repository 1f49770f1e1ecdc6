"""Greedy decoding speed: ``plait generate``'s KV-cached loop against ``transformers.generate``.

    python benchmarks/generate.py [--model small] [--prompt-tokens 32] [--new-tokens 128] [--rounds 3]

One Llama (plait's preset shape, random weights) is saved by transformers with
``save_pretrained``; plait loads that directory as ``plait generate`` does (``locate_model``,
``load_model``). Both decode greedily from the same prompt ids for exactly ``--new-tokens``
tokens (EOS does not stop either: plait gets no EOS id, transformers ``min_new_tokens``), fp32,
one process; the two alternate in each round (so machine drift hits both alike). Reported:
tokens per second of each (median over the rounds), the ratio of plait's time to transformers'
(target <= 1.0), and whether the two produced the same tokens.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="plait preset whose shape the model takes")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import transformers

    from plait.checkpoint.hf_config import hf_config_dict
    from plait.generate import Sampling, generate_ids, load_model, locate_model
    from plait.mesh import ParallelContext
    from plait.models import get_preset

    torch.set_num_threads(torch.get_num_threads())
    config = get_preset(args.model)
    fields = {k: v for k, v in hf_config_dict(config).items() if k not in ("architectures", "model_type")}
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "model"
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).save_pretrained(path)
        theirs = transformers.LlamaForCausalLM.from_pretrained(path).eval()
        ours = load_model(locate_model(path), ParallelContext.single())
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    sampling = Sampling(max_new_tokens=args.new_tokens, temperature=0)

    def run_plait() -> list[int]:
        return generate_ids(ours, prompt[0].tolist(), sampling, eos_id=None)

    def run_transformers() -> list[int]:
        with torch.no_grad():
            out = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=False)
        return out[0, args.prompt_tokens:].tolist()

    times: dict[str, list[float]] = {"plait": [], "transformers": []}
    tokens: dict[str, list[int]] = {}
    for round_index in range(args.rounds + 1):
        for name, run in (("plait", run_plait), ("transformers", run_transformers)):
            start = time.perf_counter()
            tokens[name] = run()
            if round_index:  # the first round warms both up
                times[name].append(time.perf_counter() - start)
    plait_s, hf_s = statistics.median(times["plait"]), statistics.median(times["transformers"])
    print(f"`{args.model}` ({config.num_parameters() / 1e6:.1f}M), fp32, one process "
          f"({torch.get_num_threads()} threads), prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"greedy; median of {args.rounds} rounds")
    print("| implementation | time (s) | tokens/s | ratio |")
    print("|---|---|---|---|")
    print(f"| plait generate | {plait_s:.3f} | {args.new_tokens / plait_s:.1f} | **{plait_s / hf_s:.2f}x** |")
    print(f"| transformers generate | {hf_s:.3f} | {args.new_tokens / hf_s:.1f} | |")
    print(f"same tokens: {tokens['plait'] == tokens['transformers']}")


if __name__ == "__main__":
    main()
