"""``make gpu-check DEVICE=cpu``: the GPU machine's one command runs here first, every section,
so that it works the first time a GPU appears (benchmarks/gpu_check.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_check import CPU_SHAPES, CUDA_SHAPES  # noqa: E402
from gpu_check_multi import MULTI_RANK_LAYOUTS  # noqa: E402
SECTIONS = ["environment", "tests", "cpu_match", "device_policy", "throughput", "memory", "profile",
            "multi_rank", "context_parallel"]


@pytest.mark.timeout(600)
def test_gpu_check_runs_every_section_on_the_cpu(tmp_path):
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path / "out")}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=580)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    sections = report["sections"]
    assert list(sections) == SECTIONS
    assert {name: figures["status"] for name, figures in sections.items()} == dict.fromkeys(SECTIONS, "ok")
    assert sections["cpu_match"]["max_loss_rel_error"] == 0.0  # the CPU against itself: bit for bit
    assert "no CUDA device is visible" in sections["device_policy"]["message"]
    layouts = sections["multi_rank"]["layouts"]
    assert set(layouts) == set(CPU_SHAPES.layouts) and set(CUDA_SHAPES.layouts) == set(MULTI_RANK_LAYOUTS)
    assert all(v["ok"] for v in layouts.values())
    assert sections["context_parallel"]["plait_rel_error"] <= 1e-5 and "torch_s" not in sections["context_parallel"]
    names = {row["implementation"] for row in sections["throughput"]["rows"]}
    assert {"plait", "transformers", "plait compiled", "transformers compiled",
            "ratio plait compiled / transformers compiled"} <= names
    assert sections["memory"]["measured_gb"] > 0 and sections["memory"]["predicted_gb"] > 0
    for step in sections["profile"]["steps"].values():  # each kind's time adds up to the busy time
        assert step["ms_by_kind"]["matrix products"] > 0 and step["ms_by_kind"]["attention"] > 0
        assert abs(sum(step["ms_by_kind"].values()) - 1e3 * step["busy_s"]) < 1e-6 * step["busy_s"] + 1e-9
        assert 0 < step["busy_s"] <= step["wall_s"] and step["top_ops"][0]["ms"] > 0
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| section | status | seconds | result |" in markdown and "| tiny | 2 x 64 | plait compiled |" in markdown
    assert "| kind | plait | transformers |" in markdown and "| op | calls | ms | kind |" in markdown


def test_results_are_on_disk_after_every_section(tmp_path):
    """The lent machine's time may run out mid-run: what the finished sections measured stays."""
    import torch
    from gpu_check import Check

    check = Check(torch.device("cpu"), CPU_SHAPES, budget_s=60.0, out=tmp_path)
    check.run("first", lambda _: {"value": 1}, 0)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["sections"]["first"]["value"] == 1
    assert "| first | ok |" in (tmp_path / "results.md").read_text()
    check.run("second", lambda _: 1 / 0, 0)
    second = json.loads((tmp_path / "results.json").read_text())["sections"]["second"]
    assert second["status"] == "failed" and "ZeroDivisionError" in second["error"]


