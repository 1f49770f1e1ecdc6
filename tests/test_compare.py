"""`plait compare`: two layouts of one job, read back layout-free, against a dtype's tolerance."""
from __future__ import annotations

import pytest
import torch

from plait.compare import Comparison, RunResult, Tolerance, max_relative
from test_cli import run_plait, text_dir  # noqa: F401  (fixture)


@pytest.mark.large  # 18 s of four launches; make test's randomized layouts run compare's phases and Comparison
def test_compare_of_two_layouts_is_within_tolerance_and_exits_0(text_dir, tmp_path):  # noqa: F811
    work = tmp_path / "work"
    result = run_plait(["compare", "--model", "tiny", "--data", str(text_dir), "--tokenizer", "byte", "--seq-len", "32",
                        "--global-batch", "4", "--steps", "2", "--dtype", "float32", "--eval-every", "0",
                        "--layout-a", "--nproc 1", "--layout-b", "--nproc 2 --tp 2 --sequence-parallel",
                        "--work-dir", str(work)], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    report = result.stdout
    assert "SAME within tolerance" in report
    assert "first-step gradients: " in report and "final weights: " in report
    assert sum(1 for line in report.splitlines() if line.strip().split(" ")[0] in ("1", "2")) == 2  # loss rows
    assert (work / "a" / "first-step" / "COMPLETE").exists() and (work / "b" / "checkpoints").is_dir()


@pytest.mark.parametrize("args, message", [
    (["--layout-a", "--nproc 1", "--layout-b", "--nproc 2 --lr 1e-2"], "--layout-b sets --lr, which changes the job"),
    (["--out", "x", "--layout-a", "--nproc 1", "--layout-b", "--nproc 2"], "--out is set by plait compare"),
    (["--layout-a", "--nproc 1", "--layout-b", "--nproc 2 --tp 3"], "plait: error:"),
    (["--bogus", "1", "--layout-a", "--nproc 1", "--layout-b", "--nproc 2"], "unrecognized arguments: --bogus 1"),
])
def test_bad_compare_flags_are_one_line(args, message, tmp_path, capsys, monkeypatch):
    from plait.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--model", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def _result(scale: float = 1.0, loss_at: int | None = None) -> RunResult:
    torch.manual_seed(0)
    weights = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(8, 8) for i in range(12)}
    grads = {name: torch.randn(8, 8) for name in weights}
    losses = [5.0 - 0.1 * step for step in range(6)]
    if loss_at is not None:
        losses[loss_at - 1] *= 1.001
    weights["model.layers.10.mlp.down_proj.weight"][3, 3] *= scale
    return RunResult(losses, grads, weights)


def test_comparison_names_the_first_step_and_parameter_beyond_tolerance():
    tolerance = Tolerance.for_dtype("float32")
    assert Comparison.of(_result(), _result(), tolerance).ok
    differing = Comparison.of(_result(), _result(scale=1.01, loss_at=4), tolerance)
    failures = differing.failures()
    assert not differing.ok
    assert failures[0].startswith("loss at step 4:")
    assert failures[1].startswith("final weight model.layers.10.mlp.down_proj.weight: max relative difference")
    b = _result(loss_at=4)
    b.first_grads["model.layers.2.mlp.down_proj.weight"][0, 0] += 1.0
    in_time = Comparison.of(_result(), b, tolerance).failures()  # step 1's gradients come before step 4's loss
    assert in_time[0].startswith("first-step gradient of model.layers.2.mlp.down_proj.weight") and \
        in_time[1].startswith("loss at step 4")
    report = "\n".join(differing.report())
    assert "DIFFERENT: loss at step 4" in report and "beyond" in report
    assert len(differing.report()) < 25  # one screen
    long = RunResult([5.0] * 40, {}, {})
    late = RunResult([5.0] * 22 + [5.1] + [5.0] * 17, {}, {})
    table = [line.split()[0] for line in Comparison.of(long, late, tolerance).report()
             if line.split()[0].isdigit()]
    assert len(table) <= 10 and {"1", "23", "40"} <= set(table)  # first, first beyond (= worst), last


def test_tolerance_scales_with_the_dtype_and_max_relative_ignores_near_zero_elements():
    fp32, bf16 = Tolerance.for_dtype("float32"), Tolerance.for_dtype("bfloat16")
    assert fp32.loss < bf16.loss and fp32.grads < bf16.grads
    a = torch.tensor([1.0, 1e-9])
    assert max_relative(a, torch.tensor([1.0, 2e-9])) == pytest.approx(1e-9)  # relative to the largest element
    assert max_relative(torch.zeros(3), torch.zeros(3)) == 0.0
    assert max_relative(torch.zeros(3), torch.ones(3)) == float("inf")
