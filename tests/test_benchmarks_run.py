"""Every benchmark still runs, at its smallest (``make test-large``).

The benchmarks are not part of ``make test``, so one can rot unseen: ``benchmarks/planner.py``'s
machine part crashed for two weeks (``plait calibrate`` fitted a collective it never timed)
before a rerun found it. Each runs here with the least work its flags allow, in a subprocess,
and must exit 0 and print its table; the figures are the benchmarks' business, not this test's.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SMALLEST = {
    "single_rank": ["--model", "tiny", "--steps", "1", "--seq-len", "64", "--dtypes", "float32"],
    "generate": ["--model", "tiny", "--rounds", "1", "--new-tokens", "4", "--prompt-tokens", "8"],
    "sequence_parallel_memory": ["--model", "tiny"],
    "pipeline": ["--steps", "1", "--microbatches", "2", "--seq-len", "64", "--batch", "4"],
    "zero": ["--part", "speed", "--steps", "1", "--dtypes", "float32"],
    "context_parallel": ["--part", "all", "--steps", "1", "--seq-len", "256", "--memory-seqs", "256",
                         "--cp-sizes", "1,2"],
    "planner": ["--part", "paper"],
    "tokenize_speed": ["--rounds", "1"],
}


@pytest.mark.large
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(SMALLEST))
def test_the_benchmark_runs(name, tmp_path):
    env = {**os.environ, "PLAIT_CACHE": str(tmp_path / "cache")}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *SMALLEST[name]], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "|---|" in result.stdout, result.stdout[-2000:]
