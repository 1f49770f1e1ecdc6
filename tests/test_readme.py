"""README's Python snippets run as written, from a fresh directory."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(containing: str) -> str:
    blocks = [block for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if containing in block]
    assert len(blocks) == 1, f"README.md has {len(blocks)} Python blocks containing {containing!r}"
    return blocks[0]


def run(code: str, directory: Path, nproc: int = 1) -> list[list[str]]:
    """Each process's printed words (under torch.distributed.run with ``nproc`` > 1)."""
    (directory / "snippet.py").write_text(code)
    logs = directory / "logs"
    launcher = (["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                 f"--log-dir={logs}", "--redirects=1"] if nproc > 1 else [])
    done = subprocess.run([sys.executable, *launcher, "snippet.py"], cwd=directory, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    if nproc == 1:
        return [done.stdout.split()]
    return [next(logs.rglob(f"attempt_0/{rank}/stdout.log")).read_text().split() for rank in range(nproc)]


def test_tensor_parallel_snippet_runs_under_torchrun(tmp_path):  # ~12 s
    code = snippet("parallelize(")
    assert "--nproc-per-node 2" in code
    first, second = run(code, tmp_path, nproc=2)
    assert len(first) == 1 and first == second  # both ranks hold the same full output
    assert "init_distributed(tp=2)" in code
    ((alone,),) = run(code.replace("init_distributed(tp=2)", "init_distributed()"), tmp_path)  # the plain MLP
    assert float(first[0]) == pytest.approx(float(alone), rel=1e-5, abs=1e-6)


@pytest.mark.large  # ~15 s: 50 steps of tiny
def test_quickstart_snippet_runs(tmp_path):
    (printed,) = run(snippet("Trainer("), tmp_path)
    losses = [float(value) for value in printed]
    assert len(losses) == 50 and losses[-1] < losses[0]