def test_the_report_renders_what_only_a_gpu_run_has(tmp_path):
    """Figures that only CUDA produces (datasheet MFU, the planner's step, 2+ GPUs' sections,
    torch's context_parallel, the device's capacity) render in results.md: a formatting error
    there would end the one GPU run at its first save."""
    import torch
    from gpu_check import Check
    from gpu_check_report import OP_KINDS, markdown

    step = {"wall_s": 0.2, "busy_s": 0.18, "ms_by_kind": {kind: 36.0 for kind, _ in [*OP_KINDS, ("other", ())]},
            "top_ops": [{"op": "aten::mm", "calls": 700, "ms": 110.0}]}
    row = {"model": "llama-1b", "batch": 8, "seq_len": 2048, "step_s": 0.2, "tokens_per_s": 81920.0, "mfu": 0.6}
    check = Check(torch.device("cpu"), CUDA_SHAPES, budget_s=480.0, out=tmp_path)
    check.results = {
        "environment": {"status": "ok", "torch": "2.11.0+cu130", "gpu": "NVIDIA H200", "gpus": 2,
                        "ring_attention_kernel": "flash (cuda)", "transformers": "5.17.0"},
        "tests": {"status": "ok", "summary": "43 passed in 30s", "seconds": 40.0},
        "cpu_match": {"status": "ok", "steps": 10, "max_loss_rel_error": 2e-7, "max_param_rel_error": 3e-6,
                      "tolerance": 1e-5},
        "device_policy": {"status": "ok", "command": "plait train --model tiny --nproc 3", "exit_code": 2,
                          "message": "plait: error: 3 ranks on this host but 2 visible GPUs"},
        "throughput": {"status": "ok", "dtype": "bfloat16", "profile": "h200", "matmul_peak_tflops": 760.0,
                       "datasheet_peak_tflops": 989.0, "rows": [
                           {**row, "implementation": "plait", "mfu_datasheet": 0.46, "planner_step_s": 0.178},
                           {**row, "implementation": "transformers", "mfu_datasheet": 0.40},
                           {**row, "implementation": "ratio plait / transformers", "ratio": 0.87},
                           {**row, "implementation": "ratio plait compiled / plait", "ratio": 0.93,
                            "alternated": False}]},
        "memory": {"status": "ok", "model": "llama-1b", "measured_gb": 35.2, "what": "max_memory_allocated",
                   "predicted_gb": 37.4, "profile": "h200", "ratio_measured_over_predicted": 0.94,
                   "capacity_gb": {"profile": 141.0, "device": 150.1}},
        "profile": {"status": "ok", "model": "llama-1b", "batch": 8, "seq_len": 2048, "time": "self device time",
                    "steps": {"plait": step, "transformers": step}},
        "multi_rank": {"status": "failed", "steps": 10, "layouts": {"dp2": {"max_loss_rel_error": 1e-7, "ok": True},
                                                                    "tp2 + SP": {"max_loss_rel_error": 3e-5, "ok": False}},
                       "allreduce_backend": "nccl", "allreduce_mb": 256, "allreduce_bus_gb_s": 355.0},
        "context_parallel": {"status": "ok", "shape": [1, 32, 16384, 64], "plait_rel_error": 4e-3, "plait_s": 0.011,
                             "torch_rel_error": 4e-3, "torch_s": 0.013, "plait_over_torch": 0.85},
        "later": {"status": "skipped", "why": "40 s needed, 12 s of the budget left"},
        "broken": {"status": "failed", "error": "RuntimeError: a | b\nsecond line"},
    }
    text = markdown(check.results, check.device, check.elapsed())
    assert "`make gpu-check` on NVIDIA H200" in text and "NVIDIA H200 x 2" in text
    assert "| llama-1b | 8 x 2048 | plait | 0.200 | 81920 | 60.0% | 46.0% | 0.178 (h200) |" in text
    assert "**ratio plait compiled / plait** (timed in separate alternations) | **0.930**" in text
    assert "capacity 150.1 GB on the device, 141 GB in the profile" in text
    assert "tp2 + SP 3.0e-05" in text and "355.0 GB/s bus (nccl)" in text and "plait / torch 0.85" in text
    assert "| broken | failed |  | RuntimeError: a / b |" in text and "| later | skipped |" in text
    assert "| matrix products | 36.0 | 36.0 |" in text and "| `aten::mm` | 700 | 110.0 | matrix products |" in text


def test_contestants_alternate_together_unless_memory_splits_eager_from_compiled():
    from plait.models import get_preset
    from single_rank import CONTESTANTS, alternation_groups

    config = get_preset("llama-1b")
    assert alternation_groups(CONTESTANTS, config, 4, 2048, None) == [CONTESTANTS]  # the CPU
    assert alternation_groups(CONTESTANTS, config, 4, 2048, 140e9) == [CONTESTANTS]  # an H200
    assert alternation_groups(CONTESTANTS, config, 4, 2048, 50e9) == [("plait", "transformers"),
                                                                      ("plait compiled", "transformers compiled")]
    assert alternation_groups(CONTESTANTS[:2], config, 4, 2048, 50e9) == [("plait", "transformers")]


def test_a_group_that_runs_out_of_memory_is_halved_and_its_ratio_says_so(monkeypatch):
    """On a GPU the memory count may be short: the group is timed in halves, not lost."""
    import single_rank
    import torch
    from plait.models import get_preset

    timed = []
    real = single_rank.time_interleaved

    def short_of_memory(runs, *args, **kwargs):
        if len(runs) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        timed.append(tuple(runs))
        return real(runs, *args, **kwargs)

    monkeypatch.setattr(single_rank, "time_interleaved", short_of_memory)
    rows = single_rank.compare(get_preset("tiny"), torch.device("cpu"), torch.float32, 2, 32, 1, False, 1e12)
    assert timed == [("plait",), ("transformers",)]
    assert [row["implementation"] for row in rows] == ["plait", "transformers", "ratio plait / transformers"]
    assert rows[2]["alternated"] is False and rows[2]["ratio"] > 0
    monkeypatch.setattr(single_rank, "time_interleaved", lambda *a, **k: short_of_memory({"a": 0, "b": 0}))
    with pytest.raises(torch.OutOfMemoryError):  # one contestant alone that does not fit: the error
        single_rank.compare(get_preset("tiny"), torch.device("cpu"), torch.float32, 2, 32, 1, False, 1e12)


def test_the_planners_step_for_the_gpu_rows_is_a_physical_one():
    """The figure plait's measured GPU step is held against: no faster than the datasheet peak
    allows for the model's FLOPs, and not absurdly slow (the planner predicts ~45% MFU eager)."""
    from gpu_check import planner_step_s
    from plait.models import get_preset
    from plait.planner.hardware import load_profile

    config, hardware = get_preset("llama-1b"), load_profile("h200")
    step = planner_step_s(config, 4, 2048, hardware)
    mfu = config.flops_per_token(2048) * 4 * 2048 / step / hardware.peak("bfloat16")
    assert 0.2 < mfu < 1.0, mfu
