"""``plait generate`` and ``plait eval``: use a trained model (a run, a checkpoint or a Hugging
Face directory); ``plait tokenize``: pre-tokenise a corpus with a model's tokenizer. Like ``plait train``, the parent checks what it can and launches ``--nproc``
local workers (or runs under ``torchrun``); each worker joins the job and does its part."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from plait.device import DeviceRequest
from plait.errors import PlaitError
from plait.train.config import DTYPES

MODEL_HELP = "a run directory (its newest checkpoint), a checkpoint, or a Hugging Face Llama directory"


def add_commands(commands) -> None:
    generate = commands.add_parser(
        "generate", help="continue a prompt with a trained model (KV-cached sampling)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Encode --prompt with the model's tokenizer, sample up to --max-new-tokens tokens with a KV "
                    "cache and print the continuation. --temperature 0 is greedy (the tokens of transformers' "
                    "greedy generate on the same weights). --nproc N --tp N splits the model over N processes.")
    _add_model_flags(generate, [("--nproc", 1, "local processes (each holds 1/tp of the model)"),
                                ("--tp", 1, "tensor-parallel size (= --nproc)")])
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="tokens to add at most (EOS stops earlier)")
    generate.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0: greedy")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus: the smallest set of probability >= p")
    generate.add_argument("--seed", type=int, default=0, help="seed of the sampling")

    evaluate = commands.add_parser(
        "eval", help="mean token loss and perplexity of a model on a corpus",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Encode --data with the model's tokenizer, cut it into windows of --seq-len + 1 tokens (each "
                    "token predicted once) and print the mean token loss and the perplexity. Any layout: --nproc N "
                    "with --dp / --tp / --pp / --zero as plait train.")
    _add_model_flags(evaluate, [("--nproc", 1, "local processes"), ("--dp", None, "data-parallel size"),
                                ("--tp", 1, "tensor-parallel size"), ("--pp", 1, "pipeline-parallel size"),
                                ("--zero", 0, "ZeRO level (3: parameters gathered per block)")])
    evaluate.add_argument("--data", required=True, help="as plait train --data: text, .jsonl, .parquet, a "
                                                        "directory, stdlib, a .bin, or a mixture (all of it is read)")
    evaluate.add_argument("--field", default="text", help="the text field of .jsonl records / .parquet rows")
    evaluate.add_argument("--tokenizer", default=None, help="tokenizer file or directory (default: the model's)")
    evaluate.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    evaluate.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    evaluate.add_argument("--max-batches", type=int, default=1_000_000, help="evaluate at most this many batches")
    add_tokenize_command(commands)


def _add_model_flags(parser: argparse.ArgumentParser, layout: list[tuple[str, int | None, str]]) -> None:
    """What every command that runs a trained model takes: the model, its dtype, the layout, a timeout."""
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the weights and compute")
    for flag, default, text in layout:
        parser.add_argument(flag, type=int, default=default, help=text)
    parser.add_argument("--timeout", dest="timeout_s", type=float, default=300.0, help="seconds a collective may wait")
    parser.add_argument("--device", choices=[request.value for request in DeviceRequest], default="auto",
                        help="auto (CUDA when a GPU is visible), cuda (one GPU per local rank) or cpu")


def add_tokenize_command(commands) -> None:
    tokenize = commands.add_parser(
        "tokenize", help="pre-tokenize a corpus into a .bin of token ids (all cores)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Encode --data (text files, directories, .jsonl, .parquet) with --tokenizer into -o OUT.bin "
                    "(uint16 ids; OUT.u32.bin for vocabularies over 65536): each document's ids, then EOS, in "
                    "file order, as plait train encodes text. Streams with bounded memory; written atomically.")
    tokenize.add_argument("--data", required=True, help="'stdlib', a text / .jsonl / .parquet file, or a directory")
    tokenize.add_argument("--tokenizer", required=True,
                          help="a Hugging Face tokenizer (tokenizer.json or its directory), or 'bpe' / 'byte'")
    tokenize.add_argument("-o", "--output", required=True, help="the .bin (or .u32.bin) to write")
    tokenize.add_argument("--field", default="text", help="the text field of .jsonl records / .parquet rows")
    tokenize.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes encoding in parallel")
    tokenize.add_argument("--vocab-size", type=int, default=8192, help="with --tokenizer bpe: its vocabulary")
    tokenize.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")


def tokenize_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from plait.data.corpus import open_text_corpus
    from plait.data.pretokenize import tokenize_corpus

    try:
        corpus = open_text_corpus(args.data, field=args.field)
        result = tokenize_corpus(corpus, args.tokenizer, Path(args.output), args.workers, args.vocab_size,
                                 show_progress=args.progress)
    except PlaitError as error:
        print(f"plait: error: {error}", file=sys.stderr)
        return 2
    print(f"plait: wrote {args.output}: {result.tokens:,} {result.dtype} token ids from {result.text_bytes / 1e6:.1f} MB "
          f"in {result.seconds:.1f} s ({result.text_bytes / 1e6 / result.seconds:.2f} MB/s, "
          f"{result.tokens / result.seconds:,.0f} tokens/s, {args.workers} workers)")
    return 0


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from plait.launch import launch_local_workers, under_launcher
    from plait.device import host_device_plan
    from plait.generate import GenerateError, Sampling, locate_model
    from plait.mesh import ParallelDims

    worker: Callable
    try:
        if args.command == "generate":
            sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
            if not under_launcher() and args.tp != args.nproc:
                raise GenerateError(f"--tp {args.tp} must equal --nproc {args.nproc} (generation has no data or "
                                    "pipeline parallelism)")
            dims = dict(dp=1, pp=1, tp=args.tp)
            worker = lambda ctx: _generate(args, sampling, ctx)  # noqa: E731
        else:
            for name in ("seq_len", "batch_size", "max_batches"):
                if getattr(args, name) < 1:
                    raise GenerateError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
            dims = dict(dp=args.dp, pp=args.pp, tp=args.tp)
            worker = lambda ctx: _evaluate(args, ctx)  # noqa: E731
        if args.nproc < 1:
            raise GenerateError(f"--nproc must be >= 1, got {args.nproc}")
        if not under_launcher():
            ParallelDims.from_world_size(args.nproc, **dims)
            host_device_plan(args.device, local_ranks=args.nproc)
            locate_model(args.model)
    except PlaitError as error:
        print(f"plait: error: {error}", file=sys.stderr)
        return 2
    if args.nproc > 1 and not under_launcher():
        return launch_local_workers(args.nproc, 0, argv)
    return _worker(dims, args.timeout_s, args.device, worker)


def _worker(dims: dict, timeout_s: float, device: str, body: Callable) -> int:
    """Join the job, run ``body(ctx)``, exit as ``plait train``'s workers do; user errors in one line."""
    from plait.mesh import init_distributed, shutdown

    ctx, code = None, 0
    try:
        ctx = init_distributed(dims["dp"], dims["pp"], dims["tp"], timeout_s, device)
        body(ctx)
    except PlaitError as error:
        print(f"plait: error: {error}", file=sys.stderr)
        code = 2
    if ctx is not None and ctx.world_size > 1:
        sys.stdout.flush()
        if code:
            os._exit(code)
        shutdown(ctx, code)
    return code


def _generate(args: argparse.Namespace, sampling, ctx) -> None:
    import torch

    from plait.generate import generate_ids, load_model, load_tokenizer, locate_model

    files = locate_model(args.model)
    tokenizer = load_tokenizer(files)
    model = load_model(files, ctx, torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)
    new = generate_ids(model, tokenizer.encode(args.prompt), sampling, tokenizer.eos_id, ctx)
    if ctx.rank == 0:
        print(tokenizer.decode(new), flush=True)


def _evaluate(args: argparse.Namespace, ctx) -> None:
    from plait.evaluate import evaluate_corpus

    result = evaluate_corpus(args.model, args.data, ctx, args.seq_len, args.batch_size, args.max_batches,
                             args.tokenizer, args.dtype, args.zero, args.field)
    if ctx.rank == 0:
        print(f"plait: eval loss {result.loss:.6f}, perplexity {result.perplexity:.4f} over {result.tokens:,} "
              f"tokens ({result.windows} windows of {args.seq_len})", flush=True)
