"""Pre-tokenisation throughput: ``plait tokenize`` with 1 and 2 workers against ``tokenizers``'
own ``encode_batch`` on the same corpus and tokenizer.

    python benchmarks/tokenize_speed.py [--data stdlib] [--rounds 2]

The tokenizer is plait's byte-level BPE of the corpus (8192 ids, trained once and cached), saved
in Hugging Face's format, so both sides load the same ``tokenizer.json``. ``tokenizers``: every
document read, then ``Tokenizer.encode_batch`` (its Rust thread pool) over all of them at once,
ids dropped (no file written): the library's best case. plait: the whole command's work in
process, reading, encoding in chunks, writing the .bin. Reported: MB of text per second and
tokens per second (median over the rounds, which alternate between the contestants).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="stdlib")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from tokenizers import Tokenizer

    from plait.data.corpus import open_text_corpus
    from plait.data.pretokenize import tokenize_corpus
    from plait.data.tokenizer import build_tokenizer

    corpus = open_text_corpus(args.data)
    megabytes = corpus.total_bytes() / 1e6
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_dir = Path(scratch) / "tok"
        build_tokenizer("bpe", corpus).save_pretrained(tokenizer_dir)
        raw = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))

        def run_tokenizers() -> int:
            texts = list(corpus.documents())
            return sum(len(encoding.ids) + 1 for encoding in raw.encode_batch(texts, add_special_tokens=True))

        def run_plait(workers: int) -> int:
            return tokenize_corpus(corpus, str(tokenizer_dir), Path(scratch) / "out.bin", workers).tokens

        contestants = {"tokenizers encode_batch": run_tokenizers, "plait tokenize, 1 worker": lambda: run_plait(1),
                       "plait tokenize, 2 workers": lambda: run_plait(2)}
        times: dict[str, list[float]] = {name: [] for name in contestants}
        tokens: dict[str, int] = {}
        for _ in range(args.rounds):
            for name, run in contestants.items():
                start = time.perf_counter()
                tokens[name] = run()
                times[name].append(time.perf_counter() - start)
    print(f"corpus {args.data}: {len(corpus)} files, {megabytes:.1f} MB; plait's BPE (8192), median of {args.rounds}")
    print("| contestant | time (s) | MB/s | tokens/s | tokens |")
    print("|---|---|---|---|---|")
    for name in contestants:
        seconds = statistics.median(times[name])
        print(f"| {name} | {seconds:.2f} | {megabytes / seconds:.2f} | {tokens[name] / seconds:,.0f} | {tokens[name]:,} |")


if __name__ == "__main__":
    main()
